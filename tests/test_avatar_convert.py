"""convert on LongCat-Video-Avatar folders (1.0 and 1.5, tiny synth trees): layouts, dtype casts,
INT8 quantize/dequantize, verify on every output, refusals and crash safety.

Expected values are computed here from the stored tensors (the INT8 rule is re-implemented
below from the original's description), never taken from longcat_tools.model.int8.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from longcat_tools.cli import main
from longcat_tools.model import avatar
from longcat_tools.verify import verify

pytest.importorskip("onnx")

DITS = {"avatar-1.0": ["avatar_single", "avatar_multi"], "avatar-1.5": ["base_model"]}
CONVERTED = {"avatar_single": "transformer", "avatar_multi": "transformer_multi",
             "base_model": "transformer", "base_model_int8": "transformer_int8"}
INT8 = "base_model_int8"
# What the original's save_quantized_state_dict writes: json.dump(..., indent=2).
QUANT_CONFIG_TEXT = json.dumps({
    "quantization_method": "int8_per_channel_symmetric",
    "skip_patterns": ["final_layer.linear"],
    "description": "Weight-only INT8 quantization with per-channel symmetric scaling"},
    indent=2)


def _convert(*args: str) -> None:
    assert main(["convert", *args, "-q"]) == 0


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].reshape(-1).view(torch.uint8).equal(  # bit for bit
            b[k].reshape(-1).view(torch.uint8)), k


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.suffix != ".safetensors" and p.name != "checksums.sha256"
            and not p.name.endswith(".index.json")}


def _verified(path: Path) -> None:
    report = verify(path, deep=True)
    failed = [c for c in report.checks if c.status == "fail"]
    assert failed == [], failed


def _quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The original's QuantizedLinear.from_linear, written out: float32, per-row max / 127,
    a true division, round half to even, clamp."""
    w = w.float()
    scale = torch.clamp(torch.amax(torch.abs(w), dim=1), min=1e-8) / 127.0
    q = torch.clamp(torch.round(torch.div(w, scale[:, None])), -128, 127).to(torch.int8)
    return q, scale


def _linear_modules(t: dict[str, torch.Tensor]) -> list[str]:
    """Every Linear of the DiT (2-D weights) but the one the original skips."""
    return [k[: -len(".weight")] for k, v in t.items()
            if k.endswith(".weight") and v.dim() == 2 and "final_layer.linear" not in k]


# --- layouts -----------------------------------------------------------------------------------

@pytest.mark.parametrize("model", list(avatar.VERSIONS))
def test_round_trip_native_converted_native_bit_for_bit(avatar_copy, model):
    av = avatar_copy(model)
    root = av.parent
    conv, back = root / "conv", root / "back"
    _convert("--src", str(av), "--dst", str(conv))
    _convert("--src", str(conv), "--dst", str(back), "--to", "native")
    for d in DITS[model] + ([INT8] if model == "avatar-1.5" else []):
        _same(_tensors(av / d), _tensors(conv / CONVERTED[d]))
        _same(_tensors(av / d), _tensors(back / d))
    got = _files(back)
    if model == "avatar-1.5":  # the lora command's registry, which convert writes
        registry = json.loads(got.pop("lora/adapters.json"))
        assert [a["file"] for a in registry["adapters"]] == ["dmd_lora.safetensors"]
    assert got == _files(av)  # configs, root files, audio, separator, scheduler
    _same(_tensors(av / "lora"), _tensors(back / "lora"))
    index = json.loads((conv / "model_index.json").read_text())
    assert index["_class_name"] == "LongCatVideoAvatarPipeline"
    assert index["model_name"] == avatar.VERSIONS[model].folder
    base = root / "LongCat-Video"
    for part in ("tokenizer", "text_encoder", "vae", "scheduler"):  # self-contained
        assert _files(conv / part) == _files(base / part) or (
            part == "scheduler" and model == "avatar-1.5")
    _verified(back)
    shutil.rmtree(base)  # the converted folder stands alone; the hub layout does not
    _verified(conv)
    assert any(c.status == "fail" for c in verify(back).checks)


def test_verify_names_a_converted_folders_files_from_it(avatar_copy):
    """Every row of a converted (model_index.json) avatar named ../<folder>/..., as if its
    base parts were a sibling's; the layout row said they come from ../LongCat-Video."""
    av = avatar_copy("avatar-1.0")
    conv = av.parent / "conv"
    _convert("--src", str(av), "--dst", str(conv))
    report = verify(conv)
    assert report.ok and not [c.file for c in report.checks if c.file.startswith("../")]
    assert "base model from this folder" in next(c.message for c in report.checks
                                                 if c.name == "layout")


