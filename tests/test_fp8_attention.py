"""fp8-mode attention (int8 Q K^T, e4m3 P V): the arithmetic in ``kernels.fp8_attention``, and
when a call takes the kernel. The kernel itself is held to this reference on a GPU
(tests/test_fp8_attention_gpu.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from longcat_tools.kernels import dense
from longcat_tools.kernels import fp8_attention as fa


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _qkv(*shape: int, seed: int = 0, scale_q: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*shape, generator=g) for _ in range(3))
    return [q * scale_q, k, v]


def test_int8_rows_round_half_away_from_zero_with_a_scale_per_row():
    x = torch.tensor([[127.0, 0.5, -0.5, 1.5, -2.5, 63.49], [0, 0, 0, 0, 0, 0]])
    out = fa._int8_rows(x)  # row 0: scale 1, so the values are rounded; row 1: all zero
    assert out.tolist() == [[127.0, 1.0, -1.0, 2.0, -3.0, 63.0], [0.0] * 6]
    y = torch.tensor([[2.54, -1.27, 0.01]])  # scale 0.02: 127, -63.5 -> -64, 0.5 -> 1
    assert torch.allclose(fa._int8_rows(y), torch.tensor([[2.54, -1.28, 0.02]]))


@pytest.mark.parametrize("key_scale", ["token", "head"])
@pytest.mark.parametrize("scale_q", [1.0, 4.0])
def test_the_reference_lands_a_few_percent_from_fp32(scale_q, key_scale):
    """Random data is the hard case (the output is an average with little signal left); the
    bound is what the arithmetic gives, 3.5-4.1% here, with headroom. bf16 SDPA: 0.2%."""
    q, k, v = _qkv(1, 2, 700, 128, scale_q=scale_q)
    exact = F.scaled_dot_product_attention(q, k, v)
    err = _rel(fa.reference(q, k, v, key_scale=key_scale), exact)
    assert 0.01 < err < 0.045


@pytest.mark.parametrize("scale_q", [1.0, 2.0, 4.0])
def test_one_key_scale_per_head_costs_little_error(scale_q):
    """The block sparse recipe scales k once per head (amax ~4.5 sigma over a head of random
    keys, against ~3 sigma per token): its error is 3%, 8% and 12% above the per-token one
    as the scores sharpen (scale_q 1, 2, 4); e4m3 q and k instead (3 mantissa bits) would
    add about 40%."""
    q, k, v = _qkv(1, 2, 700, 128, scale_q=scale_q)
    exact = F.scaled_dot_product_attention(q, k, v)
    token = _rel(fa.reference(q, k, v), exact)
    head = _rel(fa.reference(q, k, v, key_scale="head"), exact)
    assert token < head < 1.15 * token


@pytest.mark.parametrize("key_scale", ["token", "head"])
def test_smoothing_makes_a_shared_key_offset_free(key_scale):
    """A vector added to every key changes no softmax; without the mean subtracted, its large
    channels would set every key's int8 scale and wash out the rest."""
    q, k, v = _qkv(1, 2, 300, 64, seed=1)
    offset = torch.randn(64, generator=torch.Generator().manual_seed(2)) * 30
    base = fa.reference(q, k, v, key_scale=key_scale)
    # int8 roundings that flip
    assert _rel(fa.reference(q, k + offset, v, key_scale=key_scale), base) < 5e-3
    k0 = k + offset
    naive = fa._int8_rows(q) @ fa._int8_rows(k0).transpose(-1, -2) * 64**-0.5
    exact = q @ k0.transpose(-1, -2) * 64**-0.5
    assert _rel(naive - naive.amax(-1, keepdim=True), exact - exact.amax(-1, keepdim=True)) > 0.02


def test_v_keeps_a_scale_per_channel():
    """A channel a thousand times larger than the others leaves their error unchanged."""
    q, k, v = _qkv(1, 1, 256, 32, seed=3)
    loud = v.clone()
    loud[..., 0] *= 1000
    a, b = fa.reference(q, k, v), fa.reference(q, k, loud)
    assert torch.allclose(a[..., 1:], b[..., 1:], rtol=0, atol=0)


