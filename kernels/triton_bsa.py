"""Triton kernels for 3D block sparse attention (CUDA, bf16/fp16; tuned on an H100).

Launches, each readable top to bottom:

1. ``_pool_kernel``    mean of every chunk over its real tokens, read straight from the
                       THW raster layout (no permuted copy), summed in float64.
2. ``_score_kernel``   pooled q . pooled k, float32 FMAs in order d = 0..D-1, rounded to
                       the dtype.
3. ``_select_kernel``  per query chunk, the ``count`` best kv chunks by a radix select on
                       the score bits (16 passes for bf16), as an *ascending* index list.
4. ``_to_fp16_kernel`` bf16 V -> float16 V times a per-head power of two (see ``to_fp16``).
5. ``_bsa_fwd_kernel`` flash attention forward: one program per (query chunk, batch*head),
                       looping over its selected kv chunks, 64 keys a step.

Why it looks like this (measurements in benchmarks/NOTES_bsa_kernel.md):

* Gathering chunk tokens with computed row offsets costs nothing extra in the kernel and
  saves the three permute copies in and one out that the original makes.
* Ascending kv lists make the programs in flight walk K/V of one head in the same order;
  walking them in score order, as the original does, was 15% slower.
* The selection is bit-for-bit the reference's (exact float64 pooling sums, float32 score
  sums in the same order, same rounding, same tie rule: lower index first), so tests can
  demand equality.
* P @ V runs in float16 for bf16 inputs: bf16 P costs ~1.7e-3 of relative error on top of
  the ~1.7e-3 of rounding the output, float16 P almost nothing.

Ragged edge chunks (latent shape not divisible by the chunk) are masked in every kernel:
missing query rows are neither loaded nor stored, missing keys get a score of -inf.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import ChunkLayout, selection_counts


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


@triton.jit
def _round_fp32_to(x, dtype: tl.constexpr):
    """float32 -> ``dtype`` with round-to-nearest-even (spelled out for bf16, whose
    conversion the CPU interpreter truncates), returned in ``dtype``."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return x.to(dtype)


@triton.jit
def _pool_kernel(X, OUT, stride_xb, stride_xh, stride_xs, stride_ob, stride_oh, stride_om,
                 H, T, HH, W, NH, NW,
                 CT: tl.constexpr, CH: tl.constexpr, CW: tl.constexpr, C: tl.constexpr,
                 C_PAD: tl.constexpr, RB: tl.constexpr, D: tl.constexpr):
    m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    x = X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh
    d = tl.arange(0, D)
    acc = tl.zeros([D], dtype=tl.float64)
    count = tl.zeros([], dtype=tl.int32)
    for r0 in tl.static_range(0, C_PAD, RB):
        rows, valid = _chunk_rows(m, r0 + tl.arange(0, RB), NH, NW, T, HH, W, CT, CH, CW, C)
        tile = tl.load(x + rows[:, None] * stride_xs + d[None, :], mask=valid[:, None], other=0.0)
        acc += tl.sum(tile.to(tl.float64), axis=0)
        count += tl.sum(valid.to(tl.int32), axis=0)
    mean = acc / count.to(tl.float64)
    out = OUT + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + m * stride_om
    tl.store(out + d, _round_fp32_to(mean.to(tl.float32), OUT.dtype.element_ty))