def test_attached_adapters_keep_name_scale_and_folder(avatar_copy, tmp_path):
    """convert left an avatar's registry behind: an adapter attached at 0.5 came out at 1."""
    av = avatar_copy("avatar-1.5")
    shutil.copy(av / "lora" / "dmd_lora.safetensors", tmp_path / "x.safetensors")
    assert main(["lora", "attach", str(tmp_path / "x.safetensors"), "--name", "mine",
                 "--scale", "0.5", "-m", str(av), "-q"]) == 0
    conv, back = av.parent / "conv", av.parent / "back"
    _convert("--src", str(av), "--dst", str(conv))
    _convert("--src", str(conv), "--dst", str(back), "--to", "native")
    for root in (conv, back):
        doc = json.loads((root / "lora" / "adapters.json").read_text())
        got = {a["name"]: (a["file"], a["default_scale"]) for a in doc["adapters"]}
        assert got == {"dmd_lora": ("dmd_lora.safetensors", 1.0),
                       "mine": ("mine/x.safetensors", 0.5)}, root
        _verified(root)


@pytest.mark.parametrize("model", list(avatar.VERSIONS))
def test_native_to_native_rewrite_verifies(avatar_copy, model):
    av = avatar_copy(model)
    root = av.parent
    _convert("--src", str(av), "--dst", str(root / "same"), "--to", "native",
             "--max-shard-size", "100KB")
    for d in DITS[model]:
        assert len(list((root / "same" / d).glob("*.safetensors"))) > 1
        _same(_tensors(av / d), _tensors(root / "same" / d))
    _verified(root / "same")


@pytest.mark.parametrize("dtype,torch_dtype", [("bf16", torch.bfloat16),
                                               ("fp16", torch.float16)])
def test_dtype_casts_are_exact(avatar_copy, dtype, torch_dtype):
    av = avatar_copy("avatar-1.5")
    root = av.parent
    out = root / "cast"
    _convert("--src", str(av), "--dst", str(out), "--to", "native", "--dtype", dtype)
    src, got = _tensors(av / "base_model"), _tensors(out / "base_model")
    assert src.keys() == got.keys()
    for k, v in src.items():
        assert got[k].dtype == torch_dtype and got[k].equal(v.to(torch_dtype)), k
    qsrc, qgot = _tensors(av / INT8), _tensors(out / INT8)
    quantized = {k[: -len(".weight_int8")] for k in qsrc if k.endswith(".weight_int8")}
    for k, v in qsrc.items():
        module = k.rpartition(".")[0]
        if k.endswith((".weight_int8", ".weight_scale")) or module in quantized:
            assert qgot[k].dtype == v.dtype and qgot[k].equal(v), k  # the format, untouched
        else:
            assert qgot[k].dtype == torch_dtype and qgot[k].equal(v.to(torch_dtype)), k
    lsrc, lgot = _tensors(av / "lora"), _tensors(out / "lora")
    for k, v in lsrc.items():  # LoRA weights cast (alpha_scale stays float32)
        assert lgot[k].equal(v.to(lgot[k].dtype)), k
    assert any(t.dtype == torch_dtype for t in lgot.values())
    _verified(out)


# --- INT8 --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,torch_dtype", [("keep", torch.bfloat16),
                                               ("fp32", torch.float32)])
def test_int8_dequantize_is_float32_product_then_one_cast(avatar_copy, dtype, torch_dtype):
    av = avatar_copy("avatar-1.5")
    root = av.parent
    shutil.rmtree(av / "base_model")
    out = root / "deq"
    _convert("--src", str(av), "--dst", str(out), "--to", "native", "--int8", "dequantize",
             "--dtype", dtype)
    q, got = _tensors(av / INT8), _tensors(out / "base_model")
    modules = {k[: -len(".weight_int8")] for k in q if k.endswith(".weight_int8")}
    assert "final_layer.adaLN_modulation.1" in modules
    assert "final_layer.linear" not in modules
    expected: dict[str, torch.Tensor] = {}
    for k, v in q.items():
        module = k.rpartition(".")[0]
        if k.endswith(".weight_int8"):
            w = v.to(torch.float32) * q[f"{module}.weight_scale"].to(torch.float32)[:, None]
            expected[f"{module}.weight"] = w.to(torch_dtype)
        elif not k.endswith(".weight_scale"):
            expected[k] = v.to(torch_dtype)
    _same(expected, got)
    _verified(out)


