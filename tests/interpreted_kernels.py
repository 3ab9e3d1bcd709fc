"""Our Triton kernels' logic on the CPU, run by Triton's interpreter.

``TRITON_INTERPRET=1 python tests/interpreted_kernels.py CHECK`` (the variable must be set before
Triton compiles anything, hence a process of its own; ``test_kernels_interpreted.py`` starts
it). Exit code 0: the check held. Only arithmetic the interpreter does as a GPU does is checked:
float32 and float64, and the bf16 rounding the kernels do by bits there. The interpreter's e4m3
and bf16 casts truncate, so the kernels' casts stay with the GPU tests.

- ``selection``: pooling, the int8 score kernel and the select kernel give the reference's
  chunks, bit for bit (top-k and CDF, bf16 and fp16, chunks that do and do not divide the
  latent; many tied scores; counts of zero); the pass over k also writes its chunk-major copy
  right; the scores equal the reference's on means spread over many binades
  (``wide_means``: the grid drops low bits), zero and subnormal chunks.
- ``forward``: the sparse forward on float32 inputs gives the reference's attention over the
  selected chunks, with ragged chunks, empty lists, a running max that jumps mid-list, and kv
  passes (bit for bit one pass's output).
- ``scales``: ``column_stats`` gives ``fp8_attention``'s statistics (``key_mean``,
  ``value_scales``, ``per_tensor_scales``).
- ``fused_fp8``: the fused ends of the fp8 self-attention (``fa3_fp8_attention.from_qkv``): q
  as e4m3 out of the norm, v's mean added on the way to the projection's e4m3 rows.
- ``fp8_key_scale``: the fp8 sparse forward takes k's scale per head, of the right head; with
  the interpreter's truncating e4m3, only loosely (the GPU tests hold it to the reference).
"""

from __future__ import annotations

import math
import os
import sys

import torch

from longcat_tools.kernels import column_stats as CS
from longcat_tools.kernels import fp8_attention as F
from longcat_tools.kernels import reference as R
from longcat_tools.kernels import triton_bsa as TB

# latent, chunk, sparsity, cdf threshold
SELECTIONS = [((4, 8, 8), (4, 4, 4), 0.75, None), ((5, 6, 7), (4, 4, 4), 0.5, None),
              ((4, 8, 8), (2, 4, 4), None, 0.3), ((3, 5, 6), (2, 2, 4), 0.8, 0.2)]


def wide_means(dtype: torch.dtype, M: int, D: int = 32, seed: int = 0,
               subnormal: bool = False) -> torch.Tensor:
    """``[1, 2, M, D]`` tokens that are their own chunk means (chunks of one token): values
    over +-14 binades inside each row (fp16: +-5, so that most scores stay finite), so many
    fall below the score grid; row 0 zero, row 1 tiny (bf16: 2**-110, with ``subnormal``
    2**-140; fp16: 2**-12), so its scores with itself underflow float32 (bf16), row 2 a
    cancelling 1, 2**-12, -1. (The interpreter's bf16 casts mishandle subnormals: GPU tests
    only.)"""
    g = torch.Generator().manual_seed(seed)
    spread = 14 if dtype == torch.bfloat16 else 5
    x = torch.randn(1, 2, M, D, generator=g) * 2.0 ** torch.randint(
        -spread, spread + 1, (1, 2, M, D), generator=g)
    x[:, :, 0] = 0.0
    tiny = (2.0**-140 if subnormal else 2.0**-110) if dtype == torch.bfloat16 else 2.0**-12
    x[:, :, 1] *= tiny
    x[:, :, 2, :3] = torch.tensor([1.0, 2.0**-12, -1.0])
    return x.to(dtype)


