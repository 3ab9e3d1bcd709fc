"""GPU tests of the Triton row kernels (kernels.triton_norm) and the DiT's fast BSA call.

The kernels must give the plain path's values (runner.dit: fp32 math, same roundings): equal
bits except a rare last-bit difference where a sum's order differs.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DT = torch.bfloat16


def assert_nearly_equal(got: torch.Tensor, want: torch.Tensor, frac: float = 2e-3) -> None:
    """Same bits except at most ``frac`` of the elements. Where they differ, an fp32 sum in
    another order rounded the other way at a bf16 rounding point: one ulp of an O(1)
    intermediate (inputs here have unit scale), which cancellation may leave on a small
    result, so the bound is absolute as well as relative."""
    assert got.shape == want.shape and got.dtype == want.dtype
    diff = got != want
    assert diff.float().mean().item() <= frac, f"{int(diff.sum())} of {diff.numel()} differ"
    if diff.any():
        g, w = got[diff].float(), want[diff].float()
        assert torch.all((g - w).abs() <= (w.abs() + 1) * 2**-6)
    err = (got.double() - want.double()).norm() / want.double().norm()
    assert err < 1e-3, f"relative error {err:.2e}"


def _vecs(B, T, C, g):
    mod = torch.randn(B, T, 1, 6 * C, generator=g, device="cuda")  # chunks are strided views
    return mod[..., :C], mod[..., C:2 * C] * 0.1, mod[..., 2 * C:3 * C]


@pytest.mark.parametrize("C", [4096, 96])
def test_fused_rows_match_the_plain_math(C):
    from longcat_tools.kernels.triton_norm import fused_rows
    from longcat_tools.runner.dit import LayerNorm, modulate

    g = torch.Generator(device="cuda").manual_seed(0)
    B, T, HW = 2, 3, 203
    N, fr = T * HW, (B, T, HW, C)
    x = torch.randn(B, N, C, generator=g, device="cuda").to(DT)
    h = torch.randn(B, N, C, generator=g, device="cuda").to(DT)
    shift, scale, gate = _vecs(B, T, C, g)
    plain_norm = LayerNorm(C, eps=1e-6, elementwise_affine=False).cuda()
    ln = LayerNorm(C, eps=1e-6).cuda()
    with torch.no_grad():
        ln.weight.normal_(1.0, 0.1, generator=g)
        ln.bias.normal_(0.0, 0.1, generator=g)
    ln = ln.to(DT)
    with torch.no_grad():
        gated = (x + (gate * h.view(fr)).view(B, N, C)).to(DT)
        xo, y = fused_rows(x, T, res=h, gate=gate, norm="modulate", shift=shift, scale=scale)
        assert_nearly_equal(xo, gated)  # the GPU contracts x + gate * h into one fma
        assert_nearly_equal(y, modulate(plain_norm, gated.view(fr), shift, scale).view(B, N, C))
        xo, y = fused_rows(x, T, res=h, gate=gate, norm="layer_norm", weight=ln.weight,
                           bias=ln.bias)
        assert_nearly_equal(xo, gated)
        assert_nearly_equal(y, ln(gated))
        xo, y = fused_rows(x, T, res=h, norm="modulate", shift=shift, scale=scale)
        assert torch.equal(xo, x + h)
        assert_nearly_equal(y, modulate(plain_norm, (x + h).view(fr), shift, scale).view(B, N, C))
        xo, y = fused_rows(x, T, norm="modulate", shift=shift, scale=scale)
        assert xo is None
        assert_nearly_equal(y, modulate(plain_norm, x.view(fr), shift, scale).view(B, N, C))
        xo, y = fused_rows(x, T, res=h, gate=gate)
        assert y is None
        assert_nearly_equal(xo, gated)


def test_head_norm_rope_matches_the_plain_path():
    from longcat_tools.kernels.triton_norm import head_norm_rope
    from longcat_tools.runner.dit import RMSNorm, apply_rope, rope_3d_table

    g = torch.Generator(device="cuda").manual_seed(1)
    B, H, D, grid = 1, 32, 128, (3, 10, 12)
    N = 360
    qkv = torch.randn(B, N, 3 * H * D, generator=g, device="cuda").to(DT) * 3
    qn, kn = RMSNorm(D).cuda(), RMSNorm(D).cuda()
    with torch.no_grad():
        qn.weight.normal_(1.0, 0.1, generator=g)
        kn.weight.normal_(1.0, 0.1, generator=g)
    qn, kn = qn.to(DT), kn.to(DT)
    cos, sin = rope_3d_table(grid, D, torch.device("cuda"))
    q, k, _ = qkv.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
    with torch.no_grad():
        gq, gk = head_norm_rope(qkv, H, [qn.weight, kn.weight], cos, sin, 1e-6)
        assert gq.shape == (B, H, N, D) and gq.stride() == (N * H * D, D, H * D, 1)
        assert_nearly_equal(gq, apply_rope(qn(q), cos, sin))
        assert_nearly_equal(gk, apply_rope(kn(k), cos, sin))
        (only_q,) = head_norm_rope(qkv[..., :H * D], H, [qn.weight], None, None, 1e-6)
        assert_nearly_equal(only_q, qn(q))


def test_bsa_fast_call_bf16_pv_and_token_major_output():
    """The DiT's fast BSA call: strided q/k/v in, token-major out, bf16 P @ V within the bf16
    band of an fp64 reference (measured ~2.3e-3, like dense SDPA; float16 P @ V ~1.7e-3)."""
    from longcat_tools import kernels
    from longcat_tools.kernels import reference as R

    g = torch.Generator(device="cuda").manual_seed(2)
    B, H, D, lat = 1, 4, 128, (8, 16, 24)
    S = 8 * 16 * 24
    qkv = torch.randn(B, S, 3, H, D, generator=g, device="cuda").to(DT)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    lay = R.ChunkLayout(lat, (4, 4, 4))
    idx, cnt = kernels.select_chunks(q, k, lat, lat, sparsity=0.875)
    ref = R.masked_attention(q.double(), k.double(), v.double(), lay, lay,
                             R.chunk_mask(idx, cnt, lay.num_chunks))
    fast = kernels.block_sparse_attention(q, k, v, lat, lat, sparsity=0.875, pv_fp16=False,
                                          token_major=True)
    assert fast.stride() == (S * H * D, D, H * D, 1)
    err = float((fast.double() - ref).norm() / ref.norm())
    assert 1e-3 < err < 3e-3, err
    same = kernels.block_sparse_attention(q.contiguous(), k.contiguous(), v.contiguous(), lat,
                                          lat, sparsity=0.875, pv_fp16=False)
    assert torch.equal(same, fast)
    precise = kernels.block_sparse_attention(q, k, v, lat, lat, sparsity=0.875)
    assert float((precise.double() - ref).norm() / ref.norm()) < 2e-3


@pytest.mark.parametrize("shape", [(2, 1000, 11008), (7, 96)])
def test_swiglu_matches_eager(shape):
    """``silu(a) * b`` with eager's two roundings; Triton's exp may differ in the last bit."""
    from longcat_tools.kernels import triton_norm as TN
    from longcat_tools.runner import fast_ops

    g = torch.Generator(device="cuda").manual_seed(3)
    a = (torch.randn(*shape, generator=g, device="cuda") * 3).to(DT)
    b = torch.randn(*shape, generator=g, device="cuda").to(DT)
    want = torch.nn.functional.silu(a) * b
    assert_nearly_equal(TN.swiglu(a, b), want)
    assert torch.equal(fast_ops.swiglu(a, b), TN.swiglu(a, b))  # the dispatcher takes it


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _nearly_same_e4m3(a: torch.Tensor, b: torch.Tensor, frac: float = 1e-5) -> None:
    """Same e4m3 codes except at most ``frac`` of them, each one step apart: where two
    compilations of the norm round its bf16 output one ulp apart (on an H200, 1 to 4 of 2.5M
    elements with modulation; none with affine weights)."""
    codes = (a.view(torch.uint8).int() - b.view(torch.uint8).int()).abs()
    assert (codes != 0).float().mean().item() <= frac and codes.max().item() <= 1


@pytest.mark.parametrize("norm", ["modulate", "layer_norm"])
def test_fused_rows_write_e4m3_rows_as_scaling_their_bf16_output_does(norm):
    """``e4m3=True``: the norm's output as fp8 GEMM input, ``e4m3_rows`` of the bf16 output
    (a row of zeros and one loud channel included), with the same scales."""
    from longcat_tools.kernels.triton_norm import e4m3_rows, fused_rows

    g = torch.Generator(device="cuda").manual_seed(5)
    B, T, HW, C = 2, 3, 101, 4096
    x = torch.randn(B, T * HW, C, generator=g, device="cuda").to(DT)
    h = torch.randn(B, T * HW, C, generator=g, device="cuda").to(DT)
    x[0, 7] = 0
    h[0, 7] = 0
    x[1, 9, 3] = 2e4
    shift, scale, gate = _vecs(B, T, C, g)
    kw = dict(shift=shift, scale=scale) if norm == "modulate" else dict(
        weight=torch.randn(C, generator=g, device="cuda").to(DT),
        bias=torch.randn(C, generator=g, device="cuda").to(DT))
    xo, y = fused_rows(x, T, res=h, gate=gate, norm=norm, **kw)
    xo8, rows = fused_rows(x, T, res=h, gate=gate, norm=norm, e4m3=True, **kw)
    q, s = e4m3_rows(y.reshape(-1, C))
    assert torch.equal(xo8, xo) and rows.dtype == DT and rows.scale.shape == (B, T * HW, 1)
    assert torch.equal(rows.scale.reshape(-1, 1), s)
    _nearly_same_e4m3(rows.q.reshape(-1, C), q)


@pytest.mark.parametrize("shape", [(2, 300, 11008), (5, 96)])
def test_swiglu_writes_e4m3_rows_with_the_bits_of_scaling_its_bf16_output(shape):
    from longcat_tools.kernels import triton_norm as TN

    g = torch.Generator(device="cuda").manual_seed(6)
    a = (torch.randn(*shape, generator=g, device="cuda") * 3).to(DT)
    b = torch.randn(*shape, generator=g, device="cuda").to(DT)
    a[1], b[1] = 0, 0
    rows = TN.swiglu(a, b, e4m3=True)
    q, s = TN.e4m3_rows(TN.swiglu(a, b).reshape(-1, shape[-1]))
    assert _same_bits(rows.q.reshape(-1, shape[-1]), q)
    assert torch.equal(rows.scale.reshape(-1, 1), s) and rows.scale.shape == (*shape[:-1], 1)


def _tiny_dit(frames: int, size: int):
    """The tiny DiT with unit-scale random weights in bf16, and inputs for ``frames`` latent
    frames of ``size`` x ``size`` (a 9-token prompt)."""
    from longcat_tools.runner.dit import LongCatTransformer3DModel
    from longcat_tools.synth import dit_config

    torch.manual_seed(0)
    m = LongCatTransformer3DModel.from_config(dit_config("tiny"))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.2 if p.dim() > 1 else 0.05)
    m = m.to("cuda", DT).eval()
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(1, 16, frames, size, size, generator=g, device="cuda")
    t = torch.full((1, frames), 700.0, device="cuda")
    y = torch.randn(1, 1, 512, m.dims.caption_channels, generator=g, device="cuda")
    mask = torch.zeros(1, 512, dtype=torch.long, device="cuda")
    mask[:, :9] = 1
    return m, (x, t, y, mask)


@pytest.mark.parametrize("n_cond", [0, 1])
def test_tiny_dit_fast_path_with_row_kernels_matches_plain(n_cond, monkeypatch):
    from longcat_tools.kernels import compiled

    m, (x, t, y, mask) = _tiny_dit(frames=4, size=8)
    t[:, :n_cond] = 0
    calls = {"rows": 0}
    import longcat_tools.kernels.triton_norm as TN

    real = TN.fused_rows

    def spy(*a, **k):
        calls["rows"] += 1
        return real(*a, **k)

    monkeypatch.setattr(TN, "fused_rows", spy)
    monkeypatch.delenv("LONGCAT_NO_TRITON_NORM", raising=False)
    with torch.no_grad():
        plain = m(x, t, y, mask, num_cond_latents=n_cond)
        m.enable_fast_ops()
        fast = m(x, t, y, mask, num_cond_latents=n_cond)
    assert compiled._TRITON_ROWS and calls["rows"] == 4 * len(m.blocks)
    err = float((fast.double() - plain.double()).norm() / plain.double().norm())
    assert err < 1e-2, err


@pytest.mark.parametrize("n_cond,size", [(0, 8), (1, 8), (1, 6)])
def test_tiny_fp8_dit_fast_path_feeds_its_gemms_e4m3_rows(n_cond, size, fp8_gemm_inputs,
                                                           monkeypatch):
    """fp8: the row kernels hand qkv, the cross q, w1/w3 and w2 their inputs as e4m3 rows, and
    the output stays the plain fp8 path's (bf16 glue rounding apart). Size 6: 9 tokens a frame,
    so the cross-attention's slice of the scales starts off cuBLASLt's 16-byte alignment."""
    m, (x, t, y, mask) = _tiny_dit(frames=4, size=size)
    m.to_fp8()
    t[:, :n_cond] = 0
    seen = fp8_gemm_inputs
    monkeypatch.delenv("LONGCAT_NO_TRITON_NORM", raising=False)
    with torch.no_grad():
        plain = m(x, t, y, mask, num_cond_latents=n_cond)
        seen.clear()
        m.enable_fast_ops()
        fast = m(x, t, y, mask, num_cond_latents=n_cond)
    assert seen == {"Rows": 5 * len(m.blocks), "Tensor": 3 * len(m.blocks)}
    err = float((fast.double() - plain.double()).norm() / plain.double().norm())
    assert err < 2e-2, err


@pytest.mark.parametrize("cap", [4, 16, 32])
def test_row_kernels_give_their_bits_at_any_warp_count(cap, monkeypatch):
    """``ROW_WARPS`` is a speed knob only: every launch takes its warps from it, e4m3 rows and
    SwiGLU (no sums) keep their bits at every warp count, the norms' sums may round a last bit
    apart."""
    from longcat_tools.kernels import triton_norm as TN

    g = torch.Generator(device="cuda").manual_seed(7)
    B, T, HW, C = 1, 2, 37, 4096
    x, h = (torch.randn(B, T * HW, C, generator=g, device="cuda").to(DT) for _ in range(2))
    a, b = (torch.randn(50, 11008, generator=g, device="cuda").to(DT) for _ in range(2))
    qkv = torch.randn(1, 40, 3 * C, generator=g, device="cuda").to(DT)
    qw, kw = (torch.rand(128, generator=g, device="cuda").to(DT) + 0.5 for _ in range(2))
    shift, scale, gate = _vecs(B, T, C, g)
    mod = dict(res=h, gate=gate, norm="modulate", shift=shift, scale=scale)

    def run_all():
        return (TN.fused_rows(x, T, **mod), TN.fused_rows(x, T, e4m3=True, **mod),
                TN.swiglu(a, b, e4m3=True), TN.e4m3_rows(x[0]), TN.swiglu(a, b),
                TN.head_norm_rope(qkv, 32, [qw, kw], None, None, 1e-6))

    want = run_all()
    warps: dict[str, int] = {}
    for name in ("_rows_kernel", "_swiglu_e4m3_kernel", "_e4m3_rows_kernel", "_swiglu_kernel",
                 "_head_norm_rope_kernel"):
        kernel = getattr(TN, name)

        def spy(*args, _run=kernel.run, _name=name, **kwargs):
            warps[_name] = kwargs["num_warps"]
            return _run(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", spy)
    monkeypatch.setattr(TN, "ROW_WARPS", dict.fromkeys(TN.ROW_WARPS, (128, cap)))
    got = run_all()
    assert warps == dict.fromkeys(warps, cap) and len(warps) == 5
    (xo, y), (xo8, rows), sw, (q, s), plain_sw, (gq, gk) = got
    assert torch.equal(xo, want[0][0]) and torch.equal(xo8, want[1][0])
    assert_nearly_equal(y, want[0][1])
    _nearly_same_e4m3(rows.q.reshape(-1, C), want[1][1].q.reshape(-1, C), frac=1e-3)
    assert _same_bits(sw.q, want[2].q) and torch.equal(sw.scale, want[2].scale)
    assert _same_bits(q, want[3][0]) and torch.equal(s, want[3][1])
    assert torch.equal(plain_sw, want[4])
    assert_nearly_equal(gq, want[5][0])
    assert_nearly_equal(gk, want[5][1])


def test_fused_rows_keep_nan_and_inf_in_the_residual():
    """The residual stream keeps a NaN (CUDA's 0x7FFFFFFF from inf - inf) and an inf, in the
    bf16 and the e4m3 variants alike, where the plain path keeps them."""
    from longcat_tools.kernels.triton_norm import fused_rows

    g = torch.Generator(device="cuda").manual_seed(8)
    B, T, HW, C = 1, 2, 19, 4096
    x, h = (torch.randn(B, T * HW, C, generator=g, device="cuda").to(DT) for _ in range(2))
    x[0, 3, 7], h[0, 3, 7] = float("inf"), float("-inf")
    x[0, 5, 9] = float("inf")
    shift, scale, _ = _vecs(B, T, C, g)
    plain = x + h
    xo, _ = fused_rows(x, T, res=h, norm="modulate", shift=shift, scale=scale)
    xo8, _ = fused_rows(x, T, res=h, norm="modulate", shift=shift, scale=scale, e4m3=True)
    for got in (xo, xo8):
        assert torch.equal(got.isnan(), plain.isnan()) and bool(got[0, 3, 7].isnan())
        assert torch.equal(got.isinf(), plain.isinf()) and bool(got[0, 5, 9].isinf())
        ok = ~plain.isnan()
        assert torch.equal(got[ok], plain[ok])