@triton.jit
def _score_kernel(QB, KB, S, Mq, Mk, stride_qbh, stride_kbh, stride_sbh, stride_sm,
                  D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    q_ptrs = QB + bh * stride_qbh + offs_m * D
    k_ptrs = KB + bh * stride_kbh + offs_n * D
    # float32, in order d = 0..D-1: products of bf16/fp16 values are exact in float32, so
    # this is the reference's sum bit for bit. An "ieee" dot is a chain of FMAs over k in
    # order (tensor cores would reorder and truncate it).
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for d0 in tl.static_range(0, D, BD):
        dd = d0 + tl.arange(0, BD)
        a = tl.load(q_ptrs[:, None] + dd[None, :], mask=offs_m[:, None] < Mq, other=0.0)
        b = tl.load(k_ptrs[None, :] + dd[:, None], mask=offs_n[None, :] < Mk, other=0.0)
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    s = _round_fp32_to(acc, QB.dtype.element_ty).to(tl.float32)
    mask = (offs_m[:, None] < Mq) & (offs_n[None, :] < Mk)
    tl.store(S + bh * stride_sbh + offs_m[:, None] * stride_sm + offs_n[None, :], s, mask=mask)


@triton.jit
def _select_kernel(S, CNT, IDX, Mk, KMAX, stride_srow, stride_irow,
                   MK_PAD: tl.constexpr, LOW_BIT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    n = tl.arange(0, MK_PAD)
    valid = n < Mk
    s = tl.load(S + row * stride_srow + n, mask=valid, other=0.0)
    # float order -> unsigned order: flip all bits of negatives, the sign bit of the rest
    bits = s.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, ~bits, bits ^ -2147483648).to(tl.uint32, bitcast=True)
    # scores rounded to bf16/fp16 have their low LOW_BIT bits zero: drop them, fewer passes
    key = tl.where(valid, key >> LOW_BIT, 0)
    k = tl.load(CNT + row)
    # the k-th largest key, one bit at a time
    kth = tl.zeros([], dtype=tl.uint32)
    for bit in tl.static_range(31 - LOW_BIT, -1, -1):
        cand = kth | (1 << bit)
        hits = tl.sum(((key >= cand) & valid).to(tl.int32), axis=0)
        kth = tl.where(hits >= k, cand, kth)
    above = (key > kth) & valid
    need = k - tl.sum(above.to(tl.int32), axis=0)
    tie = (key == kth) & valid
    take = above | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= need))
    pos = tl.cumsum(take.to(tl.int32), axis=0) - 1
    out = IDX + row * stride_irow
    tl.store(out + pos, n, mask=take)
    tl.store(out + n, tl.full([MK_PAD], -1, tl.int32), mask=(n >= k) & (n < KMAX))


