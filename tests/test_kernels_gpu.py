"""GPU tests of the Triton block sparse attention kernels (run on a CUDA device).

Each case draws fresh random bf16/fp16 inputs, poisons the output with NaN, and compares
against an fp32 dense attention restricted to the selected chunks. The Triton selection
must equal the PyTorch reference's exactly (indices and counts), on the GPU and against the
reference run on the CPU: scores are exact float64 sums, so BLAS order does not matter.
"""

from __future__ import annotations

import math
import random
import zlib

import pytest
import torch

from longcat_tools import kernels
from longcat_tools.kernels import reference as R

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

REL_ERR = 2e-3

# (B, H, D, latent_q, latent_k, chunk_q, chunk_k, sparsity, cdf_threshold)
CASES = [
    (1, 4, 128, (8, 16, 16), (8, 16, 16), (4, 4, 4), (4, 4, 4), 0.875, None),
    (2, 2, 64, (6, 10, 13), (6, 10, 13), (4, 4, 4), (4, 4, 4), 0.75, None),
    (1, 32, 128, (4, 8, 12), (4, 8, 12), (4, 4, 4), (4, 4, 4), 0.5, None),
    (1, 3, 128, (5, 9, 14), (7, 9, 14), (4, 4, 4), (4, 4, 4), None, 0.6),
    (2, 2, 64, (4, 12, 12), (6, 12, 12), (4, 4, 4), (4, 4, 4), 0.9, 0.3),
    (1, 2, 128, (3, 7, 9), (5, 7, 9), (2, 4, 4), (2, 4, 4), 0.7, None),
    (1, 2, 64, (8, 8, 16), (8, 8, 16), (4, 4, 8), (4, 4, 8), 0.75, None),
    (1, 2, 128, (6, 11, 10), (6, 11, 10), (3, 4, 4), (3, 4, 4), None, 0.9),
    (1, 1, 128, (12, 30, 52), (12, 30, 52), (4, 4, 4), (4, 4, 4), 0.9375, None),
]


def _random_cases(n: int, seed: int = 7):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        lat_q = (rng.randint(1, 9), rng.randint(3, 17), rng.randint(3, 17))
        lat_k = (rng.randint(1, 9), lat_q[1], lat_q[2])
        mode = rng.choice(["topk", "cdf", "both"])
        sp = rng.choice([0.5, 0.75, 0.875]) if mode != "cdf" else None
        cdf = rng.choice([0.3, 0.7, 0.95]) if mode != "topk" else None
        out.append((rng.randint(1, 2), rng.choice([1, 5, 32]), rng.choice([64, 128]), lat_q,
                    lat_k, (4, 4, 4), (4, 4, 4), sp, cdf))
    return out


