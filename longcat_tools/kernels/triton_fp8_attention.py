"""fp8-mode attention forward (CUDA, sm_89+): Q K^T in int8, P V in e4m3 tensor cores.

SageAttention's recipe, in two Triton launches that read top to bottom; the arithmetic is
spelled out in PyTorch in ``fp8_attention.reference``, which the tests hold this kernel to.

1. ``_quantize_kernel``  one pass per tensor, a tile of rows at a time, into a padded
                         contiguous copy:
                         q and k: int8 with a float32 scale per token (amax / 127); k first
                         loses its mean over the sequence ("smoothing": ``q . (k - m)``
                         differs from ``q . k`` by the same number on every key of a query
                         row, which the softmax ignores, and the channels that all keys share
                         no longer set the scales);
                         v: e4m3 with a scale per channel over the whole sequence (P V sums
                         over tokens, so a channel's scale comes out of the sum), written
                         transposed, ``[D, S]``: fp8 tensor cores take both operands
                         contiguous along the summed axis.
2. ``_fwd_kernel``       flash attention over the quantized tiles: ``s = (q8 . k8) sq sk``
                         (int32 products, exact), softmax in float32 base 2, ``p`` (at most 1)
                         quantized as ``p * 448`` (exact for 1), ``acc += p8 . v8`` promoted
                         to float32 after every tile (Hopper's fp8 accumulator keeps fewer
                         bits), and at the end ``acc * sv / (448 * l)``.

Why int8 for Q K^T: near each row's largest values its steps are 16x finer than e4m3's, at
the same tensor-core rate on Hopper (the error it saves: ``kernels/README.md``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

try:  # host-side TMA descriptors: Triton >= 3.4 (torch >= 2.8)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: plain loads of the same tiles
    TensorDescriptor = None

from .column_stats import key_mean, value_scales
from .fp8 import E4M3, E4M3_MAX

P_SCALE = tl.constexpr(E4M3_MAX)  # p (at most 1) goes to e4m3 as p * 448: 1 stays exact
LOG2_P_SCALE = tl.constexpr(math.log2(E4M3_MAX))  # the same scale inside an exp2


@triton.jit
def int8_rows(x):
    """float32 ``[R, D]`` -> (int8 values, float32 scales ``[R]``): ``round(x / s)`` half away
    from zero with ``s = amax / 127`` per row (1 for an all-zero row)."""
    amax = tl.max(tl.abs(x), axis=1)
    scale = tl.where(amax > 0.0, amax / 127.0, 1.0)
    return int8_scaled(x, scale[:, None]), scale


@triton.jit
def int8_scaled(x, scale):
    """float32 ``x`` -> int8 ``round(x / scale)`` half away from zero (``fp8_attention``)."""
    y = x / scale
    y = tl.minimum(tl.maximum(tl.where(y >= 0, y + 0.5, y - 0.5), -127.0), 127.0)
    return y.to(tl.int8)


@triton.jit
def e4m3_scaled(x, inv, dtype: tl.constexpr):
    """``x * inv`` in e4m3 (``dtype``) with PyTorch's bits for
    ``(x * inv).clamp(-448, 448).to(float8_e4m3fn)``; ``inv``: the reciprocal of a scale,
    ``tl.div_rn(1.0, scale)``, rounded as PyTorch's division of tensors. NaN kept through the
    clamp, then to nearest even. (A correctly rounded division per element instead nearly
    doubles the scaling kernels' instructions: sm90 SASS of ``e4m3_rows``, 26 an element
    against 14.)"""
    y = tl.maximum(x * inv, -P_SCALE, propagate_nan=tl.PropagateNan.ALL)
    y = tl.minimum(y, P_SCALE, propagate_nan=tl.PropagateNan.ALL)
    return y.to(dtype, fp_downcast_rounding="rtne")


# block_m x block_n tiles, warps, pipeline stages: the fastest of
# ``benchmarks/fp8_attention.py --sweep`` on an H100 at 480p/93 (24 configs); tma: K and V
# tiles by TMA (else plain loads; always so where Triton has no TensorDescriptor).
FP8_ATTN_CONFIG: dict[str, int] = {"block_m": 64, "block_n": 128, "num_warps": 4,
                                   "num_stages": 3, "tma": 0}


@triton.jit
def _quantize_kernel(X, XQ, SCALE, MEAN, stride_xb, stride_xh, stride_xs, H, S, S_PAD,
                     BLOCK: tl.constexpr, D: tl.constexpr, SMOOTH: tl.constexpr,
                     PER_CHANNEL: tl.constexpr):
    """Rows ``[i * BLOCK, (i + 1) * BLOCK)`` of head ``bh``, quantized (rows past S zero).

    PER_CHANNEL false (q, k): int8, ``round(x / scale)`` half away from zero, with
    ``scale = amax / 127`` of each row written to ``SCALE[bh, row]``; XQ is
    ``[B * H, S_PAD, D]``. SMOOTH: ``MEAN[bh, :]`` subtracted first.
    PER_CHANNEL (v): e4m3 of ``x / SCALE[bh, :]`` (given); XQ is ``[B * H, D, S_PAD]``.
    """
    i = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = i * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, D)
    ok = rows < S
    x = X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh
    tile = tl.load(x + rows[:, None].to(tl.int64) * stride_xs + d[None, :], mask=ok[:, None],
                   other=0.0).to(tl.float32)
    if SMOOTH:
        tile = tl.where(ok[:, None], tile - tl.load(MEAN + bh * D + d)[None, :], 0.0)
    if PER_CHANNEL:
        y = tile / tl.load(SCALE + bh * D + d)[None, :]
        out = XQ + bh.to(tl.int64) * D * S_PAD
        tl.store(out + d[:, None] * S_PAD + rows[None, :],
                 tl.trans(y).to(XQ.dtype.element_ty, fp_downcast_rounding="rtne"))
    else:
        y, scale = int8_rows(tile)
        tl.store(SCALE + bh.to(tl.int64) * S_PAD + rows, scale)
        tl.store(XQ + (bh.to(tl.int64) * S_PAD + rows[:, None]) * D + d[None, :], y)


@triton.jit
def _fwd_kernel(QQ, KQ, VT, QS, KS, VS, Out, stride_ob, stride_oh, stride_os, H, SQ, SK,
                SQ_PAD, SK_PAD, qk_scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                D: tl.constexpr, EVEN_K: tl.constexpr, TMA: tl.constexpr):
    """Queries ``[m * BLOCK_M, (m + 1) * BLOCK_M)`` of head ``bh`` against every key.

    TMA: KQ and VT are host-side TMA descriptors of the 2D views ``[B*H*SK_PAD, D]`` and
    ``[B*H*D, SK_PAD]`` (tiles ``[BLOCK_N, D]`` and ``[D, BLOCK_N]``), else the copies."""
    m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    d = tl.arange(0, D)
    q = tl.load(QQ + (bh.to(tl.int64) * SQ_PAD + rows[:, None]) * D + d[None, :])
    sq = tl.load(QS + bh.to(tl.int64) * SQ_PAD + rows) * qk_scale
    if not TMA:
        k_base = KQ + bh.to(tl.int64) * SK_PAD * D
        v_base = VT + bh.to(tl.int64) * D * SK_PAD
    ks_base = KS + bh.to(tl.int64) * SK_PAD

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for n0 in range(0, SK_PAD, BLOCK_N):
        if TMA:
            k = KQ.load([(bh * SK_PAD + n0).to(tl.int32), 0])
        else:
            k = tl.load(k_base + (n0 + cols)[:, None] * D + d[None, :])
        sk = tl.load(ks_base + n0 + cols)
        s = tl.dot(q, tl.trans(k)).to(tl.float32) * sq[:, None] * sk[None, :]
        if not EVEN_K:
            s = tl.where((n0 + cols < SK)[None, :], s, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        if TMA:
            vt = VT.load([(bh * D).to(tl.int32), n0])
        else:
            vt = tl.load(v_base + d[:, None] * SK_PAD + (n0 + cols)[None, :])
        acc = acc * alpha[:, None]
        p8 = (p * P_SCALE).to(vt.dtype, fp_downcast_rounding="rtne")
        acc = tl.dot(p8, tl.trans(vt), acc, max_num_imprecise_acc=BLOCK_N)
        m_i = m_ij

    out = acc * (tl.load(VS + bh * D + d) / P_SCALE)[None, :] / l_i[:, None]
    o_ptrs = Out + b * stride_ob + h * stride_oh + rows[:, None].to(tl.int64) * stride_os \
        + d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(rows < SQ)[:, None])


def _pad(n: int, block: int) -> int:
    return triton.cdiv(n, block) * block


def quantize_qk(x: torch.Tensor, block: int, smooth: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, H, S, D]`` -> (``[B*H, S_pad, D]`` int8, ``[B*H, S_pad]`` float32 row scales),
    the mean over S subtracted first with ``smooth``."""
    B, H, S, D = x.shape
    s_pad = _pad(S, block)
    xq = torch.empty(B * H, s_pad, D, device=x.device, dtype=torch.int8)
    scale = torch.empty(B * H, s_pad, device=x.device, dtype=torch.float32)
    mean = key_mean(x).reshape(B * H, D) if smooth else scale
    _quantize_kernel[(s_pad // block, B * H)](x, xq, scale, mean, x.stride(0), x.stride(1),
                                              x.stride(2), H, S, s_pad, block, D, smooth, False)
    return xq, scale


def quantize_v(v: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, H, S, D]`` -> (``[B*H, D, S_pad]`` e4m3, transposed; ``[B*H, D]`` float32
    scales, one per channel)."""
    B, H, S, D = v.shape
    s_pad = _pad(S, block)
    scale = value_scales(v).reshape(B * H, D).contiguous()
    vt = torch.empty(B * H, D, s_pad, device=v.device, dtype=E4M3)
    _quantize_kernel[(s_pad // block, B * H)](v, vt, scale, scale, v.stride(0), v.stride(1),
                                              v.stride(2), H, S, s_pad, block, D, False, True)
    return vt, scale


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """Non-causal softmax attention, scale ``D**-0.5``: Q K^T in int8, P V in e4m3;
    ``[B, H, Sq, D]`` in q's dtype.

    q, k, v: bf16/fp16 ``[B, H, S, D]`` views with unit stride along D (e.g. of the qkv
    projection). ``out``: any ``[B, H, Sq, D]`` view with unit stride along D.
    """
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    B, H, SQ, D = q.shape
    SK = k.shape[2]
    cfg = FP8_ATTN_CONFIG
    bm, bn = cfg["block_m"], cfg["block_n"]
    qq, qs = quantize_qk(q, bm)
    kq, ks = quantize_qk(k, bn, smooth=True)
    vt, vs = quantize_v(v, bn)
    sk_pad = kq.shape[1]
    o = torch.empty(q.shape, device=q.device, dtype=q.dtype) if out is None else out
    tma = bool(cfg.get("tma")) and TensorDescriptor is not None
    if tma:
        kq = TensorDescriptor.from_tensor(kq.view(-1, D), [bn, D])
        vt = TensorDescriptor.from_tensor(vt.view(-1, vt.shape[-1]), [D, bn])
    _fwd_kernel[(triton.cdiv(SQ, bm), B * H)](
        qq, kq, vt, qs, ks, vs, o, o.stride(0), o.stride(1), o.stride(2), H, SQ, SK,
        qq.shape[1], sk_pad, D**-0.5 * math.log2(math.e), bm, bn, D, SK % bn == 0, tma,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return o


def supported(q: torch.Tensor) -> bool:
    """Whether this kernel covers the inputs: CUDA sm_89+, bf16/fp16, D a power of two in
    32..256 (an 8-bit tensor-core product sums over at least 32)."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[-1] in (32, 64, 128, 256)
            and torch.cuda.get_device_capability(q.device) >= (8, 9))
