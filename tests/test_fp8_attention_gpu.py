"""The fp8-mode attention kernel (``kernels.triton_fp8_attention``) against its PyTorch
reference (``kernels.fp8_attention.reference``) and fp32, on a GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from longcat_tools.kernels import fp8_attention as ref

pytestmark = pytest.mark.gpu


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _qkv_views(B: int, S: int, H: int, D: int, dtype: torch.dtype, seed: int = 0):
    """q, k, v as strided views of one token-major qkv projection, like the DiT's."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn(B, S, 3, H, D, device="cuda", generator=g).to(dtype)
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


@pytest.mark.parametrize("S,D,dtype", [(1000, 128, torch.bfloat16), (777, 64, torch.float16),
                                       (256, 128, torch.bfloat16)])
def test_the_quantized_copies_are_the_references(S, D, dtype):
    from longcat_tools.kernels import triton_fp8_attention as tfa

    q, k, v = _qkv_views(2, S, 3, D, dtype)
    qq, qs = tfa.quantize_qk(q, 128)
    kq, ks = tfa.quantize_qk(k, 128, smooth=True)
    vt, vs = tfa.quantize_v(v, 128)
    B, H = q.shape[:2]
    qd = (qq.float() * qs[:, :, None])[:, :S].view(B, H, S, D)
    kd = (kq.float() * ks[:, :, None])[:, :S].view(B, H, S, D)
    vd = (vt.float() * vs[:, :, None])[:, :, :S].transpose(1, 2).reshape(B, H, S, D)
    kf = k.float() - k.float().mean(dim=2, keepdim=True)
    amax = v.float().abs().amax(dim=2, keepdim=True)
    for got, want in ((qd, ref._int8_rows(q.float())), (kd, ref._int8_rows(kf)),
                      (vd, ref._e4m3(v.float(), amax / ref.E4M3_MAX))):
        # Triton divides approximately: a value can land one step over now and then
        off = ~torch.isclose(got, want, rtol=1e-5, atol=0)
        assert off.float().mean().item() < 1e-3
    assert not qq[:, S:].any() and not kq[:, S:].any() and not vt[:, :, S:].float().any()


@pytest.mark.parametrize("S,D,dtype,scale_q", [(1000, 128, torch.bfloat16, 1.0),
                                               (1000, 128, torch.bfloat16, 4.0),
                                               (777, 64, torch.float16, 1.0),
                                               (4096, 128, torch.bfloat16, 1.0)])
def test_the_kernel_follows_its_reference(S, D, dtype, scale_q):
    """The kernel quantizes p against the running row maximum, the reference against the
    final one, so they differ by about the error of quantizing p (~2% on random data). Against
    fp32 the kernel must be as close as the reference."""
    from longcat_tools.kernels import triton_fp8_attention as tfa

    q, k, v = _qkv_views(1, S, 4, D, dtype, seed=1)
    q = q * scale_q
    out = tfa.attention(q, k, v)
    assert out.dtype == dtype and out.shape == q.shape
    r = ref.reference(q, k, v)
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert _rel(out, r) < 0.03
    assert _rel(out, exact) < 1.1 * _rel(r, exact) + 0.003


def test_a_token_major_output_gets_the_same_values():
    from longcat_tools.kernels import triton_fp8_attention as tfa

    q, k, v = _qkv_views(2, 500, 4, 128, torch.bfloat16, seed=2)
    B, H, S, D = q.shape
    tm = tfa.attention(q, k, v, out=q.new_empty(B, S, H, D).transpose(1, 2))
    assert tm.transpose(1, 2).is_contiguous()
    assert torch.equal(tm, tfa.attention(q, k, v))


def test_plain_loads_give_the_bits_of_tma_loads(monkeypatch):
    from longcat_tools.kernels import triton_fp8_attention as tfa

    q, k, v = _qkv_views(1, 700, 2, 128, torch.bfloat16, seed=6)
    by_tma = tfa.attention(q, k, v)
    monkeypatch.setitem(tfa.FP8_ATTN_CONFIG, "tma", 0)
    assert torch.equal(tfa.attention(q, k, v), by_tma)


