"""Triton row kernels for the DiT's memory-bound glue (CUDA, bf16/fp16 activations).

Each token row (C = 4096 channels at the real size) fits in the registers of one program, so
every kernel reads its inputs once and writes its outputs once, with the same fp32 math and the
same roundings as ``runner.dit``'s plain path:

* ``fused_rows``: an optional residual ``x + res`` or gated residual ``x + gate * res`` (fp32,
  rounded to x's dtype), then an optional LayerNorm of the result in fp32, either without
  affine weights and modulated per latent frame (``* (1 + scale) + shift``, adaLN) or with
  affine weights (the pre-cross-attention norm), rounded once. One call replaces the two or
  three passes (residual, upcast, norm, modulate, cast) of the plain path.
* ``head_norm_rope``: per-head RMSNorm of q and k read straight out of the fused qkv projection
  (rounded, times the weight, rounded, as the plain path does), then interleaved RoPE in fp32;
  q and k are written token-major (``[B, N, H, D]``) and returned as ``[B, H, N, D]`` views,
  the layout the attention kernels read without copies; for fp8 attention q can come out as
  e4m3 of a scale given beforehand (``fa3_fp8_attention.from_qkv``).
* ``swiglu``: ``silu(a) * b`` of the FFN, with the plain path's two roundings, one pass.
* ``e4m3_rows``: an fp8 GEMM's input scaled per token (``kernels.fp8``'s rule, its bits): the
  row's amax, ``x / (amax / 448)`` clamped and rounded to e4m3, and the scale, in one read
  (optionally after adding a mean per group of rows: the fp8 attention's output pass).
  ``fused_rows`` and ``swiglu`` can end the same way (``e4m3=True``): the fp8 DiT's GEMM inputs
  then never go through memory in bf16. They are rounded to it first, so they are ``e4m3_rows``
  of the bf16 result, except where this compilation of the norm rounds it one ulp apart from
  the bf16-writing one (a few elements in a million, one e4m3 step; tests/test_triton_norm_gpu.py).

The last two replaced ``torch.compile`` of the same functions, which compiled anew in every
process (seconds, inside the first denoising step) and again for each new row count (the
prompt's tokens, the video's).

Why hand-written: inductor's looped reductions read each 4096-wide row twice and ran ~3x over
the bandwidth floor at 84,480 tokens (benchmarks/results/dit_forward.md).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from .fp8 import E4M3, MIN_SCALE, Rows
from .triton_bsa import _round_fp32_to as _rnd
from .triton_fp8_attention import e4m3_scaled

_MIN_SCALE = tl.constexpr(MIN_SCALE)

RES_NONE, RES_ADD, RES_GATED = 0, 1, 2
NORM_NONE, NORM_MODULATE, NORM_AFFINE = 0, 1, 2
_NORMS = {None: NORM_NONE, "modulate": NORM_MODULATE, "layer_norm": NORM_AFFINE}

# Warps of a row kernel's program: one per so many elements of its padded row (its block), at
# most so many. For fused_rows, SwiGLU e4m3 and e4m3_rows, the fastest that keeps the bits of
# those timed by benchmarks/row_kernels.py on an H100 at 720p
# (benchmarks/results/vs_original.md, sessions 19 and 21: SwiGLU e4m3 at 32 warps since its
# scaling multiplies by the reciprocal, 1.553 against 1.636 ms at 16; its only reduction is a
# maximum, so the warps change no bits).
ROW_WARPS: dict[str, tuple[int, int]] = {"fused_rows": (512, 8), "fused_rows_e4m3": (512, 8),
                                         "swiglu": (512, 8), "swiglu_e4m3": (512, 32),
                                         "e4m3_rows": (1024, 16), "head_norm_rope": (512, 8)}
ROWS_PER_PROGRAM = 8  # fused_rows: tokens a program takes (its per-frame vectors read once)


def _row_warps(kernel: str, block: int) -> int:
    per_warp, most = ROW_WARPS[kernel]
    return max(1, min(most, block // per_warp))


@triton.jit
def _rows_kernel(X, RES, GATE, SHIFT, SCALE, W, BIAS, XOUT, YOUT, YSCALE,
                 T, HW, C, sg_b, sg_t, ssh_b, ssh_t, ssc_b, ssc_t, eps,
                 ROWS: tl.constexpr, BLOCK_C: tl.constexpr, RES_MODE: tl.constexpr,
                 NORM_MODE: tl.constexpr, Q8: tl.constexpr):
    """``ROWS`` consecutive tokens of one latent frame ``(b, t)``; rows are C contiguous.
    ``Q8``: the norm's output, rounded to x's dtype, goes out scaled per row (``YSCALE``)."""
    pid = tl.program_id(0)
    bt = tl.program_id(1)
    b = bt // T
    t = bt % T
    c = tl.arange(0, BLOCK_C)
    cm = c < C
    if RES_MODE == 2:
        g = tl.load(GATE + b * sg_b + t * sg_t + c, mask=cm, other=0.0).to(tl.float32)
    if NORM_MODE == 1:
        mul = tl.load(SCALE + b * ssc_b + t * ssc_t + c, mask=cm, other=0.0).to(tl.float32) + 1.0
        add = tl.load(SHIFT + b * ssh_b + t * ssh_t + c, mask=cm, other=0.0).to(tl.float32)
    if NORM_MODE == 2:
        mul = tl.load(W + c, mask=cm, other=0.0).to(tl.float32)
        add = tl.load(BIAS + c, mask=cm, other=0.0).to(tl.float32)
    for i in range(ROWS):
        f = pid * ROWS + i  # token index inside the frame
        if f < HW:
            off = (bt.to(tl.int64) * HW + f) * C + c
            x = tl.load(X + off, mask=cm, other=0.0)
            if RES_MODE != 0:
                r = tl.load(RES + off, mask=cm, other=0.0).to(tl.float32)
                if RES_MODE == 2:
                    r = g * r
                x = _rnd(x.to(tl.float32) + r, XOUT.dtype.element_ty)
                tl.store(XOUT + off, x, mask=cm)
            if NORM_MODE != 0:
                v = x.to(tl.float32)
                mean = tl.sum(v, axis=0) / C
                d = tl.where(cm, v - mean, 0.0)
                var = tl.sum(d * d, axis=0) / C
                y = d * (1.0 / tl.sqrt_rn(var + eps))
                y = y * mul + add
                if Q8:
                    yq, ys = _e4m3_row(_rnd(y, X.dtype.element_ty).to(tl.float32), cm,
                                       YOUT.dtype.element_ty)
                    tl.store(YOUT + off, yq, mask=cm)
                    tl.store(YSCALE + bt.to(tl.int64) * HW + f, ys)
                else:
                    tl.store(YOUT + off, _rnd(y, YOUT.dtype.element_ty), mask=cm)


def _frame_vec(v: torch.Tensor | None, B: int, T: int, C: int) -> tuple[torch.Tensor | None,
                                                                        int, int]:
    """A per-frame vector ``[B, T, 1, C]`` / ``[B, T, C]`` (unit channel stride) and its b, t
    strides; a batch or frame dim of size 1 broadcasts (stride 0)."""
    if v is None:
        return None, 0, 0
    if v.dim() == 4:
        v = v.squeeze(2)
    v = v.expand(B, T, C)
    if v.stride(-1) != 1:
        v = v.contiguous()
    return v, v.stride(0), v.stride(1)


def fused_rows(x: torch.Tensor, frames: int, *, res: torch.Tensor | None = None,
               gate: torch.Tensor | None = None, norm: str | None = None,
               shift: torch.Tensor | None = None, scale: torch.Tensor | None = None,
               weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               eps: float = 1e-6, e4m3: bool = False) -> tuple[torch.Tensor | None, Any]:
    """``(x + [gate *] res, norm(that))`` for ``x`` ``[B, N, C]`` in ``frames`` latent frames.

    ``gate``/``shift``/``scale``: ``[B, T, 1, C]`` (fp32 in the DiT); ``norm``: ``None``,
    ``"modulate"`` (LayerNorm without affine, ``* (1 + scale) + shift``) or ``"layer_norm"``
    (with ``weight``/``bias``). The first result is ``None`` without ``res``, the second
    without ``norm``; ``e4m3``: the second is ``kernels.fp8.Rows``, ``e4m3_rows`` of the
    norm's bf16 output (see the module's docstring).
    """
    B, N, C = x.shape
    if N % frames:
        raise ValueError(f"{N} tokens do not split into {frames} frames")
    hw = N // frames
    x = x.contiguous()
    res_mode = RES_NONE if res is None else (RES_ADD if gate is None else RES_GATED)
    norm_mode = _NORMS[norm]
    if res is not None:
        res = res.reshape(B, N, C).contiguous()
    g, sg_b, sg_t = _frame_vec(gate, B, frames, C)
    sh, ssh_b, ssh_t = _frame_vec(shift, B, frames, C)
    sc, ssc_b, ssc_t = _frame_vec(scale, B, frames, C)
    x_out = torch.empty_like(x) if res is not None else None
    y = y_scale = None
    e4m3 = e4m3 and norm_mode != NORM_NONE
    if norm_mode != NORM_NONE:
        y = torch.empty_like(x, dtype=E4M3 if e4m3 else x.dtype)
    if e4m3:
        y_scale = torch.empty(B, N, 1, device=x.device, dtype=torch.float32)
    block_c = triton.next_power_of_2(C)
    warps = _row_warps("fused_rows_e4m3" if e4m3 else "fused_rows", block_c)
    dummy = x
    _rows_kernel[(triton.cdiv(hw, ROWS_PER_PROGRAM), B * frames)](
        x, res if res is not None else dummy, g if g is not None else dummy,
        sh if sh is not None else dummy, sc if sc is not None else dummy,
        weight if weight is not None else dummy, bias if bias is not None else dummy,
        x_out if x_out is not None else dummy, y if y is not None else dummy,
        y_scale if e4m3 else dummy, frames, hw, C, sg_b, sg_t, ssh_b, ssh_t, ssc_b, ssc_t,
        float(eps), ROWS_PER_PROGRAM, block_c, res_mode, norm_mode, e4m3, num_warps=warps)
    return x_out, Rows(y, y_scale, x.dtype) if e4m3 else y


@triton.jit
def _head_norm_rope_kernel(SRC, W, COS, SIN, OUT, Q8, QSCALE, N, stride_sb, stride_sn, stride_op,
                           stride_ob, stride_on, stride_cn, eps, H, H_PAD: tl.constexpr,
                           D: tl.constexpr, PARTS: tl.constexpr, ROPE: tl.constexpr,
                           Q_E4M3: tl.constexpr):
    """One token: per-head RMSNorm over D of each of its ``PARTS`` parts, then RoPE. With
    Q_E4M3 part 0 goes to Q8 as e4m3 of its rounded value times ``1 / QSCALE[0]``, the other
    parts to OUT from its first slot."""
    tok = tl.program_id(0)
    b = (tok // N).to(tl.int64)
    n = (tok % N).to(tl.int64)
    hh = tl.arange(0, H_PAD)[:, None]
    col = hh * D + tl.arange(0, D)[None, :]
    ok = hh < H
    dt = OUT.dtype.element_ty
    if ROPE:  # the tables repeat each angle for both channels of a pair
        ce, co = tl.split(tl.reshape(tl.load(COS + n * stride_cn + tl.arange(0, D)), (D // 2, 2)))
        se, so = tl.split(tl.reshape(tl.load(SIN + n * stride_cn + tl.arange(0, D)), (D // 2, 2)))
    for p in tl.static_range(PARTS):
        x = tl.load(SRC + b * stride_sb + n * stride_sn + p * (H * D) + col, mask=ok,
                    other=0.0).to(tl.float32)
        w = tl.load(W + p * D + tl.arange(0, D)).to(tl.float32)
        rstd = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=1) / D + eps)
        # the plain path: (x * rstd) rounded, times the weight in the activation dtype, rounded
        y = _rnd(_rnd(x * rstd[:, None], dt).to(tl.float32) * w[None, :], dt).to(tl.float32)
        if ROPE:
            ye, yo = tl.split(tl.reshape(y, (H_PAD, D // 2, 2)))
            oe = ye * ce[None, :] + (-yo) * se[None, :]
            oo = yo * co[None, :] + ye * so[None, :]
            y = tl.reshape(tl.join(oe, oo), (H_PAD, D))
        at = b * stride_ob + n * stride_on + col
        if Q_E4M3 and p == 0:
            inv = tl.div_rn(1.0, tl.load(QSCALE))
            tl.store(Q8 + at, e4m3_scaled(_rnd(y, dt).to(tl.float32), inv,
                                          Q8.dtype.element_ty), mask=ok)
        else:
            tl.store(OUT + (p - Q_E4M3) * stride_op + at, _rnd(y, dt), mask=ok)


def head_norm_rope(src: torch.Tensor, heads: int, weights: list[torch.Tensor],
                   cos: torch.Tensor | None, sin: torch.Tensor | None,
                   eps: float, q_scale: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Per-head RMSNorm (+ RoPE) of the first ``len(weights)`` ``C``-wide parts of ``src``.

    ``src`` ``[B, N, P * C]`` with unit channel stride (the qkv projection: parts q, k, v);
    ``weights``: one ``[D]`` RMSNorm weight per part to normalise (q's, k's); ``cos``/``sin``
    ``[N, D]`` fp32 (interleaved pairs) or ``None`` for no RoPE. Returns one ``[B, H, N, D]``
    view of a token-major ``[B, N, H, D]`` tensor per part. ``q_scale`` (float32, one
    element): the first part comes back as e4m3 of its value times ``1 / q_scale``, as
    ``cudnn_fp8_attention.scale_cast`` would scale the bf16 one, and is never written in bf16.
    """
    B, N, _ = src.shape
    parts, D, H = len(weights), weights[0].shape[0], heads
    if src.stride(-1) != 1:
        src = src.contiguous()
    q_e4m3 = q_scale is not None
    out = torch.empty(parts - q_e4m3, B, N, H, D, device=src.device, dtype=src.dtype)
    q8 = torch.empty(B, N, H, D, device=src.device, dtype=E4M3) if q_e4m3 else out
    w = torch.stack([w.to(src.dtype) for w in weights]).contiguous()
    rope = cos is not None
    if rope:
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
    _head_norm_rope_kernel[(B * N,)](
        src, w, cos if rope else w, sin if rope else w, out, q8, q_scale if q_e4m3 else w, N,
        src.stride(0), src.stride(1), N * H * B * D, N * H * D, H * D,  # both [B, N, H, D]
        cos.stride(0) if rope else 0, float(eps), H, triton.next_power_of_2(H), D, parts, rope,
        q_e4m3, num_warps=_row_warps("head_norm_rope", triton.next_power_of_2(H) * D))
    return [o.transpose(1, 2) for o in ([q8] if q_e4m3 else []) + list(out)]