def test_int8_quantize_matches_the_original_rule_and_synth(avatar_copy, avatar_trees):
    av = avatar_copy("avatar-1.5")
    root = av.parent
    shutil.rmtree(av / INT8)
    out = root / "quant"
    _convert("--src", str(av), "--dst", str(out), "--to", "native", "--int8", "quantize")
    src, got = _tensors(av / "base_model"), _tensors(out / INT8)
    expected: dict[str, torch.Tensor] = {}
    modules = set(_linear_modules(src))
    for k, v in src.items():
        module = k.rpartition(".")[0]
        if module in modules and k.endswith(".weight"):
            expected[f"{module}.weight_int8"], expected[f"{module}.weight_scale"] = _quantize(v)
        elif module in modules:
            expected[k] = v.to(torch.bfloat16)
        else:
            expected[k] = v
    _same(expected, got)
    assert "final_layer.linear.weight" in got and "final_layer.linear.weight_int8" not in got
    synth_int8 = avatar_trees["avatar-1.5"] / avatar.VERSIONS["avatar-1.5"].folder / INT8
    _same(_tensors(synth_int8), got)
    assert (out / INT8 / "quantization_config.json").read_text() == QUANT_CONFIG_TEXT
    assert (out / INT8 / "config.json").read_bytes() == (av / "base_model/config.json").read_bytes()
    # the original's 4 GiB greedy split: one numbered shard at tiny size, index in state order
    assert sorted(p.name for p in (out / INT8).glob("*.safetensors")) == [
        "quantized_model-00001-of-00001.safetensors"]
    index = json.loads((out / INT8 / "quantized_model.safetensors.index.json").read_text())
    synth_index = json.loads((synth_int8 / "quantized_model.safetensors.index.json").read_text())
    assert list(index["weight_map"]) == list(synth_index["weight_map"])
    assert index["metadata"] == synth_index["metadata"]
    _verified(out)


def test_int8_quantize_greedy_split_matches_synth(avatar_copy, avatar_trees):
    av = avatar_copy("avatar-1.5")
    root = av.parent
    synth_int8 = avatar_trees["avatar-1.5"] / avatar.VERSIONS["avatar-1.5"].folder / INT8
    out = root / "split"
    # synth splits the tiny INT8 folder greedily at 200000 bytes: the same limit, the same split
    _convert("--src", str(av), "--dst", str(out), "--to", "native", "--int8", "quantize",
             "--max-shard-size", "200000")
    index = json.loads((out / INT8 / "quantized_model.safetensors.index.json").read_text())
    synth_index = json.loads((synth_int8 / "quantized_model.safetensors.index.json").read_text())
    assert index == synth_index and len(set(index["weight_map"].values())) > 1
    for f in synth_int8.glob("quantized_model-*.safetensors"):
        _same(load_file(f), load_file(out / INT8 / f.name))


# --- refusals and crash safety ----------------------------------------------------------------

