"""The runner's DiT: every layout loads to the same model, LoRA math, condition frames, KV cache,
BSA plumbing, forward_check. (Parity with the original code is checked in scratch scripts that
import it; these tests pin properties that must hold independently of it.)"""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from runner_layouts import lora_to_fastvideo, make_layout

from longcat_tools.errors import LongcatError
from longcat_tools.runner import load_transformer
from longcat_tools.runner.attention import BSAParams
from longcat_tools.runner.compare import forward_check, probe_inputs
from longcat_tools.runner.dit import LongCatTransformer3DModel
from longcat_tools.runner.lora import read_tensors


@pytest.fixture(scope="module")
def layouts(tiny_native, tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    return {"native": tiny_native,
            "converted-fastvideo": make_layout(tiny_native, root / "cfv", "converted"),
            "converted-native": make_layout(tiny_native, root / "cnat", "converted", "native"),
            "fastvideo-single": make_layout(tiny_native, root / "single", "fastvideo-single")}


@pytest.fixture(scope="module")
def dit(tiny_native):
    return load_transformer(tiny_native)


def _inputs(dit, **kw):
    inp = probe_inputs(dit, **kw)
    return inp["hidden_states"], inp["timestep"], inp["encoder_hidden_states"], \
        inp["encoder_attention_mask"]


@pytest.mark.parametrize("name", ["converted-fastvideo", "converted-native", "fastvideo-single"])
def test_every_layout_gives_the_native_forward_bit_for_bit(layouts, name):
    r = forward_check(layouts["native"], against=layouts[name])
    assert r["ok"] and r["identical"], r
    assert r["against_layout"].startswith(name.split("-")[0])


def test_load_from_the_transformer_folder_and_describe_layout(layouts):
    m = load_transformer(layouts["converted-fastvideo"] / "transformer")
    assert m.layout == "converted (fastvideo keys)"
    assert isinstance(m, LongCatTransformer3DModel)
    assert not any(p.requires_grad for p in m.parameters())


def test_forward_check_fails_on_different_weights(tiny_native, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_native, other)
    from safetensors.torch import load_file, save_file

    shard = sorted((other / "dit").glob("*-00001-of-*.safetensors"))[0]
    sd = load_file(shard)
    name = next(k for k in sd if k.endswith(".weight") and sd[k].dim() == 2)
    sd[name] = sd[name] * 1.01
    save_file(sd, shard, metadata={"format": "pt"})
    r = forward_check(tiny_native, against=other)
    assert not r["ok"] and r["rel_diff"] > 1e-5 and "differ" in r["problems"][0]


def test_forward_check_compares_weights_whatever_the_bsa_setting(tiny_native, tmp_path):
    """`bsa enable` on one of two byte-identical checkpoints failed the check, blaming the
    weights: each probe ran its config's attention."""
    from longcat_tools.cli import main

    other = tmp_path / "other"
    shutil.copytree(tiny_native, other)
    assert main(["bsa", "enable", "-m", str(other), "-q"]) == 0
    r = forward_check(tiny_native, against=other)
    assert r["ok"] and r["identical"], r["problems"]


def test_incomplete_or_misshapen_checkpoint_is_one_clear_error(tiny_native, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(tiny_native, bad)
    shard = sorted((bad / "dit").glob("*.safetensors"))[-1]
    sd = load_file(shard)
    key = sorted(sd)[0]
    shape = sd[key].shape
    sd[key] = torch.zeros(3, 3)
    save_file(sd, shard, metadata={"format": "pt"})
    with pytest.raises(LongcatError, match=f"'{key}' has shape"):
        load_transformer(bad)
    sd[key] = torch.zeros(shape, dtype=torch.int32)  # was cast to its values and loaded
    save_file(sd, shard, metadata={"format": "pt"})
    with pytest.raises(LongcatError, match=f"'{key}' is I32, not floating point"):
        load_transformer(bad)


def _merged_copy(dit, adapters):
    """A LoRA-free copy whose weights have the LoRA updates merged: W + m*a*BlockDiag(ups)@down."""
    merged = load_transformer(dit._path)
    modules = dict(merged.named_modules())
    for deltas in adapters:
        for module, d in deltas.items():
            up = torch.block_diag(*d.ups)
            with torch.no_grad():
                modules[module].weight += d.multiplier * float(d.alpha_scale) * (up @ d.down)
    return merged


def test_runtime_lora_equals_merged_weights_alone_and_together(tiny_native):
    dit = load_transformer(tiny_native)
    dit._path = tiny_native
    dit.load_lora(tiny_native / "lora/cfg_step_lora.safetensors", "cfg", scale=0.7)
    dit.load_lora(tiny_native / "lora/refinement_lora.safetensors", "ref")
    x, t, y, mask = _inputs(dit)
    base = dit(x, t, y, mask, num_cond_latents=1)
    for names in (["cfg"], ["ref"], ["cfg", "ref"]):
        dit.enable_loras(names)
        got = dit(x, t, y, mask, num_cond_latents=1)
        ref = _merged_copy(dit, [dit.lora_registry[n] for n in names])(x, t, y, mask,
                                                                      num_cond_latents=1)
        assert (got - base).abs().max() > 1e-3  # the adapter does something
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    dit.disable_loras()
    assert torch.equal(dit(x, t, y, mask, num_cond_latents=1), base)


def test_fastvideo_lora_format_gives_the_native_numbers(tiny_native, tmp_path):
    fv = lora_to_fastvideo(tiny_native / "lora/refinement_lora.safetensors",
                           tmp_path / "fv.safetensors")
    assert any(k.endswith(".to_q.lora_A") for k in read_tensors(fv))
    dit = load_transformer(tiny_native)
    dit.load_lora(tiny_native / "lora/refinement_lora.safetensors", "native")
    dit.load_lora(fv, "fastvideo")
    x, t, y, mask = _inputs(dit)
    dit.enable_loras(["native"])
    a = dit(x, t, y, mask)
    dit.enable_loras(["fastvideo"])
    assert torch.equal(dit(x, t, y, mask), a)


def test_lora_that_does_not_fit_is_refused(tiny_native, tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({"blocks.0.ffn.w1.lora_A": torch.zeros(4, 7), "blocks.0.ffn.w1.lora_B":
               torch.zeros(5, 4)}, bad)
    dit = load_transformer(tiny_native)
    with pytest.raises(LongcatError, match="blocks.0.ffn.w1"):
        dit.load_lora(bad, "bad")


def test_condition_frames_never_see_noise_frames(dit):
    x, t, y, mask = _inputs(dit)
    a = dit(x, t, y, mask, num_cond_latents=1)
    x2 = x.clone()
    x2[:, :, 1:] += torch.randn_like(x2[:, :, 1:])
    b = dit(x2, t, y, mask, num_cond_latents=1)
    assert torch.equal(a[:, :, :1], b[:, :, :1])  # block-causal: cond tokens unaffected
    assert not torch.allclose(a[:, :, 1:], b[:, :, 1:])


def test_kv_cache_path_equals_the_full_condition_forward(dit):
    x, t, y, mask = _inputs(dit, frames=4)
    n = 2
    x[1, :, :n] = x[0, :, :n]  # like CFG: one set of condition frames, a batch-1 cache
    full = dit(x, t.masked_fill(torch.arange(4) < n, 0), y, mask, num_cond_latents=n)
    zeros = torch.zeros(1, 1, 7, y.shape[-1])
    _, cache = dit(x[:1, :, :n], torch.zeros(1, n), zeros, return_kv=True, skip_crs_attn=True)
    assert set(cache) == set(range(dit.dims.depth))
    assert cache[0][0].shape == (1, dit.dims.num_heads, n * 16, dit.dims.head_dim)
    cached = dit(x[:, :, n:], t[:, n:], y, mask, num_cond_latents=n, kv_cache=cache)
    torch.testing.assert_close(cached, full[:, :, n:], rtol=1e-5, atol=1e-5)
    _, offloaded = dit(x[:1, :, :n], torch.zeros(1, n), zeros, return_kv=True,
                       skip_crs_attn=True, offload_kv_cache=True)
    assert offloaded[1][0].device.type == "cpu"


def test_padded_text_tokens_are_attended_as_zeros(tiny_native):
    """text_tokens_zero_pad (the shipped config): padding changes the output (the tokens stay in
    the softmax) but their content does not (they are zeroed)."""
    dit = load_transformer(tiny_native)
    x, t, y, mask = _inputs(dit)
    a = dit(x, t, y, mask)
    y2 = y.clone()
    y2[0, :, 5:] = torch.randn_like(y2[0, :, 5:])
    assert torch.equal(dit(x, t, y2, mask), a)
    dit.text_tokens_zero_pad = False
    b = dit(x, t, y, mask)
    assert not torch.allclose(a[:1], b[:1]) and torch.allclose(a[1:], b[1:], atol=1e-6)


def test_output_is_fp32_and_bf16_weights_track_fp32(tiny_native, dit):
    x, t, y, mask = _inputs(dit)
    ref = dit(x, t, y, mask, num_cond_latents=1)
    low = load_transformer(tiny_native, dtype="bf16")
    out = low(x, t, y, mask, num_cond_latents=1)
    assert out.dtype == torch.float32
    assert ((out - ref).norm() / ref.norm()).item() < 0.05


def test_bsa_keeping_every_chunk_is_dense_and_sparsity_changes_output(tiny_native):
    pytest.importorskip("longcat_tools.kernels", reason="BSA runs through the kernels package")
    dit = load_transformer(tiny_native)
    x, t, y, mask = _inputs(dit, frames=4)
    dense = dit(x, t, y, mask, num_cond_latents=2)
    # sparsity 0 (every key chunk kept) is outside what a config or enable_bsa takes (0, 1)
    dit.bsa = BSAParams(sparsity=0.0, cdf_threshold=None, chunk_q=(2, 2, 2), chunk_k=(2, 2, 2))
    torch.testing.assert_close(dit(x, t, y, mask, num_cond_latents=2), dense, rtol=1e-5,
                               atol=1e-5)
    dit.enable_bsa({"sparsity": 0.75, "chunk_3d_shape_q": [2, 2, 2],
                    "chunk_3d_shape_k": [2, 2, 2]})
    sparse = dit(x, t, y, mask, num_cond_latents=2)
    assert dit.bsa.sparsity == 0.75 and not torch.allclose(sparse, dense, atol=1e-3)
    assert math.isfinite(sparse.abs().max().item())
    dit.disable_bsa()
    assert torch.equal(dit(x, t, y, mask, num_cond_latents=2), dense)


@pytest.mark.parametrize("fp32", [False, True])
def test_runtime_lora_rounds_like_the_original_in_bf16(fp32):
    """The original's multi-LoRA forward, written out here: ``org + sum_i(up_i(down_i(x))
    .to(dtype) * multiplier * alpha_scale)``, summed from the first update in order, with
    alpha_scale a tensor in the model dtype. Ours must give it bit for bit in bf16."""
    import torch.nn.functional as F

    from longcat_tools.runner.dit import Linear
    from longcat_tools.runner.lora import LoraDelta

    g = torch.Generator().manual_seed(0)
    bf = torch.bfloat16
    layer = Linear(24, 36).to(bf)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(36, 24, generator=g))
        layer.bias.copy_(torch.randn(36, generator=g))
    specs = [(torch.randn(12, 24, generator=g), [torch.randn(12, 4, generator=g)
                                                 for _ in range(3)], 0.5, 0.7),
             (torch.randn(4, 24, generator=g), [torch.randn(36, 4, generator=g)], 1.0, 1.0),
             (torch.randn(8, 24, generator=g), [torch.randn(36, 8, generator=g)], 0.375, 1.3)]
    layer.loras = [LoraDelta(d, u, torch.tensor(a), m).to("cpu", bf) for d, u, a, m in specs]
    x = torch.randn(5, 7, 24, generator=g).to(bf)

    w, b = layer.weight, layer.bias
    want = F.linear(x.float(), w.float(), b.float()) if fp32 else F.linear(x, w, b)
    total = 0
    for down, ups, alpha, mult in specs:
        down, ups = down.to(bf), [u.to(bf) for u in ups]
        h = x
        if fp32:
            h, down, ups = h.float(), down.float(), [u.float() for u in ups]
        lx = F.linear(h, down)
        parts = zip(lx.chunk(len(ups), -1), ups, strict=True)
        lx = torch.cat([F.linear(c, u) for c, u in parts], -1)
        total = total + lx.to(bf) * mult * torch.tensor(alpha).to(bf)
    want = want + total
    with torch.no_grad():
        got = layer(x, fp32=fp32)
    assert got.dtype == want.dtype and torch.equal(got, want)