@triton.jit
def _kv_step(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, idx, j, intra,
             NHK, NWK, TK, HHK, WK, d, qk_scale,
             CTK: tl.constexpr, CHK: tl.constexpr, CWK: tl.constexpr, CK: tl.constexpr,
             BLOCK_N: tl.constexpr, KV_SPLIT: tl.constexpr, EVEN_K: tl.constexpr):
    """One step of online softmax over part ``j % KV_SPLIT`` of selected chunk ``j // KV_SPLIT``."""
    if KV_SPLIT == 1:
        c = tl.load(idx + j)
        r = tl.arange(0, BLOCK_N)
    else:
        c = tl.load(idx + j // KV_SPLIT)
        r = (j % KV_SPLIT) * BLOCK_N + tl.arange(0, BLOCK_N)
        intra = ((r // (CHK * CWK)) * HHK + (r // CWK) % CHK) * WK + r % CWK
    ct = c // (NHK * NWK)
    ch = (c // NWK) % NHK
    cw = c % NWK
    # raster row of token r of chunk c: the chunk's first row + the (hoisted) offset of r
    rows = ((ct * CTK) * HHK + ch * CHK) * WK + cw * CWK + intra
    if EVEN_K:
        k = tl.load(k_base + rows[:, None] * stride_ks + d[None, :])
        v = tl.load(v_base + rows[:, None] * stride_vs + d[None, :])
    else:
        col_ok = ((r < CK) & (ct * CTK + r // (CHK * CWK) < TK)
                  & (ch * CHK + (r // CWK) % CHK < HHK) & (cw * CWK + r % CWK < WK))
        k = tl.load(k_base + rows[:, None] * stride_ks + d[None, :], mask=col_ok[:, None],
                    other=0.0)
        v = tl.load(v_base + rows[:, None] * stride_vs + d[None, :], mask=col_ok[:, None],
                    other=0.0)
    qk = tl.dot(q, tl.trans(k))
    if not EVEN_K:
        qk = tl.where(col_ok[None, :], qk, float("-inf"))
    m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
    alpha = tl.math.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_ij


@triton.jit
def _bsa_fwd_kernel(Q, K, V, Out, IDX, CNT,
                    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                    stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
                    stride_ib, stride_ih, stride_im, stride_cb, stride_ch,
                    H, TQ, HHQ, WQ, NHQ, NWQ, TK, HHK, WK, NHK, NWK, qk_scale,
                    CTQ: tl.constexpr, CHQ: tl.constexpr, CWQ: tl.constexpr, CQ: tl.constexpr,
                    CTK: tl.constexpr, CHK: tl.constexpr, CWK: tl.constexpr, CK: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KV_SPLIT: tl.constexpr,
                    HEAD_DIM: tl.constexpr, EVEN_Q: tl.constexpr, EVEN_K: tl.constexpr):
    m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    d = tl.arange(0, HEAD_DIM)

    q_rows, q_ok = _chunk_rows(m, tl.arange(0, BLOCK_M), NHQ, NWQ, TQ, HHQ, WQ,
                               CTQ, CHQ, CWQ, CQ)
    q_ptrs = Q + b * stride_qb + h * stride_qh + q_rows[:, None] * stride_qs + d[None, :]
    if EVEN_Q:
        q = tl.load(q_ptrs)
    else:
        q = tl.load(q_ptrs, mask=q_ok[:, None], other=0.0)

    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    idx = IDX + b * stride_ib + h * stride_ih + m * stride_im
    count = tl.load(CNT + b * stride_cb + h * stride_ch + m)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    r = tl.arange(0, BLOCK_N)
    intra = ((r // (CHK * CWK)) * HHK + (r // CWK) % CHK) * WK + r % CWK
    for j in range(0, count * KV_SPLIT):
        acc, l_i, m_i = _kv_step(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, idx,
                                 j, intra, NHK, NWK, TK, HHK, WK, d, qk_scale, CTK, CHK, CWK,
                                 CK, BLOCK_N, KV_SPLIT, EVEN_K)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # no chunk selected -> zeros
    o_ptrs = Out + b * stride_ob + h * stride_oh + q_rows[:, None] * stride_os + d[None, :]
    if EVEN_Q:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty))
    else:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=q_ok[:, None])


# ----------------------------------------------------------------------------- wrappers


POOL_CONFIG = {"elems": 4096, "num_warps": 4}


def pool(x: torch.Tensor, layout: ChunkLayout) -> torch.Tensor:
    """``[B, H, M, D]`` chunk means in x's dtype; same bits as ``reference.pool``."""
    B, H, _, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(B, H, layout.num_chunks, D, device=x.device, dtype=x.dtype)
    (T, HH, W), (ct, ch, cw), (_, nh, nw) = layout.latent, layout.chunk, layout.grid
    c_pad = triton.next_power_of_2(layout.chunk_size)
    rb = min(c_pad, max(1, POOL_CONFIG["elems"] // D))
    _pool_kernel[(layout.num_chunks, B * H)](
        x, out, x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1),
        out.stride(2), H, T, HH, W, nh, nw, ct, ch, cw, layout.chunk_size, c_pad, rb, D,
        num_warps=POOL_CONFIG["num_warps"])
    return out


SCORE_CONFIG = {"bm": 64, "bn": 64, "bd": 16, "num_warps": 4}


def scores(qbar: torch.Tensor, kbar: torch.Tensor) -> torch.Tensor:
    """``[B, H, Mq, Mk]`` float32 scores; same bits as ``reference.scores``."""
    B, H, Mq, D = qbar.shape
    Mk = kbar.shape[2]
    qbar, kbar = qbar.contiguous(), kbar.contiguous()
    s = torch.empty(B, H, Mq, Mk, device=qbar.device, dtype=torch.float32)
    bm, bn, bd = SCORE_CONFIG["bm"], SCORE_CONFIG["bn"], min(D, SCORE_CONFIG["bd"])
    grid = (triton.cdiv(Mq, bm), triton.cdiv(Mk, bn), B * H)
    _score_kernel[grid](qbar, kbar, s, Mq, Mk, qbar.stride(1), kbar.stride(1), s.stride(1),
                        s.stride(2), D, bm, bn, bd, num_warps=SCORE_CONFIG["num_warps"])
    return s


MAX_SELECT_CHUNKS = 16384
SELECT_WARPS = 4  # 0: by row length  # one program holds a whole score row


def select(score: torch.Tensor, counts: torch.Tensor, kmax: int,
           low_bits: int = 0) -> torch.Tensor:
    """``[B, H, Mq, kmax]`` int32 ascending indices of the top ``counts`` scores, -1 padded.

    ``low_bits``: trailing bits known to be zero in every score (16 for bf16-rounded).
    """
    B, H, Mq, Mk = score.shape
    idx = torch.empty(B, H, Mq, max(kmax, 1), device=score.device, dtype=torch.int32)
    counts = counts.contiguous()
    mk_pad = triton.next_power_of_2(Mk)
    low_bit = low_bits
    _select_kernel[(B * H * Mq,)](score, counts, idx, Mk, kmax, score.stride(2),
                                  idx.stride(2), mk_pad, low_bit,
                                  num_warps=SELECT_WARPS or min(8, max(1, mk_pad // 2048)))
    return idx[..., :kmax]


def select_chunks(q: torch.Tensor, k: torch.Tensor, layout_q: ChunkLayout,
                  layout_k: ChunkLayout, sparsity: float | None,
                  cdf_threshold: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton pool + score + select; returns ``(indices, counts)`` like the reference."""
    score = scores(pool(q, layout_q), pool(k, layout_k))
    mk = layout_k.num_chunks
    if cdf_threshold is None:
        kmax = int((1 - sparsity) * mk)  # type: ignore[operator]
        counts = torch.full(score.shape[:-1], kmax, dtype=torch.int32, device=q.device)
    else:
        counts = selection_counts(score, sparsity, cdf_threshold, q.shape[-1])
        kmax = int(counts.max())
    low = {torch.bfloat16: 16, torch.float16: 13}.get(q.dtype, 0)
    return select(score, counts, kmax, low), counts


# kv_split (steps per kv chunk), num_warps, num_stages; 0 = by chunk size, tuned on H100
# (see benchmarks/NOTES_bsa_kernel.md). pv_fp16: for bf16 inputs, P @ V in float16.
FWD_CONFIG: dict[str, int] = {"kv_split": 0, "num_warps": 0, "num_stages": 0, "pv_fp16": 1}


def _fwd_config(cq_pad: int, ck_pad: int) -> tuple[int, int, int]:
    kv = FWD_CONFIG["kv_split"] or max(1, ck_pad // 64)  # 64-key steps measured best
    kv = max(1, min(kv, ck_pad // 16))
    warps = FWD_CONFIG["num_warps"] or (4 if cq_pad <= 64 else 8)
    stages = FWD_CONFIG["num_stages"] or 2
    return kv, warps, stages


@triton.jit
def _to_fp16_kernel(X, SCALE, OUT, S, H, stride_xb, stride_xh, stride_xs,
                    BS: tl.constexpr, D: tl.constexpr):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    s = tl.program_id(0) * BS + tl.arange(0, BS)
    d = tl.arange(0, D)
    ok = s[:, None] < S
    x = tl.load(X + b * stride_xb + h * stride_xh + s[:, None] * stride_xs + d[None, :],
                mask=ok, other=0.0)
    y = (x.to(tl.float32) * tl.load(SCALE + bh)).to(tl.float16)
    tl.store(OUT + bh.to(tl.int64) * S * D + s[:, None] * D + d[None, :], y, mask=ok)


def to_fp16(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 ``v`` -> (float16 ``v * scale``, scale ``[B, H]`` float32), scale a power of two.

    Why: P @ V with P in bf16 adds ~1.7e-3 relative error on top of the ~1.6e-3 of
    rounding the output to bf16; P in float16 (8x finer) makes the first negligible. The
    per-head power of two brings max|v| to about 2**14, inside float16's range, exactly.
    """
    B, H, S, D = v.shape
    vmax = torch.linalg.vector_norm(v, ord=float("inf"), dim=(-2, -1), dtype=torch.float32)
    e = torch.ceil(torch.log2(vmax))
    scale = torch.where(torch.isfinite(e), torch.exp2((14.0 - e).clamp(-126, 126)), 1.0)
    scale = scale.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    out = torch.empty(B, H, S, D, device=v.device, dtype=torch.float16)
    bs = max(1, 4096 // D)  # read straight from a strided view (e.g. the qkv projection)
    _to_fp16_kernel[(triton.cdiv(S, bs), B * H)](v, scale, out, S, H, v.stride(0), v.stride(1),
                                                 v.stride(2), bs, D, num_warps=4)
    return out, scale


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout_q: ChunkLayout,
           layout_k: ChunkLayout, indices: torch.Tensor, counts: torch.Tensor,
           pv_fp16: bool | None = None, out: torch.Tensor | None = None,
           v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Sparse flash attention forward over the selected chunks; ``[B, H, Sq, D]``.

    q, k, v: any strides with unit stride along D (no copies). ``out``: any ``[B, H, Sq, D]``
    view with unit stride along D (e.g. of a token-major ``[B, Sq, H, D]`` tensor).
    ``v_scale`` ``[B, H]``: ``v`` is already ``to_fp16``'s output with this scale.
    """
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    B, H, _, D = q.shape
    if pv_fp16 is None:
        pv_fp16 = bool(FWD_CONFIG["pv_fp16"])
    vscale = v_scale
    if vscale is None and pv_fp16 and v.dtype == torch.bfloat16:
        v, vscale = to_fp16(v)
    o = torch.empty(q.shape, device=q.device, dtype=q.dtype) if out is None else out
    counts = counts.contiguous()
    if indices.shape[-1] == 0:
        indices = torch.zeros(*indices.shape[:-1], 1, device=q.device, dtype=torch.int32)
    (tq, hq, wq), (ctq, chq, cwq), (_, nhq, nwq) = layout_q.latent, layout_q.chunk, layout_q.grid
    (tk, hk, wk), (ctk, chk, cwk), (_, nhk, nwk) = layout_k.latent, layout_k.chunk, layout_k.grid
    cq, ck = layout_q.chunk_size, layout_k.chunk_size
    block_m, ck_pad = _next_pow2(cq), _next_pow2(ck)
    kv, warps, stages = _fwd_config(block_m, ck_pad)
    even_q = layout_q.divisible and block_m == cq
    even_k = layout_k.divisible and ck_pad == ck
    _bsa_fwd_kernel[(layout_q.num_chunks, B * H)](
        q, k, v, o, indices, counts,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        indices.stride(0), indices.stride(1), indices.stride(2), counts.stride(0),
        counts.stride(1), H, tq, hq, wq, nhq, nwq, tk, hk, wk, nhk, nwk,
        D**-0.5 * 1.4426950408889634,
        ctq, chq, cwq, cq, ctk, chk, cwk, ck, block_m, ck_pad // kv, kv, D, even_q, even_k,
        num_warps=warps, num_stages=stages)
    if vscale is not None:
        # undo the power-of-two scale of V: exact. In the kernel's epilogue this per-head
        # load made the whole kernel 25-30% slower at 48x44x80 on H100 (codegen).
        o.div_(vscale.to(o.dtype)[:, :, None, None])
    return o


def supported(q: torch.Tensor, layout_k: ChunkLayout) -> bool:
    """Whether the Triton path covers these inputs (else use the reference)."""
    D = q.shape[-1]
    return (q.dtype in (torch.float16, torch.bfloat16) and D in (16, 32, 64, 128, 256)
            and layout_k.num_chunks <= MAX_SELECT_CHUNKS)
