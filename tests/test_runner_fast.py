"""Fused glue (runner.fast_ops), cached RoPE tables and the memory options (runner.offload)."""

from __future__ import annotations

import logging

import pytest
import torch

from longcat_tools.kernels import fp8
from longcat_tools.kernels.compiled import Compiled
from longcat_tools.runner import fast_ops, offload
from longcat_tools.runner.dit import LongCatTransformer3DModel, rope_3d_table, rope_table_cached
from longcat_tools.synth import dit_config


def _model(seed: int = 0, dtype: torch.dtype = torch.float32) -> LongCatTransformer3DModel:
    torch.manual_seed(seed)
    m = LongCatTransformer3DModel.from_config(dit_config("tiny"))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.2 if p.dim() > 1 else 0.05)
    return m.to(dtype).eval()


def _inputs(m: LongCatTransformer3DModel, n_cond: int = 0):
    g = torch.Generator().manual_seed(1)
    c = m.dims.caption_channels
    x = torch.randn(2, 16, 4, 8, 8, generator=g)
    t = torch.tensor([700.0, 130.0])[:, None].repeat(1, 4)
    t[:, :n_cond] = 0
    y = torch.randn(2, 1, 512, c, generator=g)
    mask = torch.zeros(2, 512, dtype=torch.long)
    mask[0, :7], mask[1, :19] = 1, 1
    return x, t, y, mask


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(autouse=True)
def _eager():
    """Fused functions run eagerly here (compiling costs tens of seconds on CPU)."""
    fast_ops.set_compile(False)
    yield
    fast_ops.set_compile(True)


def test_fp32_path_is_bit_identical_with_fast_ops_on():
    m = _model()
    args = _inputs(m, n_cond=1)
    with torch.no_grad():
        plain = m(*args, num_cond_latents=1)
        m.enable_fast_ops()
        fast = m(*args, num_cond_latents=1)
    assert torch.equal(plain, fast)


def test_rope_cache_returns_the_same_table():
    cos, sin = rope_3d_table((3, 4, 5), 24, torch.device("cpu"))
    c1, s1 = rope_table_cached((3, 4, 5), 24, torch.device("cpu"))
    c2, _ = rope_table_cached((3, 4, 5), 24, torch.device("cpu"))
    assert torch.equal(cos, c1) and torch.equal(sin, s1) and c1 is c2
    assert not c1.is_inference()


@pytest.mark.parametrize("n_cond", [0, 1])
def test_bf16_fused_path_runs_and_equals_plain_when_eager(n_cond, monkeypatch):
    """Eagerly the fused functions are the plain path's math, op for op: bit-identical."""
    ref = _model()  # fp32 reference
    m = _model(dtype=torch.bfloat16)
    args = _inputs(m, n_cond)
    calls: dict[str, int] = {}
    for c in fast_ops.ALL:
        def spy(*a, _fn=c.fn, **k):
            calls[_fn.__name__] = calls.get(_fn.__name__, 0) + 1
            return _fn(*a, **k)
        monkeypatch.setattr(c, "fn", spy)
    with torch.no_grad():
        want = ref(*args, num_cond_latents=n_cond)
        plain = m(*args, num_cond_latents=n_cond)
        assert not calls
        m.enable_fast_ops()
        fast = m(*args, num_cond_latents=n_cond)
    depth = len(m.blocks)
    assert calls == {"_modulate": 2 * depth, "_gated_residual": 2 * depth,
                     "_layer_norm": depth, "_rms_norm": depth, "_swiglu": depth,
                     "_norm_rope": 2 * depth}
    assert torch.equal(fast, plain)
    assert _rel(fast, want) < 3e-2  # bf16 vs fp32


@pytest.mark.parametrize("n_cond", [0, 1])
def test_fp8_fused_glue_hands_the_gemms_e4m3_rows_with_the_plain_bits(n_cond, fp8_gemm_inputs):
    """In fp8 the norms and the SwiGLU write the GEMM inputs scaled per token; eagerly that is
    the plain path's scaling of the same bf16 values, so the output is bit-identical. With
    condition frames the cross-attention reads a slice of the rows (B = 2: a strided one)."""
    m = _model(dtype=torch.bfloat16)
    m.to_fp8()
    args = _inputs(m, n_cond)
    seen = fp8_gemm_inputs
    with torch.no_grad():
        plain = m(*args, num_cond_latents=n_cond)
        assert seen == {"Rows": 2 * len(m.blocks), "Tensor": 6 * len(m.blocks)}  # w1, w3
        seen.clear()
        m.enable_fast_ops()
        fast = m(*args, num_cond_latents=n_cond)
    # qkv, cross q, w1, w3, w2 read rows; attention and cross outputs, and the text, tensors
    assert seen == {"Rows": 5 * len(m.blocks), "Tensor": 3 * len(m.blocks)}
    assert torch.equal(fast, plain)