def test_head_sizes_the_8_bit_products_cannot_take_are_not_claimed():
    from longcat_tools.kernels import triton_bsa as TB
    from longcat_tools.kernels import triton_fp8_attention as tfa
    from longcat_tools.kernels.reference import ChunkLayout

    q16 = torch.zeros(1, 1, 64, 16, device="cuda", dtype=torch.bfloat16)
    assert not tfa.supported(q16) and tfa.supported(q16.new_zeros(1, 1, 64, 32))
    assert not TB.fp8_covers(ChunkLayout((4, 4, 4), (2, 2, 4)))  # 16-token chunks
    assert TB.fp8_covers(ChunkLayout((4, 4, 8), (4, 4, 8)))  # 128: two steps of 64


@pytest.mark.parametrize("kernels", [["cudnn", "triton"], ["triton"]])
def test_an_fp8_dit_with_fp8_attention_stays_near_its_bf16_attention(tiny_native, kernels,
                                                                      monkeypatch):
    from longcat_tools.runner.compare import probe_inputs
    from longcat_tools.runner.loading import load_transformer

    monkeypatch.setattr(ref, "DENSE_KERNELS", kernels)
    model = load_transformer(tiny_native, dtype="bf16", device="cuda", fp8=True)
    x = probe_inputs(model, frames=5, size=16, device="cuda")
    with torch.no_grad():
        model.fp8_attention = frozenset()
        base = model(**x).float()
        model.fp8_attention = frozenset({"dense"})
        quant = model(**x).float()
    assert not torch.equal(base, quant)  # the kernel ran
    assert _rel(quant, base) < 0.1


def test_an_fp8_dit_with_fp8_bsa_stays_near_its_bf16_bsa(tiny_native, monkeypatch):
    """The default fp8 kinds quantize the BSA forward inside the DiT (64-token chunks of a
    8 x 8 x 8 token grid, D = 32), near the same model with its attention in bf16."""
    from longcat_tools.runner.compare import probe_inputs
    from longcat_tools.runner.loading import load_transformer

    model = load_transformer(tiny_native, dtype="bf16", device="cuda", fp8=True)
    model.enable_bsa({"sparsity": 0.5, "cdf_threshold": None, "chunk_3d_shape_q": [4, 4, 4],
                      "chunk_3d_shape_k": [4, 4, 4]})
    x = probe_inputs(model, frames=8, size=16, device="cuda")
    monkeypatch.setattr(ref, "CALLS", ref.Counter())
    with torch.no_grad():
        model.fp8_attention = frozenset()
        base = model(**x).float()
        assert not ref.CALLS
        model.fp8_attention = None  # the default kinds: dense and bsa
        quant = model(**x).float()
    assert ref.CALLS == {"bsa triton": model.dims.depth}
    assert _rel(quant, base) < 0.1


def _token_mask(indices, counts, lq, lk) -> torch.Tensor:
    """The selected chunks as a ``[B, H, Sq, Sk]`` mask over raster tokens."""
    from longcat_tools.kernels import reference as KR

    chunks = KR.chunk_mask(indices, counts, lk.num_chunks)

    def chunk_of(layout):
        index, valid = layout.token_index(indices.device)
        out = torch.empty(int(valid.sum()), dtype=torch.long, device=indices.device)
        ids = torch.arange(index.shape[0], device=indices.device)[:, None].expand_as(index)
        out[index[valid]] = ids[valid]
        return out

    return chunks[:, :, chunk_of(lq)][:, :, :, chunk_of(lk)]


@pytest.mark.parametrize("latent,chunk,sparsity,tma", [((8, 16, 16), (4, 4, 4), 0.875, 1),
                                                       ((6, 10, 13), (4, 4, 4), 0.75, 1),
                                                       ((5, 6, 10), (2, 4, 4), 0.5, 0),
                                                       ((8, 8, 16), (4, 4, 8), 0.75, 1)])
