"""Our `convert` (default, FastVideo keys) against FastVideo's own converter, pinned as golden data.

tests/golden/fastvideo/ holds what FastVideo's scripts/checkpoint_conversion/longcat_to_fastvideo.py
wrote for `synth --preset tiny --seed 0` (commit and commands: README.md and provenance.json there;
regenerate by hand with tests/golden/generate_fastvideo.py, never in CI). Each test synthesizes the
same input, converts it with our CLI and compares per tensor (name, dtype, shape, sha256 of the raw
bytes as stored), per JSON field and per copied file. Intended differences, as the README says:
our transformer is sharded with an index (FastVideo writes one transformer/model.safetensors), and
we add checksums.sha256, lora/adapters.json and safetensors __metadata__ in our files.

Only the CLI is used (`python -m longcat_tools`), and the golden files are found from this file,
so the tests run the same against the installed wheel from any folder.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parent / "golden" / "fastvideo"
REGEN = "tests/golden/generate_fastvideo.py"
TENSOR_DIRS = ["transformer", "lora/distilled", "lora/refinement"]
JSON_FILES = ["model_index.json", "transformer/config.json"]
# files only we write, on purpose (README `convert`: "it differs only by sharding, the index, the
# checksums and the adapter registry")
OURS_ONLY = {"checksums.sha256", "lora/adapters.json"}


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "longcat_tools", *args], capture_output=True,
                       text=True)
    if check and r.returncode != 0:
        pytest.fail(f"longcat-tools {' '.join(args)} exited {r.returncode}:\n{r.stderr[-3000:]}")
    return r


def golden(name: str):
    return json.loads((GOLDEN / name).read_text())


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_tensors(path: Path) -> tuple[dict, dict[str, dict]]:
    """(metadata, {name: {dtype, shape, sha256}}) from the raw safetensors bytes (no library)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", None) or {}
    out = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        out[name] = {"dtype": info["dtype"], "shape": info["shape"],
                     "sha256": hashlib.sha256(raw[8 + n + start:8 + n + end]).hexdigest()}
    return meta, out