@pytest.mark.parametrize("args,words", [
    (["--to", "comfy"], ["no peer", "avatar keys"]),
    (["--keys", "fastvideo"], ["no peer", "avatar keys"]),
    (["--dtype", "fp8"], ["INT8"]),
])
def test_refusals_are_one_line(avatar_trees, tmp_path, capsys, args, words):
    av = avatar_trees["avatar-1.5"] / avatar.VERSIONS["avatar-1.5"].folder
    dst = tmp_path / "out"
    assert main(["convert", "--src", str(av), "--dst", str(dst), *args]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and all(w in err for w in words), err
    assert not dst.exists()


def test_int8_refusals(avatar_trees, tmp_path, capsys):
    dst = tmp_path / "out"
    v10 = avatar_trees["avatar-1.0"] / avatar.VERSIONS["avatar-1.0"].folder
    assert main(["convert", "--src", str(v10), "--dst", str(dst), "--int8", "quantize"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "INT8" in err
    base = avatar_trees["avatar-1.0"] / "LongCat-Video"
    assert main(["convert", "--src", str(base), "--dst", str(dst), "--int8", "dequantize"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Avatar 1.5" in err and not dst.exists()


def test_missing_base_is_one_line(avatar_copy, capsys):
    av = avatar_copy("avatar-1.0")
    root = av.parent
    shutil.rmtree(root / "LongCat-Video")
    assert main(["convert", "--src", str(av), "--dst", str(root / "out")]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(root / "LongCat-Video") in err and "missing" in err
    assert not (root / "out").exists()


def test_the_sibling_base_model_is_never_the_output(avatar_copy, capsys):
    """The avatar reads its text encoder, tokenizer and VAE from ../LongCat-Video: --force
    replaced that folder with the converted avatar."""
    av = avatar_copy("avatar-1.5")
    base = av.parent / "LongCat-Video"
    before = sorted(p.relative_to(base) for p in base.rglob("*"))
    assert main(["convert", "--src", str(av), "--dst", str(base), "--force", "-q"]) == 2
    assert str(base) in capsys.readouterr().err
    assert sorted(p.relative_to(base) for p in base.rglob("*")) == before


def test_killed_or_failed_run_leaves_no_dst(avatar_copy):
    av = avatar_copy("avatar-1.5")
    root = av.parent
    dst = root / "out"
    env = {**os.environ, "LONGCAT_TOOLS_TEST_KILL_AT": "5"}
    r = subprocess.run([sys.executable, "-m", "longcat_tools", "convert", "--src", str(av),
                        "--dst", str(dst), "-q"], env=env, capture_output=True)
    assert r.returncode != 0 and not dst.exists()
    shard = sorted((av / "base_model").glob("*.safetensors"))[-1]
    tensors = load_file(shard)
    name = next(iter(tensors))
    tensors[name] = torch.full_like(tensors[name], 1e6)  # no float16 holds it
    save_file(tensors, shard, metadata={"format": "pt"})
    assert main(["convert", "--src", str(av), "--dst", str(dst), "--dtype", "fp16", "-q"]) != 0
    assert not dst.exists()
    _convert("--src", str(av), "--dst", str(dst), "--dtype", "bf16")  # and then it works
    _verified(dst)


def test_an_int8_folder_of_another_method_is_refused(avatar_copy, capsys):
    """A quantization_config.json saying int4 was converted and loaded as the INT8 format."""
    from longcat_tools.errors import LongcatError
    from longcat_tools.runner.avatar_dit import load_avatar_transformer

    av = avatar_copy("avatar-1.5")
    qpath = av / INT8 / "quantization_config.json"
    qpath.write_text(json.dumps({"quantization_method": "int4_groupwise"}))
    assert main(["convert", "--src", str(av), "--dst", str(av.parent / "out"), "-q"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"{qpath}: quantization_method 'int4_groupwise'" in line
    assert not (av.parent / "out").exists()
    with pytest.raises(LongcatError, match="int4_groupwise"):
        load_avatar_transformer(av / INT8)
    assert verify(av).status == "fail"


@pytest.mark.parametrize("mode", ["dequantize", "keep"])
def test_an_unusable_int8_scale_is_refused_before_writing(avatar_copy, capsys, mode):
    """A NaN scale came out as NaN weights (dequantize) or passed through (keep), exit 0."""
    av = avatar_copy("avatar-1.5")
    shard = next((av / INT8).glob("*.safetensors"))
    t = load_file(str(shard))
    name = sorted(n for n in t if n.endswith(".weight_scale"))[0]
    t[name][0] = float("nan")
    save_file(t, str(shard), metadata={"format": "pt"})
    out = av.parent / "out"
    assert main(["convert", "--src", str(av), "--dst", str(out), "--to", "native", "--int8",
                 mode, "-q"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"{name} holds nan" in line and "must be finite and positive" in line, line
    assert not out.exists()


@pytest.mark.parametrize("folder", ["base_model", INT8])
def test_an_integer_weight_is_refused(avatar_copy, capsys, folder):
    """The base model's check, which the avatar's DiT folders skipped: verify then failed the
    output."""
    av = avatar_copy("avatar-1.5")
    shard = sorted((av / folder).glob("*.safetensors"))[0]
    t = load_file(shard)
    name = next(n for n, v in t.items() if v.is_floating_point() and v.ndim == 1)
    t[name] = t[name].to(torch.int32)
    save_file(t, shard)
    assert main(["convert", "--src", str(av), "--dst", str(av.parent / "out"), "-q"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"tensor '{name}' is I32, not floating point" in line
    assert not (av.parent / "out").exists()