def test_the_fp8_bsa_forward_follows_the_reference(latent, chunk, sparsity, tma, monkeypatch):
    """Same selection as bf16 (it runs on the unquantized q and k); the forward as
    ``fp8_attention.reference`` restricted to the selected chunks, within the p rounding."""
    from longcat_tools.kernels import reference as KR
    from longcat_tools.kernels import triton_bsa as TB

    monkeypatch.setitem(TB.FWD_CONFIG, "tma", tma)
    S = latent[0] * latent[1] * latent[2]
    q, k, v = _qkv_views(1, S, 4, 128, torch.bfloat16, seed=4)
    lq = lk = KR.ChunkLayout(latent, chunk)
    indices, counts = TB.select_chunks(q, k, lq, lk, sparsity, None)
    out = TB.attend(q, k, v, lq, lk, indices, counts, fp8=True)
    r = ref.reference(q, k, v, _token_mask(indices, counts, lq, lk), key_scale="head")
    exact = KR.masked_attention(q.float(), k.float(), v.float(), lq, lk,
                                KR.chunk_mask(indices, counts, lk.num_chunks))
    assert _rel(out, r) < 0.03
    assert _rel(out, exact) < 1.1 * _rel(r, exact) + 0.003


def test_block_sparse_attention_quantizes_when_asked(monkeypatch):
    from longcat_tools import kernels

    monkeypatch.setattr(ref, "CALLS", ref.Counter())
    q, k, v = _qkv_views(1, 4 * 16 * 16, 2, 128, torch.bfloat16, seed=5)
    args = (q, k, v, (4, 16, 16), (4, 16, 16))
    plain = kernels.block_sparse_attention(*args, sparsity=0.75)
    quant = kernels.block_sparse_attention(*args, sparsity=0.75, fp8=True)
    assert ref.CALLS == {"bsa triton": 1}
    assert not torch.equal(quant, plain) and _rel(quant, plain) < 0.06


def _cudnn():
    from longcat_tools.kernels import cudnn_fp8_attention as C

    if not C.supported(torch.zeros(1, 1, 64, 128, device="cuda", dtype=torch.bfloat16)):
        pytest.skip("no cudnn frontend with FP8 SDPA, or not a Hopper-class GPU")
    return C


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_cudnn_path_scales_as_its_reference(dtype):
    """The scaling pass writes e4m3 bits equal to PyTorch's product with the scale's reciprocal
    and round-to-nearest; the output pass multiplies back and adds v's mean in float32, rounding
    once."""
    C = _cudnn()
    q, k, v = _qkv_views(2, 333, 3, 128, dtype, seed=3)
    k, v = k + 2.0, v - 1.0
    s_q, s_k, s_v, k_mean, v_mean = ref.per_tensor_scales(q, k, v)
    B, H, S, D = q.shape
    for x, s, m in ((q, s_q, None), (k, s_k, k_mean), (v, s_v, v_mean)):
        got = C.scale_cast(x, C.token_major(B, H, S, D, ref.E4M3, x.device), s, m)
        xf = x.float() - (m[:, :, None] if m is not None else 0.0)
        want = (xf * (torch.ones_like(s) / s)).clamp(-448.0, 448.0).to(ref.E4M3)
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    back = C.scale_cast(got, C.token_major(B, H, S, D, dtype, v.device), s_v, v_mean)
    fma = got.double() * s_v.double() + v_mean[:, :, None].double()  # rounded once, as tl.fma
    assert torch.equal(back, fma.float().to(dtype))


@pytest.mark.parametrize("S,D,dtype", [(3000, 128, torch.bfloat16), (333, 64, torch.float16),
                                       (37440, 128, torch.bfloat16)])