@triton.jit
def _silu_mul(a, b):
    """``silu(a)`` in fp32 rounded to b's dtype, times ``b`` in fp32, rounded: eager's
    ``F.silu(a) * b`` (``a`` already fp32)."""
    s = _rnd(a / (1.0 + tl.exp(-a)), b.dtype)
    return _rnd(s.to(tl.float32) * b.to(tl.float32), b.dtype)


@triton.jit
def _swiglu_kernel(A, B, H, n, BLOCK: tl.constexpr):
    """``BLOCK`` elements of ``_silu_mul``."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    a = tl.load(A + i, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(B + i, mask=ok, other=0.0)
    tl.store(H + i, _silu_mul(a, b), mask=ok)


@triton.jit
def _swiglu_e4m3_kernel(A, B, Q, SCALE, K, BLOCK_K: tl.constexpr):
    """One row of ``_swiglu_kernel``'s result, scaled per row as ``_e4m3_rows_kernel``."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_K)
    ok = c < K
    a = tl.load(A + row * K + c, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(B + row * K + c, mask=ok, other=0.0)
    q, scale = _e4m3_row(_silu_mul(a, b).to(tl.float32), ok, Q.dtype.element_ty)
    tl.store(Q + row * K + c, q, mask=ok)
    tl.store(SCALE + row, scale)


def swiglu(a: torch.Tensor, b: torch.Tensor, e4m3: bool = False) -> Any:
    """``F.silu(a) * b`` of two contiguous tensors of one shape and dtype; ``e4m3``: as
    ``kernels.fp8.Rows`` (``e4m3_rows`` of it, in the same pass)."""
    if e4m3:
        K = a.shape[-1]
        q = torch.empty_like(a, dtype=E4M3)
        scale = torch.empty(*a.shape[:-1], 1, device=a.device, dtype=torch.float32)
        block = triton.next_power_of_2(K)
        _swiglu_e4m3_kernel[(a.numel() // K,)](a, b, q, scale, K, block,
                                                num_warps=_row_warps("swiglu_e4m3", block))
        return Rows(q, scale, a.dtype)
    h = torch.empty_like(a)
    n = a.numel()
    block = 4096
    _swiglu_kernel[(triton.cdiv(n, block),)](a, b, h, n, block,
                                             num_warps=_row_warps("swiglu", block))
    return h


@triton.jit
def _max_keep_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _e4m3_row(x, ok, dtype: tl.constexpr):
    """A float32 row (``ok``: its lanes) -> (e4m3 ``x * (1 / scale)``, ``scale``): ``scale =
    max(amax / 448, MIN_SCALE)`` (1 if all zero, or NaN, as eager's ``amax > 0`` test gives),
    the division and the reciprocal rounded to nearest as PyTorch's are (``div_rn``), the
    product clamped to +-448 with NaN kept (as ``clamp``): ``fp8._quantize_rows``."""
    x = tl.where(ok, x, 0.0)
    amax = tl.reduce(tl.abs(x), 0, _max_keep_nan)  # NaN if the row has one (tl.max skips it)
    scale = tl.where(amax > 0, tl.maximum(tl.div_rn(amax, 448.0), _MIN_SCALE), 1.0)
    return e4m3_scaled(x, tl.div_rn(1.0, scale), dtype), scale


@triton.jit
def _e4m3_rows_kernel(X, Q, SCALE, MEAN, K, ROWS_PER_MEAN, BLOCK_K: tl.constexpr,
                      ADD_MEAN: tl.constexpr):
    """One row through ``_e4m3_row``; with ADD_MEAN the row plus ``MEAN[row // ROWS_PER_MEAN]``
    (float32), rounded to X's dtype first."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_K)
    ok = c < K
    x = tl.load(X + row * K + c, mask=ok, other=0.0).to(tl.float32)
    if ADD_MEAN:
        m = tl.load(MEAN + (row // ROWS_PER_MEAN) * K + c, mask=ok, other=0.0)
        x = _rnd(x + m, X.dtype.element_ty).to(tl.float32)
    q, scale = _e4m3_row(x, ok, Q.dtype.element_ty)
    tl.store(Q + row * K + c, q, mask=ok)
    tl.store(SCALE + row, scale)


def e4m3_rows(x: torch.Tensor, mean: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous ``[N, K]`` -> (e4m3 ``[N, K]``, float32 scales ``[N, 1]``), the bits of
    ``kernels.fp8.quantize_rows``. ``mean`` (float32 ``[G, K]``, G dividing N): the rows of
    each consecutive N / G are first added to their group's mean in float32 and rounded to x's
    dtype (the fp8 attention's output pass), which is then never written."""
    N, K = x.shape
    q = torch.empty(N, K, device=x.device, dtype=E4M3)
    scale = torch.empty(N, 1, device=x.device, dtype=torch.float32)
    block = triton.next_power_of_2(K)
    per_mean = N // mean.shape[0] if mean is not None else N
    _e4m3_rows_kernel[(N,)](x, q, scale, mean if mean is not None else scale, K, per_mean,
                            block, mean is not None, num_warps=_row_warps("e4m3_rows", block))
    return q, scale


def supported(heads: int, head_dim: int) -> bool:
    """Whether ``head_norm_rope`` covers this head layout (D a power of two, even)."""
    return head_dim >= 2 and head_dim & (head_dim - 1) == 0 and heads >= 1
