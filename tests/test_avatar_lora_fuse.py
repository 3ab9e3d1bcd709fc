"""``lora fuse`` on LongCat-Video-Avatar folders (tiny synth trees, bf16 like the releases).

Expected weights are computed here from the stored tensors: the adapter read key by key from its
native file, ``W + m * alpha_scale * up @ down`` summed in fp32 and cast once, and the INT8 copy
quantized by a reimplementation of the original's rule (per output row, max|row| / 127, divided,
rounded half to even). Nothing is taken from longcat_tools' LoRA, fusion or int8 code.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from avatar_media import speech, write_wav
from hostile import refused
from safetensors import safe_open
from safetensors.torch import save_file

from longcat_tools import lora as lora_lib
from longcat_tools.cli import main
from longcat_tools.errors import UsageError
from longcat_tools.model import avatar
from longcat_tools.synth import synth
from longcat_tools.verify import verify

pytest.importorskip("onnx")

DIT_INDEX = "diffusion_pytorch_model.safetensors.index.json"
INT8_INDEX = "quantized_model.safetensors.index.json"
NATIVE = "lora___lorahyphen___"
HYPHEN = "___lorahyphen___"
# DMD targets checked one by one: a 3-way fused qkv, a 2-way kv, a plain Linear
DMD_SAMPLE = ("blocks.0.attn.qkv", "blocks.1.cross_attn.kv_linear", "blocks.1.ffn.w2")
UNTOUCHED = ("blocks.0.audio_cross_attn.kv_linear", "final_layer.adaLN_modulation.1",
             "blocks.1.adaLN_modulation.1")


@pytest.fixture(scope="module")
def avatar_trees(tmp_path_factory):
    """bf16 trees, as the releases store them (overrides the session's fp32 ones here)."""
    root = tmp_path_factory.mktemp("avatar_fuse")
    return {m: synth(root / m, "tiny", model=m, dtype="bf16").path for m in avatar.VERSIONS}


def _tensor(folder: Path, index: str, name: str) -> torch.Tensor:
    shard = json.loads((folder / index).read_text())["weight_map"][name]
    with safe_open(folder / shard, "pt") as f:
        return f.get_tensor(name)


def _names(folder: Path, index: str) -> list[str]:
    return list(json.loads((folder / index).read_text())["weight_map"])


def _terms(path: Path) -> dict[str, tuple[torch.Tensor, list[torch.Tensor], float]]:
    """module -> (down, ups, alpha_scale) of a native LoRA file, read key by key."""
    with safe_open(path, "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    out = {}
    for key in t:
        if not key.endswith(".lora_down.weight"):
            continue
        stem = key[: -len(".lora_down.weight")]
        ups = ([t[stem + ".lora_up.weight"]] if stem + ".lora_up.weight" in t else
               [t[f"{stem}.lora_up.blocks.{j}.weight"] for j in range(16)
                if f"{stem}.lora_up.blocks.{j}.weight" in t])
        module = stem[len(NATIVE):].replace(HYPHEN, ".")
        out[module] = (t[key], ups, float(t[stem + ".alpha_scale"]))
    return out


def _fused(w: torch.Tensor, term: tuple[torch.Tensor, list[torch.Tensor], float],
           m: float) -> torch.Tensor:
    """W + m * alpha_scale * blockdiag(ups) @ down, in fp32, cast once to W's dtype."""
    down, ups, alpha = term
    r = down.shape[0] // len(ups)
    delta = torch.cat([u.float() @ down[j * r:(j + 1) * r].float() for j, u in enumerate(ups)])
    return (w.float() + delta * (m * alpha)).to(w.dtype)


def _quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The original's per-row symmetric INT8: scale max|row| / 127 (at least 1e-8 / 127)."""
    x = w.float()
    scale = torch.clamp(x.abs().max(dim=1).values, min=1e-8) / 127.0
    return torch.clamp(torch.round(x / scale[:, None]), -128, 127).to(torch.int8), scale


def _digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _fails(report) -> list:
    return [c for c in report.checks if c.status == "fail"]


def _run(capsys, *args: object) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


# --- 1.5: the DMD LoRA into base_model, base_model_int8 re-quantized ---------------------------

def test_fuse_dmd_into_avatar_15(avatar_trees, capsys):
    av = avatar_trees["avatar-1.5"] / avatar.VERSIONS["avatar-1.5"].folder
    before = _digests(av)
    dst = av.parent / "fused-dmd"
    rc, out, err = _run(capsys, "lora", "fuse", "dmd_lora:0.75", "--dst", dst, "-m", av,
                        "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["dit_folders"] == ["base_model", "base_model_int8"]
    assert doc["requantized"] == ["base_model_int8"] and doc["dropped"] == []
    assert "base_model_int8/ re-quantized from the fused base_model/" in err
    assert "warning" not in err
    assert _digests(av) == before  # the source is left as it is

    terms = _terms(av / "lora" / "dmd_lora.safetensors")
    assert len(terms) == 14  # 7 modules x 2 blocks
    src_f, dst_f = av / "base_model", dst / "base_model"
    src_q, dst_q = av / "base_model_int8", dst / "base_model_int8"
    for module in DMD_SAMPLE:
        w = _tensor(src_f, DIT_INDEX, f"{module}.weight")
        assert w.dtype == torch.bfloat16
        want = _fused(w, terms[module], 0.75)
        got = _tensor(dst_f, DIT_INDEX, f"{module}.weight")
        assert got.dtype == torch.bfloat16 and torch.equal(got, want), module
        assert not torch.equal(got, w), module  # the adapter does change it
        q, s = _quantize(want)
        assert torch.equal(_tensor(dst_q, INT8_INDEX, f"{module}.weight_int8"), q), module
        assert torch.equal(_tensor(dst_q, INT8_INDEX, f"{module}.weight_scale"), s), module
        assert not torch.equal(_tensor(src_q, INT8_INDEX, f"{module}.weight_int8"), q), module
    # every tensor outside the adapted modules is bit-identical, in both folders
    adapted = set(terms)
    for folder, index, dst_folder in ((src_f, DIT_INDEX, dst_f), (src_q, INT8_INDEX, dst_q)):
        names = _names(folder, index)
        assert _names(dst_folder, index) == names  # same index order, same shards
        changed = [n for n in names
                   if not torch.equal(_tensor(folder, index, n), _tensor(dst_folder, index, n))]
        assert {n.rpartition(".")[0] for n in changed} <= adapted, changed
        assert all(n.endswith((".weight", ".weight_int8", ".weight_scale")) for n in changed)
    for module in UNTOUCHED:
        assert module not in adapted
        assert torch.equal(_tensor(src_q, INT8_INDEX, f"{module}.weight_int8"),
                           _tensor(dst_q, INT8_INDEX, f"{module}.weight_int8"))
    kept = _tensor(dst_q, INT8_INDEX, "final_layer.linear.weight")  # never quantized
    assert torch.equal(kept, _tensor(src_q, INT8_INDEX, "final_layer.linear.weight"))
    assert (dst_q / "quantization_config.json").read_bytes() == \
        (src_q / "quantization_config.json").read_bytes()

    for folder in (dst_f, dst_q):
        cfg = json.loads((folder / "config.json").read_text())
        assert [n["name"] for n in cfg["_fused_loras"]] == ["dmd_lora"]
        assert cfg["_fused_loras"][0]["scale"] == 0.75
    assert not (dst / "lora" / "dmd_lora.safetensors").exists()
    for part in ("whisper-large-v3/model.safetensors", "vocal_separator/Kim_Vocal_2.onnx",
                 "scheduler/scheduler_config.json", "model_index.json", "config.json"):
        assert (dst / part).read_bytes() == (av / part).read_bytes(), part

    report = verify(dst, deep=True)
    assert _fails(report) == [], report.checks
    # no warning: the DMD adapter is no longer a file in lora/, and the config says it is fused
    assert [c.file for c in report.checks if c.status == "warn"] == []
    assert any("fused into the DiT" in c.message for c in report.checks if c.component == "lora")
    assert main(["verify", str(dst), "-q"]) == 0


def test_fuse_int8_drop_and_checksums(avatar_copy, capsys):
    av = avatar_copy("avatar-1.5")
    lines = [f"{d}  {rel}" for rel, d in _digests(av).items()]
    (av / "checksums.sha256").write_text("\n".join(lines) + "\n")
    dst = av.parent / "fused-no-int8"
    rc, out, err = _run(capsys, "lora", "fuse", "dmd_lora", "--dst", dst, "-m", av,
                        "--int8", "drop", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["dropped"] == ["base_model_int8"] and doc["requantized"] == []
    assert "base_model_int8/ left out (--int8 drop)" in err
    assert not (dst / "base_model_int8").exists() and (dst / "base_model").is_dir()
    listed = dict(reversed(line.split("  ", 1))
                  for line in (dst / "checksums.sha256").read_text().splitlines())
    assert not any(rel.startswith(("base_model_int8/", "lora/dmd")) for rel in listed)
    assert any(rel.startswith("base_model/diffusion") for rel in listed)
    for rel, digest in listed.items():
        assert hashlib.sha256((dst / rel).read_bytes()).hexdigest() == digest, rel
    assert _fails(verify(dst)) == []


# --- 1.0: a base-module adapter into avatar_single and avatar_multi ---------------------------

def _base_lora(path: Path, hidden: int, ffn: int) -> None:
    """A native LoRA on base modules only: one plain up on the fused qkv, one on ffn.w1."""
    g = torch.Generator().manual_seed(7)
    t = {}
    for module, (out_f, in_f) in {"blocks.0.attn.qkv": (3 * hidden, hidden),
                                  "blocks.1.ffn.w1": (ffn, hidden)}.items():
        stem = NATIVE + module.replace(".", HYPHEN)
        t[stem + ".lora_down.weight"] = torch.randn(3, in_f, generator=g).to(torch.bfloat16)
        t[stem + ".lora_up.weight"] = torch.randn(out_f, 3, generator=g).to(torch.bfloat16)
        t[stem + ".alpha_scale"] = torch.tensor(0.25)
    save_file(t, path)


def test_fuse_base_adapter_into_avatar_10(avatar_copy, tmp_path, capsys):
    av = avatar_copy("avatar-1.0")
    cfg = json.loads((av / "avatar_single" / "config.json").read_text())
    ffn = _tensor(av / "avatar_single", DIT_INDEX, "blocks.1.ffn.w1.weight").shape[0]
    src = tmp_path / "base_modules.safetensors"
    _base_lora(src, cfg["hidden_size"], ffn)
    assert main(["lora", "attach", str(src), "--name", "style", "--scale", "0.5",
                 "-m", str(av), "-q"]) == 0
    dst = av.parent / "fused-style"
    rc, out, err = _run(capsys, "lora", "fuse", "style", "--dst", dst, "-m", av)
    assert rc == 0, err
    assert "avatar_single/, avatar_multi/" in out
    terms = _terms(src)
    for folder in ("avatar_single", "avatar_multi"):
        for module in terms:
            w = _tensor(av / folder, DIT_INDEX, f"{module}.weight")
            got = _tensor(dst / folder, DIT_INDEX, f"{module}.weight")
            assert torch.equal(got, _fused(w, terms[module], 0.5)), (folder, module)
        names = _names(av / folder, DIT_INDEX)
        changed = {n for n in names if not torch.equal(_tensor(av / folder, DIT_INDEX, n),
                                                       _tensor(dst / folder, DIT_INDEX, n))}
        assert changed == {f"{m}.weight" for m in terms}
    # the two fine-tunes differ, so do their fused weights
    assert not torch.equal(_tensor(dst / "avatar_single", DIT_INDEX, "blocks.1.ffn.w1.weight"),
                           _tensor(dst / "avatar_multi", DIT_INDEX, "blocks.1.ffn.w1.weight"))
    assert not (dst / "lora" / "style").exists()
    assert json.loads((dst / "lora" / "adapters.json").read_text())["adapters"] == []
    assert (dst / "chinese-wav2vec2-base" / "pytorch_model.bin").is_file()
    report = verify(dst)
    assert _fails(report) == [] and report.count("warn") == 0, report.checks


def test_fuse_audio_and_unquantized_modules_into_avatar_15(avatar_copy, tmp_path, capsys):
    """An adapter on an audio module (quantized in the INT8 copy) and on final_layer.linear
    (which the INT8 copy keeps as a float weight: it gets the fused weight itself)."""
    av = avatar_copy("avatar-1.5")
    shapes = {m: tuple(_tensor(av / "base_model", DIT_INDEX, f"{m}.weight").shape)
              for m in ("audio_proj.proj1", "final_layer.linear")}
    g = torch.Generator().manual_seed(3)
    t = {}
    for module, (out_f, in_f) in shapes.items():
        stem = NATIVE + module.replace(".", HYPHEN)
        t[stem + ".lora_down.weight"] = torch.randn(2, in_f, generator=g).to(torch.bfloat16)
        t[stem + ".lora_up.weight"] = torch.randn(out_f, 2, generator=g).to(torch.bfloat16)
        t[stem + ".alpha_scale"] = torch.tensor(0.5)
    src = tmp_path / "audio_head.safetensors"
    save_file(t, src)
    assert main(["lora", "attach", str(src), "--name", "ah", "-m", str(av), "-q"]) == 0
    dst = av.parent / "fused-ah"
    rc, _, err = _run(capsys, "lora", "fuse", "ah:2", "--dst", dst, "-m", av, "-q")
    assert rc == 0, err
    terms = _terms(src)
    want = {m: _fused(_tensor(av / "base_model", DIT_INDEX, f"{m}.weight"), terms[m], 2.0)
            for m in terms}
    for m in terms:
        assert torch.equal(_tensor(dst / "base_model", DIT_INDEX, f"{m}.weight"), want[m])
    q, s = _quantize(want["audio_proj.proj1"])
    assert torch.equal(_tensor(dst / "base_model_int8", INT8_INDEX,
                               "audio_proj.proj1.weight_int8"), q)
    assert torch.equal(_tensor(dst / "base_model_int8", INT8_INDEX,
                               "audio_proj.proj1.weight_scale"), s)
    kept = _tensor(dst / "base_model_int8", INT8_INDEX, "final_layer.linear.weight")
    assert kept.dtype == torch.bfloat16 and torch.equal(kept, want["final_layer.linear"])
    assert _fails(verify(dst)) == []


# --- refusals and failures ---------------------------------------------------------------------

def test_fuse_refusals_are_one_line_and_write_nothing(avatar_trees, avatar_copy, capsys):
    v10 = avatar_trees["avatar-1.0"] / avatar.VERSIONS["avatar-1.0"].folder
    v15 = avatar_trees["avatar-1.5"] / avatar.VERSIONS["avatar-1.5"].folder
    dst = v10.parent / "never"
    refused(capsys, "lora", "fuse", "x", "--dst", dst, "-m", v10, "--int8", "drop", code=2,
            says="has no INT8 DiT folder")
    refused(capsys, "lora", "fuse", "dmd_lora", "--dst", dst, "-m", v15, "--int8", "keep",
            code=2, says="choose quantize or drop")
    refused(capsys, "lora", "fuse", "distilled", "--dst", dst, "-m", v15.parent / "LongCat-Video",
            "--int8", "drop", code=2, says="has no INT8 DiT folder")
    av = avatar_copy("avatar-1.5")
    shutil.rmtree(av / "base_model")
    line = refused(capsys, "lora", "fuse", "dmd_lora", "--dst", av.parent / "f", "-m", av)
    assert "base_model/" in line and "--int8 drop" in line
    refused(capsys, "lora", "fuse", "dmd_lora", "--dst", av.parent / "f", "-m", av,
            "--int8", "drop", says="no float DiT folder to fuse into")
    assert not dst.exists() and not (av.parent / "f").exists()
    base = av.parent / "LongCat-Video"  # --force replaced the base model the avatar reads
    before = sorted(p.name for p in base.iterdir())
    refused(capsys, "lora", "fuse", "dmd_lora", "--dst", base, "-m", av, "--int8", "drop",
            "--force", code=2, says=f"{base}: the output may not be inside the source checkpoint")
    assert sorted(p.name for p in base.iterdir()) == before


def test_fuse_elsewhere_warns_about_the_base_folder(avatar_trees, tmp_path, capsys):
    av = avatar_trees["avatar-1.5"] / avatar.VERSIONS["avatar-1.5"].folder
    rc, _, err = _run(capsys, "lora", "fuse", "dmd_lora", "--dst", tmp_path / "alone", "-m", av,
                      "--dry-run")
    assert rc == 0 and "warning:" in err and "LongCat-Video is missing" in err
    assert not (tmp_path / "alone").exists()


def test_failed_fuse_leaves_no_dst(avatar_trees, capsys, monkeypatch):
    av = avatar_trees["avatar-1.5"] / avatar.VERSIONS["avatar-1.5"].folder
    dst = av.parent / "fused-failed"
    refused(capsys, "lora", "fuse", "dmd_lora:1e300", "--dst", dst, "-m", av, "-q", code=2,
            says="a LoRA scale must be a number from -10 to 10")
    assert not dst.exists() and not dst.with_name(dst.name + ".partial").exists()

    # values that overflow while fusing (at a scale within bounds) stop it before any rename
    from longcat_tools.lora import fusion

    monkeypatch.setattr(fusion, "_fused_tensor", lambda w, _loras: torch.full_like(w, torch.inf))
    line = refused(capsys, "lora", "fuse", "dmd_lora", "--dst", dst, "-m", av, "-q",
                   says="non-finite")
    assert "nothing was written" in line
    assert not dst.exists() and not dst.with_name(dst.name + ".partial").exists()
    monkeypatch.undo()

    # a failure late in the run (while the INT8 copy is written) leaves nothing either
    from longcat_tools.model import int8

    def broken(w):
        raise OSError("disk full")

    monkeypatch.setattr(int8, "quantize", broken)
    with pytest.raises(OSError, match="disk full"):
        lora_lib.fuse(av, [("dmd_lora", None)], dst)
    assert not dst.exists() and not dst.with_name(dst.name + ".partial").exists()
    assert not (dst.parent / "fused-failed.partial").exists()


def test_a_fused_dmd_checkpoint_distils_without_the_file_and_force_replaces_fused_10(
        avatar_copy, tmp_path, capsys):
    av = avatar_copy("avatar-1.5")
    dst = av.parent / "fused"
    rc, _, err = _run(capsys, "lora", "fuse", "dmd_lora", "--dst", dst, "-m", av)
    assert rc == 0, err
    assert not (dst / "lora" / "dmd_lora.safetensors").exists()
    report = verify(dst)
    assert _fails(report) == [] and report.count("warn") == 0, report.checks
    wav = write_wav(tmp_path / "speech.wav", speech(1.0))
    out = tmp_path / "o.mp4"
    rc, _, err = _run(capsys, "run", "-m", dst, "--task", "at2v", "-p", "a face", "--audio", wav,
                      "--distill", "--no-vocal-separation", "--height", "32", "--width", "32",
                      "--frames", "5", "-o", out, "-q")
    assert rc == 0, err
    doc = json.loads(Path(f"{out}.json").read_text())
    assert doc["final"]["steps"] == 8 and doc["final"]["loras"] == []  # in the weights already
    one = avatar_copy("avatar-1.0")
    cfg = json.loads((one / "avatar_single" / "config.json").read_text())
    ffn = _tensor(one / "avatar_single", DIT_INDEX, "blocks.1.ffn.w1.weight").shape[0]
    _base_lora(tmp_path / "b.safetensors", cfg["hidden_size"], ffn)
    assert main(["lora", "attach", str(tmp_path / "b.safetensors"), "--name", "style", "-m",
                 str(one), "-q"]) == 0
    fused = one.parent / "fused-style"
    for extra in ((), ("--force",)):
        rc, _, err = _run(capsys, "lora", "fuse", "style", "--dst", fused, "-m", one, *extra)
        assert rc == 0, err
        assert not (fused / "lora" / "marker").exists()  # the second run replaced the first
        (fused / "lora" / "marker").write_text("first run")  # in a part: yours are refused
    assert not fused.with_name("fused-style.partial").exists()


def test_a_fused_dmd_checkpoint_refuses_runs_its_weights_do_not_fit(avatar_copy, tmp_path, capsys):
    av = avatar_copy("avatar-1.5")
    dst = av.parent / "fused-half"
    rc, _, err = _run(capsys, "lora", "fuse", "dmd_lora:0.5", "--dst", dst, "-m", av)
    assert rc == 0, err
    wav = write_wav(tmp_path / "speech.wav", speech(1.0))
    base = ["run", "-m", dst, "--task", "at2v", "-p", "a face", "--audio", wav,
            "--no-vocal-separation", "--height", "32", "--width", "32", "--frames", "5", "-q"]
    rc, _, err = _run(capsys, *base, "--distill")
    assert rc == 2 and "fused into the DiT at scale 0.5" in err and err.count("\n") == 1
    rc, _, err = _run(capsys, *base, "--steps", "2")
    assert rc == 2 and "pass --distill" in err and err.count("\n") == 1
    from longcat_tools.runner.avatar_pipeline import LongCatVideoAvatarPipeline

    pipe = LongCatVideoAvatarPipeline.from_pretrained(dst, audio=False)  # the API: the same rule
    audio = torch.zeros(1, 5, 5, 5, 32)
    kw = dict(height=32, width=32, num_frames=5, decode=False)
    for extra, says in (({}, "pass distill=True"),
                        ({"distill": True, "lora_scale": 1.0}, "fused into the DiT at scale 0.5")):
        with pytest.raises(UsageError, match=says):
            pipe.at2v(audio, "a face", **kw, **extra)
    r = pipe.at2v(audio, "a face", **kw, distill=True)  # no lora_scale: the fused one
    assert r.info["steps"] == 8 and r.info["loras"] == [] and pipe.transformer.active_loras == []


def test_int8_drop_on_the_model_index_layout_is_refused(avatar_copy, tmp_path, capsys):
    av = avatar_copy("avatar-1.5")
    conv = av.parent / "conv"
    assert main(["convert", "--src", str(av), "--dst", str(conv), "-q"]) == 0
    rc, _, err = _run(capsys, "lora", "fuse", "dmd_lora", "--dst", av.parent / "x", "-m", conv,
                      "--int8", "drop")
    assert rc == 2 and "convert --to native --int8 drop" in err
    assert not (av.parent / "x").exists()
