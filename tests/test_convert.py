"""convert: FastVideo's layout and rules, exact round trips, dtype casts, safety, bad sources."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from longcat_tools import convert as conv
from longcat_tools.checkpoint import layouts
from longcat_tools.cli import main
from longcat_tools.errors import LongcatError
from longcat_tools.io.checksums import MANIFEST, check_manifest, read_manifest
from longcat_tools.lora import formats as lf
from longcat_tools.model import keymap

# FastVideo's converter writes exactly this model_index.json (reference/fastvideo_longcat.md §1.3)
FASTVIDEO_MODEL_INDEX = {
    "_class_name": "LongCatPipeline", "_diffusers_version": "0.32.0",
    "workload_type": "video-generation", "tokenizer": ["transformers", "AutoTokenizer"],
    "text_encoder": ["transformers", "UMT5EncoderModel"], "vae": ["diffusers", "AutoencoderKLWan"],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "transformer": ["diffusers", "LongCatTransformer3DModel"]}


def dit_tensors(root: Path) -> dict[str, torch.Tensor]:
    ckpt = layouts.detect(root)
    out: dict[str, torch.Tensor] = {}
    for path in sorted(set(layouts.transformer_shards(ckpt).values())):
        out.update(load_file(str(path)))
    return out


def files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def assert_identical(a: dict, b: dict) -> None:
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    bad = [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape
           or not torch.equal(a[k], b[k])]
    assert bad == []


@pytest.fixture(scope="module")
def converted(tiny_native, tmp_path_factory):
    """tiny native -> converted with the default options (fastvideo keys, keep, link)."""
    dst = tmp_path_factory.mktemp("conv") / "fv"
    conv.convert(tiny_native, dst)
    return dst


def test_fastvideo_layout_follows_fastvideo_rules(tiny_native, converted):
    src = dit_tensors(tiny_native)
    out = dit_tensors(converted)
    cfg = json.loads((tiny_native / "dit/config.json").read_text())
    dims = keymap.dit_dims(cfg)
    assert list(out) == [n for n, _ in keymap.tensor_specs(dims, "fastvideo")]
    # every tensor is torch.chunk(native, n, dim=0)[i] of its native tensor, bit for bit
    for name, t in src.items():
        for part in keymap.native_to_fastvideo(name):
            expect = torch.chunk(t, part.count, dim=0)[part.index]
            got = out[part.fastvideo]
            assert got.dtype == expect.dtype and torch.equal(got, expect), part.fastvideo
    assert len(out) == sum(len(keymap.native_to_fastvideo(n)) for n in src)
    # config: FastVideo's patch (class renamed, num_heads popped to num_attention_heads)
    expect_cfg = dict(cfg, _class_name="LongCatTransformer3DModel")
    expect_cfg["num_attention_heads"] = expect_cfg.pop("num_heads")
    got_cfg = json.loads((converted / "transformer/config.json").read_text())
    assert got_cfg == expect_cfg and list(got_cfg) == list(expect_cfg)
    assert json.loads((converted / "model_index.json").read_text()) == FASTVIDEO_MODEL_INDEX
    assert not (converted / "config.json").exists()
    # LoRA files where FastVideo puts them, in its format, with the same effective update
    for native_name, adapter in (("cfg_step_lora", "distilled"), ("refinement_lora",
                                                                  "refinement")):
        path = converted / "lora" / adapter / f"{native_name}.safetensors"
        t = load_file(str(path))
        assert all(k.endswith((".lora_A", ".lora_B", ".lora_alpha")) for k in t)
        d0 = lf.effective_deltas(tiny_native / "lora" / f"{native_name}.safetensors")
        d1 = lf.effective_deltas(path)
        assert set(d0) == set(d1) and all(torch.equal(d0[k], d1[k]) for k in d0)
    # unchanged components are hard links of the source files
    for rel in ("vae/diffusion_pytorch_model.safetensors", "tokenizer/tokenizer.json",
                "text_encoder/config.json", "scheduler/scheduler_config.json"):
        assert (converted / rel).stat().st_ino == (tiny_native / rel).stat().st_ino
    # the manifest lists every written file, hashed correctly, and nothing linked
    manifest = read_manifest(converted / MANIFEST)
    assert set(manifest) == {r for r in files(converted) if r.startswith(
        ("transformer/", "lora/")) or r == "model_index.json"}
    assert check_manifest(converted) == {}
    assert not (converted.parent / "fv.partial").exists()


@pytest.mark.parametrize("keys", ["fastvideo", "native"])
def test_round_trip_is_exact(tiny_native, tmp_path, keys):
    mid, back = tmp_path / "mid", tmp_path / "back"
    conv.convert(tiny_native, mid, keys=keys)
    assert layouts.detect(mid).flavour == keys
    cfg = json.loads((mid / "transformer/config.json").read_text())
    assert cfg["_class_name"] == keymap.CLASS_BY_FLAVOUR[keys]
    conv.convert(mid, back, to="native")
    assert layouts.detect(back).layout == "native"
    assert_identical(dit_tensors(tiny_native), dit_tensors(back))
    for name in ("cfg_step_lora", "refinement_lora"):
        rel = f"lora/{name}.safetensors"
        assert_identical(load_file(str(tiny_native / rel)), load_file(str(back / rel)))
    # configs and every unchanged file come back byte for byte
    same = sorted(r for r in files(tiny_native) if not r.startswith(("dit/diffusion", "lora/")))
    for rel in same:
        assert (tiny_native / rel).read_bytes() == (back / rel).read_bytes(), rel
    assert files(back) - files(tiny_native) <= {
        MANIFEST, "lora/adapters.json", "dit/" + layouts.DIT_STEM + ".safetensors"}


def test_bf16_casts_transformer_lora_text_encoder_and_keeps_vae(tiny_native, tmp_path):
    dst = tmp_path / "bf16"
    r = conv.convert(tiny_native, dst, dtype="bf16", link=False)
    assert r.files_linked == 0 and r.files_copied > 0
    src = dit_tensors(tiny_native)
    out = dit_tensors(dst)
    for name, t in src.items():
        for part in keymap.native_to_fastvideo(name):
            expect = torch.chunk(t.to(torch.bfloat16), part.count, 0)[part.index]
            assert out[part.fastvideo].dtype == torch.bfloat16
            assert torch.equal(out[part.fastvideo], expect)
    lora = load_file(str(dst / "lora/distilled/cfg_step_lora.safetensors"))
    assert {t.dtype for k, t in lora.items() if not k.endswith("lora_alpha")} == {torch.bfloat16}
    assert {t.dtype for k, t in lora.items() if k.endswith("lora_alpha")} == {torch.float32}
    te_src, te_out = tiny_native / "text_encoder", dst / "text_encoder"
    index = json.loads((te_out / "model.safetensors.index.json").read_text())
    total = 0
    for shard in sorted(set(index["weight_map"].values())):
        a, b = load_file(str(te_src / shard)), load_file(str(te_out / shard))
        assert set(a) == set(b)
        for k in a:
            assert b[k].dtype == torch.bfloat16 and torch.equal(b[k], a[k].to(torch.bfloat16))
            total += b[k].numel() * 2
    assert index["metadata"]["total_size"] == total
    assert json.loads((te_out / "config.json").read_text()).get("torch_dtype",
                                                                "bfloat16") == "bfloat16"
    vae = "vae/diffusion_pytorch_model.safetensors"
    assert (dst / vae).read_bytes() == (tiny_native / vae).read_bytes()
    assert (dst / vae).stat().st_ino != (tiny_native / vae).stat().st_ino  # --copy
    assert set(read_manifest(dst / MANIFEST)) == files(dst) - {MANIFEST}  # copies are listed
    assert check_manifest(dst) == {}


def test_fastvideo_single_file_source(tiny_native, converted, tmp_path):
    """FastVideo's own output (one transformer/model.safetensors) converts back exactly."""
    single = tmp_path / "fv-single"
    shutil.copytree(converted, single)
    tdir = single / "transformer"
    save_file(dit_tensors(converted), str(tdir / "model.safetensors"))
    for p in tdir.glob("diffusion_pytorch_model*"):
        p.unlink()
    (single / MANIFEST).unlink()
    assert layouts.detect(single).layout == "fastvideo-single"
    back = tmp_path / "back"
    conv.convert(single, back, to="native", lora="none")
    assert_identical(dit_tensors(tiny_native), dit_tensors(back))
    assert not (back / "lora").exists()


