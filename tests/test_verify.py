"""verify on good checkpoints of every layout, its report, its exit codes and the schema command."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from verify_builders import first_shard, to_converted

from longcat_tools import schemas
from longcat_tools.cli import main
from longcat_tools.io.safetensors import read_header
from longcat_tools.synth import synth
from longcat_tools.verify import verify
from longcat_tools.verify.deep import scan_file
from longcat_tools.verify.lora import read_targets


@pytest.fixture(scope="module")
def converted(tiny_native, tmp_path_factory):
    """The three non-native layouts, built from the tiny checkpoint by our own conversion code
    (tensor for tensor what FastVideo's longcat_to_fastvideo.py writes)."""
    base = tmp_path_factory.mktemp("converted")
    return {
        "fastvideo-single": to_converted(tiny_native, base / "fv-single", "fastvideo-single"),
        "converted-fastvideo": to_converted(tiny_native, base / "conv-fv", "converted"),
        "converted-native": to_converted(tiny_native, base / "conv-nat", "converted", "native"),
    }


def _fails(report):
    return [(c.file, c.message) for c in report.checks if c.status != "pass"]


def test_synth_tiny_passes_deep(tiny_native):
    r = verify(tiny_native, deep=True)
    assert r.status == "pass", _fails(r)
    assert (r.layout, r.flavour) == ("native", "native")
    names = {(c.component, c.name) for c in r.checks}
    for want in [("dit", "tensors"), ("dit", "shapes"), ("dit", "index"), ("dit", "deep"),
                 ("text_encoder", "shapes"), ("vae", "shapes"), ("lora", "targets"),
                 ("checkpoint", "consistency"), ("scheduler", "config")]:
        assert want in names
    assert r.stats["bytes_read"] == sum(p.stat().st_size
                                        for p in tiny_native.rglob("*.safetensors"))


def test_synth_bf16_passes(tmp_path):
    synth(tmp_path / "bf16", "tiny", dtype="bf16", seed=3)
    r = verify(tmp_path / "bf16", deep=True)
    assert r.status == "pass", _fails(r)
    assert any(c.name == "dtype" and "BF16" in c.message for c in r.checks)


def test_real_sparse_header_level_under_2s(real_sparse):
    verify(real_sparse)  # first call pays for building the schema validators
    t0 = time.perf_counter()
    r = verify(real_sparse)
    elapsed = time.perf_counter() - t0
    assert r.status == "pass", _fails(r)
    assert elapsed < 2, elapsed
    assert r.stats["parameters"] == 13_581_071_424
    assert any("1,022 tensors" in c.message for c in r.checks)


@pytest.mark.parametrize("kind", ["fastvideo-single", "converted-fastvideo", "converted-native"])
def test_converted_layouts_pass(converted, kind):
    r = verify(converted[kind], deep=True)
    assert r.status == "pass", _fails(r)
    assert r.layout == ("fastvideo-single" if kind == "fastvideo-single" else "converted")
    assert r.flavour == ("native" if kind.endswith("native") else "fastvideo")
    if kind.startswith("converted"):  # convert writes checksums.sha256: --deep compares them
        assert any(c.name == "checksum" and c.status == "pass" for c in r.checks)
    loras = [c for c in r.checks if c.component == "lora" and c.name == "targets"]
    assert len(loras) == 2 and all(c.status == "pass" for c in loras)


def test_native_lora_in_fastvideo_checkpoint_warns(converted, tmp_path):
    root = tmp_path / "c"
    shutil.copytree(converted["fastvideo-single"], root)
    shutil.copy(Path(converted["converted-native"]) / "lora/distilled/cfg_step_lora.safetensors",
                root / "lora" / "distilled" / "native.safetensors")
    r = verify(root)
    assert r.status == "warn"
    (w,) = [c for c in r.checks if c.status == "warn"]
    assert "native-flavour modules" in w.message and "native.safetensors" in w.file
    assert main(["verify", str(root), "-q"]) == 0
    assert main(["verify", str(root), "-q", "--strict"]) == 1


def test_report_json_validates_against_its_schema(tiny_native, tmp_path, capsys):
    assert main(["verify", str(tiny_native), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert schemas.errors(doc, "verify_report") == []
    assert doc["status"] == "pass" and doc["summary"]["fail"] == 0
    bad = tmp_path / "bad"
    shutil.copytree(tiny_native, bad)
    (bad / "dit" / "config.json").write_text("{}")
    assert main(["verify", str(bad), "--json", "-q"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert schemas.errors(doc, "verify_report") == []
    assert doc["status"] == "fail" and doc["summary"]["fail"] >= 1
    assert any(c["file"] == "dit/config.json" for c in doc["checks"] if c["status"] == "fail")


def test_exit_codes_and_usage(tiny_native, tmp_path, capsys, monkeypatch):
    assert main(["verify", str(tmp_path / "nope")]) == 2
    assert main(["verify", str(tiny_native), "--against", str(tiny_native)]) == 2
    assert main(["verify", str(tiny_native), "--checksums", str(tmp_path / "none")]) == 2
    capsys.readouterr()
    # as when the runner cannot be imported
    monkeypatch.setitem(sys.modules, "longcat_tools.runner", None)
    monkeypatch.setitem(sys.modules, "longcat_tools.runner.compare", None)
    assert main(["verify", str(tiny_native), "--forward"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--forward needs the reference runner" in err[0]
    monkeypatch.chdir(tiny_native)  # the --model convention: the current folder
    assert main(["verify", "-q"]) == 0


def test_forward_check_is_wired_to_the_runner(tiny_native, monkeypatch, capsys):
    import types

    calls = []
    mod = types.ModuleType("longcat_tools.runner.compare")
    mod.forward_check = lambda path, against=None: (
        calls.append((path, against)) or {"status": "fail", "message": "max rel err 3e-2"})
    monkeypatch.setitem(sys.modules, "longcat_tools.runner",
                        types.ModuleType("longcat_tools.runner"))
    monkeypatch.setitem(sys.modules, "longcat_tools.runner.compare", mod)
    assert main(["verify", str(tiny_native), "--forward", "--against", str(tiny_native),
                 "-q"]) == 1
    assert calls == [(tiny_native, tiny_native)]
    assert "max rel err 3e-2" in capsys.readouterr().err


def test_checksums_option_implies_deep(tiny_native, tmp_path):
    root = tmp_path / "c"
    shutil.copytree(tiny_native, root)
    shard = first_shard(root)
    listing = tmp_path / "SHA256SUMS"
    p = subprocess.run(["sha256sum", shard.relative_to(root).as_posix()], cwd=root,
                       capture_output=True, text=True, check=True)
    listing.write_text(p.stdout)
    r = verify(root, checksums=listing)
    assert r.deep and r.status == "pass", _fails(r)
    (row,) = [c for c in r.checks if c.name == "checksum"]
    others = [q for q in root.rglob("*") if q.suffix in (".json", ".safetensors")]
    assert (f"1 listed file: every sha256 matches; not listed, so not hashed: {len(others) - 1} "
            in row.message)
    listing.write_text(p.stdout.replace(p.stdout[:8], "00000000"))
    r = verify(root, checksums=listing)
    assert [c.file for c in r.checks if c.status == "fail"] == [
        shard.relative_to(root).as_posix()]


def test_deep_scan_blocks_cut_inside_tensors(tiny_native, monkeypatch):
    """Blocks smaller than a tensor: the scan and the hash still see every byte once."""
    import hashlib

    from longcat_tools.verify import deep

    shard = first_shard(tiny_native)
    h = read_header(shard)
    whole = scan_file(shard, h, True)
    monkeypatch.setattr(deep, "BLOCK", 1000)  # not a multiple of anything in the file
    cut = scan_file(shard, h, True)
    assert cut.sha256 == whole.sha256 == hashlib.sha256(shard.read_bytes()).hexdigest()
    assert cut.bytes_read == shard.stat().st_size
    assert set(cut.tensors) == {n for n, t in h.tensors.items() if t.numel}
    assert all(s.nonzero and not (s.nan or s.inf) for s in cut.tensors.values())


def test_lora_parsing_reads_the_three_formats():
    from longcat_tools.io.safetensors import TensorInfo

    def t(*shape):
        return TensorInfo("x", "F32", shape, 0, 0)

    native = {"lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___attn___lorahyphen___qkv"
              f".{k}": v for k, v in {"lora_down.weight": t(12, 64), "alpha_scale": t(),
                                      **{f"lora_up.blocks.{j}.weight": t(64, 4)
                                         for j in range(3)}}.items()}
    fmt, targets, unknown = read_targets(native)
    assert fmt == "native" and not unknown and targets["blocks.0.attn.qkv"].rank == 4
    fmt, targets, _ = read_targets({"blocks.0.self_attn.to_q.lora_A": t(4, 64),
                                  "blocks.0.self_attn.to_q.lora_B": t(64, 4),
                                  "blocks.0.self_attn.to_q.lora_alpha": t()})
    assert fmt == "fastvideo" and targets["blocks.0.self_attn.to_q"].alpha is not None
    fmt, targets, _ = read_targets({"transformer.blocks.0.attn.proj.lora_A.weight": t(4, 64),
                                  "transformer.blocks.0.attn.proj.lora_B.weight": t(64, 4)})
    assert fmt == "peft" and set(targets) == {"blocks.0.attn.proj"}


def test_manifest_is_checked_against_its_files(converted, tmp_path):
    root = tmp_path / "c"
    shutil.copytree(converted["fastvideo-single"], root)
    names = read_header(root / "lora/distilled/cfg_step_lora.safetensors").tensors
    targets = sorted({re.sub(r"^blocks\.\d+\.", "blocks.*.", n.split(".lora_")[0])
                      for n in names})
    assert "blocks.*.self_attn.to_q" in targets and len(targets) == 10
    entry = {"name": "distilled", "file": "distilled/cfg_step_lora.safetensors",
             "format": "fastvideo", "rank": 4, "alpha": 2.0, "targets": targets,
             "default_scale": 1.0, "source": {"file": "lora/cfg_step_lora.safetensors",
                                              "sha256": "0" * 64}}
    manifest = root / "lora" / "adapters.json"
    manifest.write_text(json.dumps({"version": 1, "adapters": [entry]}))
    r = verify(root)
    assert r.status == "pass", _fails(r)
    manifest.write_text(json.dumps({"version": 1, "adapters": [{**entry, "rank": 8}, entry]}))
    msgs = [c.message for c in verify(root).checks if c.status == "fail"]
    assert any("rank 8" in m for m in msgs) and any("used 2 times" in m for m in msgs)


def test_schema_command(capsys):
    assert main(["schema"]) == 0
    out = capsys.readouterr().out
    for name in ("verify_report", "transformer_config", "lora_manifest", "safetensors_index",
                 "model_index_native", "model_index_converted", "vae_config",
                 "scheduler_config", "text_encoder_config"):
        assert name in out
    assert main(["schema", "verify_report"]) == 0
    assert json.loads(capsys.readouterr().out)["$id"].endswith("verify_report.schema.json")
    assert main(["schema", "--json"]) == 0
    assert {d["name"] for d in json.loads(capsys.readouterr().out)} == set(schemas.names())
    assert main(["schema", "nope"]) == 2


def test_cli_fresh_process_exit_0_and_table(tiny_native):
    p = subprocess.run([sys.executable, "-m", "longcat_tools", "verify", str(tiny_native)],
                       capture_output=True, text=True)
    assert p.returncode == 0 and p.stderr == ""
    assert p.stdout.splitlines()[0].startswith(f"verify {tiny_native}: native")
    assert p.stdout.strip().splitlines()[-1].startswith("PASS:")


def _class_mismatch(root):
    doc = json.loads((root / "model_index.json").read_text())
    doc["transformer"][1] = "LongCatVideoTransformer3DModel"
    (root / "model_index.json").write_text(json.dumps(doc))
    return "model_index.json", "but transformer/config.json says"


def _flavour_mismatch(root):
    cfg = json.loads((root / "transformer/config.json").read_text())
    cfg["_class_name"] = "LongCatVideoTransformer3DModel"
    cfg["num_heads"] = cfg.pop("num_attention_heads")
    (root / "transformer/config.json").write_text(json.dumps(cfg))
    return "transformer/config.json", "belong in the fastvideo-single layout"


def _stray_next_to_single(root):
    shutil.copy(root / "transformer/model.safetensors",
                root / "transformer/diffusion_pytorch_model.safetensors")
    return "transformer/diffusion_pytorch_model.safetensors", "without an index"


def _no_model_index(root):
    (root / "model_index.json").unlink()
    return "model_index.json", "missing"


def _split_key_renamed(root):
    from verify_builders import join_file, split_file

    p = root / "transformer/model.safetensors"
    head, data = split_file(p)
    head = {k.replace("blocks.1.self_attn.to_v.", "blocks.1.self_attn.to_vv."): v
            for k, v in head.items()}
    join_file(p, head, data)
    return "transformer/model.safetensors", "are missing: blocks.1.self_attn.to_v.weight"


def _config_links_out(root):
    outside = root.parent / "elsewhere.json"
    shutil.move(root / "transformer/config.json", outside)
    (root / "transformer/config.json").symlink_to(outside)
    return "transformer/config.json", "outside the checkpoint"


@pytest.mark.parametrize("damage", [_class_mismatch, _flavour_mismatch, _stray_next_to_single,
                                    _no_model_index, _split_key_renamed, _config_links_out])
def test_converted_layout_faults(converted, tmp_path, damage, capsys):
    root = tmp_path / "c"
    shutil.copytree(converted["fastvideo-single"], root)
    rel, keyword = damage(root)
    assert main(["verify", str(root), "-q"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"{root}/{rel}" in line and keyword in line, line


@pytest.fixture
def hf_offline(monkeypatch, tmp_path):
    from huggingface_hub import constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HOME", raising=False)
    return tmp_path / "hub"


def test_hf_cache_snapshot_passes_and_matches_the_hub(tiny_native, hf_offline, capsys):
    """A Hugging Face cache snapshot: files are links into the repo's blobs/, which is allowed
    there (and only there); --against-hub compares with the cache's own record offline."""
    from hf_cache import REPO, build_cache

    snap = build_cache(tiny_native, hf_offline)
    assert (snap / "dit" / "config.json").is_symlink()
    r = verify(snap, deep=True, against_hub=True)
    assert r.status == "pass", _fails(r)
    (row,) = [c for c in r.checks if c.component == "hub"]
    assert REPO in row.message and "match" in row.message
    assert main(["verify", REPO, "--against-hub", "-q"]) == 0  # a repo id in the cache works too
    blob = (snap / "scheduler" / "scheduler_config.json").resolve()
    blob.chmod(0o644)
    blob.write_text(blob.read_text().replace("12.0", "13.0"))
    assert main(["verify", str(snap), "--against-hub", "-q"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "scheduler/scheduler_config.json" in line and "git-sha1" in line


def test_against_hub_without_a_record_is_one_line(tiny_native, hf_offline, capsys):
    assert main(["verify", str(tiny_native), "--against-hub", "-q"]) == 2  # which repo?
    assert "--repo" in capsys.readouterr().err
    assert main(["verify", str(tiny_native), "--repo", "meituan-longcat/LongCat-Video",
                 "-q"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "no record of the hub's hashes" in line


def test_forward_reads_the_runner_report(tiny_native, monkeypatch, capsys):
    import types

    mod = types.ModuleType("longcat_tools.runner.compare")
    mod.forward_check = lambda path, against=None: {
        "ok": True, "problems": [], "layout": "native", "output_shape": [2, 16, 3, 8, 8],
        "against": str(against), "rel_diff": 0.0, "max_abs_diff": 0.0}
    monkeypatch.setitem(sys.modules, "longcat_tools.runner",
                        types.ModuleType("longcat_tools.runner"))
    monkeypatch.setitem(sys.modules, "longcat_tools.runner.compare", mod)
    assert main(["verify", str(tiny_native), "--forward", "--against", str(tiny_native),
                 "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    (row,) = [c for c in doc["checks"] if c["name"] == "forward"]
    assert row["status"] == "pass" and "relative difference 0" in row["message"]


def test_registry_written_by_lora_attach_passes(converted, tiny_native, tmp_path, capsys):
    """`lora attach` writes lora/adapters.json; verify checks every entry against its file."""
    root = tmp_path / "c"
    shutil.copytree(converted["fastvideo-single"], root)
    src = tiny_native / "lora" / "cfg_step_lora.safetensors"  # native format: attach converts it
    assert main(["lora", "attach", str(src), "--name", "mine", "-m", str(root), "-q"]) == 0
    r = verify(root)
    assert r.status == "pass", _fails(r)
    (row,) = [c for c in r.checks if c.name == "manifest"]
    assert "each matching its file" in row.message
    reg = json.loads((root / "lora/adapters.json").read_text())
    mine = next(a for a in reg["adapters"] if a["name"] == "mine")
    mine["targets"] = mine["targets"][1:]
    (root / "lora/adapters.json").write_text(json.dumps(reg))
    capsys.readouterr()
    assert main(["verify", str(root), "-q"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "lora/adapters.json" in line and "targets differ" in line


@pytest.mark.parametrize("case,fault", [("peft_prefixes_and_kohya_alpha", None),
                                        ("native_with_lora_alpha", "lora_alpha"),
                                        ("native_and_fastvideo_keys", "mixes native keys"),
                                        ("no_tensors", "holds no tensors")])
def test_verify_and_lora_attach_judge_a_file_alike(converted, tmp_path, capsys, case, fault):
    """verify reads LoRA keys by the rules attach uses: a PEFT file under two stacked prefixes
    with a kohya .alpha passes both; a native file with a .lora_alpha tensor, a file mixing
    native and FastVideo keys and an empty file fail both, for the same reason."""
    import torch
    from safetensors.torch import save_file

    root = tmp_path / "c"
    shutil.copytree(converted["converted-native"], root)
    g = torch.Generator().manual_seed(3)
    down, up = torch.randn(4, 64, generator=g), torch.randn(64, 4, generator=g)
    if case == "peft_prefixes_and_kohya_alpha":
        stem = "base_model.model.transformer.blocks.0.attn.proj"
        tensors = {f"{stem}.lora_A.weight": down, f"{stem}.lora_B.weight": up,
                   f"{stem}.alpha": torch.tensor(8.0)}
    elif case == "no_tensors":
        tensors = {}
    else:
        stem = ("lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___attn"
                "___lorahyphen___proj")
        tensors = {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up}
        if case == "native_with_lora_alpha":
            tensors[f"{stem}.lora_alpha"] = torch.tensor(8.0)
        else:
            fv = "blocks.1.self_attn.to_out"
            tensors |= {f"{fv}.lora_A": down.clone(), f"{fv}.lora_B": up.clone()}
    src = tmp_path / "x.safetensors"
    save_file(tensors, str(src))
    attached = main(["lora", "attach", str(src), "--name", "x", "-m", str(root), "-q"]) == 0
    attach_err = capsys.readouterr().err
    (root / "lora" / "y").mkdir()
    shutil.copy(src, root / "lora" / "y" / "x.safetensors")
    r = verify(root)
    rows = [c for c in r.checks if c.file.endswith("y/x.safetensors")]
    assert rows
    passed = all(c.status == "pass" for c in rows)
    assert attached == passed == (fault is None), _fails(r)
    if fault:
        (row,) = [c for c in rows if c.status == "fail"]
        assert row.name == "format" and fault in row.message, row.message
        assert fault in attach_err, attach_err


def test_a_checksum_list_is_reported_where_it_is_and_an_empty_one_fails(tiny_native, tmp_path,
                                                                         capsys, monkeypatch):
    """A list given relative to the current folder was reported inside the checkpoint; an empty
    one compared nothing and passed."""
    from longcat_tools.cli import main

    monkeypatch.chdir(tmp_path)
    Path("empty.txt").write_text("")
    assert main(["verify", str(tiny_native), "--checksums", "empty.txt", "-q"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path / 'empty.txt'}: lists no file"), err
    Path("bad.txt").write_bytes(b"\xff\n")
    assert main(["verify", str(tiny_native), "--checksums", "bad.txt", "-q"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path / 'bad.txt'}: not UTF-8 text"), err
    assert "JSON" not in err


@pytest.mark.parametrize("dtype, name", [(torch.bfloat16, "BF16"), (torch.float16, "F16"),
                                         (torch.float32, "F32"), (torch.float64, "F64")])
def test_read_scalar_gives_torchs_value_without_torch(tmp_path, dtype, name):
    """verify reads LoRA alphas at header level: the value must be the one torch stores."""
    from safetensors.torch import save_file

    from longcat_tools.io.safetensors import read_scalar

    for value in (-0.7, 3.0e-5, float("inf")):
        path = tmp_path / f"{name}.safetensors"
        save_file({"pad": torch.zeros(3, dtype=dtype), "a": torch.tensor(value, dtype=dtype)},
                  str(path))
        with open(path, "rb") as f:
            got = read_scalar(f, read_header(path).tensors["a"])
        assert got == float(torch.tensor(value, dtype=dtype))