def test_the_statistics_kernels_give_the_reference_statistics(S, D, dtype):
    """``column_stats`` (one read of a tensor) == ``fp8_attention``'s PyTorch reductions, but
    for float32 sums in another order; a NaN makes the scale 1, as there."""
    from longcat_tools.kernels import column_stats as CS

    q, k, v = _qkv_views(2, S, 3, D, dtype, seed=S)
    k, v = k + 2.0, 3.0 * v - 1.0
    pairs = [(CS.key_mean(k), ref.key_mean(k)), (CS.value_scales(v), ref.value_scales(v))]
    pairs += zip(CS.tensor_scales(q, k, v), ref.per_tensor_scales(q, k, v), strict=True)
    for got, want in pairs:
        assert got.shape == want.shape and got.dtype == want.dtype
        assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    v = v.clone()
    v[1, 2, S // 2, 3] = float("nan")
    assert float(CS.tensor_scales(q, k, v)[2]) == float(ref.per_tensor_scales(q, k, v)[2]) == 1.0
    assert torch.equal(CS.value_scales(v), ref.value_scales(v))


@pytest.mark.parametrize("S,D,dtype", [(1024, 128, torch.bfloat16), (777, 64, torch.float16),
                                       (4096, 128, torch.bfloat16)])
def test_cudnn_fp8_attention_is_as_close_to_fp32_as_its_reference(S, D, dtype):
    """cuDNN rounds p against a running maximum, so it is held to fp32 near its reference's
    error (O in e4m3 there too on Hopper), not to the reference's bits."""
    C = _cudnn()
    q, k, v = _qkv_views(1, S, 4, D, dtype, seed=1)
    out = C.attention(q, k, v)
    if out is None and S % 64:
        pytest.skip(f"cuDNN builds no FP8 graph for {S} tokens (the caller falls back)")
    assert out is not None and out.dtype == dtype and out.shape == q.shape
    assert out.transpose(1, 2).is_contiguous()  # token-major
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    plan = C._PLANS[(1, 4, S, S, D, dtype, q.device.index)]
    r = ref.reference_per_tensor(q, k, v, plan.out_e4m3)
    allowance = 0.005
    assert _rel(out, exact) < 1.1 * _rel(r, exact) + allowance
    assert _rel(out, r) < 0.08
    other = q.new_empty(1, 4, S, D)  # a head-major output buffer gets the same values
    assert torch.equal(C.attention(q, k, v, out=other), out)


def test_cudnn_fp8_attention_at_the_dits_lengths():
    """At 37,440 tokens (480p/93) a softmax row sums ~10^4 terms: were p quantized after its
    normalization, p * 448 would fall under e4m3's normal range and the error would explode.
    Held to the recipe, which quantizes p against the row's maximum, with the short sequences'
    allowance. (cuDNN's amax of P reads ~0.008 here: the normalized P's, not what it rounds.)"""
    C = _cudnn()
    q, k, v = _qkv_views(1, 37440, 1, 128, torch.bfloat16, seed=7)
    out = C.attention(q, k, v)
    assert out is not None
    plan = C._PLANS[(1, 1, 37440, 37440, 128, torch.bfloat16, q.device.index)]
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    recipe = _rel(ref.reference_per_tensor(q, k, v, plan.out_e4m3), exact)
    assert _rel(out, exact) < 1.1 * recipe + 0.005, recipe


def test_cudnn_fp8_attention_keeps_values_mean_out_of_its_rounding():
    """Diffuse attention over values with a mean per channel (the DiT's case) returns mostly
    that mean: were it rounded with O, an e4m3 O would land ~2.6% from fp32 (probably much of
    why a 480p forward landed 23% from fp32 with this kernel, 6.5% with ours); v loses it
    before and gets it back after."""
    C = _cudnn()
    q, k, v = _qkv_views(1, 4096, 4, 128, torch.bfloat16, seed=8)
    v = v + torch.randn(128, device="cuda", dtype=v.dtype, generator=torch.Generator(
        "cuda").manual_seed(9))
    out = C.attention(q, k, v)
    assert out is not None
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert _rel(out, exact) < 0.006


def _fa3():
    from longcat_tools.kernels import fa3_fp8_attention as A

    if not A.supported(torch.zeros(1, 1, 64, 128, device="cuda", dtype=torch.bfloat16)):
        pytest.skip("no FlashAttention-3 build with its FP8 forward at D=128, or not sm90")
    return A


@pytest.mark.parametrize("S,dtype", [(1024, torch.bfloat16), (777, torch.float16),
                                     (4096, torch.bfloat16)])
def test_fa3_fp8_attention_is_as_close_to_fp32_as_its_reference(S, dtype):
    """FA3 rounds p as e4m3 of ``p * 256`` against its running maximum: held to fp32 near the
    recipe's error with ``p_scale=256``, and near the recipe itself."""
    A = _fa3()
    q, k, v = _qkv_views(2, S, 3, 128, dtype, seed=1)
    k, v = k + 1.0, v - 0.5
    out = A.attention(q, k, v)
    assert out is not None and out.dtype == dtype and out.shape == q.shape
    assert out.transpose(1, 2).is_contiguous()  # token-major
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    r = ref.reference_per_tensor(q, k, v, p_scale=256.0)
    assert _rel(out, exact) < 1.1 * _rel(r, exact) + 0.005
    assert _rel(out, r) < 0.08
    other = q.new_empty(q.shape)  # a head-major output buffer gets the same values
    assert torch.equal(A.attention(q, k, v, out=other), out)


def test_fa3_fp8_attention_at_the_dits_lengths():
    """37,440 keys (480p/93): p is scaled against the row's running maximum, not after the
    normalization, else it would fall under e4m3's normal range."""
    A = _fa3()
    q, k, v = _qkv_views(1, 37440, 1, 128, torch.bfloat16, seed=7)
    out = A.attention(q, k, v)
    assert out is not None
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    recipe = _rel(ref.reference_per_tensor(q, k, v, p_scale=256.0), exact)
    assert _rel(out, exact) < 1.1 * recipe + 0.005, recipe


def _projection(B: int, N: int, H: int, D: int, seed: int):
    """A qkv projection ``[B, N, 3 * H * D]`` (bf16), q's and k's norm weights and a RoPE
    table for N tokens."""
    from longcat_tools.runner.dit import rope_3d_table

    g = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn(B, N, 3 * H * D, device="cuda", generator=g).bfloat16()
    qkv[..., H * D:2 * H * D] += 0.5  # k with a mean to smooth away
    qw, kw = (torch.rand(D, device="cuda", generator=g).bfloat16() + 0.5 for _ in range(2))
    cos, sin = rope_3d_table((N // 100, 10, 10), D, torch.device("cuda"))
    return qkv, qw, kw, cos, sin


def test_fa3_fp8_self_attention_from_qkv_is_the_separate_passes_given_qs_bound():
    """``from_qkv``: q as e4m3 straight out of the norm with ``normed_scale`` is the norm's bf16
    q scaled by ``scale_cast``, and O plus v's mean goes straight to the projection's e4m3
    rows with the bits of the output pass and ``e4m3_rows``; the result stays as close to
    fp32 as with q's measured scale."""
    from longcat_tools.kernels import cudnn_fp8_attention as C
    from longcat_tools.kernels import fa3
    from longcat_tools.kernels import triton_norm as TN
    from longcat_tools.kernels.fp8 import E4M3

    A = _fa3()
    B, N, H, D = 2, 1200, 3, 128
    qkv, qw, kw, cos, sin = _projection(B, N, H, D, seed=9)
    rows = A.from_qkv(qkv, H, qw, kw, cos, sin, 1e-6)
    assert rows is not None and rows.q.shape == (B, N, H * D) and rows.dtype == torch.bfloat16
    q, k = TN.head_norm_rope(qkv, H, [qw, kw], cos, sin, 1e-6)
    v = qkv.view(B, N, 3, H, D)[:, :, 2].transpose(1, 2)
    s_q = ref.normed_scale(qw)
    assert float(q.float().abs().amax()) <= float(s_q) * 448.0
    q8 = C.scale_cast(q, C.token_major(B, H, N, D, E4M3, q.device), s_q)
    fused_q8, fused_k = TN.head_norm_rope(qkv, H, [qw, kw], cos, sin, 1e-6, q_scale=s_q)
    # two compilations of the RoPE may contract its products apart: a bf16 ulp, rarely
    for got, want, bits in ((fused_q8, q8, torch.uint8), (fused_k, k, torch.int16)):
        apart = (got.view(bits).int() - want.view(bits).int()).abs()
        assert (apart != 0).float().mean().item() <= 1e-4 and apart.max().item() <= 1
    _, k8, v8, (_, s_k, s_v), v_mean = C.quantize(fused_q8, fused_k, v, q_scale=s_q)
    o = fa3.forward(fused_q8, k8, v8, q_descale=s_q.expand(B, H), k_descale=s_k.expand(B, H),
                    v_descale=s_v.expand(B, H))
    full = C.scale_cast(o, C.token_major(B, H, N, D, q.dtype, q.device),
                        torch.ones(1, device="cuda"), v_mean)
    want, want_scale = TN.e4m3_rows(full.transpose(1, 2).reshape(B * N, H * D))
    assert torch.equal(rows.q.view(torch.uint8).reshape(B * N, -1), want.view(torch.uint8))
    assert torch.equal(rows.scale.reshape(B * N, 1), want_scale)
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    measured = A.attention(q, k, v)
    got = (rows.q.float() * rows.scale).view(B, N, H, D).transpose(1, 2)
    assert _rel(got, exact) < 1.1 * _rel(measured, exact) + 0.01


def test_an_fp8_dit_takes_its_dense_self_attention_from_qkv_through_fa3(monkeypatch):
    """In an fp8 DiT with D = 128 (FA3's) the fast path's dense self-attention goes from the
    qkv projection to the output projection's e4m3 rows (``kernels.dense.FUSED_FP8``), once a
    block, near the separate passes."""
    from longcat_tools.kernels import dense
    from longcat_tools.runner.dit import LongCatTransformer3DModel
    from longcat_tools.synth import dit_config

    _fa3()
    cfg = {**dit_config("small"), "num_heads": 2}  # 256 wide: D = 128
    torch.manual_seed(0)
    m = LongCatTransformer3DModel.from_config(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.05 if p.dim() > 1 else 0.02)
    m = m.to("cuda", torch.bfloat16).eval()
    m.to_fp8()
    m.enable_fast_ops()
    m.fp8_attention = frozenset({"dense"})
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(1, 16, 4, 20, 20, generator=g, device="cuda")
    t = torch.full((1, 4), 700.0, device="cuda")
    y = torch.randn(1, 1, 512, m.dims.caption_channels, generator=g, device="cuda")
    mask = torch.zeros(1, 512, dtype=torch.long, device="cuda")
    mask[:, :9] = 1
    monkeypatch.setattr(ref, "CALLS", ref.Counter())
    with torch.no_grad():
        fused = m(x, t, y, mask).float()
        assert ref.CALLS == {"dense fa3": len(m.blocks)}
        monkeypatch.setattr(dense, "FUSED_FP8", False)
        separate = m(x, t, y, mask).float()
    assert not torch.equal(fused, separate)  # q's scale differs
    assert _rel(fused, separate) < 0.02


def test_dense_fp8_calls_take_fa3_where_it_is_listed_first(monkeypatch):
    from longcat_tools.kernels import dense

    A = _fa3()
    q, k, v = _qkv_views(1, 1024, 2, 128, torch.bfloat16, seed=4)
    monkeypatch.setattr(ref, "CALLS", ref.Counter())
    monkeypatch.setattr(ref, "DENSE_KERNELS", ["fa3", "cudnn", "triton"])
    assert torch.equal(dense.attention(q, k, v, fp8=True), A.attention(q, k, v))
    assert ref.CALLS == {"dense fa3": 1}


def test_dense_bf16_calls_take_fa3_where_it_is_built():
    """FA3's bf16 forward takes dense calls first: as close to fp32 as cuDNN's SDPA, its output
    a view of a token-major tensor."""
    from longcat_tools.kernels import dense, fa3

    q, k, v = _qkv_views(1, 2000, 4, 128, torch.bfloat16, seed=6)
    if not fa3.covers(q):
        pytest.skip("no FlashAttention-3 build at D=128, or not sm90")
    out = dense.attention(q, k, v)
    assert torch.equal(out, fa3.forward(q, k, v)) and out.transpose(1, 2).is_contiguous()
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert _rel(out, exact) < 1.1 * _rel(F.scaled_dot_product_attention(q, k, v), exact)


def test_dense_fp8_calls_take_the_first_kernel_listed(monkeypatch):
    """The first kernel listed takes the call: cuDNN's where it is first (the default) and
    installed, ours where it is first."""
    from longcat_tools.kernels import dense
    from longcat_tools.kernels import triton_fp8_attention as tfa

    q, k, v = _qkv_views(1, 1024, 2, 128, torch.bfloat16, seed=4)
    monkeypatch.setattr(ref, "CALLS", ref.Counter())
    monkeypatch.setattr(ref, "DENSE_KERNELS", ["triton", "cudnn"])
    assert torch.equal(dense.attention(q, k, v, fp8=True), tfa.attention(q, k, v))
    C = _cudnn()
    monkeypatch.setattr(ref, "DENSE_KERNELS", ["cudnn", "triton"])
    assert torch.equal(dense.attention(q, k, v, fp8=True), C.attention(q, k, v))
    assert ref.CALLS == {"dense cudnn": 1, "dense triton": 1}


def test_without_cudnns_frontend_ours_runs_and_says_how_to_get_the_faster_one(monkeypatch,
                                                                                caplog):
    from longcat_tools.kernels import dense
    from longcat_tools.kernels import triton_fp8_attention as tfa

    q, k, v = _qkv_views(1, 256, 2, 128, torch.bfloat16, seed=6)
    C = ref.quantized_kernel("cudnn")
    monkeypatch.setattr(ref, "DENSE_KERNELS", ["cudnn", "triton"])
    monkeypatch.setattr(C, "_frontend", lambda: False)  # as where it is not installed
    monkeypatch.setattr(ref, "_WARNED", set())
    with caplog.at_level("WARNING", logger=ref.__name__):
        outs = [dense.attention(q, k, v, fp8=True) for _ in range(2)]
    assert torch.equal(outs[0], tfa.attention(q, k, v)) and torch.equal(outs[1], outs[0])
    warned = [r.getMessage() for r in caplog.records if r.name == ref.__name__]
    assert len(warned) == 1 and "pip install nvidia-cudnn-frontend" in warned[0], warned


def test_a_dense_call_no_kernel_covers_attends_in_bf16_and_says_so_once(monkeypatch, caplog):
    from longcat_tools.kernels import dense

    q, k, v = _qkv_views(1, 256, 2, 128, torch.bfloat16, seed=5)
    monkeypatch.setattr(ref, "DENSE_KERNELS", ["triton", "cudnn"])
    for name in ref.DENSE_KERNELS:  # as where neither covers the call (no frontend, an old GPU)
        monkeypatch.setattr(ref.quantized_kernel(name), "supported", lambda q: False)
    monkeypatch.setattr(ref, "_WARNED", set())
    with caplog.at_level("WARNING", logger=ref.__name__):
        outs = [dense.attention(q, k, v, fp8=True) for _ in range(2)]
    assert torch.equal(outs[0], dense.attention(q, k, v)) and torch.equal(outs[1], outs[0])
    warned = [r.getMessage() for r in caplog.records if r.name == ref.__name__]
    assert len(warned) == 1 and "sm89+" in warned[0] and "nvidia-cudnn-frontend" in warned[0], \
        warned