def grid_scores(dtype: torch.dtype, device: str = "cpu", subnormal: bool = False, D: int = 32
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(triton_bsa.scores, reference.scores)`` of ``wide_means`` q and k."""
    q, k = (wide_means(dtype, M, D, seed=M, subnormal=subnormal).to(device) for M in (40, 70))
    lq, lk = (R.ChunkLayout((1, 1, x.shape[2]), (1, 1, 1)) for x in (q, k))
    got = TB.scores(TB.pool(q, lq), TB.pool(k, lk))
    return got, R.scores(R.pool(q.cpu(), lq), R.pool(k.cpu(), lk)).to(dtype)


def selection() -> None:
    for dtype in (torch.bfloat16, torch.float16):
        for D in (16, 32):  # 16: zero channels pad the int8 dots to 32
            got, want = grid_scores(dtype, D=D)
            assert got.dtype == dtype and torch.equal(got, want), (dtype, D)
    for dtype in (torch.bfloat16, torch.float16):
        for i, (lat, chunk, sparsity, cdf) in enumerate(SELECTIONS):
            g = torch.Generator().manual_seed(i)
            q, k = (torch.randn(1, 2, lat[0] * lat[1] * lat[2], 32, generator=g).to(dtype)
                    for _ in range(2))
            layout = R.ChunkLayout(lat, chunk)
            v = torch.randn(q.shape, generator=g).to(dtype)
            prep = TB.prepare(q, k, v, layout, layout, sparsity, cdf, pv_fp16=False)
            want = R.select_chunks(q, k, layout, layout, sparsity, cdf)
            for a, b in zip(prep[:2], want, strict=True):
                assert torch.equal(a, b), (dtype, lat, chunk, sparsity, cdf)
            kc = prep.k_chunks
            # the forward's chunk-major K: each chunk's tokens, then zeros to the padded size
            index, valid = layout.token_index()
            pad = TB.chunk_pad(layout) - index.shape[1]
            chunked = torch.where(valid[..., None], k[:, :, index], 0.0)
            chunked = torch.nn.functional.pad(chunked, (0, 0, 0, pad))
            assert torch.equal(kc.view(chunked.shape), chunked), (dtype, lat, chunk)
            chunked = torch.nn.functional.pad(torch.where(valid[..., None], v[:, :, index], 0.0),
                                              (0, 0, 0, pad))
            assert torch.equal(prep.v_copy.chunks.view(chunked.shape), chunked)
        # v's copy made by the select's launch, as by its own pass; fewer or more query chunks
        # than kv chunks leave programs of one kind at the end of that launch
        g = torch.Generator().manual_seed(5)
        for lat_q, lat_k in (((4, 8, 8), (9, 8, 8)), ((9, 8, 8), (4, 8, 8))):
            lq, lk = R.ChunkLayout(lat_q, (4, 4, 4)), R.ChunkLayout(lat_k, (4, 4, 4))
            q = torch.randn(1, 2, math.prod(lat_q), 32, generator=g).to(dtype)
            k, v = (torch.randn(1, 2, math.prod(lat_k), 32, generator=g).to(dtype)
                    for _ in range(2))
            for pv_fp16 in (False, True):
                prep = TB.prepare(q, k, v, lq, lk, 0.5, None, pv_fp16=pv_fp16)
                assert torch.equal(prep.indices, R.select_chunks(q, k, lq, lk, 0.5, None)[0])
                alone = TB._v_copy(v, lk, pv_fp16)
                assert torch.equal(prep.v_copy.chunks, alone.chunks), (dtype, lat_q, pv_fp16)
                assert (prep.v_copy.scale is None) == (alone.scale is None)
            if dtype == torch.bfloat16:  # fp8: k's and v's quantized copies, the same way
                prep = TB.prepare(q, k, v, lq, lk, 0.5, None, fp8=True)
                alone = TB.quantized_copies(k, v, lk)
                assert prep.v_copy is None and prep.k_chunks is None
                assert all(torch.equal(a, b) for a, b in zip(prep.quantized, alone, strict=True))
        g = torch.Generator().manual_seed(7)
        for mk in (300, 450):  # a row in three pieces of 128 keys; one of 512 (select_pieces)
            score = (torch.randn(1, 2, 6, mk, generator=g, dtype=torch.float64) * 4).round() / 4
            counts = torch.randint(0, 200, (1, 2, 6), generator=g, dtype=torch.int32)
            counts[0, 0, 0] = 0
            want = R.select_from_scores(R.round_scores(score, dtype), counts)
            got = TB.select(score, counts, int(counts.max()), dtype)
            assert torch.equal(got, want), (dtype, mk)


def forward() -> None:
    TB.FWD_CONFIG["tma"] = 0  # plain loads: the TMA path is the GPU tests'
    for lat in ((4, 8, 8), (5, 6, 7)):
        layout = R.ChunkLayout(lat, (4, 4, 4))
        g = torch.Generator().manual_seed(lat[1])
        q, k, v = (torch.randn(1, 2, lat[0] * lat[1] * lat[2], 32, generator=g)
                   for _ in range(3))
        index, valid = layout.token_index()
        tokens = [i[ok] for i, ok in zip(index, valid, strict=True)]  # of each chunk
        # the chunks of the second half score far higher: the row max jumps mid-list
        k[:, :, torch.cat(tokens[layout.num_chunks // 2:])] *= 8.0
        idx, counts = R.select_chunks(q, k, layout, layout, 0.5, None)
        idx[0, 1, 2], counts[0, 1, 2] = -1, 0  # nothing selected: zeros
        want = R.masked_attention(q, k, v, layout, layout,
                                  R.chunk_mask(idx, counts, layout.num_chunks))
        outs = []
        for passes in (1, 2, 3):
            TB.FWD_CONFIG["kv_passes"] = passes
            outs.append(TB.attend(q, k, v, layout, layout, idx, counts))
        err = float((outs[0] - want).norm() / want.norm())
        assert err < 1e-5, (lat, err)
        assert all(torch.equal(o, outs[0]) for o in outs), lat
        assert not outs[0][0, 1, tokens[2]].any(), lat


def scales() -> None:
    CS.STATS_CONFIG["slice"] = 64  # several slices a head at these lengths
    for S, D, dtype in ((300, 64, torch.bfloat16), (129, 128, torch.float16)):
        g = torch.Generator().manual_seed(S)
        q, k, v = torch.randn(2, S, 3, 2, D, generator=g).to(dtype).permute(2, 0, 3, 1, 4)
        k, v = k + 2.0, 3.0 * v - 1.0  # means to smooth away
        pairs = [(CS.key_mean(k), F.key_mean(k)), (CS.value_scales(v), F.value_scales(v))]
        pairs += zip(CS.tensor_scales(q, k, v), F.per_tensor_scales(q, k, v), strict=True)
        for got, want in pairs:
            assert got.shape == want.shape and got.dtype == want.dtype, (S, D)
            assert float((got - want).abs().max()) <= 1e-6 * float(want.abs().max()), (S, D)
    v = v.clone()
    v[1, 1, S // 2, 3] = float("nan")
    assert float(CS.tensor_scales(q, k, v)[2]) == float(F.per_tensor_scales(q, k, v)[2]) == 1.0
    assert torch.equal(CS.value_scales(v), F.value_scales(v))  # the NaN channel's scale: 1
    zeros = torch.zeros(1, 2, 50, 32, dtype=torch.bfloat16)
    assert [float(s) for s in CS.tensor_scales(zeros, zeros, zeros)[:3]] == [1.0, 1.0, 1.0]
    assert torch.equal(CS.value_scales(zeros), F.value_scales(zeros))


def _within_one_e4m3_step(got: torch.Tensor, want: torch.Tensor) -> bool:
    """The interpreter truncates where the GPU rounds to nearest, and where rounding up carries
    into the next power of two it drops the carry (125.7 gives 64, not 128): each value at most
    one e4m3 step off (3 mantissa bits: 2**-3 of it, or the subnormal step 2**-9), or half a
    power of two one step off, for a few values only."""
    got = got.float()
    room = torch.maximum(want.abs() * 2**-3, torch.full_like(want, 2**-9))
    near = (got - want).abs() <= room
    power = (got != 0) & (torch.frexp(got).mantissa.abs() == 0.5)
    carry = ~near & power & ((2 * got - want).abs() <= room)
    return bool((near | carry).all()) and float(carry.float().mean()) < 0.05


def fused_fp8() -> None:
    """The fp8 self-attention's two fused ends: ``head_norm_rope`` writing q as e4m3 of its
    value over a given scale (k as before), and ``e4m3_rows`` adding a mean per group of
    rows first (float32 activations: the interpreter's bf16 rounding is not the GPU's)."""
    from longcat_tools.kernels import cudnn_fp8_attention as C
    from longcat_tools.kernels import fp8
    from longcat_tools.kernels import triton_norm as TN

    g = torch.Generator().manual_seed(11)
    B, N, H, D = 2, 24, 3, 32
    qkv = torch.randn(B, N, 3 * H * D, generator=g)
    qw, kw = (torch.rand(D, generator=g) + 0.5 for _ in range(2))
    cos, sin = (torch.rand(N, D, generator=g) for _ in range(2))
    q, k = TN.head_norm_rope(qkv, H, [qw, kw], cos, sin, 1e-6)
    s_q = F.normed_scale(qw)
    q8, k_too = TN.head_norm_rope(qkv, H, [qw, kw], cos, sin, 1e-6, q_scale=s_q)
    assert q8.dtype == fp8.E4M3 and q8.transpose(1, 2).is_contiguous()
    assert torch.equal(k_too, k)
    assert _within_one_e4m3_step(q8, q * (1 / s_q)), "q"
    assert float(q.abs().amax()) <= float(s_q) * F.E4M3_MAX
    # the output pass: O plus v's mean, then the projection's per-token e4m3
    o = torch.randn(B, N, H, D, generator=g)
    mean = torch.randn(B, H, D, generator=g)
    rows, scale = TN.e4m3_rows(o.reshape(B * N, H * D), mean.reshape(B, H * D))
    full = C.scale_cast(o.transpose(1, 2), C.token_major(B, H, N, D, o.dtype, o.device),
                        torch.ones(1), mean)
    want, want_scale = fp8.quantize_rows(full.transpose(1, 2).reshape(B * N, H * D))
    assert torch.equal(scale, want_scale)
    assert _within_one_e4m3_step(rows, want.float()), "rows"


def fp8_key_scale() -> None:
    """The fp8 sparse forward scales k once per head (``reference(key_scale="head")``), at the
    right head for B = 2: one key 60x louder in head (1, 0) sets that head's scale alone. The
    interpreter truncates the e4m3 casts, so the match is loose (5-7%), but the per-key recipe
    lands far off in that head (76%), and one or two kv passes give the same bits."""
    TB.FWD_CONFIG["tma"] = 0
    lat = (4, 8, 8)
    layout = R.ChunkLayout(lat, (4, 4, 4))
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 256, 64, generator=g) for _ in range(3))
    q *= 4.0  # sharp scores, where the keys' quantization shows
    k[1, 0, 5] *= 60.0
    k[0, 1] = 0.0  # an all-zero head: scale 1, every score 0
    q, k, v = (x.bfloat16() for x in (q, k, v))
    idx, counts = R.select_chunks(q.float(), k.float(), layout, layout, 0.5, None)
    index, valid = layout.token_index()
    chunk_of = torch.empty(int(valid.sum()), dtype=torch.long)  # each raster token's chunk
    chunk_of[index[valid]] = torch.arange(index.shape[0])[:, None].expand_as(index)[valid]
    token_mask = R.chunk_mask(idx, counts, layout.num_chunks)[:, :, chunk_of][:, :, :, chunk_of]
    outs = []
    for passes in (1, 2):
        TB.FWD_CONFIG["kv_passes"] = passes
        outs.append(TB.attend(q, k, v, layout, layout, idx, counts, fp8=True).float())
    assert torch.equal(outs[0], outs[1])
    head = F.reference(q, k, v, token_mask, key_scale="head")
    token = F.reference(q, k, v, token_mask, key_scale="token")
    for b, h in ((0, 0), (0, 1), (1, 0), (1, 1)):
        got, want, other = outs[0][b, h], head[b, h], token[b, h]
        err = float((got - want).norm() / want.norm())
        assert err < 0.12, (b, h, err)
        if (b, h) == (1, 0):
            assert float((got - other).norm() / other.norm()) > 3 * err, (b, h)


CHECKS = {"selection": selection, "forward": forward, "scales": scales, "fused_fp8": fused_fp8,
          "fp8_key_scale": fp8_key_scale}

if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1")
    CHECKS[sys.argv[1]]()