def test_value_scales_are_the_channel_amax_over_448():
    """One aminmax pass gives abs().amax's bits: zero, -0.0 and all-negative channels, strided
    (a token-major view, as the DiT's v)."""
    g = torch.Generator().manual_seed(0)
    v = (torch.randn(2, 3, 40, 32, generator=g) * 3).bfloat16()
    v[0, 0, :, 0], v[0, 0, :, 1], v[0, 1, :, 2] = 0.0, -0.0, -5.0
    for x in (v, v.transpose(1, 2).contiguous().transpose(1, 2)):
        amax = x.abs().amax(dim=2).float()
        expected = torch.where(amax > 0, amax / 448.0, 1.0)
        assert torch.equal(fa.value_scales(x), expected)
    assert fa.value_scales(v)[0, 0, :2].tolist() == [1.0, 1.0]
    assert fa.value_scales(v)[0, 1, 2] == torch.tensor(5.0) / 448.0


def test_dense_attention_quantizes_only_on_a_gpu():
    q, k, v = (t.bfloat16() for t in _qkv(1, 2, 64, 32))
    assert fa.default_kinds() == frozenset({"dense", "bsa"})  # measured on an H100
    assert fa.DENSE_KERNELS == ["fa3", "cudnn", "triton"]  # cuDNN's on an H100, FA3's on an H200
    assert not fa.use(q)  # a CPU tensor
    assert torch.equal(dense.attention(q, k, v, fp8=True), dense.attention(q, k, v))


def test_per_tensor_scales_bound_every_value_without_overflow():
    """One scale per tensor, amax / 448; k's and v's cover them less their means (bounded, not
    measured: an e4m3 value keeps its mantissa at any scale that does not overflow); all
    zero -> 1."""
    q, k, v = (t.bfloat16() for t in _qkv(2, 3, 50, 32, seed=4))
    k, v = k + 5.0, v - 3.0
    s_q, s_k, s_v, k_mean, v_mean = fa.per_tensor_scales(q, k, v)
    assert s_q == q.float().abs().amax() / 448.0
    for x, s, mean in ((k, s_k, k_mean), (v, s_v, v_mean)):
        assert torch.equal(mean, x.float().mean(dim=2))
        smoothed = (x.float() - mean[:, :, None]).abs().amax()
        assert smoothed / 448.0 <= s <= (x.float().abs().amax() + mean.abs().amax()) / 448.0
    zeros = torch.zeros(1, 1, 4, 8)
    assert [s.item() for s in fa.per_tensor_scales(zeros, zeros, zeros)[:3]] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("spike", [False, True])
def test_normed_scale_bounds_q_after_its_rms_norm_and_rope(spike):
    """q's scale from its norm weight alone holds every value the norm and RoPE can give: rows
    with all their energy in one channel (the largest weight's, or its pair's) reach the bound,
    random rows stay well inside it."""
    from longcat_tools.runner.dit import RMSNorm, apply_rope, rope_3d_table

    D = 128
    g = torch.Generator().manual_seed(3)
    norm = RMSNorm(D).bfloat16()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(D, generator=g) + 0.5)
        if spike:
            norm.weight[37] = 9.0
    top = int(norm.weight.float().abs().argmax())
    x = torch.randn(8 * 4 * 4, D, generator=g)
    x[:D] = torch.eye(D) * 1e3 + x[:D] * 1e-3  # one channel each: the row's whole norm
    cos, sin = rope_3d_table((8, 4, 4), D, torch.device("cpu"))
    q = apply_rope(norm(x.bfloat16()), cos, sin).float()
    bound = float(fa.normed_scale(norm.weight)) * fa.E4M3_MAX
    assert q.abs().amax() <= bound
    assert q[top].abs().amax() > 0.9 * bound  # tight where a row can reach it
    assert float(fa.normed_scale(torch.zeros(D))) == 1.0


def test_a_given_q_scale_changes_only_qs_rounding():
    """``reference_per_tensor(q_scale=...)``: a coarser q scale leaves e4m3's relative precision
    (no value leaves the normal range here), so the output moves far less than fp8's error."""
    q, k, v = (t.bfloat16() for t in _qkv(1, 2, 300, 64, seed=5))
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    measured = fa.reference_per_tensor(q, k, v)
    bounded = fa.reference_per_tensor(q, k, v, q_scale=fa.per_tensor_scales(q, k, v)[0] * 3)
    assert not torch.equal(bounded, measured)
    assert _rel(bounded, exact) < 1.2 * _rel(measured, exact)


