"""``convert`` to and from a ComfyUI single-file DiT (WanVideoWrapper's LongCat key layout).

The comfy state dict is built here from the native tensors with the layout written out by hand
(docs/convert.md, "ComfyUI single files"), not with the package's key map, so the map is checked
against an independent statement of the layout.
"""

from __future__ import annotations

import json

import pytest
import torch
from hostile import refused
from safetensors.torch import load_file, save_file

from longcat_tools import schemas
from longcat_tools.cli import main

# native module -> comfy module(s) (rows split in this order), as WanVideoWrapper names them
GLOBAL = {"x_embedder.proj": ["patch_embedding"],
          "t_embedder.mlp.0": ["time_embedding.mlp.0"],
          "t_embedder.mlp.2": ["time_embedding.mlp.2"],
          "y_embedder.y_proj.0": ["text_embedding.0"], "y_embedder.y_proj.2": ["text_embedding.2"],
          "final_layer.linear": ["head.head"],
          "final_layer.adaLN_modulation.1": ["head.modulation.1"]}
BLOCK = {"adaLN_modulation.1": ["modulation.1"], "pre_crs_attn_norm": ["norm3"],
         "attn.qkv": ["self_attn.q", "self_attn.k", "self_attn.v"],
         "attn.q_norm": ["self_attn.norm_q"], "attn.k_norm": ["self_attn.norm_k"],
         "attn.proj": ["self_attn.o"], "cross_attn.q_linear": ["cross_attn.q"],
         "cross_attn.kv_linear": ["cross_attn.k", "cross_attn.v"],
         "cross_attn.proj": ["cross_attn.o"], "cross_attn.q_norm": ["cross_attn.norm_q"],
         "cross_attn.k_norm": ["cross_attn.norm_k"],
         "ffn.w1": ["ffn.w1"], "ffn.w2": ["ffn.w2"], "ffn.w3": ["ffn.w3"]}


def _native_dit(root) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for p in sorted((root / "dit").glob("*.safetensors")):
        out.update(load_file(p))
    return out


