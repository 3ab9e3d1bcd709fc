"""ComfyUI (kohya ``lora_unet_``) LoRA files: attach, export back byte-equal, same delta.

The files are written here with ComfyUI's naming rule (``lora_unet_`` + the WanVideoWrapper
module path with ``.`` as ``_``; ``.lora_down.weight`` = A, ``.lora_up.weight`` = B,
``.alpha``: scale alpha / rank) and the expected deltas computed here from that rule.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from hostile import refused
from safetensors.torch import load_file, save_file

from longcat_tools.cli import main
from longcat_tools.lora import formats as lf

R = 4
C = 64  # tiny hidden size
# comfy module -> (out, in) for the tiny preset
TARGETS = {"blocks.0.self_attn.q": (C, C), "blocks.0.self_attn.k": (C, C),
           "blocks.0.self_attn.v": (C, C), "blocks.1.cross_attn.k": (C, C),
           "blocks.1.cross_attn.v": (C, C), "blocks.0.ffn.w1": (256, C),
           "blocks.1.modulation.1": (6 * C, 32), "head.head": (4 * 16, C)}
ALPHA = 8.0


def _comfy_lora(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m, (o, i) in TARGETS.items():
        k = "lora_unet_" + m.replace(".", "_")
        out[f"{k}.lora_down.weight"] = torch.randn(R, i, generator=g)
        out[f"{k}.lora_up.weight"] = torch.randn(o, R, generator=g)
        out[f"{k}.alpha"] = torch.tensor(ALPHA)
    return out


def _expected_deltas(sd) -> dict[str, torch.Tensor]:
    """Native module -> stacked (alpha/rank) * up @ down of its comfy targets."""
    def d(m):
        k = "lora_unet_" + m.replace(".", "_")
        up, down = sd[f"{k}.lora_up.weight"], sd[f"{k}.lora_down.weight"]
        return (ALPHA / R) * up.double() @ down.double()

    return {"blocks.0.attn.qkv": torch.cat([d(f"blocks.0.self_attn.{x}") for x in "qkv"]),
            "blocks.1.cross_attn.kv_linear": torch.cat([d(f"blocks.1.cross_attn.{x}")
                                                        for x in "kv"]),
            "blocks.0.ffn.w1": d("blocks.0.ffn.w1"),
            "blocks.1.adaLN_modulation.1": d("blocks.1.modulation.1"),
            "final_layer.linear": d("head.head")}


@pytest.fixture
def ckpt(tiny_native, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_native, dst)
    return dst


def _cli(*args) -> int:
    return main([str(a) for a in args])


def test_reader_gives_comfyui_delta(tmp_path):
    sd = _comfy_lora()
    path = tmp_path / "kohya.safetensors"
    save_file(sd, path)
    assert lf.read_lora(path).format == "comfy"
    got = lf.effective_deltas(path)
    want = _expected_deltas(sd)
    assert sorted(got) == sorted(want)
    for m, t in want.items():
        assert torch.allclose(got[m], t, rtol=1e-12, atol=1e-12), m


@pytest.mark.parametrize("auto", [True, False])
def test_attach_then_export_comfy_is_byte_equal(ckpt, tmp_path, auto):
    sd = _comfy_lora()
    src = tmp_path / "kohya.safetensors"
    save_file(sd, src)
    fmt = [] if auto else ["--format", "comfy"]
    assert _cli("lora", "attach", src, "--name", "k", "-m", ckpt, *fmt, "-q") == 0
    out = tmp_path / "back.safetensors"
    assert _cli("lora", "export", "k", "-m", ckpt, "--format", "comfy", "--out", out, "-q") == 0
    back = load_file(out)
    assert sorted(back) == sorted(sd)
    for k, t in sd.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape, k
        assert back[k].numpy().tobytes() == t.numpy().tobytes(), k


def test_comfy_and_native_files_apply_the_same_delta(ckpt, tmp_path):
    """The comfy file attached (stored natively) and exported as native gives the delta the
    comfy rule gives."""
    sd = _comfy_lora(1)
    src = tmp_path / "kohya.safetensors"
    save_file(sd, src)
    assert _cli("lora", "attach", src, "--name", "k", "-m", ckpt, "-q") == 0
    nat = tmp_path / "native.safetensors"
    assert _cli("lora", "export", "k", "-m", ckpt, "--format", "native", "--out", nat, "-q") == 0
    assert lf.read_lora(nat).format == "native"
    got = lf.effective_deltas(nat)
    for m, t in _expected_deltas(sd).items():
        assert torch.allclose(got[m], t, rtol=1e-6, atol=1e-9), m


def test_diffusion_model_spelling_reads_like_lora_unet(ckpt, tmp_path):
    """ComfyUI maps ``diffusion_model.<module>`` to the same weight as ``lora_unet_<module>``
    (LightX2V-style files, alpha stored as I64): same deltas, exported in the kohya spelling."""
    sd = {k: v for k, v in _comfy_lora(2).items() if not k.endswith(".alpha")}
    generic = {}
    for k, v in sd.items():
        stem, suffix = k.split(".", 1)
        module = next(m for m in TARGETS if "lora_unet_" + m.replace(".", "_") == stem)
        generic[f"diffusion_model.{module}.{suffix}"] = v
        generic[f"diffusion_model.{module}.alpha"] = torch.tensor(int(ALPHA), dtype=torch.int64)
    src = tmp_path / "lightx2v_style.safetensors"
    save_file(generic, src)
    assert lf.read_lora(src).format == "comfy"
    got = lf.effective_deltas(src)
    want = _expected_deltas({**sd, **{f"lora_unet_{m.replace('.', '_')}.alpha":
                                      torch.tensor(ALPHA) for m in TARGETS}})
    assert sorted(got) == sorted(want)
    for m, t in want.items():
        assert torch.allclose(got[m], t, rtol=1e-12, atol=1e-12), m
    assert _cli("lora", "attach", src, "--name", "g", "-m", ckpt, "-q") == 0
    out = tmp_path / "back.safetensors"
    assert _cli("lora", "export", "g", "-m", ckpt, "--format", "comfy", "--out", out, "-q") == 0
    back = load_file(out)
    assert sorted(k for k in back if not k.endswith(".alpha")) == sorted(sd)
    for k, t in sd.items():
        assert torch.equal(back[k], t), k


KQ = "lora_unet_blocks_0_self_attn_q"


@pytest.mark.parametrize("edit,says", [
    (lambda d: d.update({f"{KQ}.diff": torch.zeros(C, C)}), "full-weight delta (.diff)"),
    (lambda d: d.update({"lora_unet_blocks_0_ffn_w1.diff_b": torch.zeros(256)}), ".diff_b"),
    (lambda d: d.update({f"{KQ}.set_weight": torch.zeros(C, C)}), ".set_weight"),
    (lambda d: d.update({"lora_unet_blocks_0_nothing.lora_up.weight": torch.zeros(C, R)}),
     "targets no module"),
    (lambda d: d.update({f"{KQ}.lora_up.weight": torch.zeros(C + 1, R)}), ""),
    (lambda d: d.pop("lora_unet_blocks_0_self_attn_k.lora_down.weight"), ""),
    (lambda d: d.update({f"{KQ}.hada_w1_a": torch.zeros(1)}), "unknown key"),
    (lambda d: d.update({"diffusion_model.blocks.0.self_attn.q.lora_up.weight":
                         torch.zeros(C, R)}), "name the same tensor"),
    (lambda d: d.update({f"{KQ}.alpha": torch.ones(2)}), "must be one number"),
])
def test_hostile_comfy_loras_are_refused(ckpt, tmp_path, capsys, edit, says):
    sd = _comfy_lora()
    edit(sd)
    src = tmp_path / "bad.safetensors"
    save_file(sd, src)
    refused(capsys, "lora", "attach", src, "--name", "bad", "-m", ckpt, "-q", says=says or None)
    assert not (ckpt / "lora" / "bad").exists()
