"""Triton kernels for 3D block sparse attention (CUDA, bf16/fp16; tuned on an H100).

Launches, each readable top to bottom:

1. ``_chunk_pass_kernel`` one pass over a raster tensor, chunk by chunk: the chunk means
                          over their real tokens (summed in float64), a chunk-major copy
                          (missing edge tokens zero), or both. q: means; k: both; v: copy
                          (bf16 V as float16 times a per-head power of two, see ``_v_copy``).
2. ``_grid_kernel``       the means on the score grid (``reference.fixed_point``), as three
   ``_score_kernel``      int8 slices; then the scores, ``reference.exact_scores`` rounded
                          to the dtype: nine int8 tensor-core products of the slices, exact
                          in int32, combined exactly in float64, rounded on the way out.
3. ``_select_kernel``     per query chunk, the ``count`` best kv chunks by a radix select
                          on the score bits (16 passes for bf16), as an *ascending* list.
                          Where ``attend``'s copies are wanted, ``_select_and_copy_kernel``
                          writes them in the same launch (v's; fp8: k's and v's).
4. ``_bsa_fwd_kernel``    flash attention forward: one program per (query chunk,
                          batch*head), queries gathered from the raster layout, K and V
                          tiles loaded by TMA from the chunk-major copies. With
                          several kv passes (``kv_passes_for``: where a head's K and V
                          overflow L2) it is launched once per slice of the kv chunks, the
                          softmax state carried between launches in float32: same tiles,
                          same order, same bits.

fp8 mode (``attend(fp8=True)``; the rules are ``fp8_attention``'s): ``_chunk_quant_kernel``
writes the copies instead of step 1's (int8 k less its mean with one scale per head, e4m3 v
transposed per chunk), and the forward quantizes its queries to int8 as it loads them.

Why it looks like this (measurements in benchmarks/NOTES_bsa_kernel.md):

* The forward is bound by moving K/V tiles from L2: every (query chunk, kv chunk) pair
  loads 32 KB. TMA loads of contiguous tiles beat gathers from the raster layout by ~10%,
  and the copies cost little: k is read anyway for pooling, v anyway for float16.
* Ascending kv lists make the programs in flight walk K/V of one head in the same order;
  walking them in score order, as the original does, was 15% slower.
* The selection is bit-for-bit the reference's (exact float64 pooling sums, the same
  exact scores, the same rounding float64 -> float32 -> dtype, the same tie rule: lower
  index first), so tests can demand equality. The scores used to be a float32 FMA chain in
  a fixed order d = 0..D-1 (1.17 ms at 720p, growing with M_q * M_k), then a cuBLAS float64
  matmul of the means (0.38 ms with its conversions, and 8 bytes a score written and read
  back). An exact sum needs no order; on the 21-bit grid it is nine int8 products, which
  tensor cores run several times faster than float64, and the kernel writes the rounded
  scores (2 bytes each). A float64 ``tl.dot`` does not compile in Triton 3.6 (sm_90).
* P @ V runs in float16 for bf16 inputs: bf16 P costs ~1.7e-3 of relative error on top of
  the ~1.7e-3 of rounding the output, float16 P almost nothing.

Ragged edge chunks (latent shape not divisible by the chunk) are masked in every kernel:
missing query rows are neither loaded nor stored, missing keys get a score of -inf.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import NamedTuple

import torch
import triton
import triton.language as tl

try:  # host-side TMA descriptors: Triton >= 3.4 (torch >= 2.8)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: plain loads of the same tiles
    TensorDescriptor = None

from longcat_tools.model.chunks import kept_per_query

from .column_stats import column_stats, value_scales
from .fp8 import E4M3
from .fp8_attention import int8_scale
from .reference import GRID_BITS as R_GRID_BITS
from .reference import ChunkLayout, selection_counts
from .triton_fp8_attention import LOG2_P_SCALE, int8_rows, int8_scaled


def _next_pow2(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(n))


@triton.jit
def _chunk_rows(chunk, r, NH, NW, T, HH, W,
                CT: tl.constexpr, CH: tl.constexpr, CW: tl.constexpr, C: tl.constexpr):
    """Raster row and validity of slot ``r`` of ``chunk`` (chunks numbered T, then H, W)."""
    ct = chunk // (NH * NW)
    ch = (chunk // NW) % NH
    cw = chunk % NW
    t = ct * CT + r // (CH * CW)
    h = ch * CH + (r // CW) % CH
    w = cw * CW + r % CW
    valid = (r < C) & (t < T) & (h < HH) & (w < W)
    return (t * HH + h) * W + w, valid


# Triton's CPU interpreter truncates a float32 -> bf16 cast; there ``_round_fp32_to`` rounds
# by bits. On a GPU the cast (cvt.rn.bf16x2.f32) rounds to nearest even: the same bits, NaN
# kept, in fewer instructions (benchmarks/results/sass_sm90.json).
_ROUND_BY_BITS = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0").lower()
                              in ("1", "true", "yes", "on", "y"))


@triton.jit
def _round_fp32_to(x, dtype: tl.constexpr):
    """float32 -> ``dtype`` with round-to-nearest-even, returned in ``dtype``."""
    if dtype == tl.bfloat16 and _ROUND_BY_BITS:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return tl.where(x != x, x, bits.to(tl.float32, bitcast=True)).to(tl.bfloat16)
    else:
        return x.to(dtype)


GRID_BITS = tl.constexpr(R_GRID_BITS)


@triton.jit
def _pow2(n):
    """``2.0 ** n`` in float64 from its bits (``reference.pow2``), n an int32 in -1022..1023."""
    return ((n.to(tl.int64) + 1023) << 52).to(tl.float64, bitcast=True)


@triton.jit
def _chunk_pass_kernel(X, MEAN, XC, SCALE, stride_xb, stride_xh, stride_xs, stride_mb,
                       stride_mh, stride_mm, H, M, T, HH, W, NH, NW,
                       CT: tl.constexpr, CH: tl.constexpr, CW: tl.constexpr, C: tl.constexpr,
                       C_PAD: tl.constexpr, RB: tl.constexpr, D: tl.constexpr,
                       POOL: tl.constexpr, COPY: tl.constexpr, SCALED: tl.constexpr):
    """Chunk ``program_id(0)`` of head ``program_id(1)``: ``_chunk_pass``."""
    _chunk_pass(tl.program_id(0), tl.program_id(1), X, MEAN, XC, SCALE, stride_xb, stride_xh,
                stride_xs, stride_mb, stride_mh, stride_mm, H, M, T, HH, W, NH, NW,
                CT, CH, CW, C, C_PAD, RB, D, POOL, COPY, SCALED)


@triton.jit
def _chunk_pass(m, bh, X, MEAN, XC, SCALE, stride_xb, stride_xh, stride_xs, stride_mb,
                stride_mh, stride_mm, H, M, T, HH, W, NH, NW,
                CT: tl.constexpr, CH: tl.constexpr, CW: tl.constexpr, C: tl.constexpr,
                C_PAD: tl.constexpr, RB: tl.constexpr, D: tl.constexpr,
                POOL: tl.constexpr, COPY: tl.constexpr, SCALED: tl.constexpr):
    """Chunk ``m`` of head ``bh``: its mean into MEAN and/or its C_PAD slots into XC."""
    b = bh // H
    h = bh % H
    x = X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh
    xc = XC + (bh.to(tl.int64) * M + m) * C_PAD * D
    d = tl.arange(0, D)
    acc = tl.zeros([RB, D], dtype=tl.float64)  # one reduction over rows at the end
    count = tl.zeros([RB], dtype=tl.int32)
    for r0 in tl.static_range(0, C_PAD, RB):
        r = r0 + tl.arange(0, RB)
        rows, valid = _chunk_rows(m, r, NH, NW, T, HH, W, CT, CH, CW, C)
        tile = tl.load(x + rows[:, None].to(tl.int64) * stride_xs + d[None, :],
                       mask=valid[:, None], other=0.0)
        if POOL:
            acc += tile.to(tl.float64)
            count += valid.to(tl.int32)
        if COPY:
            if SCALED:
                tile = tile.to(tl.float32) * tl.load(SCALE + bh)
            tl.store(xc + r[:, None] * D + d[None, :], tile.to(XC.dtype.element_ty))
    if POOL:
        mean = tl.sum(acc, axis=0) / tl.sum(count, axis=0).to(tl.float64)
        out = MEAN + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh + m * stride_mm
        tl.store(out + d, _round_fp32_to(mean.to(tl.float32), MEAN.dtype.element_ty))


@triton.jit
def _grid_kernel(MEAN, GRID, GEXP, ROWS, M, RB: tl.constexpr, D: tl.constexpr):
    """Rows ``[RB]`` of the means ``[B*H*M, D]`` on the score grid (``reference.fixed_point``):
    21-bit integers as three int8 slices, low 7 bits first, each with the sign, into GRID
    ``[B*H, 3, M, D]``; the exponents into GEXP ``[B*H*M]``."""
    r = tl.program_id(0) * RB + tl.arange(0, RB)
    ok = r < ROWS
    d = tl.arange(0, D)
    x = tl.load(MEAN + r[:, None].to(tl.int64) * D + d[None, :], mask=ok[:, None],
                other=0.0).to(tl.float32)
    field = (tl.max(tl.abs(x), axis=1).to(tl.int32, bitcast=True) >> 23) & 0xFF
    e = tl.maximum(field, 1) - 126  # least e with max|x| < 2**e, at least -125
    ints = (x.to(tl.float64) * _pow2(-e + GRID_BITS)[:, None]).to(tl.int32)  # toward zero
    mag = tl.abs(ints)
    sign = tl.where(ints < 0, -1, 1)
    g = GRID + ((r // M).to(tl.int64) * 3 * M + r % M)[:, None] * D + d[None, :]
    for j in tl.static_range(3):
        tl.store(g + j * M * D, (((mag >> (7 * j)) & 127) * sign).to(tl.int8),
                 mask=ok[:, None])
    tl.store(GEXP + r, e, mask=ok)


@triton.jit
def _chunk_quant_kernel(X, XC, SCALE, MEAN, stride_xb, stride_xh, stride_xs, H, M, T, HH, W,
                        NH, NW, CT: tl.constexpr, CH: tl.constexpr, CW: tl.constexpr,
                        C: tl.constexpr, C_PAD: tl.constexpr, RB: tl.constexpr,
                        D: tl.constexpr, E4M3_T: tl.constexpr):
    """Chunk ``program_id(0)`` of head ``program_id(1)``: ``_chunk_quant``."""
    _chunk_quant(tl.program_id(0), tl.program_id(1), X, XC, SCALE, MEAN, stride_xb, stride_xh,
                 stride_xs, H, M, T, HH, W, NH, NW, CT, CH, CW, C, C_PAD, RB, D, E4M3_T)


@triton.jit
def _chunk_quant(m, bh, X, XC, SCALE, MEAN, stride_xb, stride_xh, stride_xs, H, M, T, HH, W,
                 NH, NW, CT: tl.constexpr, CH: tl.constexpr, CW: tl.constexpr,
                 C: tl.constexpr, C_PAD: tl.constexpr, RB: tl.constexpr,
                 D: tl.constexpr, E4M3_T: tl.constexpr):
    """Chunk ``m`` of head ``bh`` quantized for the fp8 forward (``fp8_attention``'s rules).

    E4M3_T false (k): ``X - MEAN[bh]`` as int8 over the head's scale ``SCALE[bh]``, slots
    ``[C_PAD, D]`` per chunk (a missing edge token: zeros). E4M3_T (v): e4m3 of
    ``X / SCALE[bh, :]`` (per-channel scales, given), stored transposed, ``[D, C_PAD]``."""
    b = bh // H
    h = bh % H
    x = X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh
    chunk = bh.to(tl.int64) * M + m
    d = tl.arange(0, D)
    for r0 in tl.static_range(0, C_PAD, RB):
        r = r0 + tl.arange(0, RB)
        rows, valid = _chunk_rows(m, r, NH, NW, T, HH, W, CT, CH, CW, C)
        tile = tl.load(x + rows[:, None].to(tl.int64) * stride_xs + d[None, :],
                       mask=valid[:, None], other=0.0).to(tl.float32)
        if E4M3_T:
            y = tl.trans(tile / tl.load(SCALE + bh * D + d)[None, :])
            tl.store(XC + chunk * D * C_PAD + d[:, None] * C_PAD + r[None, :],
                     y.to(XC.dtype.element_ty, fp_downcast_rounding="rtne"))
        else:
            tile = tl.where(valid[:, None], tile - tl.load(MEAN + bh * D + d)[None, :], 0.0)
            tl.store(XC + (chunk * C_PAD + r[:, None]) * D + d[None, :],
                     int8_scaled(tile, tl.load(SCALE + bh)))


@triton.jit
def _score_kernel(QG, QE, KG, KE, OUT, Mq, Mk, BM: tl.constexpr, BN: tl.constexpr,
                  D: tl.constexpr, DTYPE: tl.constexpr, STAGES: tl.constexpr):
    """Scores of query chunks ``[BM]`` against every kv chunk of head ``bh``, ``[BN]`` at a
    time, rounded to DTYPE: ``reference.exact_scores`` from the means' int8 slices (a = a2 *
    2**14 + a1 * 2**7 + a0, each |aj| < 128). The nine slice products are exact int32
    tensor-core dots, grouped by weight; three int32 sums (below 2**31 for D <= 256) then make
    the exact integer, below 2**51, in float64, scaled by the two exponents and rounded
    float64 -> float32 -> DTYPE."""
    pm = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    rm = pm * BM + tl.arange(0, BM)
    d = tl.arange(0, D)
    q_ok = rm < Mq
    qp = QG + bh * 3 * Mq * D + rm[:, None] * D + d[None, :]
    q0 = tl.load(qp, mask=q_ok[:, None], other=0)
    q1 = tl.load(qp + Mq * D, mask=q_ok[:, None], other=0)
    q2 = tl.load(qp + 2 * Mq * D, mask=q_ok[:, None], other=0)
    qe = tl.load(QE + bh * Mq + rm, mask=q_ok, other=0)
    i32: tl.constexpr = tl.int32
    for n0 in tl.range(0, Mk, BN, num_stages=STAGES):
        rn = n0 + tl.arange(0, BN)
        k_ok = rn < Mk
        kp = KG + bh * 3 * Mk * D + rn[:, None] * D + d[None, :]
        k0 = tl.trans(tl.load(kp, mask=k_ok[:, None], other=0))
        k1 = tl.trans(tl.load(kp + Mk * D, mask=k_ok[:, None], other=0))
        k2 = tl.trans(tl.load(kp + 2 * Mk * D, mask=k_ok[:, None], other=0))
        ke = tl.load(KE + bh * Mk + rn, mask=k_ok, other=0)
        hi = tl.dot(q2, k2, out_dtype=i32) * 128  # weight 2**21
        hi = tl.dot(q1, k2, tl.dot(q2, k1, hi, out_dtype=i32), out_dtype=i32)
        mid = tl.dot(q2, k0, out_dtype=i32)  # weight 2**14
        mid = tl.dot(q0, k2, tl.dot(q1, k1, mid, out_dtype=i32), out_dtype=i32)
        lo = tl.dot(q1, k0, out_dtype=i32)  # weight 1
        lo = tl.dot(q0, k0, tl.dot(q0, k1, lo, out_dtype=i32) * 128, out_dtype=i32)
        n = (hi.to(tl.float64) * 2097152.0
             + (mid.to(tl.float64) * 16384.0 + lo.to(tl.float64)))
        score = (n * _pow2(qe - GRID_BITS)[:, None] * _pow2(ke - GRID_BITS)[None, :]
                 ).to(tl.float32)
        tl.store(OUT + (bh * Mq + rm[:, None]) * Mk + rn[None, :],
                 _round_fp32_to(score, DTYPE), mask=q_ok[:, None] & k_ok[None, :])


@triton.jit
def _score_keys(s_row, n, Mk, LOW_BIT: tl.constexpr, DTYPE: tl.constexpr):
    """Scores ``n`` of a row as unsigned keys in float order, and which exist (padding: key 0).

    The row holds scores in DTYPE (``_score_kernel``'s), float32 ones already rounded to
    DTYPE, or float64 exact scores, rounded here float64 -> float32 -> DTYPE like
    ``reference.round_float64``."""
    valid = n < Mk
    s = tl.load(s_row + n, mask=valid, other=0.0)
    if s_row.dtype.element_ty == tl.float64:
        s = _round_fp32_to(s.to(tl.float32), DTYPE)
    bits = s.to(tl.float32).to(tl.int32, bitcast=True)
    # -0.0 ties +0.0, as in the reference's sort (a float64 matmul may return either)
    bits = tl.where(bits == -2147483648, 0, bits)
    # float order -> unsigned order: flip all bits of negatives, the sign bit of the rest
    key = tl.where(bits < 0, ~bits, bits ^ -2147483648).to(tl.uint32, bitcast=True)
    # scores rounded to bf16/fp16 have their low LOW_BIT bits zero: drop them, fewer passes
    return tl.where(valid, key >> LOW_BIT, 0), valid


@triton.jit
def _select_kernel(S, CNT, IDX, Mk, KMAX, stride_srow, stride_irow, PIECE: tl.constexpr,
                   PIECES: tl.constexpr, LOW_BIT: tl.constexpr, DTYPE: tl.constexpr):
    """Row ``program_id(0)``: ``_select_row``."""
    _select_row(tl.program_id(0), S, CNT, IDX, Mk, KMAX, stride_srow, stride_irow, PIECE,
                PIECES, LOW_BIT, DTYPE)


@triton.jit
def _select_row(row, S, CNT, IDX, Mk, KMAX, stride_srow, stride_irow, PIECE: tl.constexpr,
                PIECES: tl.constexpr, LOW_BIT: tl.constexpr, DTYPE: tl.constexpr):
    """The ``CNT[row]`` best of the row's ``Mk`` scores, as ``ascending_picks`` writes them.

    The row is held as PIECES (1 to 3) tensors of PIECE keys, so that a row of 1,320 keys
    takes 1,536 lanes instead of the 2,048 of one power of two: the kernel is bound by
    instruction issue, about the same per lane (benchmarks/NOTES_bsa_kernel.md, round 26).
    The pieces' counts are added lane by lane before each pass's one reduction."""
    row = row.to(tl.int64)
    s_row = S + row * stride_srow
    n0 = tl.arange(0, PIECE)
    n1 = n0 + PIECE
    n2 = n1 + PIECE
    key0, ok0 = _score_keys(s_row, n0, Mk, LOW_BIT, DTYPE)
    key1, ok1 = key0, ok0  # unused below unless PIECES says so
    key2, ok2 = key0, ok0
    if PIECES > 1:
        key1, ok1 = _score_keys(s_row, n1, Mk, LOW_BIT, DTYPE)
    if PIECES > 2:
        key2, ok2 = _score_keys(s_row, n2, Mk, LOW_BIT, DTYPE)
    k = tl.load(CNT + row)
    # the k-th largest key, one bit at a time (cand >= 1, so the padding's 0 never counts)
    kth = tl.zeros([], dtype=tl.uint32)
    for bit in tl.static_range(31 - LOW_BIT, -1, -1):
        cand = kth | (1 << bit)
        hits = (key0 >= cand).to(tl.int32)
        if PIECES > 1:
            hits += (key1 >= cand).to(tl.int32)
        if PIECES > 2:
            hits += (key2 >= cand).to(tl.int32)
        kth = tl.where(tl.sum(hits, axis=0) >= k, cand, kth)
    above = ((key0 > kth) & ok0).to(tl.int32)
    if PIECES > 1:
        above += ((key1 > kth) & ok1).to(tl.int32)
    if PIECES > 2:
        above += ((key2 > kth) & ok2).to(tl.int32)
    need = k - tl.sum(above, axis=0)  # ties at kth to take, lower index first
    out = IDX + row * stride_irow
    done = _picks_of_piece(out, n0, ok0, key0, kth, k, need, 0, KMAX)
    if PIECES > 1:
        done = _picks_of_piece(out, n1, ok1, key1, kth, k, need, done, KMAX)
    if PIECES > 2:
        _picks_of_piece(out, n2, ok2, key2, kth, k, need, done, KMAX)


@triton.jit
def _select_and_copy_kernel(S, CNT, IDX, Mk, KMAX, stride_srow, stride_irow, ROWS,
                            X, XC, XSCALE, Y, YC, YSCALE, MEAN, stride_xb, stride_xh,
                            stride_xs, stride_yb, stride_yh, stride_ys, H, M, T, HH, W, NH, NW,
                            PIECE: tl.constexpr, PIECES: tl.constexpr, LOW_BIT: tl.constexpr,
                            DTYPE: tl.constexpr, CT: tl.constexpr, CH: tl.constexpr,
                            CW: tl.constexpr, C: tl.constexpr, C_PAD: tl.constexpr,
                            RB: tl.constexpr, D: tl.constexpr, QUANT: tl.constexpr,
                            SCALED: tl.constexpr):
    """``_select_kernel``'s ROWS rows and the forward's copies of the ``B*H*M`` kv chunks in
    one launch, the kinds of program alternating while all last. QUANT false: v's copy as
    ``_chunk_pass_kernel`` makes it (X, XC, XSCALE; Y unused). QUANT: ``_chunk_quant_kernel``'s
    of k (X) and of v (Y). Why: the select is bound by instruction issue and the copies by
    memory, so on one SM they overlap (benchmarks/NOTES_bsa_kernel.md, round 26)."""
    KINDS: tl.constexpr = 3 if QUANT else 2
    pid = tl.program_id(0)
    chunks = (tl.num_programs(0) - ROWS) // (KINDS - 1)
    both = tl.minimum(ROWS, chunks)
    rest = pid - KINDS * both
    if rest < 0:
        kind = pid % KINDS
        i = pid // KINDS
    elif chunks > ROWS:
        kind = 1 + rest % (KINDS - 1)
        i = both + rest // (KINDS - 1)
    else:
        kind = rest * 0
        i = both + rest
    if kind == 0:
        _select_row(i, S, CNT, IDX, Mk, KMAX, stride_srow, stride_irow, PIECE, PIECES,
                    LOW_BIT, DTYPE)
    elif not QUANT:
        _chunk_pass(i % M, i // M, X, X, XC, XSCALE, stride_xb, stride_xh, stride_xs, 0, 0,
                    0, H, M, T, HH, W, NH, NW, CT, CH, CW, C, C_PAD, RB, D, False, True, SCALED)
    elif kind == 1:
        _chunk_quant(i % M, i // M, X, XC, XSCALE, MEAN, stride_xb, stride_xh, stride_xs, H, M,
                     T, HH, W, NH, NW, CT, CH, CW, C, C_PAD, RB, D, False)
    else:
        _chunk_quant(i % M, i // M, Y, YC, YSCALE, MEAN, stride_yb, stride_yh, stride_ys, H, M,
                     T, HH, W, NH, NW, CT, CH, CW, C, C_PAD, RB, D, True)


@triton.jit
def ascending_picks(out, n, valid, key, kth, k, KMAX):
    """Write a row's ``k`` picks to ``out`` in ascending order, -1 after them up to KMAX: the
    keys above the k-th largest ``kth``, then the ties at it, lower index first."""
    need = k - tl.sum(((key > kth) & valid).to(tl.int32), axis=0)
    _picks_of_piece(out, n, valid, key, kth, k, need, 0, KMAX)


@triton.jit
def _picks_of_piece(out, n, valid, key, kth, k, need, before, KMAX):
    """``ascending_picks`` for one piece of a row, the earlier pieces' counts in ``before``
    (keys above kth in the low 16 bits, ties at kth in the high); returns them with this
    piece's added."""
    above = (key > kth) & valid
    tie = (key == kth) & valid
    # one scan for both counts up to n: keys above kth (low 16 bits), ties at kth (high)
    packed = above.to(tl.int32) | (tie.to(tl.int32) << 16)
    upto = tl.cumsum(packed, axis=0) + before
    ties_upto = upto >> 16
    take = above | (tie & (ties_upto <= need))
    pos = (upto & 0xFFFF) + tl.minimum(ties_upto, need) - 1
    tl.store(out + pos, n, mask=take)
    tl.store(out + n, tl.full(n.shape, -1, tl.int32), mask=(n >= k) & (n < KMAX))
    return before + tl.sum(packed, axis=0)


@triton.jit
def _bsa_fwd_kernel(Q, KD, VD, Out, IDX, CNT, KS, VS, START, STOP, SM, SL, SACC,
                    stride_qb, stride_qh, stride_qs, stride_ob, stride_oh, stride_os,
                    stride_ib, stride_ih, stride_im, stride_cb, stride_ch,
                    H, Mk, TQ, HHQ, WQ, NHQ, NWQ, TK, HHK, WK, NHK, NWK, qk_scale,
                    CTQ: tl.constexpr, CHQ: tl.constexpr, CWQ: tl.constexpr, CQ: tl.constexpr,
                    CTK: tl.constexpr, CHK: tl.constexpr, CWK: tl.constexpr, CK: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KV_SPLIT: tl.constexpr,
                    HEAD_DIM: tl.constexpr, EVEN_Q: tl.constexpr, EVEN_K: tl.constexpr,
                    TMA: tl.constexpr, FP8: tl.constexpr, LOAD_STATE: tl.constexpr,
                    STORE_STATE: tl.constexpr):
    """KD, VD: TMA descriptors of the chunk-major copies, or (TMA false) the copies.

    FP8 (``fp8_attention``'s rules, ``key_scale="head"``): q is quantized here to int8 per
    token, KD holds int8 k with one scale for the head in KS, VD e4m3 v transposed per chunk
    (``[D, slots]``) with its per-channel scales in VS; p goes to e4m3 as ``p * 448``. Why
    the scales are folded: a score is ``int32 dot * (q row scale * k scale)``, its max taken
    before that positive scale, and ``* 448`` is ``+ log2(448)`` inside the exp2. A scale per
    key instead cost a multiply per score and its loads: 475 instructions a tile against 412
    on sm90, 13.97 against 13.10 ms at 720p on an H100
    (benchmarks/results/bsa_ab_key_scale_h100_session31.json). l and acc both carry the
    448, which cancels in ``acc / l``.

    One of several kv passes (``attend``'s ``FWD_CONFIG["kv_passes"]``): LOAD_STATE starts
    from the softmax state (row max, row sum, unnormalised acc; float32 in SM, SL, SACC) at
    list position START, STORE_STATE stops at STOP and stores the state instead of the
    output. The tiles are the same, in the same order, so the output is bit for bit one
    pass's."""
    m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    d = tl.arange(0, HEAD_DIM)

    q_rows, q_ok = _chunk_rows(m, tl.arange(0, BLOCK_M), NHQ, NWQ, TQ, HHQ, WQ,
                               CTQ, CHQ, CWQ, CQ)
    q_rows = q_rows.to(tl.int64)  # S * stride passes 2**31 from ~175k tokens of a qkv view
    q_ptrs = Q + b * stride_qb + h * stride_qh + q_rows[:, None] * stride_qs + d[None, :]
    if EVEN_Q:
        q = tl.load(q_ptrs)
    else:
        q = tl.load(q_ptrs, mask=q_ok[:, None], other=0.0)
    if FP8:
        q, sq = int8_rows(q.to(tl.float32))
        sq = sq * tl.load(KS + bh)  # times k's scale: one per head
        # score (log2 units) = qk[i, :] * row_mul[i]; kept normal, so that a masked -inf
        # column times it stays -inf for a row of subnormal q
        row_mul = tl.maximum(sq * qk_scale, 1.1754944e-38)
        p_shift = LOG2_P_SCALE
    else:
        row_mul = tl.full([BLOCK_M], qk_scale, tl.float32)
        p_shift = 0.0

    idx = IDX + b * stride_ib + h * stride_ih + m * stride_im
    count = tl.load(CNT + b * stride_cb + h * stride_ch + m)
    first_row = bh * Mk * (BLOCK_N * KV_SPLIT)  # of this head in the chunk-major copies

    # this program's rows of the state between passes
    state = (bh.to(tl.int64) * tl.num_programs(0) + m) * BLOCK_M + tl.arange(0, BLOCK_M)
    if LOAD_STATE:
        j_start = tl.load(START + b * stride_cb + h * stride_ch + m) * KV_SPLIT
        m_i = tl.load(SM + state)
        l_i = tl.load(SL + state)
        acc = tl.load(SACC + state[:, None] * HEAD_DIM + d[None, :])
    else:
        j_start = 0
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if STORE_STATE:
        j_stop = tl.load(STOP + b * stride_cb + h * stride_ch + m) * KV_SPLIT
    else:
        j_stop = count * KV_SPLIT
    for j in range(j_start, j_stop):
        # part j % KV_SPLIT (BLOCK_N slots) of selected chunk j // KV_SPLIT
        c = tl.load(idx + j // KV_SPLIT)
        part = j % KV_SPLIT
        row = first_row + c * (BLOCK_N * KV_SPLIT) + part * BLOCK_N
        if TMA:
            k = KD.load([row, 0])
        else:
            tile = (row + tl.arange(0, BLOCK_N)).to(tl.int64)[:, None] * HEAD_DIM + d[None, :]
            k = tl.load(KD + tile)
        if FP8:
            qk = tl.dot(q, tl.trans(k)).to(tl.float32)
        else:
            qk = tl.dot(q, tl.trans(k))
        if EVEN_K:
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * row_mul)
            m_use = m_ij
        else:
            r = part * BLOCK_N + tl.arange(0, BLOCK_N)
            ct = c // (NHK * NWK)
            ch = (c // NWK) % NHK
            cw = c % NWK
            col_ok = ((r < CK) & (ct * CTK + r // (CHK * CWK) < TK)
                      & (ch * CHK + (r // CWK) % CHK < HHK) & (cw * CWK + r % CWK < WK))
            qk = tl.where(col_ok[None, :], qk, float("-inf"))
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * row_mul)
            m_use = tl.where(m_ij == float("-inf"), 0.0, m_ij)  # no real key seen yet
        p = tl.math.exp2(qk * row_mul[:, None] - (m_use - p_shift)[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if FP8:  # v^T tile: the chunk's [D, slots] block, columns of this part
            if TMA:
                vt = VD.load([(row // (BLOCK_N * KV_SPLIT)) * HEAD_DIM, part * BLOCK_N])
            else:
                vt = tl.load(VD + (row // (BLOCK_N * KV_SPLIT) * HEAD_DIM + d[:, None]).to(
                    tl.int64) * (BLOCK_N * KV_SPLIT) + part * BLOCK_N
                    + tl.arange(0, BLOCK_N)[None, :])
            acc = tl.dot(p.to(vt.dtype, fp_downcast_rounding="rtne"), tl.trans(vt), acc,
                         max_num_imprecise_acc=BLOCK_N)
        else:
            if TMA:
                v = VD.load([row, 0])
            else:
                v = tl.load(VD + tile)
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_ij

    if STORE_STATE:
        tl.store(SM + state, m_i)
        tl.store(SL + state, l_i)
        tl.store(SACC + state[:, None] * HEAD_DIM + d[None, :], acc)
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # no chunk selected -> zeros
        if FP8:
            out = out * tl.load(VS + bh * HEAD_DIM + d)[None, :]
        o_ptrs = Out + b * stride_ob + h * stride_oh + q_rows[:, None] * stride_os + d[None, :]
        if EVEN_Q:
            tl.store(o_ptrs, out.to(Out.dtype.element_ty))
        else:
            tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=q_ok[:, None])


# ----------------------------------------------------------------------------- wrappers


POOL_CONFIG = {"elems": 4096, "num_warps": 2}


def _rows_per_step(pad: int, D: int) -> int:
    """Rows a chunk pass loads at once: about ``POOL_CONFIG["elems"]`` elements."""
    return min(pad, max(1, POOL_CONFIG["elems"] // D))


def chunk_pad(layout: ChunkLayout) -> int:
    """Slots per chunk in the chunk-major copies: a power of two, at least 16 (a dot tile)."""
    return _next_pow2(layout.chunk_size)


def chunk_pass(x: torch.Tensor, layout: ChunkLayout, *, pool: bool = True,
               copy_dtype: torch.dtype | None = None, scale: torch.Tensor | None = None
               ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One read of raster ``x`` ``[B, H, S, D]`` (unit stride along D): ``(means, copy)``.

    means: ``[B, H, M, D]`` chunk means in x's dtype, same bits as ``reference.pool``.
    copy (with ``copy_dtype``): ``[B * H * M * chunk_pad, D]``, chunk after chunk, missing
    edge tokens zero, times ``scale[b, h]`` when given.
    """
    B, H, _, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    M = layout.num_chunks
    means = torch.empty(B, H, M, D, device=x.device, dtype=x.dtype) if pool else None
    copy = _empty_copy(x, layout, copy_dtype) if copy_dtype is not None else None
    m_arg = means if means is not None else x
    ms = means.stride()[:3] if means is not None else (0, 0, 0)
    shape, constexprs = _pass_args(x, layout)
    _chunk_pass_kernel[(M, B * H)](
        x, m_arg, copy if copy is not None else x, scale if scale is not None else x,
        *shape[:3], *ms, *shape[3:], *constexprs, pool, copy is not None, scale is not None,
        num_warps=POOL_CONFIG["num_warps"])
    return means, copy


def _empty_copy(x: torch.Tensor, layout: ChunkLayout, dtype: torch.dtype) -> torch.Tensor:
    """``[B * H * M * chunk_pad, D]`` for ``chunk_pass``'s copy of x."""
    B, H, _, D = x.shape
    return torch.empty(B * H * layout.num_chunks * chunk_pad(layout), D, device=x.device,
                       dtype=dtype)


def _pass_args(x: torch.Tensor, layout: ChunkLayout) -> tuple[tuple, tuple]:
    """A chunk pass's arguments over x: x's strides, H, M and the layout's sizes; then the
    constexprs (chunk shape and size, its padded size, rows a step, D)."""
    D = x.shape[-1]
    (T, HH, W), (ct, ch, cw), (_, nh, nw) = layout.latent, layout.chunk, layout.grid
    pad = chunk_pad(layout)
    return ((*x.stride()[:3], x.shape[1], layout.num_chunks, T, HH, W, nh, nw),
            (ct, ch, cw, layout.chunk_size, pad, _rows_per_step(pad, D), D))


class Grid(NamedTuple):
    """Pooled means on the score grid (``reference.fixed_point``): the integers as three int8
    slices ``[B*H, 3, M, D]`` (low 7 bits first, each with the sign), exponents ``[B*H*M]``."""

    slices: torch.Tensor
    exps: torch.Tensor


def grid(means: torch.Tensor, rows_per_program: int = 16) -> Grid:
    """``[B, H, M, D]`` bf16/fp16 means (contiguous) on the score grid."""
    B, H, M, D = means.shape
    g = Grid(torch.empty(B * H, 3, M, D, device=means.device, dtype=torch.int8),
             torch.empty(B * H * M, device=means.device, dtype=torch.int32))
    rows = B * H * M
    _grid_kernel[(triton.cdiv(rows, rows_per_program),)](
        means.contiguous(), g.slices, g.exps, rows, M, rows_per_program, D, num_warps=4)
    return g


def pool(x: torch.Tensor, layout: ChunkLayout) -> torch.Tensor:
    """``[B, H, M, D]`` chunk means in x's dtype; same bits as ``reference.pool``."""
    return chunk_pass(x, layout)[0]  # type: ignore[return-value]


# The score kernel: query chunks a program, kv chunks a step, warps, pipeline stages of its
# loop over kv chunks. H100, 720p: 0.248 ms; 2 stages 0.264, 128 x 64 at 8 warps 0.274
# (benchmarks/results/bsa_selection_h100_session25.json).
SCORE_CONFIG = {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 3}


def scores(qbar: torch.Tensor, kbar: torch.Tensor) -> torch.Tensor:
    """``[B, H, Mq, Mk]`` scores of the pooled means ``[B, H, M, D]`` (bf16/fp16) in their
    dtype: ``reference.scores`` bit for bit (int8 tensor cores, exact)."""
    if qbar.shape[-1] < 32:  # int8 tensor-core dots take K >= 32; zero channels add nothing
        qbar, kbar = (torch.nn.functional.pad(x, (0, 32 - x.shape[-1])) for x in (qbar, kbar))
    B, H, Mq, D = qbar.shape
    Mk = kbar.shape[2]
    qg, kg = grid(qbar), grid(kbar)
    out = torch.empty(B, H, Mq, Mk, device=qbar.device, dtype=qbar.dtype)
    bm, bn = SCORE_CONFIG["block_m"], SCORE_CONFIG["block_n"]
    _score_kernel[(triton.cdiv(Mq, bm), B * H)](
        qg.slices, qg.exps, kg.slices, kg.exps, out, Mq, Mk, bm, bn, D,
        _SCORE_TYPES[qbar.dtype][0], SCORE_CONFIG["num_stages"],
        num_warps=SCORE_CONFIG["num_warps"])
    return out


MAX_SELECT_CHUNKS = 16384
# warps: one program holds a whole score row. 0: warps by row length, 4 up to 2048 keys and
# 8 above (H100: 0.69 ms at 4 against 0.80 at 8 for 1,320 keys; 3.21 against 2.70 ms for
# 2,640: benchmarks/results/bsa_selection_warps_h100.json).
# copy_v: the forward's copies (v's; fp8: k's and v's) made by the select's launch
# (``_select_and_copy_kernel``), else by their own.
SELECT_CONFIG = {"warps": 0, "copy_v": 1}
# per input dtype: its Triton type, and the trailing bits that are zero in the float32 bits
# of every value rounded to it (the radix select skips them)
_SCORE_TYPES = {torch.bfloat16: (tl.bfloat16, 16), torch.float16: (tl.float16, 13)}


def select_pieces(mk: int) -> tuple[int, int]:
    """``(PIECE, PIECES)`` of ``_select_kernel`` for rows of ``mk`` keys: three quarters of
    the next power of two where they cover the row (from 512 lanes), else all of it in one."""
    pad = triton.next_power_of_2(mk)
    if pad >= 512 and mk <= 3 * pad // 4:
        return pad // 4, triton.cdiv(mk, pad // 4)
    return pad, 1


def select(score: torch.Tensor, counts: torch.Tensor, kmax: int,
           dtype: torch.dtype) -> torch.Tensor:
    """``[B, H, Mq, kmax]`` int32 ascending indices of the top ``counts`` scores, -1 padded.

    ``score``: :func:`scores` (in ``dtype``), float64 ``reference.exact_scores`` (rounded to
    ``dtype`` in the kernel), or float32 ``reference.round_scores`` of them; same result.
    ``dtype``: bf16 or fp16.
    """
    idx, args, constexprs, warps = _select_args(score, counts, kmax, dtype)
    _select_kernel[(math.prod(score.shape[:3]),)](*args, *constexprs, num_warps=warps)
    return idx


def _select_args(score: torch.Tensor, counts: torch.Tensor, kmax: int, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, tuple, tuple, int]:
    """The indices ``select`` returns (to be written), the select's arguments and constexprs
    and its warps."""
    B, H, Mq, Mk = score.shape
    score = score.contiguous()  # rows at a fixed stride
    idx = torch.empty(B, H, Mq, max(kmax, 1), device=score.device, dtype=torch.int32)
    tl_dtype, low_bit = _SCORE_TYPES[dtype]
    warps = SELECT_CONFIG["warps"] or min(8, max(4, triton.next_power_of_2(Mk) // 512))
    return (idx[..., :kmax], (score, counts.contiguous(), idx, Mk, kmax, score.stride(2),
                              idx.stride(2)), (*select_pieces(Mk), low_bit, tl_dtype), warps)


class ChunkCopy(NamedTuple):
    """V's chunk-major copy for the forward, and the per-head scale ``[B, H]`` applied to it
    (None: a plain copy)."""

    chunks: torch.Tensor
    scale: torch.Tensor | None


class QuantCopies(NamedTuple):
    """The fp8 forward's chunk-major copies (``quantized_copies``)."""

    k_chunks: torch.Tensor
    k_scale: torch.Tensor
    v_chunks: torch.Tensor
    v_scale: torch.Tensor


def _select_and_copy(score: torch.Tensor, counts: torch.Tensor, kmax: int, dtype: torch.dtype,
                     k: torch.Tensor, v: torch.Tensor, layout: ChunkLayout, pv_fp16: bool,
                     fp8: bool) -> tuple[torch.Tensor, ChunkCopy | None, QuantCopies | None]:
    """:func:`select`, and in the same launch (``_select_and_copy_kernel``) the forward's
    copies: v's (``_v_copy``), or with ``fp8`` k's and v's (``quantized_copies``)."""
    idx, args, constexprs, warps = _select_args(score, counts, kmax, dtype)
    rows = math.prod(score.shape[:3])
    chunks = v.shape[0] * v.shape[1] * layout.num_chunks
    k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (k, v))
    shape_v, pass_constexprs = _pass_args(v, layout)
    if fp8:
        quant, mean = _quant_plan(k, v, layout)
        copy = None
        shape_k = _pass_args(k, layout)[0]
        data = (k, quant.k_chunks, quant.k_scale, v, quant.v_chunks, quant.v_scale, mean,
                *shape_k[:3], *shape_v)
    else:
        copy_dtype, scale = _v_copy_kind(v, pv_fp16)
        copy, quant = ChunkCopy(_empty_copy(v, layout, copy_dtype), scale), None
        data = (v, copy.chunks, scale if scale is not None else v, v, v, v, v, *shape_v[:3],
                *shape_v)
    _select_and_copy_kernel[(rows + (2 if fp8 else 1) * chunks,)](
        *args, rows, *data, *constexprs, *pass_constexprs, fp8,
        copy is not None and copy.scale is not None, num_warps=warps)
    return idx, copy, quant


def select_chunks(q: torch.Tensor, k: torch.Tensor, layout_q: ChunkLayout,
                  layout_k: ChunkLayout, sparsity: float | None,
                  cdf_threshold: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton pool + score + select; returns ``(indices, counts)`` like the reference."""
    prepared = prepare(q, k, None, layout_q, layout_k, sparsity, cdf_threshold)
    return prepared.indices, prepared.counts


class Prepared(NamedTuple):
    """What ``attend`` takes besides q, k, v: the selection and the forward's copies of k and
    v (``k_chunks`` and ``v_copy``, or with fp8 ``quantized``)."""

    indices: torch.Tensor
    counts: torch.Tensor
    k_chunks: torch.Tensor | None
    v_copy: ChunkCopy | None
    quantized: QuantCopies | None


def prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, layout_q: ChunkLayout,
            layout_k: ChunkLayout, sparsity: float | None, cdf_threshold: float | None,
            pv_fp16: bool | None = None, fp8: bool = False) -> Prepared:
    """``select_chunks``, and with ``v`` the forward's copies of k and v for ``attend``. k's
    (bf16/fp16) comes from the pass over k that pools it; v's, or with ``fp8`` both quantized
    ones, from the select's launch where ``SELECT_CONFIG["copy_v"]``, else their own."""
    kbar, kc = chunk_pass(k, layout_k,
                          copy_dtype=k.dtype if v is not None and not fp8 else None)
    score = scores(pool(q, layout_q), kbar)  # type: ignore[arg-type]
    mk = layout_k.num_chunks
    if cdf_threshold is None:
        kmax = kept_per_query(sparsity, mk)
        counts = torch.full(score.shape[:-1], kmax, dtype=torch.int32, device=q.device)
    else:
        counts = selection_counts(score.float(), sparsity, cdf_threshold, q.shape[-1])
        kmax = int(counts.max())
    pv = _pv_fp16(pv_fp16)
    if v is not None and SELECT_CONFIG["copy_v"]:
        indices, v_copy, quant = _select_and_copy(score, counts, kmax, q.dtype, k, v, layout_k,
                                                  pv, fp8)
        return Prepared(indices, counts, kc, v_copy, quant)
    indices = select(score, counts, kmax, q.dtype)
    if v is None:
        return Prepared(indices, counts, kc, None, None)
    if fp8:
        return Prepared(indices, counts, None, None, quantized_copies(k, v, layout_k))
    return Prepared(indices, counts, kc, _v_copy(v, layout_k, pv), None)


# kv_split (steps per kv chunk), num_warps, num_stages; 0 = by chunk size, tuned on H100
# (see benchmarks/NOTES_bsa_kernel.md). pv_fp16: for bf16 inputs, P @ V in float16.
# tma: K/V tiles by TMA (else plain loads; always so where Triton has no TensorDescriptor).
# kv_passes: launches per call, each over one slice of the kv chunks, the softmax state
# carried between them in float32 (4 * D + 8 bytes per query row); 0 = ``kv_passes_for``
# (one per kv_pass_mb MB of a head's K and V at 2 + 2 bytes a value, rounded), timed against
# one pass on a shape's first call where that is more than one (``_timed_passes``).
# maxnreg / fp8_maxnreg: registers a thread in the bf16 / fp8 forward; 0 = ``_REGISTER_CAP``
# where it was measured, 255 = the compiler's choice.
FWD_CONFIG: dict[str, int] = {"kv_split": 0, "num_warps": 0, "num_stages": 0, "pv_fp16": 1,
                              "tma": 1, "kv_passes": 0, "kv_pass_mb": 30, "maxnreg": 0,
                              "fp8_maxnreg": 0}


def kv_passes_for(layout_k: ChunkLayout, head_dim: int) -> int:
    """The forward's launches (``FWD_CONFIG["kv_passes"]``, else by the size of a head's K and
    V). Measured on an H100 at 0.9375 with random q, k, v: one at 720p (43 MB, two passes 1%
    slower), three at 48 frames (87 MB: 25% faster than one, bf16; fp8 gains too though its
    bytes are half; see benchmarks/NOTES_bsa_kernel.md, round 9). Where this is more than one
    and not set, ``attend`` times it against one pass (``_timed_passes``)."""
    if FWD_CONFIG["kv_passes"]:
        return FWD_CONFIG["kv_passes"]
    head_bytes = layout_k.num_chunks * chunk_pad(layout_k) * head_dim * 4
    return max(1, round(head_bytes / (FWD_CONFIG["kv_pass_mb"] * 1e6)))


# kv passes chosen by timing, per device, shape, picks per query chunk and kind of forward
_TIMED: dict[tuple, int] = {}


def _cuda_ms(fn: Callable[[], None]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _timed_passes(key: tuple, candidates: tuple[int, ...], launch: Callable[[int], None],
                  timer: Callable[[Callable[[], None]], float] = _cuda_ms) -> int:
    """Run ``launch`` with the pass count that measured fastest for ``key``; on the key's first
    call, time every candidate (once to compile, once timed) and keep the fastest. Why: the
    passes pay where a query chunk's picks spread over the whole head, as random q and k's do
    (89 -> 72 ms at 48 frames), and cost where the picks share chunks, as in the DiT (66 ->
    69 ms; benchmarks/results/bsa_picks_h100_session26.json). Every candidate writes the same
    bits, so the output of the first call is already the one to return."""
    if key not in _TIMED:
        times = {}
        for n in candidates:
            launch(n)  # compiles
            times[n] = timer(lambda n=n: launch(n))
        _TIMED[key] = min(times, key=times.__getitem__)
    else:
        launch(_TIMED[key])
    return _TIMED[key]


# With 4 warps and D = 128 the compiler gives a thread 245-255 registers, so two programs
# share an SM and wait on each other's loads. Capped, three fit (fp8: 168 registers) or, with
# one pipeline stage (33 KB of shared memory instead of 82), four (bf16: 128); neither spills
# in the loop (benchmarks/results/sass_sm90.json). On an H100 at 0.9375 that took 20% off the
# fp8 forward at 720p and 16% at 48 frames, and 2-5% / 8-9% off bf16 (P V in float16;
# benchmarks/results/bsa_ab_caps_h100.json, NOTES_bsa_kernel.md round 12). Measured only at
# that shape and with these stages. By fp8: (maxnreg, stages).
_REGISTER_CAP = {True: (168, 2), False: (128, 1)}


def _fwd_config(cq_pad: int, ck_pad: int, head_dim: int, fp8: bool
                ) -> tuple[int, int, int, int | None]:
    """kv_split, num_warps, num_stages, maxnreg (None: the compiler's choice)."""
    kv = FWD_CONFIG["kv_split"] or max(1, ck_pad // 64)  # 64-key steps measured best
    kv = max(1, min(kv, ck_pad // 16))
    warps = FWD_CONFIG["num_warps"] or (4 if cq_pad <= 64 else 8)
    cap, cap_stages = _REGISTER_CAP[fp8] if warps == 4 and head_dim == 128 else (255, 2)
    stages = FWD_CONFIG["num_stages"] or cap_stages
    if stages != cap_stages:  # a cap holds for the stages it was measured with
        cap = 255
    maxnreg = FWD_CONFIG["fp8_maxnreg" if fp8 else "maxnreg"] or cap
    return kv, warps, stages, (None if maxnreg >= 255 else maxnreg)


def _pv_fp16(pv_fp16: bool | None) -> bool:
    """``attend``'s ``pv_fp16``, None meaning ``FWD_CONFIG["pv_fp16"]``."""
    return bool(FWD_CONFIG["pv_fp16"]) if pv_fp16 is None else pv_fp16


def _v_copy_kind(v: torch.Tensor, pv_fp16: bool) -> tuple[torch.dtype, torch.Tensor | None]:
    """The dtype of V's chunk-major copy and the per-head scale ``[B, H]`` applied to it.

    With ``pv_fp16`` and bf16 ``v``: float16 ``v * scale``, scale a power of two. Why: P @ V
    with P in bf16 adds ~1.7e-3 relative error on top of the ~1.6e-3 of rounding the output
    to bf16; P in float16 (8x finer) makes the first negligible. The per-head power of two
    brings max|v| to about 2**14, inside float16's range, exactly.
    """
    if not (pv_fp16 and v.dtype == torch.bfloat16):
        return v.dtype, None
    vmax = torch.linalg.vector_norm(v, ord=float("inf"), dim=(-2, -1), dtype=torch.float32)
    e = torch.ceil(torch.log2(vmax))
    scale = torch.where(torch.isfinite(e), torch.exp2((14.0 - e).clamp(-126, 126)), 1.0)
    return torch.float16, scale.contiguous()


def _v_copy(v: torch.Tensor, layout: ChunkLayout, pv_fp16: bool) -> ChunkCopy:
    """Chunk-major V for the forward (``_v_copy_kind``), by its own pass over v."""
    dtype, scale = _v_copy_kind(v, pv_fp16)
    return ChunkCopy(chunk_pass(v, layout, pool=False, copy_dtype=dtype, scale=scale)[1],
                     scale)  # type: ignore[arg-type]


def quantized_copies(k: torch.Tensor, v: torch.Tensor, layout: ChunkLayout) -> QuantCopies:
    """The fp8 forward's chunk-major copies (``fp8_attention``'s rules): int8 k less its
    mean ``[B*H*M*pad, D]`` with a scale per head ``[B*H]``, and e4m3 v transposed per
    chunk ``[B*H*M*D, pad]`` with per-channel scales ``[B*H, D]``."""
    quant, mean = _quant_plan(k, v, layout)
    for x, xc, scale, e4m3_t in ((k, quant.k_chunks, quant.k_scale, False),
                                 (v, quant.v_chunks, quant.v_scale, True)):
        shape, constexprs = _pass_args(x, layout)
        _chunk_quant_kernel[(layout.num_chunks, x.shape[0] * x.shape[1])](
            x, xc, scale, mean, *shape, *constexprs, e4m3_t,
            num_warps=POOL_CONFIG["num_warps"])
    return quant


def _quant_plan(k: torch.Tensor, v: torch.Tensor, layout: ChunkLayout
                ) -> tuple[QuantCopies, torch.Tensor]:
    """``quantized_copies``' scales and its copies still to be written, and k's mean
    ``[B*H, D]``."""
    B, H, _, D = k.shape
    M, pad = layout.num_chunks, chunk_pad(layout)
    stats = column_stats(k, smooth=True)
    mean = stats.mean.reshape(B * H, D)
    ks = int8_scale(stats.amax).reshape(B * H).contiguous()
    kc = torch.empty(B * H * M * pad, D, device=k.device, dtype=torch.int8)
    vs = value_scales(v).reshape(B * H, D).contiguous()
    vt = torch.empty(B * H * M * D, pad, device=v.device, dtype=E4M3)
    return QuantCopies(kc, ks, vt, vs), mean


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout_q: ChunkLayout,
           layout_k: ChunkLayout, indices: torch.Tensor, counts: torch.Tensor,
           pv_fp16: bool | None = None, out: torch.Tensor | None = None,
           k_chunks: torch.Tensor | None = None, v_copy: ChunkCopy | None = None,
           fp8: bool = False, quantized: QuantCopies | None = None) -> torch.Tensor:
    """Sparse flash attention forward over the selected chunks; ``[B, H, Sq, D]``.

    ``indices``: per query chunk, ascending and -1 padded past ``counts``, as ``select``
    returns them (kv passes take runs of positions; one pass accepts any order).
    q, k, v: any strides with unit stride along D. ``out``: any ``[B, H, Sq, D]`` view with
    unit stride along D (e.g. of a token-major ``[B, Sq, H, D]`` tensor). ``k_chunks``,
    ``v_copy`` (``quantized`` with fp8): the chunk-major copies that ``prepare`` made (v's
    with ``pv_fp16`` as given there), else made here. ``fp8``: int8 Q K^T and e4m3 P V
    (``kernels.fp8_attention``; ``pv_fp16``, ``k_chunks`` and ``v_copy`` unused).
    """
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    B, H, _, D = q.shape
    pv_fp16 = _pv_fp16(pv_fp16)
    ks = vs = vscale = None
    if fp8:
        kc, ks, vc, vs = quantized if quantized is not None else quantized_copies(k, v, layout_k)
    else:
        kc = k_chunks if k_chunks is not None else chunk_pass(k, layout_k, pool=False,
                                                              copy_dtype=k.dtype)[1]
        vc, vscale = v_copy if v_copy is not None else _v_copy(v, layout_k, pv_fp16)
    o = torch.empty(q.shape, device=q.device, dtype=q.dtype) if out is None else out
    counts = counts.contiguous()
    if indices.shape[-1] == 0:
        indices = torch.zeros(*indices.shape[:-1], 1, device=q.device, dtype=torch.int32)
    (tq, hq, wq), (ctq, chq, cwq), (_, nhq, nwq) = layout_q.latent, layout_q.chunk, layout_q.grid
    (tk, hk, wk), (ctk, chk, cwk), (_, nhk, nwk) = layout_k.latent, layout_k.chunk, layout_k.grid
    cq, ck = layout_q.chunk_size, layout_k.chunk_size
    block_m, ck_pad = _next_pow2(cq), chunk_pad(layout_k)
    kv, warps, stages, maxnreg = _fwd_config(block_m, ck_pad, D, fp8)
    even_q = layout_q.divisible and block_m == cq
    even_k = layout_k.divisible and ck_pad == ck
    block_n = ck_pad // kv
    tma = bool(FWD_CONFIG["tma"]) and TensorDescriptor is not None
    v_block = [D, block_n] if fp8 else [block_n, D]
    kd, vd = ((TensorDescriptor.from_tensor(kc, [block_n, D]),  # type: ignore[union-attr]
               TensorDescriptor.from_tensor(vc, v_block)) if tma else (kc, vc))

    def launch(n: int) -> None:
        passes = kv_pass_bounds(indices, counts, layout_k.num_chunks, n)
        state = [counts] * 3
        if len(passes) > 1:
            rows = B * H * layout_q.num_chunks * block_m
            state = [torch.empty(rows, device=q.device, dtype=torch.float32) for _ in range(2)]
            state.append(torch.empty(rows, D, device=q.device, dtype=torch.float32))
        for i, (start, stop) in enumerate(passes):
            _bsa_fwd_kernel[(layout_q.num_chunks, B * H)](
                q, kd, vd, o, indices, counts, ks if fp8 else counts, vs if fp8 else counts,
                start, stop, *state,
                q.stride(0), q.stride(1), q.stride(2), o.stride(0), o.stride(1), o.stride(2),
                indices.stride(0), indices.stride(1), indices.stride(2), counts.stride(0),
                counts.stride(1), H, layout_k.num_chunks, tq, hq, wq, nhq, nwq, tk, hk, wk, nhk,
                nwk, D**-0.5 * math.log2(math.e),
                ctq, chq, cwq, cq, ctk, chk, cwk, ck, block_m, block_n, kv, D, even_q, even_k,
                tma, fp8, i > 0, i < len(passes) - 1, num_warps=warps, num_stages=stages,
                maxnreg=maxnreg)

    n = kv_passes_for(layout_k, D)
    if (n == 1 or FWD_CONFIG["kv_passes"] or q.device.type != "cuda"
            or torch.cuda.is_current_stream_capturing()):
        launch(n)
    else:
        key = (q.device.index, B * H, layout_q.latent, layout_q.chunk, layout_k.latent,
               layout_k.chunk, indices.shape[-1], D, fp8, pv_fp16)
        _timed_passes(key, (1, n), launch)
    if vscale is not None:
        # undo the power-of-two scale of V: exact. In the kernel's epilogue this per-head
        # load made the whole kernel 25-30% slower at 48x44x80 on H100 (codegen).
        o.div_(vscale.to(o.dtype)[:, :, None, None])
    return o


def kv_pass_bounds(indices: torch.Tensor, counts: torch.Tensor, mk: int, passes: int
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(start, stop)`` list positions ``[B, H, Mq]`` of each kv pass. Pass i takes the
    selected chunks in ``[mk * i / passes, mk * (i + 1) / passes)``: the lists are ascending,
    so that is a run of positions. Why passes: each keeps the tiles in flight within one
    slice of a head's K and V, which fits L2 where the whole head does not
    (benchmarks/NOTES_bsa_kernel.md, round 7)."""
    passes = max(1, min(passes, mk))
    if passes == 1:
        return [(counts, counts)]
    valid = torch.arange(indices.shape[-1], device=indices.device) < counts[..., None]
    cuts = [((indices < mk * i // passes) & valid).sum(-1, dtype=torch.int32).contiguous()
            for i in range(1, passes)]
    starts, stops = [counts, *cuts], [*cuts, counts]
    return list(zip(starts, stops, strict=True))


def fp8_covers(layout_k: ChunkLayout) -> bool:
    """Whether the fp8 forward compiles for these chunks: P V sums over a step of
    ``chunk_pad / kv_split`` keys, and 8-bit tensor-core products need at least 32."""
    ck_pad = chunk_pad(layout_k)
    return ck_pad // _fwd_config(ck_pad, ck_pad, 128, True)[0] >= 32


def supported(q: torch.Tensor, layout_k: ChunkLayout) -> bool:
    """Whether the Triton path covers these inputs (else use the reference)."""
    D = q.shape[-1]
    return (q.dtype in (torch.float16, torch.bfloat16) and D in (16, 32, 64, 128, 256)
            and layout_k.num_chunks <= MAX_SELECT_CHUNKS)