def _to_comfy(native: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in native.items():
        module, param = name.rsplit(".", 1)
        if module.startswith("blocks."):
            _, i, rest = module.split(".", 2)
            targets = [f"blocks.{i}.{c}" for c in BLOCK[rest]]
        else:
            targets = GLOBAL[module]
        for j, c in enumerate(torch.chunk(t, len(targets), 0)):
            out[f"{targets[j]}.{param}"] = c.contiguous()
    return out


def _cli(*args) -> int:
    return main([str(a) for a in args])


def test_native_to_comfy_and_back_bit_for_bit(tiny_native, tmp_path):
    native = _native_dit(tiny_native)
    assert _cli("convert", "--src", tiny_native, "--dst", tmp_path / "c", "--to", "comfy",
                "-q") == 0
    written = load_file(tmp_path / "c" / "diffusion_model.safetensors")
    expected = _to_comfy(native)
    assert sorted(written) == sorted(expected)
    for k, t in expected.items():
        assert written[k].dtype == t.dtype and torch.equal(written[k], t), k
    assert _cli("convert", "--src", tmp_path / "c" / "diffusion_model.safetensors", "--dst",
                tmp_path / "back", "--to", "native", "-q") == 0
    back = _native_dit(tmp_path / "back")
    assert sorted(back) == sorted(native)
    for k, t in native.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k
    cfg = json.loads((tmp_path / "back" / "dit" / "config.json").read_text())
    assert cfg == json.loads((tiny_native / "dit" / "config.json").read_text())
    for comp in ("vae", "text_encoder", "tokenizer", "scheduler"):
        assert not (tmp_path / "back" / comp).exists()
    # its own earlier output is replaced with --force (it was refused as "not a checkpoint")
    assert _cli("convert", "--src", tiny_native, "--dst", tmp_path / "c", "--to", "comfy",
                "--force", "-q") == 0
    assert load_file(tmp_path / "c" / "diffusion_model.safetensors").keys() == written.keys()


def test_prefixed_bf16_file_reads_into_fastvideo_layout(tiny_native, tmp_path):
    """A file with ComfyUI's ``model.diffusion_model.`` prefix, converted straight to FastVideo
    keys, equals converting the native checkpoint."""
    comfy = {f"model.diffusion_model.{k}": v.to(torch.bfloat16)
             for k, v in _to_comfy(_native_dit(tiny_native)).items()}
    src = tmp_path / "kijai_bf16.safetensors"
    save_file(comfy, src)
    assert _cli("convert", "--src", src, "--dst", tmp_path / "fv", "-q") == 0
    assert _cli("convert", "--src", tiny_native, "--dst", tmp_path / "ref", "--dtype", "bf16",
                "--lora", "none", "-q") == 0
    a = load_file(next((tmp_path / "fv" / "transformer").glob("*.safetensors")))
    b = {}
    for p in (tmp_path / "ref" / "transformer").glob("*.safetensors"):
        b.update(load_file(p))
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _scaled_fp8(native: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """An fp8_e4m3fn_scaled comfy dict (2-D weights quantized with a per-tensor scale) and the
    float32 dequantization of each quantized weight, computed here."""
    comfy = _to_comfy(native)
    out, deq = {}, {}
    for k, t in comfy.items():
        if k.endswith(".weight") and t.ndim == 2:
            scale = (t.float().abs().max() / 448).reshape(())
            q = (t.float() / scale).to(torch.float8_e4m3fn)
            out[k] = q
            out[k[: -len(".weight")] + ".scale_weight"] = scale.to(torch.float32)
            deq[k] = q.to(torch.float32) * scale.to(torch.float32)
        else:
            out[k] = t
    out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out, deq


@pytest.mark.parametrize("dtype,torch_dtype", [("fp32", torch.float32), ("keep", torch.bfloat16)])
def test_fp8_scaled_reads_as_the_float32_dequantization(tiny_native, tmp_path, dtype,
                                                         torch_dtype):
    comfy, deq = _scaled_fp8(_native_dit(tiny_native))
    src = tmp_path / "kijai_fp8_e4m3fn_scaled.safetensors"
    save_file(comfy, src)
    assert _cli("convert", "--src", src, "--dst", tmp_path / "out", "--to", "comfy", "--dtype",
                dtype, "-q") == 0
    got = load_file(tmp_path / "out" / "diffusion_model.safetensors")
    assert "scaled_fp8" not in got and not any(k.endswith(".scale_weight") for k in got)
    for k, want in deq.items():
        assert got[k].dtype == torch_dtype and torch.equal(got[k], want.to(torch_dtype)), k
    for k, t in comfy.items():
        if k not in deq and k != "scaled_fp8" and not k.endswith(".scale_weight"):
            exp = t if dtype == "keep" else t.to(torch.float32)
            assert torch.equal(got[k], exp), k


def test_fp8_without_marker_and_with_input_scales_reads_the_same(tiny_native, tmp_path):
    """WanVideoWrapper reads a file as scaled from its ``scale_weight`` tensors alone, and
    ``scale_input`` (activation scales) changes no weight: both give the same dequantization."""
    comfy, deq = _scaled_fp8(_native_dit(tiny_native))
    del comfy["scaled_fp8"]
    for k in deq:
        comfy[k[: -len(".weight")] + ".scale_input"] = torch.tensor(3.5)
    src = tmp_path / "no_marker.safetensors"
    save_file(comfy, src)
    assert _cli("convert", "--src", src, "--dst", tmp_path / "out", "--to", "comfy", "--dtype",
                "fp32", "-q") == 0
    got = load_file(tmp_path / "out" / "diffusion_model.safetensors")
    assert not any(k.endswith((".scale_input", ".scale_weight")) for k in got)
    for k, want in deq.items():
        assert torch.equal(got[k], want), k


def test_fp8_dequantization_that_overflows_float16_is_refused(tiny_native, tmp_path, capsys):
    comfy, _ = _scaled_fp8(_native_dit(tiny_native))
    comfy[f"{W}.scale_weight"] = torch.tensor(1e4)  # 448 * 1e4 > 65504
    src = tmp_path / "big.safetensors"
    save_file(comfy, src)
    refused(capsys, "convert", "--src", src, "--dst", tmp_path / "out", "--dtype", "fp16", "-q",
            says="overflows float16")
    assert not (tmp_path / "out").exists()


def test_planning_reads_only_the_header_and_the_scales(tiny_native, tmp_path, monkeypatch):
    """The plan of a (possibly 27 GB) fp8 file reads no weight: only the one-value scales."""
    from longcat_tools.checkpoint import comfy_single

    comfy, _ = _scaled_fp8(_native_dit(tiny_native))
    src = tmp_path / "fp8.safetensors"
    save_file(comfy, src)
    seen: list[str] = []
    real = comfy_single.read_tensor

    def spy(f, info):
        seen.append(info.name)
        return real(f, info)

    monkeypatch.setattr(comfy_single, "read_tensor", spy)
    comfy_single.read(src)
    assert seen and all(n.endswith(".scale_weight") for n in seen)


@pytest.fixture
def fp8_dict(tiny_native):
    return _scaled_fp8(_native_dit(tiny_native))[0]


W = "blocks.0.self_attn.q"


@pytest.mark.parametrize("edit,says", [
    (lambda d: d.pop(f"{W}.scale_weight"), "has no scale"),
    (lambda d: d.update({f"{W}.scale_weight": torch.ones(2)}), "must be one float value"),
    (lambda d: d.update({f"{W}.scale_weight": torch.tensor(0.0)}), "not a positive finite"),
    (lambda d: d.update({f"{W}.scale_weight": torch.tensor(float("nan"))}), "not a positive"),
    (lambda d: d.update({"blocks.0.norm3.scale_weight": torch.tensor(1.0)}), "not float8"),
    (lambda d: d.update({"blocks.0.norm3.scale_input": torch.tensor(1.0)}),
     "belongs to no scaled float8 weight"),
    (lambda d: d.update({f"{W}.scale_input": torch.ones(2)}), "must be one value"),
    (lambda d: d.update({f"{W}.bias": torch.zeros(3)}), "has shape"),
    (lambda d: d.update({"blocks.0.extra.weight": torch.zeros(2)}), "unknown ComfyUI DiT"),
    (lambda d: d.pop("blocks.1.ffn.w2.weight"), "is missing"),
    (lambda d: d.update({"blocks.0.norm3.weight": d["blocks.0.norm3.weight"].to(torch.int32)}),
     "is I32, not floating point"),
    (lambda d: d.update({"model.diffusion_model.head.head.bias": torch.zeros(1)}), "prefix"),
])
def test_hostile_single_files_are_refused(fp8_dict, tmp_path, capsys, edit, says):
    edit(fp8_dict)
    src = tmp_path / "bad.safetensors"
    save_file(fp8_dict, src)
    refused(capsys, "convert", "--src", src, "--dst", tmp_path / "out", "-q", says=says)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option", [["--lora", "distilled"], ["--copy"]])
def test_options_a_single_file_source_has_nothing_for_are_refused(tiny_native, tmp_path, capsys,
                                                                  option):
    """--lora with any name, even one that does not exist, was accepted and did nothing."""
    assert _cli("convert", "--src", tiny_native, "--dst", tmp_path / "c", "--to", "comfy",
                "-q") == 0
    refused(capsys, "convert", "--src", tmp_path / "c" / "diffusion_model.safetensors", "--dst",
            tmp_path / "out", *option, "-q", code=2, says="is a single-file DiT, with no "
            "adapters or other files beside it")
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_shard_as_the_source_says_to_pass_the_folder(tiny_native, tmp_path,
                                                                   capsys):
    """It said only "unknown ComfyUI DiT tensor 'x_embedder.proj.weight'", naming no file."""
    assert _cli("convert", "--src", tiny_native, "--dst", tmp_path / "one", "--to", "native",
                "-q") == 0
    shard = tmp_path / "one" / "dit" / "diffusion_pytorch_model.safetensors"
    line = refused(capsys, "convert", "--src", shard, "--dst", tmp_path / "out", "-q",
                   says="not a ComfyUI single-file DiT; to convert a checkpoint, pass its folder")
    assert line.startswith(f"error: {shard}: unknown ComfyUI DiT tensor")


def test_non_safetensors_file_is_refused(tmp_path, capsys):
    src = tmp_path / "model.ckpt"
    src.write_bytes(b"x")
    refused(capsys, "convert", "--src", src, "--dst", tmp_path / "out", "-q",
            says="must be a .safetensors DiT")


def test_verify_checks_a_comfy_file_and_the_folder_convert_writes(tiny_native, fp8_dict, tmp_path,
                                                                   capsys):
    """verify refused what convert --to comfy writes ("not a LongCat-Video checkpoint")."""
    from longcat_tools.verify import verify

    assert _cli("convert", "--src", tiny_native, "--dst", tmp_path / "c", "--to", "comfy",
                "-q") == 0
    folder, file = tmp_path / "c", tmp_path / "c" / "diffusion_model.safetensors"
    for path in (folder, file):
        report = verify(path, deep=True)
        assert report.status == "pass", [(c.file, c.message) for c in report.failures()]
        assert report.layout == "comfy-single"
        assert schemas.errors(report.to_json(), "verify_report") == []  # its enums lacked comfy
    checked = {(c.name, c.status) for c in verify(folder, deep=True).checks}
    assert {("layout", "pass"), ("deep", "pass"), ("checksum", "pass")} <= checked
    # the folder's list names its file relative to the folder, also when the file is verified
    assert verify(file, checksums=folder / "checksums.sha256").status == "pass"
    for extra in (["--against-hub"], ["--forward"]):  # no hub record, not run here: refused
        assert _cli("verify", file, *extra, "-q") == 2
        assert "ComfyUI single-file DiT" in capsys.readouterr().err
    save_file(fp8_dict, tmp_path / "fp8.safetensors")
    assert verify(tmp_path / "fp8.safetensors", deep=True).status == "pass"
    fp8_dict[f"{W}.scale_weight"] = torch.tensor(0.0)  # what convert refuses, verify fails
    save_file(fp8_dict, tmp_path / "bad.safetensors")
    bad = verify(tmp_path / "bad.safetensors").failures()
    assert len(bad) == 1 and "not a positive finite" in bad[0].message
    plain = load_file(file)
    plain[f"{W}.weight"][0, 0] = float("nan")
    save_file(plain, tmp_path / "nan.safetensors")
    assert verify(tmp_path / "nan.safetensors").status == "pass"  # headers are sound
    bad = verify(tmp_path / "nan.safetensors", deep=True).failures()
    assert len(bad) == 1 and f"{W}.weight (1 NaN" in bad[0].message
    assert _cli("verify", tmp_path / "nan.safetensors", "--deep", "-q") == 1


def test_the_fused_lora_record_travels_through_a_comfy_file(tiny_native, tmp_path):
    """A ComfyUI file has no config: converting a fused checkpoint dropped its _fused_loras, so
    the merged weights came back looking unfused (and run no longer asked for --distill)."""
    fused = tmp_path / "fused"
    assert _cli("lora", "fuse", "distilled", "-m", tiny_native, "--dst", fused, "-q") == 0
    assert _cli("convert", "--src", fused, "--dst", tmp_path / "c", "--to", "comfy", "-q") == 0
    assert _cli("convert", "--src", tmp_path / "c" / "diffusion_model.safetensors", "--dst",
                tmp_path / "back", "--to", "native", "-q") == 0
    want = json.loads((fused / "dit" / "config.json").read_text())["_fused_loras"]
    got = json.loads((tmp_path / "back" / "dit" / "config.json").read_text())
    assert want and got["_fused_loras"] == want