def test_an_e4m3_output_rounds_what_varies_not_values_mean():
    """Diffuse attention (the DiT's at 480p) mostly returns v's mean. Rounded to e4m3 as it
    is, O would carry e4m3's ~3% per element; v loses its mean first and gets it back after, so
    an e4m3 O stays near a bf16 one's error."""
    q, k, v = _qkv(1, 2, 2048, 64, seed=5)
    v = v + torch.randn(64, generator=torch.Generator().manual_seed(6))  # a mean per channel
    exact = F.scaled_dot_product_attention(q, k, v)
    plain = _rel(fa.reference_per_tensor(q, k, v), exact)
    rounded = _rel(fa.reference_per_tensor(q, k, v, out_e4m3=True), exact)
    assert plain < 0.005 and rounded < 2 * plain
    unsmoothed = fa._e4m3(exact, 2 * v.abs().amax() / 448.0)  # O's rounding alone, no mean out
    assert _rel(unsmoothed, exact) > 5 * rounded, rounded


def test_the_per_tensor_recipe_lands_a_few_percent_from_fp32():
    """cuDNN's recipe (one e4m3 scale per tensor): ~5.3% on random data, against 3.6% for the
    Triton kernels' int8 Q K^T; a shared key offset costs it nothing (k loses its mean)."""
    q, k, v = _qkv(1, 2, 300, 64)
    exact = F.scaled_dot_product_attention(q, k, v)
    err = _rel(fa.reference_per_tensor(q, k, v), exact)
    assert 0.02 < err < 0.07
    offset = torch.randn(64, generator=torch.Generator().manual_seed(2)) * 30
    shifted = fa.reference_per_tensor(q, k + offset, v)
    assert _rel(shifted, exact) < 1.2 * err


def test_reference_per_tensor_rounds_p_at_the_scale_given():
    """FA3 rounds p as e4m3 of ``p * 256``, cuDNN of ``p * 448``: different bits, both about as
    close to fp32."""
    q, k, v = _qkv(1, 2, 300, 64, seed=2)
    exact = F.scaled_dot_product_attention(q, k, v)
    a, b = fa.reference_per_tensor(q, k, v), fa.reference_per_tensor(q, k, v, p_scale=256.0)
    assert not torch.equal(a, b)
    assert _rel(a, exact) < 0.08 and _rel(b, exact) < 0.08 and _rel(a, b) < 0.05


def test_fa3_is_read_from_its_build_flags(monkeypatch):
    """FA3 (``flash_attn_interface``) is taken for what its build has: head sizes, fp16, FP8;
    nothing where it is not installed; never for CPU tensors."""
    import sys
    import types

    from longcat_tools.kernels import fa3, fa3_fp8_attention

    def installed(**off):
        monkeypatch.setitem(sys.modules, "flash_attn_interface", types.SimpleNamespace(
            flash_attn_func=lambda *a, **k: None))
        monkeypatch.setitem(sys.modules, "flash_attn_config", types.SimpleNamespace(
            CONFIG={"build_flags": {f"FLASHATTENTION_DISABLE_{n}": on
                                    for n, on in off.items()}}))
        fa3.build.cache_clear()
        return fa3.build()

    try:
        b = installed(FP8=False, FP16=True, HDIM64=True, HDIM96=True, HDIM192=True,
                      HDIM256=True, BACKWARD=True)
        assert b.func is not None and b.head_dims == {128} and not b.backward
        assert b.dtypes == {torch.bfloat16, torch.float8_e4m3fn}
        b = installed(FP8=True)
        assert b.head_dims == set(fa3.HEAD_DIMS) and torch.float8_e4m3fn not in b.dtypes
        assert b.backward
        assert not fa3.covers(torch.zeros(1, 1, 8, 128, dtype=torch.bfloat16))  # CPU
        monkeypatch.setitem(sys.modules, "flash_attn_interface", None)  # not installed
        fa3.build.cache_clear()
        assert fa3.build() == fa3.Build(None, frozenset(), frozenset())
        assert not fa3_fp8_attention.supported(torch.zeros(1, 1, 8, 128, dtype=torch.bfloat16))
    finally:
        fa3.build.cache_clear()


def test_the_reference_names_its_key_scales():
    q, k, v = _qkv(1, 1, 64, 32)
    with pytest.raises(ValueError, match="'token' or 'head'"):
        fa.reference(q, k, v, key_scale="heads")