def _inputs(B, H, D, lat_q, lat_k, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda s: torch.randn(B, H, s, D, device="cuda", dtype=dtype, generator=g)  # noqa: E731
    return mk(math.prod(lat_q)), mk(math.prod(lat_k)), mk(math.prod(lat_k))


def assert_same_selection(idx, cnt, ref_idx, ref_cnt):
    """Same counts and the same ascending index lists, -1 padding included."""
    assert torch.equal(cnt.cpu(), ref_cnt.cpu())
    assert idx.shape == ref_idx.shape
    same = (idx.cpu() == ref_idx.cpu()).all(-1)
    assert bool(same.all()), f"{int((~same).sum())} of {same.numel()} rows differ"


@pytest.mark.parametrize("case", CASES + _random_cases(8), ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_matches_fp32_masked_reference(case, dtype):
    from longcat_tools.kernels import triton_bsa as TB

    B, H, D, lat_q, lat_k, cq, ck, sp, cdf = case
    q, k, v = _inputs(B, H, D, lat_q, lat_k, dtype, seed=zlib.crc32(str(case).encode()))
    lq, lk = R.ChunkLayout(lat_q, cq), R.ChunkLayout(lat_k, ck)
    idx, cnt = kernels.select_chunks(q, k, lat_q, lat_k, sparsity=sp, cdf_threshold=cdf,
                                     chunk_q=cq, chunk_k=ck)
    ref_idx, ref_cnt = R.select_chunks(q, k, lq, lk, sp, cdf)
    assert_same_selection(idx, cnt, ref_idx, ref_cnt)

    out = torch.full_like(q, float("nan"))
    TB.attend(q, k, v, lq, lk, idx, cnt, out=out)
    assert torch.isfinite(out).all(), "some outputs were not written"
    mask = R.chunk_mask(idx, cnt, lk.num_chunks)
    ref = R.masked_attention(q.float(), k.float(), v.float(), lq, lk, mask)
    err = float((out.float() - ref).norm() / ref.norm().clamp_min(1e-30))
    empty = cnt == 0
    if empty.any():  # query chunks that kept nothing must give exact zeros
        assert torch.all(R.to_chunks(out, lq)[empty] == 0)
    assert err < REL_ERR, f"relative error {err:.2e}"

    # the public entry point takes the same path and gives the same bits
    torch.full_like(q, float("nan"))  # leave NaN in the allocator's free block
    got = kernels.block_sparse_attention(q, k, v, lat_q, lat_k, sparsity=sp,
                                         cdf_threshold=cdf, chunk_q=cq, chunk_k=ck)
    assert torch.equal(got, out)


def _outlier_inputs(B, H, D, lat_q, lat_k, dtype, seed):
    """Like activations: a few channels 2**6 larger, and query chunk 0 all zeros (its scores
    are +-0.0, all tied)."""
    q, k, _ = _inputs(B, H, D, lat_q, lat_k, dtype, seed)
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    scale = torch.where(torch.rand(D, device="cuda", generator=g) < 0.05, 64.0, 1.0)
    q, k = (q * scale).to(dtype), (k * scale).to(dtype)
    lq = R.ChunkLayout(lat_q, (4, 4, 4))
    index, valid = lq.token_index("cuda")
    q[:, :, index[0][valid[0]]] = 0
    return q, k


@pytest.mark.parametrize("case", CASES[:5] + CASES[8:], ids=str)  # 4x4x4 chunks
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_selection_equals_cpu_reference(case, dtype):
    """GPU selection (cuBLAS scores, rounding inside the select kernel) == the reference run
    on the CPU (its own BLAS), bit for bit, on data with outlier channels and a zero chunk."""
    B, H, D, lat_q, lat_k, cq, ck, sp, cdf = case
    q, k = _outlier_inputs(B, H, D, lat_q, lat_k, dtype, seed=zlib.crc32(str(case).encode()))
    lq, lk = R.ChunkLayout(lat_q, cq), R.ChunkLayout(lat_k, ck)
    idx, cnt = kernels.select_chunks(q, k, lat_q, lat_k, sparsity=sp, cdf_threshold=cdf,
                                     chunk_q=cq, chunk_k=ck)
    ref_idx, ref_cnt = R.select_chunks(q.cpu(), k.cpu(), lq, lk, sp, cdf)
    assert_same_selection(idx, cnt, ref_idx, ref_cnt)
    if sp is not None:  # the zero query chunk: all scores tie, the lowest indices win
        n = int(ref_cnt[0, 0, 0])
        assert idx[:, :, 0].cpu().eq(torch.arange(n, dtype=torch.int32)).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_select_kernel_rounds_float64_like_reference(dtype):
    """The select kernel on float64 scores (rounded as it loads them) == on the reference's
    rounded float32 scores == the reference's sort, with values placed on rounding ties and
    on both zeros."""
    from longcat_tools.kernels import triton_bsa as TB

    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    tricky = torch.tensor([1 + ulp / 2 + 2**-40, 1 + ulp / 2, 1 + ulp, 1.0, 1 + ulp / 2 - 2**-40,
                           -0.0, 0.0, -(1 + ulp / 2 + 2**-40), -1.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    rows = torch.stack([tricky[torch.randperm(len(tricky), generator=g)] for _ in range(64)])
    s64 = rows.view(1, 1, 64, -1).cuda()
    for kk in range(1, len(tricky) + 1):
        cnt = torch.full((1, 1, 64), kk, dtype=torch.int32, device="cuda")
        want = R.select_from_scores(R.round_scores(s64.cpu(), dtype), cnt.cpu())
        assert torch.equal(TB.select(s64, cnt, kk, dtype).cpu(), want)
        assert torch.equal(TB.select(R.round_scores(s64, dtype), cnt, kk, dtype).cpu(), want)


@pytest.mark.parametrize("dtype, subnormal", [(torch.bfloat16, False), (torch.bfloat16, True),
                                             (torch.float16, False)])
@pytest.mark.parametrize("config", [(64, 64, 4, 3), (64, 64, 4, 1), (128, 64, 8, 2),
                                    (64, 128, 4, 2)], ids=str)
@pytest.mark.parametrize("D", [16, 32])
def test_int8_scores_are_the_reference_scores(dtype, subnormal, config, D, monkeypatch):
    """The score kernel (int8 slices on tensor cores) == ``reference.scores`` bit for bit, on
    means over many binades (the grid drops low bits of some), zero, tiny and subnormal
    chunks, for each tile shape; D = 16 pads the int8 dots to 32 with zeros."""
    from interpreted_kernels import grid_scores

    from longcat_tools.kernels import triton_bsa as TB

    monkeypatch.setattr(TB, "SCORE_CONFIG", dict(zip(
        ("block_m", "block_n", "num_warps", "num_stages"), config, strict=True)))
    got, want = grid_scores(dtype, "cuda", subnormal, D)
    assert got.dtype == dtype and torch.equal(got.cpu(), want)


@pytest.mark.parametrize("case", CASES[:6], ids=str)
def test_plain_loads_where_triton_lacks_tma(case, monkeypatch):
    """The forward's fallback for Triton without host TMA descriptors (torch < 2.8)."""
    from longcat_tools.kernels import triton_bsa as TB

    monkeypatch.setitem(TB.FWD_CONFIG, "tma", 0)
    B, H, D, lat_q, lat_k, cq, ck, sp, cdf = case
    q, k, v = _inputs(B, H, D, lat_q, lat_k, torch.bfloat16, seed=zlib.crc32(str(case).encode()))
    lq, lk = R.ChunkLayout(lat_q, cq), R.ChunkLayout(lat_k, ck)
    idx, cnt = kernels.select_chunks(q, k, lat_q, lat_k, sparsity=sp, cdf_threshold=cdf,
                                     chunk_q=cq, chunk_k=ck)
    out = torch.full_like(q, float("nan"))
    TB.attend(q, k, v, lq, lk, idx, cnt, out=out)
    assert torch.isfinite(out).all(), "some outputs were not written"
    ref = R.masked_attention(q.float(), k.float(), v.float(), lq, lk,
                             R.chunk_mask(idx, cnt, lk.num_chunks))
    assert float((out.float() - ref).norm() / ref.norm().clamp_min(1e-30)) < REL_ERR


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_kv_passes_give_the_one_pass_bits(case, fp8, monkeypatch):
    """Two or three launches over slices of the kv chunks, the softmax state carried in
    float32 between them, visit the same tiles in the same order as one launch."""
    from longcat_tools.kernels import triton_bsa as TB

    B, H, D, lat_q, lat_k, cq, ck, sp, cdf = case
    lq, lk = R.ChunkLayout(lat_q, cq), R.ChunkLayout(lat_k, ck)
    if fp8 and (torch.cuda.get_device_capability() < (8, 9) or not TB.fp8_covers(lk)):
        pytest.skip("the fp8 forward needs sm89+ and steps of 32 keys or more")
    q, k, v = _inputs(B, H, D, lat_q, lat_k, torch.bfloat16, seed=zlib.crc32(str(case).encode()))
    idx, cnt = kernels.select_chunks(q, k, lat_q, lat_k, sparsity=sp, cdf_threshold=cdf,
                                     chunk_q=cq, chunk_k=ck)
    outs = []
    for passes in (1, 2, 3):
        monkeypatch.setitem(TB.FWD_CONFIG, "kv_passes", passes)
        outs.append(TB.attend(q, k, v, lq, lk, idx, cnt, fp8=fp8))
    assert torch.isfinite(outs[0]).all()
    assert torch.equal(outs[1], outs[0]) and torch.equal(outs[2], outs[0])


def test_kv_passes_follow_the_size_of_a_heads_k_and_v(monkeypatch):
    """By default one pass per ~30 MB of a head's K and V: the counts measured best on an H100
    (one at 720p, three at 48 frames); a set ``kv_passes`` wins."""
    from longcat_tools.kernels import triton_bsa as TB

    at_720p, at_48f = R.ChunkLayout((24, 44, 80), (4, 4, 4)), R.ChunkLayout((48, 44, 80), (4, 4, 4))
    assert TB.FWD_CONFIG["kv_passes"] == 0
    assert (TB.kv_passes_for(at_720p, 128), TB.kv_passes_for(at_48f, 128)) == (1, 3)
    assert TB.kv_passes_for(R.ChunkLayout((4, 8, 8), (4, 4, 4)), 64) == 1
    monkeypatch.setitem(TB.FWD_CONFIG, "kv_passes", 2)
    assert TB.kv_passes_for(at_720p, 128) == 2


def test_kv_passes_timed_on_the_first_call_keep_the_one_pass_bits(monkeypatch):
    """Where the size rule asks for several passes, the first call of a shape times them
    against one pass, keeps the faster for later calls and returns one pass's bits."""
    from longcat_tools.kernels import triton_bsa as TB

    monkeypatch.setattr(TB, "_TIMED", {})
    monkeypatch.setitem(TB.FWD_CONFIG, "kv_pass_mb", 0.2)  # so a small head asks for several
    lat, chunk, D = (8, 16, 16), (4, 4, 4), 64
    layout = R.ChunkLayout(lat, chunk)
    n = TB.kv_passes_for(layout, D)
    assert n > 1
    q, k, v = _inputs(1, 2, D, lat, lat, torch.bfloat16, seed=5)
    idx, cnt = kernels.select_chunks(q, k, lat, lat, sparsity=0.75, chunk_q=chunk, chunk_k=chunk)
    first = TB.attend(q, k, v, layout, layout, idx, cnt)
    assert list(TB._TIMED.values()) in ([1], [n])
    again = TB.attend(q, k, v, layout, layout, idx, cnt)
    assert len(TB._TIMED) == 1
    monkeypatch.setitem(TB.FWD_CONFIG, "kv_passes", 1)
    one = TB.attend(q, k, v, layout, layout, idx, cnt)
    assert torch.isfinite(one).all()
    assert torch.equal(first, one) and torch.equal(again, one)


def test_fp16_inputs():
    lat = (6, 10, 13)
    q, k, v = _inputs(1, 4, 128, lat, lat, torch.float16, seed=3)
    lq = R.ChunkLayout(lat, (4, 4, 4))
    out = kernels.block_sparse_attention(q, k, v, lat, lat, sparsity=0.75)
    idx, cnt = R.select_chunks(q, k, lq, lq, 0.75, None)
    ref = R.masked_attention(q.float(), k.float(), v.float(), lq, lq,
                             R.chunk_mask(idx, cnt, lq.num_chunks))
    assert float((out.float() - ref).norm() / ref.norm()) < REL_ERR


def test_cdf_zero_threshold_gives_zeros():
    lat = (4, 8, 8)
    q, k, v = _inputs(1, 2, 64, lat, lat, torch.bfloat16, seed=5)
    out = kernels.block_sparse_attention(q, k, v, lat, lat, sparsity=None, cdf_threshold=0.0)
    assert torch.equal(out, torch.zeros_like(out))


def test_fp32_falls_back_to_reference():
    lat = (4, 5, 6)
    q, k, v = _inputs(1, 2, 32, lat, lat, torch.float32, seed=9)
    got = kernels.block_sparse_attention(q, k, v, lat, lat, sparsity=0.5)
    want = R.block_sparse_attention(q, k, v, lat, lat, sparsity=0.5)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dense_attention(dtype):
    q, k, v = _inputs(1, 4, 128, (2, 16, 32), (2, 16, 32), dtype, seed=11)
    got = kernels.attention(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert float((got.double() - ref).norm() / ref.norm()) < (1e-2 if dtype != torch.float32
                                                               else 1e-4)