def test_shards_respect_max_size(tiny_native, tmp_path):
    dst = tmp_path / "sharded"
    conv.convert(tiny_native, dst, max_shard_size="100KB", lora="distilled")
    index = json.loads((dst / "transformer" / layouts.INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[0].endswith(f"-00001-of-{len(shards):05d}.safetensors")
    total = 0
    for s in shards:
        t = load_file(str(dst / "transformer" / s))
        nbytes = sum(x.numel() * x.element_size() for x in t.values())
        assert nbytes <= 100_000 or len(t) == 1
        total += nbytes
        assert all(index["weight_map"][k] == s for k in t)
    assert index["metadata"]["total_size"] == total
    assert list(index["weight_map"]) == sorted(index["weight_map"])
    assert sorted(os.listdir(dst / "lora")) == ["adapters.json", "distilled"]


def test_rekey_converted_to_converted(tiny_native, converted, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    conv.convert(converted, a, keys="native")
    conv.convert(tiny_native, b, keys="native")
    assert_identical(dit_tensors(a), dit_tensors(b))
    assert (a / "transformer/config.json").read_bytes() == (b / "transformer/config.json"
                                                            ).read_bytes()
    rel = "lora/refinement/refinement_lora.safetensors"
    assert_identical(load_file(str(a / rel)), load_file(str(b / rel)))


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_native, tmp_path, capsys):
    dst = tmp_path / "dry"
    assert main(["convert", "--src", str(tiny_native), "--dst", str(dst), "--dry-run",
                 "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["dry_run"] and doc["tensors"] == 68 + 60 + 72
    assert doc["bytes_in"] > 0 and doc["bytes_out"] >= doc["bytes_to_write"] > 0
    assert {g["group"] for g in doc["groups"]} >= {"transformer", "lora/distilled", "vae"}
    assert not dst.exists() and not (tmp_path / "dry.partial").exists()


def _corrupt_header(root):
    shard = sorted((root / "dit").glob("*-00002-of-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:16] = b"\xff" * 8
    shard.write_bytes(bytes(data))


def _truncate(root):
    shard = sorted((root / "dit").glob("*-00001-of-*.safetensors"))[0]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 10)


def _missing_shard(root):
    sorted((root / "dit").glob("*-00003-of-*.safetensors"))[0].unlink()


def _unknown_key(root):
    shard = sorted((root / "dit").glob("*-00001-of-*.safetensors"))[0]
    t = load_file(str(shard))
    t["blocks.0.attn.mystery.weight"] = torch.zeros(2)
    save_file(t, str(shard))
    index_path = root / "dit" / layouts.INDEX_NAME
    index = json.loads(index_path.read_text())
    index["weight_map"]["blocks.0.attn.mystery.weight"] = shard.name
    index_path.write_text(json.dumps(index))


def _no_dit(root):
    shutil.rmtree(root / "dit")


def _bad_lora(root):
    path = root / "lora" / "cfg_step_lora.safetensors"
    t = load_file(str(path))
    t[lf.native_key_module("blocks.0.attn.nothing") + ".lora_down.weight"] = torch.zeros(2, 64)
    save_file(t, str(path))


def _bad_bsa_params(root):
    path = root / "dit" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["bsa_params"] = "x"  # verify and run refuse it; convert wrote it out
    path.write_text(json.dumps(cfg))


def _int_weight(root):
    path = sorted((root / "dit").glob("*.safetensors"))[0]
    t = load_file(str(path))
    name = next(iter(t))
    t[name] = t[name].to(torch.int32)  # convert wrote it out; verify then failed the output
    save_file(t, str(path))


@pytest.mark.parametrize("damage,expect", [
    (_no_dit, "not a LongCat-Video checkpoint"),
    (_int_weight, "is I32, not floating point"),
    (_bad_bsa_params, "bsa_params"),
    (_corrupt_header, "header is not valid UTF-8 JSON"),
    (_truncate, "truncated"),
    (_missing_shard, "which is missing"),
    (_unknown_key, "unknown DiT tensor 'blocks.0.attn.mystery.weight'"),
    (_bad_lora, "blocks.0.attn.nothing"),
])
def test_bad_sources_fail_with_one_line(tiny_native, tmp_path, capsys, damage, expect):
    src = tmp_path / "src"
    shutil.copytree(tiny_native, src)
    damage(src)
    dst = tmp_path / "dst"
    assert main(["convert", "--src", str(src), "--dst", str(dst)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expect in err[0], err
    assert not dst.exists() and not (tmp_path / "dst.partial").exists()


def test_destination_problems(tiny_native, tmp_path, capsys, monkeypatch):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    args = ["convert", "--src", str(tiny_native), "--dst"]
    assert main([*args, str(taken)]) == 1
    assert "already exists (pass --force" in capsys.readouterr().err
    assert main([*args, str(taken), "--force"]) == 1  # not a checkpoint: never deleted
    assert "does not look like a checkpoint" in capsys.readouterr().err
    assert (taken / "notes.txt").exists()
    assert main([*args, str(tiny_native / "out")]) == 2
    assert "inside the source" in capsys.readouterr().err
    assert main([*args, str(tmp_path / "x"), "--lora", "nope"]) == 2
    assert "no adapter named 'nope'" in capsys.readouterr().err
    for listed in (",", "distilled,"):  # chose nothing / as if 'distilled'
        assert main([*args, str(tmp_path / "x"), "--lora", listed]) == 2
        assert "an empty adapter name" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    partial = tmp_path / "p.partial"
    shutil.copytree(tiny_native, partial)
    assert main(["convert", "--src", str(partial), "--dst", str(tmp_path / "p")]) == 2
    assert "scratch folder of --dst" in capsys.readouterr().err and partial.is_dir()
    monkeypatch.setenv(conv.ENV_FREE_BYTES, "1000")
    assert main([*args, str(tmp_path / "full")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not enough free disk" in err[0]
    assert not (tmp_path / "full").exists() and not (tmp_path / "full.partial").exists()


def test_force_replaces_a_previous_output(tiny_native, converted, tmp_path):
    dst = tmp_path / "again"
    shutil.copytree(converted, dst)
    conv.convert(tiny_native, dst, force=True, keys="native")  # another layout's parts: replaced
    assert layouts.detect(dst).flavour == "native"
    assert [p.name for p in tmp_path.iterdir()] == ["again"]
    conv.convert(tiny_native, dst, force=True, to="native")
    assert layouts.detect(dst).layout == "native" and not (dst / "transformer").exists()
    for litter in ("README.md", "hub_manifest.json", ".DS_Store"):  # a download's: replaced
        (dst / litter).write_text("{}")
    (dst / ".cache" / "huggingface").mkdir(parents=True)
    conv.convert(tiny_native, dst, force=True, to="native")
    assert not (dst / "README.md").exists() and not (dst / ".cache").exists()
    (dst / "stale.txt").write_text("mine")  # not a checkpoint's: refused, kept
    with pytest.raises(LongcatError, match="holds stale.txt, which this run does not write"):
        conv.convert(tiny_native, dst, force=True, keys="native")
    assert (dst / "stale.txt").read_text() == "mine"


ZYGOTE = r"""
import json, os, signal, sys, time
import longcat_tools.convert  # noqa: F401  (imports torch once; every run below is a fork)
from longcat_tools.cli import main
from longcat_tools.errors import LongcatError

src, dst, plan = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])


def run(env):
    pid = os.fork()
    if pid == 0:
        os.environ.update(env)
        os._exit(main(["convert", "--src", src, "--dst", dst, "-q"]))
    return pid


def state(how, status):
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    out = {"how": how, "killed": killed, "dst": os.path.exists(dst)}
    if not killed and os.path.exists(dst):  # finished before the timer: start over
        import shutil
        shutil.rmtree(dst)
    return out


results = []
for k in plan["hook"]:
    pid = run({"LONGCAT_TOOLS_TEST_KILL_AT": str(k)})
    results.append(state(f"step {k}", os.waitpid(pid, 0)[1]))
for delay in plan["timer"]:
    pid = run({})
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    results.append(state(f"after {delay:.3f} s", os.waitpid(pid, 0)[1]))
pid = run({})
status = os.waitpid(pid, 0)[1]
results.append({"how": "final", "exit": os.WEXITSTATUS(status), "dst": os.path.exists(dst)})
print(json.dumps(results))
"""


def test_sigkill_never_leaves_a_destination(tiny_native, converted, tmp_path):
    """SIGKILL at 10 steps of the run (tensor writes in the DiT and LoRA files, finished files,
    after the manifest, just before the rename: the documented $LONGCAT_TOOLS_TEST_KILL_AT hook)
    and at 3 wall-clock moments: DST never exists afterwards, and the next run succeeds and
    equals an uninterrupted run."""
    dst = tmp_path / "dst"
    steps = conv.plan(tiny_native, dst).steps
    hook = sorted({1 + i * (steps - 4) // 6 for i in range(7)} | {steps - 2, steps - 1, steps})
    assert len(hook) == 10
    timer = [0.01, 0.08, 0.2]
    p = subprocess.run([sys.executable, "-c", ZYGOTE, str(tiny_native), str(dst),
                        json.dumps({"hook": hook, "timer": timer})],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr
    results = json.loads(p.stdout)
    kills = [r for r in results[:-1] if r["killed"]]
    assert len(kills) >= 10
    assert all(r["killed"] for r in results[:len(hook)])
    assert not any(r["dst"] for r in kills), results
    final = results[-1]
    assert final["exit"] == 0 and final["dst"]
    assert (dst / MANIFEST).read_text() == (converted / MANIFEST).read_text()
    assert files(dst) == files(converted)
    assert [p.name for p in tmp_path.iterdir()] == ["dst"]


def test_demo_step_converts(tiny_native, tmp_path):
    from longcat_tools.demo import DemoContext, step_convert

    ctx = DemoContext(tmp_path, print, {"native": tiny_native})
    detail = step_convert(ctx)
    assert "68 DiT tensors" in detail and "distilled+refinement" in detail
    assert layouts.detect(ctx.paths["converted"]).flavour == "fastvideo"


def test_other_file_system_copies_instead_of_linking(tiny_native, tmp_path, monkeypatch):
    monkeypatch.setattr(conv, "_same_filesystem", lambda a, b: False)
    p = conv.plan(tiny_native, tmp_path / "x")
    assert not any(j.kind == "link" for j in p.jobs)
    assert any("different file systems" in n for n in p.notes)
    assert p.bytes_to_write == p.bytes_out  # the disk check counts the copies


def test_buffered_writes_are_identical(tiny_native, converted, tmp_path, monkeypatch):
    """Without O_DIRECT (file systems that refuse it) the same bytes are written."""
    from longcat_tools.io import checksums

    monkeypatch.setenv(checksums.ENV_NO_DIRECT, "1")
    dst = tmp_path / "fallback"
    conv.convert(tiny_native, dst, link=False)
    ours, ref = read_manifest(dst / MANIFEST), read_manifest(converted / MANIFEST)
    assert {k: ours[k] for k in ref} == ref
    assert check_manifest(dst) == {}


def test_manifest_is_sha256sum_format(converted, tmp_path):
    p = subprocess.run(["sha256sum", "-c", "--strict", MANIFEST], cwd=converted,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    bad = tmp_path / "bad.sha256"
    bad.write_text("abc  x\n")
    with pytest.raises(LongcatError, match="not a sha256sum line"):
        read_manifest(bad)
    copy = tmp_path / "c"
    shutil.copytree(converted, copy)
    with open(copy / "model_index.json", "a") as f:
        f.write(" ")
    assert check_manifest(copy) == {"model_index.json": "checksum differs"}


def test_options_are_checked(tiny_native, tmp_path):
    from longcat_tools.errors import UsageError

    assert conv.parse_size("5GB") == 5 * 10**9 and conv.parse_size("2GiB") == 2 * 2**30
    assert conv.parse_size("500 MB") == 5 * 10**8 and conv.parse_size(1234) == 1234
    for bad in ("abc", "0", "5XB"):
        with pytest.raises(UsageError):
            conv.parse_size(bad)
    with pytest.raises(UsageError, match="--to native"):
        conv.plan(tiny_native, tmp_path / "x", to="native", keys="fastvideo")
    with pytest.raises(UsageError, match="--dtype"):
        conv.plan(tiny_native, tmp_path / "x", dtype="int8")
    with pytest.raises(UsageError, match="cannot read ''"):  # took the default, 5GB
        conv.plan(tiny_native, tmp_path / "x", max_shard_size="")


def test_fp16_refuses_values_it_cannot_hold(tiny_native, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_native, src)
    shard = sorted((src / "dit").glob("*-00001-of-*.safetensors"))[0]
    t = load_file(str(shard))
    name = next(k for k in sorted(t) if k.endswith("attn.qkv.weight"))  # quantized by fp8
    t[name] = t[name].clone()
    t[name].view(-1)[0] = 1e6
    save_file(t, str(shard), metadata={"format": "pt"})
    with pytest.raises(LongcatError, match="overflows float16"):
        conv.convert(src, tmp_path / "dst", dtype="fp16")
    assert not (tmp_path / "dst").exists() and not (tmp_path / "dst.partial").exists()
    # through fp8, dequantized: came out inf, exit 0, and verify passed it
    conv.convert(src, tmp_path / "fp8", dtype="fp8")
    for to in ("converted", "native"):
        with pytest.raises(LongcatError, match="dequantized overflows float16"):
            conv.convert(tmp_path / "fp8", tmp_path / f"back_{to}", dtype="fp16", to=to)
    # an inf already in a chunk let another value's overflow through; fp8 wrote an inf scale
    t[name].view(-1)[1] = float("inf")
    save_file(t, str(shard), metadata={"format": "pt"})
    with pytest.raises(LongcatError, match="overflows float16"):
        conv.convert(src, tmp_path / "dst", dtype="fp16")
    with pytest.raises(LongcatError, match="holds NaN or Inf, which no e4m3 scale can carry"
                       ) as refused:
        conv.convert(src, tmp_path / "fp8_inf", dtype="fp8")
    assert f"tensor '{name}' holds" in str(refused.value)  # the source's name, not the output's


@pytest.mark.parametrize("adapter", ["cfg_step_lora.safetensors", "refinement_lora.safetensors"])
def test_fp16_refuses_lora_values_it_cannot_hold(tiny_native, tmp_path, capsys, monkeypatch,
                                                   adapter):
    """A LoRA up weight of 1e6 (fp16 tops out at 65504): one line naming the file and tensor,
    exit 1, checked before the output folder is even made, so no DST and no DST.partial."""
    src = tmp_path / "src"
    shutil.copytree(tiny_native, src)
    path = src / "lora" / adapter
    t = load_file(str(path))
    up = sorted(k for k in t if ".lora_up." in k)[-1]
    t[up] = t[up].clone()
    t[up].view(-1)[-1] = 1e6
    save_file(t, str(path), metadata={"format": "pt"})
    started = []
    real = conv.atomic_folder
    monkeypatch.setattr(conv, "atomic_folder", lambda *a, **k: started.append(a) or real(*a, **k))
    dst = tmp_path / "dst"
    capsys.readouterr()
    assert main(["convert", "--src", str(src), "--dst", str(dst), "--dtype", "fp16", "-q"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "overflows float16" in line and adapter in line and f"'{up}'" in line, line
    assert not dst.exists() and not (tmp_path / "dst.partial").exists() and started == []
    assert main(["convert", "--src", str(src), "--dst", str(dst), "--dtype", "bf16", "-q"]) == 0


def test_lora_registry_is_not_an_adapter(tiny_native, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_native, src)
    (src / "lora" / "adapters.json").write_text('{"version": 1, "adapters": []}')
    p = conv.plan(src, tmp_path / "dst")
    assert p.loras == ["distilled", "refinement"]
    assert not any("adapters.json" in j.rel for j in p.jobs)


@pytest.mark.parametrize("keys", ["fastvideo", "native"])
def test_converted_output_passes_deep_verify_and_registers_its_adapters(tiny_native, tmp_path,
                                                                          keys):
    import hashlib

    from longcat_tools import lora
    from longcat_tools.convert import convert
    from longcat_tools.verify import verify

    dst = tmp_path / keys
    convert(tiny_native, dst, keys=keys)
    report = verify(dst, deep=True)
    assert report.status == "pass", [(c.file, c.message) for c in report.failures()]
    reg = lora.load_registry(layouts.detect(dst))
    assert {a.name for a in reg.adapters} == {"distilled", "refinement"}
    distilled = reg.get("distilled")
    src = tiny_native / "lora" / "cfg_step_lora.safetensors"
    assert distilled.rank == 4 and distilled.source
    assert hashlib.sha256(src.read_bytes()).hexdigest() in distilled.source.values()


@pytest.mark.parametrize("text", ["[1, 2]", "{", '{"model_name": 5}'])
def test_a_source_whose_model_index_verify_fails_is_refused(tiny_native, tmp_path, capsys, text):
    """convert read past a broken model_index.json that verify fails (and run refuses)."""
    src = tmp_path / "src"
    shutil.copytree(tiny_native, src)
    (src / "model_index.json").write_text(text)
    for extra in (["--dry-run"], []):
        assert main(["convert", "--src", str(src), "--dst", str(tmp_path / "out"), "-q",
                     *extra]) == 1
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"error: {src / 'model_index.json'}: "), line
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("break_it, says", [
    (lambda src: (src / "vae" / "diffusion_pytorch_model.safetensors").unlink(),
     "vae's weights cannot load"),
    (lambda src: (src / "vae" / "config.json").write_text('{"z_dim": "16"}'), "vae/config.json"),
    (lambda src: (src / "scheduler" / "scheduler_config.json").write_text(
        '{"shift": "12"}'), "scheduler_config.json"),
])
def test_a_component_verify_fails_is_refused_not_carried(tiny_native, tmp_path, capsys,
                                                         break_it, says):
    """convert carried a VAE without weights, or a config with strings for numbers, with exit 0,
    and verify then failed the output."""
    src = tmp_path / "src"
    shutil.copytree(tiny_native, src)
    (src / "checksums.sha256").unlink(missing_ok=True)
    break_it(src)
    assert main(["convert", "--src", str(src), "--dst", str(tmp_path / "out"), "-q"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert says in line, line
    assert not (tmp_path / "out").exists()


def test_pickles_are_left_behind_or_refused(tiny_native, tmp_path, capsys):
    """A pickle beside safetensors weights was copied, and the output then failed verify."""
    from longcat_tools.verify import verify

    src = tmp_path / "src"
    shutil.copytree(tiny_native, src)
    (src / "text_encoder" / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    (src / "text_encoder" / "pytorch_model.bin.index.json").write_text('{"weight_map": {}}')
    for extra in ([], ["--dtype", "fp16"]):
        dst = tmp_path / f"out{len(extra)}"
        assert main(["convert", "--src", str(src), "--dst", str(dst), *extra]) == 0
        assert "skipped text_encoder/pytorch_model.bin (a pickle" in capsys.readouterr().out
        assert not (dst / "text_encoder" / "pytorch_model.bin").exists()
        assert not (dst / "text_encoder" / "pytorch_model.bin.index.json").exists()
        assert verify(dst).status == "pass"
    for p in (src / "text_encoder").glob("*.safetensors"):
        p.unlink()
    assert main(["convert", "--src", str(src), "--dst", str(tmp_path / "none")]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "pytorch_model.bin: pickle weight file, and text_encoder/ has no safetensors" in line
    assert not (tmp_path / "none").exists()