def test_fp8_fused_glue_writes_bf16_for_layers_with_runtime_loras(tiny_native, fp8_gemm_inputs):
    """A run-time LoRA reads the activation itself, so its layers get the bf16 one."""
    from longcat_tools.runner.loading import load_transformer
    from longcat_tools.runner.lora import lora_path

    m = load_transformer(tiny_native, dtype="bf16", fp8=True)
    m.lora_mode = "runtime"
    m.load_lora(lora_path(tiny_native, "distilled"), "distilled")
    m.enable_loras(["distilled"])
    assert m.blocks[0].attn.qkv.loras and m.blocks[0].ffn.w2.loras
    x, t, y, mask = _inputs(m)
    args = (x[:, : m.dims.in_channels].bfloat16(), t, y[..., : m.dims.caption_channels].bfloat16(),
            mask)
    seen = fp8_gemm_inputs
    with torch.no_grad():
        plain = m(*args)
        m.enable_fast_ops()
        fast = m(*args)
    assert "Rows" not in seen
    assert torch.equal(fast, plain)


def test_only_our_fp8_linears_without_runtime_loras_take_rows():
    """A wrapper that shows the e4m3 weight (as PEFT's LoRA layers do), or an e4m3 weight
    without our scale, must get the activation."""
    from longcat_tools.runner.dit import Linear, takes_rows

    lin = Linear(32, 32)
    assert not takes_rows(lin)  # bf16/fp32 weight
    stored = Linear(32, 32)  # diffusers' layerwise casting: e4m3 storage, no scale, bf16 math
    stored.weight.data = stored.weight.data.to(fp8.E4M3)
    assert not takes_rows(stored)
    lin.to_fp8()
    assert takes_rows(lin)

    class Wrapped(torch.nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base_layer = base

        @property
        def weight(self):
            return self.base_layer.weight

    assert not takes_rows(Wrapped(lin)) and not takes_rows(lin, Wrapped(lin))
    lin.loras.append(object())
    assert not takes_rows(lin)


def test_fused_functions_equal_the_plain_math_in_fp32():
    from longcat_tools.runner.dit import RMSNorm, apply_rope

    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2, 60, 24, generator=g)
    norm = RMSNorm(24)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.1, generator=g)
    cos, sin = rope_3d_table((3, 4, 5), 24, torch.device("cpu"))
    want = apply_rope(norm(q), cos, sin)
    assert torch.equal(fast_ops._norm_rope(q, norm.weight, cos, sin, norm.eps), want)


def test_compile_failure_falls_back_to_eager(monkeypatch, caplog):
    def broken(*a, **k):
        raise RuntimeError("no compiler here")

    fn = Compiled(fast_ops._swiglu)
    fn.failed = False
    monkeypatch.setattr(torch, "compile", broken)
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    with caplog.at_level(logging.WARNING, logger="longcat_tools"):
        out = fn(a, b)
    assert torch.equal(out, torch.nn.functional.silu(a) * b)
    assert fn.failed and "no compiler here" in caplog.text


def test_block_swap_streams_blocks_and_keeps_outputs():
    m = _model()
    args = _inputs(m)
    with torch.no_grad():
        want = m(*args)
        swap = offload.enable_block_swap(m, "cpu", resident=1)
        got = m(*args)
    assert torch.equal(got, want)
    n = len(m.blocks)
    assert swap.loads == list(range(1, n))  # every swapped block once, in order, prefetched
    assert not swap._ready  # each released after it ran
    swap.remove()
    with torch.no_grad():
        assert torch.equal(m(*args), want)


def test_on_device_moves_back_home():
    lin = torch.nn.Linear(3, 3)
    with offload.on_device(lin, torch.device("cpu"), home="meta"):
        assert lin.weight.device.type == "cpu"
    assert lin.weight.is_meta


def test_pipeline_with_offload_all_and_vae_tiling_gives_the_same_video(tiny_native):
    from longcat_tools.runner import load_pipeline

    kw = dict(prompt="a cat", height=32, width=32, num_frames=5, steps=1, seed=3)
    want = load_pipeline(tiny_native).t2v(**kw)
    pipe = load_pipeline(tiny_native, offload="all", vae_tiling=True)
    assert pipe.offload_text_encoder and hasattr(pipe.transformer, "block_swap")
    got = pipe.t2v(**kw)
    assert torch.equal(got.latents, want.latents)
    assert pipe.text_encoder.device.type == "cpu"


def test_bad_offload_is_one_line(capsys, tiny_native):
    from longcat_tools.cli import main

    rc = main(["run", "-q", "-m", str(tiny_native), "--task", "t2v", "--offload", "gpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--offload gpu: unknown" in err[0]


def test_the_vae_conv3d_weights_take_channels_last_and_back():
    """Only Conv3d weights change format (the Wan VAE's 4D ones cannot take channels_last_3d)."""
    from longcat_tools.runner.pipeline import conv3d_memory_format

    m = torch.nn.Sequential(torch.nn.Conv3d(4, 8, 3), torch.nn.Conv2d(8, 8, 3),
                            torch.nn.GroupNorm(2, 8))
    x = torch.randn(1, 4, 5, 6, 6)
    want = m[0](x)
    conv3d_memory_format(m, True)
    assert m[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert m[1].weight.is_contiguous()
    assert torch.allclose(m[0](x), want, atol=1e-6)
    conv3d_memory_format(m, False)
    assert m[0].weight.is_contiguous()