def tensors_in(folder: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for f in sorted(folder.glob("*.safetensors")):
        _, ts = read_tensors(f)
        dup = set(out) & set(ts)
        assert not dup, f"{folder}: tensors in more than one file: {sorted(dup)[:5]}"
        out.update({k: {**v, "file": f.name} for k, v in ts.items()})
    return out


def synth_drift(native: Path) -> list[str]:
    """Files of our synth output that differ from the input the golden data was made from."""
    want = golden("inputs.json")
    have = {p.relative_to(native).as_posix(): p for p in native.rglob("*") if p.is_file()}
    drift = [f"missing {r}" for r in sorted(set(want) - set(have))]
    drift += [f"extra {r}" for r in sorted(set(have) - set(want))]
    drift += [f"changed {r}" for r in sorted(set(want) & set(have))
              if sha256_file(have[r]) != want[r]["sha256"]]
    return drift


def require_same_inputs(native: Path) -> None:
    drift = synth_drift(native)
    if drift:
        pytest.fail("synth drifted: `synth --preset tiny --seed 0` no longer writes the input the "
                    f"FastVideo golden data was made from ({'; '.join(drift[:8])}). If the change "
                    f"is intended, regenerate with {REGEN}; no converter comparison is possible "
                    "until then.")


def compare_tensors(ours: dict[str, dict], want: dict[str, dict], what: str) -> None:
    problems = [f"missing (FastVideo writes it): {k}" for k in sorted(set(want) - set(ours))]
    problems += [f"extra (FastVideo does not write it): {k}" for k in sorted(set(ours) - set(want))]
    for k in sorted(set(want) & set(ours)):
        for field in ("dtype", "shape", "sha256"):
            if ours[k][field] != want[k][field]:
                problems.append(f"{k}: {field} {ours[k][field]} != FastVideo's {want[k][field]}")
    assert not problems, f"{what}: {len(problems)} difference(s) from FastVideo:\n  " + \
        "\n  ".join(problems[:40])


def compare_json(ours: dict, want: dict, what: str) -> None:
    problems = [f"missing field {k!r} (FastVideo: {want[k]!r})" for k in want if k not in ours]
    problems += [f"extra field {k!r} = {ours[k]!r}" for k in ours if k not in want]
    problems += [f"{k!r}: {ours[k]!r} != FastVideo's {want[k]!r}"
                 for k in want if k in ours and ours[k] != want[k]]
    assert not problems, f"{what}:\n  " + "\n  ".join(problems)


@pytest.fixture(scope="module")
def native(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fvgold") / "native"
    cli("synth", str(path), "--preset", "tiny", "--seed", "0", "-q")
    return path


@pytest.fixture(scope="module")
def converted(native) -> Path:
    dst = native.parent / "converted"
    cli("convert", "--src", str(native), "--dst", str(dst), "-q")
    return dst


def test_golden_data_present():
    prov = golden("provenance.json")
    assert len(prov["fastvideo"]["commit"]) == 40
    assert prov["fastvideo"]["commit"] in (GOLDEN / "README.md").read_text()
    tensors = golden("tensors.json")
    assert sorted(tensors) == sorted(TENSOR_DIRS)
    assert len(tensors["transformer"]["tensors"]) == 68  # 56 native tensors, qkv/kv split


def test_synth_input_matches_golden(native):
    """Fails alone (with the others) when synth changed rather than convert."""
    require_same_inputs(native)


def test_transformer_tensors_match_fastvideo(native, converted):
    require_same_inputs(native)
    want = golden("tensors.json")["transformer"]["tensors"]
    ours = tensors_in(converted / "transformer")
    compare_tensors(ours, want, "transformer")
    # our index names exactly these tensors, each in the shard that holds it
    index = json.loads((converted / "transformer/diffusion_pytorch_model.safetensors.index.json")
                       .read_text())
    assert index["weight_map"] == {k: v["file"] for k, v in ours.items()}


def test_sharded_transformer_matches_fastvideo_per_tensor(native, tmp_path):
    """Several shards (200 KB each) hold the same tensors as FastVideo's single file."""
    require_same_inputs(native)
    dst = tmp_path / "sharded"
    cli("convert", "--src", str(native), "--dst", str(dst), "--max-shard-size", "200KB", "-q")
    ours = tensors_in(dst / "transformer")
    assert len({v["file"] for v in ours.values()}) > 1
    compare_tensors(ours, golden("tensors.json")["transformer"]["tensors"], "transformer (sharded)")


@pytest.mark.parametrize("sub", ["lora/distilled", "lora/refinement"])
def test_lora_tensors_match_fastvideo(native, converted, sub):
    require_same_inputs(native)
    want = golden("tensors.json")[sub]
    assert sorted(p.name for p in (converted / sub).glob("*.safetensors")) == want["files"]
    compare_tensors(tensors_in(converted / sub), want["tensors"], sub)


@pytest.mark.parametrize("rel", JSON_FILES)
def test_json_matches_fastvideo(native, converted, rel):
    """Field by field. Not compared: formatting (FastVideo's json.dump ends without a newline)."""
    require_same_inputs(native)
    want = json.loads((GOLDEN / "json" / rel).read_text())
    compare_json(json.loads((converted / rel).read_text()), want, rel)


def test_file_set_and_copied_files_match_fastvideo(native, converted):
    require_same_inputs(native)
    outputs = golden("outputs.json")
    theirs = set(outputs) - {"transformer/model.safetensors"}
    ours = {p.relative_to(converted).as_posix() for p in converted.rglob("*") if p.is_file()}
    ours_shards = {r for r in ours if r.startswith("transformer/diffusion_pytorch_model")}
    assert ours_shards, "no transformer shards"
    assert ours - ours_shards - OURS_ONLY == theirs
    # vae, text_encoder, tokenizer, scheduler: byte for byte what FastVideo copies
    for rel, info in outputs.items():
        if "copy_of_input" in info:
            assert sha256_file(converted / rel) == info["sha256"], rel


def build_fastvideo_layout(converted: Path, dst: Path) -> Path:
    """FastVideo's single-file layout, rebuilt from our output: one transformer/model.safetensors,
    LoRA files without metadata, FastVideo's JSON files, no index/checksums/adapters.json.
    The tensors are then checked against the golden digests, so this IS FastVideo's content."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(converted, dst, ignore=shutil.ignore_patterns(
        "diffusion_pytorch_model*", "checksums.sha256", "adapters.json", "*.safetensors"))
    tensors = {}
    for f in sorted((converted / "transformer").glob("*.safetensors")):
        tensors.update(load_file(f))
    save_file(tensors, dst / "transformer" / "model.safetensors")
    for rel in golden("outputs.json"):
        if rel.endswith(".safetensors") and rel != "transformer/model.safetensors":
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            src = converted / rel
            if rel.startswith("lora/"):
                save_file(load_file(src), dst / rel)
            else:
                shutil.copyfile(src, dst / rel)
    for rel in JSON_FILES:
        shutil.copyfile(GOLDEN / "json" / rel, dst / rel)
    for rel, info in golden("outputs.json").items():
        if "copy_of_input" in info:
            assert sha256_file(dst / rel) == info["sha256"], rel
    want = golden("tensors.json")
    for sub in TENSOR_DIRS:
        compare_tensors(tensors_in(dst / sub), want[sub]["tensors"], f"rebuilt {sub}")
    assert {p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file()} == \
        set(golden("outputs.json"))
    return dst


def test_fastvideo_layout_verifies_and_converts_back(native, converted, tmp_path):
    """The reverse direction: FastVideo's output is read by our verify and convert --to native."""
    require_same_inputs(native)
    fv = build_fastvideo_layout(converted, tmp_path / "fv")
    r = cli("verify", str(fv), "--deep", "--strict", "--json")
    report = json.loads(r.stdout)
    assert (report["layout"], report["flavour"], report["ok"]) == \
        ("fastvideo-single", "fastvideo", True)
    back = tmp_path / "back"
    cli("convert", "--src", str(fv), "--dst", str(back), "--to", "native", "-q")
    def digests(files):
        return {f.name: read_tensors(f)[1] for f in files}

    got = {k: {f: v[f] for f in ("dtype", "shape", "sha256")}
           for k, v in tensors_in(back / "dit").items()}
    want = {k: {f: v[f] for f in ("dtype", "shape", "sha256")}
            for k, v in tensors_in(native / "dit").items()}
    assert got == want, "dit: FastVideo layout -> native is not bit-identical to the input"
    names = ["cfg_step_lora.safetensors", "refinement_lora.safetensors"]
    assert digests(back / "lora" / n for n in names) == \
        digests(native / "lora" / n for n in names), \
        "lora: FastVideo's LoRA files -> native are not bit-identical to the input"


@pytest.mark.slow
def test_fastvideo_layout_runs_like_ours(native, converted, tmp_path):
    """`run` on FastVideo's layout (distilled LoRA from lora/distilled/) gives the same latents,
    bit for bit, as on our converted checkpoint."""
    require_same_inputs(native)
    fv = build_fastvideo_layout(converted, tmp_path / "fv")
    from safetensors.torch import load_file

    latents = {}
    for name, ck in (("fastvideo", fv), ("ours", converted)):
        lat = tmp_path / f"{name}.safetensors"
        cli("run", "-m", str(ck), "--prompt", "a red ball", "--distill", "--steps", "2",
            "--frames", "5", "--height", "32", "--width", "32", "--device", "cpu",
            "--dtype", "fp32", "--out", str(tmp_path / f"{name}.mp4"),
            "--save-latents", str(lat), "-q")
        latents[name] = load_file(lat)
    assert latents["fastvideo"].keys() == latents["ours"].keys()
    for k in latents["ours"]:
        assert latents["fastvideo"][k].isfinite().all()
        assert latents["fastvideo"][k].equal(latents["ours"][k]), k
