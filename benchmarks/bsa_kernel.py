"""Benchmark of ``kernels.block_sparse_attention`` against its baselines (issue #7).

One run times, per shape and sparsity (B=1, 32 heads, D=128, bf16, chunks 4x4x4):

* ours: the whole call (pool + score + select + sparse attention), and its two halves;
* ours in fp8 mode (int8 Q K^T, e4m3 P V; sm_89+): the whole call and the forward;
* dense SDPA through cuDNN and through flash (once per shape, sparsity does not matter);
* FlexAttention with the same block mask, on the chunk-permuted layout (mask build and
  permutes not timed: the best case for it);
* the original LongCat kernel, when ``LONGCAT_BSA_SRC`` names a folder holding its
  ``block_sparse_attention/`` sources (never committed; divisible shapes only);
* VSA's Triton forward from FastVideo's ``fastvideo-kernel`` wheel, where installed (on sm90
  FastVideo runs its ThunderKittens kernel instead where that loads: it needs the torch the
  wheel was built for), given our selection: alone on q, k, v already in 64-token chunk order,
  and with its layout copies (q, k, v into chunk order, the output back). Its P V is bf16, so
  the fair row of ours is the attend with P V in bf16. It autotunes per sequence length, once,
  at the first sparsity, before its timing.

It also checks ours against an fp32 reference on a sample of query chunks.

    PYTHONPATH=. python3 benchmarks/bsa_kernel.py                # full run, writes results
    PYTHONPATH=. python3 benchmarks/bsa_kernel.py --sweep        # kernel config sweep
    PYTHONPATH=. python3 benchmarks/bsa_kernel.py --selection    # selection alone, by stage
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import io
import json
import math
import os
import platform
import sys
import types
from pathlib import Path

import torch
import triton
import triton.language as tl

from longcat_tools import kernels
from longcat_tools.kernels import reference as R
from longcat_tools.model.chunks import kept_per_query

SHAPES = {"480p": (24, 30, 52), "720p": (24, 44, 80), "720p-48f": (48, 44, 80)}
SELECTION_TARGET_MS = {"720p": 0.6, "720p-48f": 2.0}  # issue #21: pool + score + select
SPARSITIES = (0.875, 0.9375, 0.96875)
CHUNK = (4, 4, 4)
HEADS, HEAD_DIM = 32, 128
RESULTS = Path(__file__).resolve().parent / "results"


def bench(fn, rep_ms: float = 400.0) -> float:
    """Median milliseconds of ``fn`` (CUDA events, L2 flushed between runs)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=50, rep=rep_ms, return_mode="median"))


@triton.jit
def _kv_load_floor_kernel(KC, VC, IDX, CNT, OUT, Mk, Mq, KMAX, BLOCK_N: tl.constexpr,
                          D: tl.constexpr):
    """Only the loads of the forward: every K and V tile of the selected chunks, summed so
    that nothing is optimised away. Its time is the floor of any kernel that loads them."""
    m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    tile = tl.arange(0, BLOCK_N)[:, None] * D + tl.arange(0, D)[None, :]
    acc = tl.zeros([BLOCK_N, D], dtype=tl.bfloat16)
    for j in range(tl.load(CNT + bh * Mq + m)):
        c = tl.load(IDX + (bh * Mq + m) * KMAX + j).to(tl.int64)
        off = (bh * Mk + c) * BLOCK_N * D + tile
        acc += tl.load(KC + off) + tl.load(VC + off)
    tl.store(OUT + (bh * Mq + m) * BLOCK_N * D + tile, acc)


def kv_load_floor(k, v, lk, indices, counts):
    """A callable running ``_kv_load_floor_kernel`` (64-token chunks, bf16 copies)."""
    from longcat_tools.kernels import triton_bsa as TB

    B, H, _, D = k.shape
    kc = TB.chunk_pass(k, lk, pool=False, copy_dtype=k.dtype)[1]
    vc = TB.chunk_pass(v, lk, pool=False, copy_dtype=k.dtype)[1]
    idx, cnt = indices.contiguous(), counts.contiguous()
    mq, pad = idx.shape[2], TB.chunk_pad(lk)
    out = torch.empty(B * H * mq * pad, D, device=k.device, dtype=k.dtype)
    return lambda: _kv_load_floor_kernel[(mq, B * H)](kc, vc, idx, cnt, out, lk.num_chunks, mq,
                                                      idx.shape[-1], pad, D, num_warps=4,
                                                      num_stages=2)


def load_original():
    """Import the original kernel from $LONGCAT_BSA_SRC, stubbing its package parents."""
    src = os.environ.get("LONGCAT_BSA_SRC")
    if not src:
        return None
    path = Path(src)
    if (path / "block_sparse_attention").is_dir():
        path = path / "block_sparse_attention"
    for name in ("longcat_video", "longcat_video.context_parallel"):
        mod = types.ModuleType(name)
        mod.__path__ = []  # type: ignore[attr-defined]
        sys.modules.setdefault(name, mod)
    sys.modules["longcat_video.context_parallel"].context_parallel_util = types.ModuleType(
        "context_parallel_util")
    pkg = types.ModuleType("longcat_video.block_sparse_attention")
    pkg.__path__ = [str(path)]  # type: ignore[attr-defined]
    sys.modules[pkg.__name__] = pkg
    with contextlib.redirect_stdout(io.StringIO()):
        mod = importlib.import_module("longcat_video.block_sparse_attention.bsa_interface")
    return mod.flash_attn_bsa_3d


def load_vsa(log):
    """VSA's Triton block-sparse forward, or None without ``fastvideo-kernel``. Loaded from
    its file: the package's ``__init__`` loads compiled ops built for one torch release."""
    import importlib.util

    spec = importlib.util.find_spec("fastvideo_kernel")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "triton_kernels" / \
        "block_sparse_attn_triton.py"
    try:
        fspec = importlib.util.spec_from_file_location("_vsa_block_sparse_attn_triton", path)
        mod = importlib.util.module_from_spec(fspec)  # type: ignore[arg-type]
        fspec.loader.exec_module(mod)  # type: ignore[union-attr]
        return mod.triton_block_sparse_attn_forward
    except Exception as e:  # noqa: BLE001
        log(f"VSA Triton forward failed to load: {type(e).__name__}: {str(e)[:300]}")
        return None


def vsa_runner(vsa, q, k, v, lq, lk, indices, counts):
    """VSA's forward with our selection on 64-token chunks (ours, in chunk order): the forward
    alone on copies made once, and the whole call from raster q, k, v to raster output."""
    idx = indices.clamp_min(0).to(torch.int32).contiguous()
    num = counts.to(torch.int32).contiguous()
    sizes = lk.counts(q.device).to(torch.int32).contiguous()

    def chunked(x, layout):
        return R.to_chunks(x, layout).flatten(2, 3).contiguous()

    qc, kc, vc = chunked(q, lq), chunked(k, lk), chunked(v, lk)

    def whole():
        o = vsa(chunked(q, lq), chunked(k, lk), chunked(v, lk), idx, num, sizes)[0]
        return R.from_chunks(o.unflatten(2, (lq.num_chunks, -1)), lq)

    return (lambda: vsa(qc, kc, vc, idx, num, sizes)[0]), whole


@contextlib.contextmanager
def kv_passes(n: int):
    """The BSA forward in ``n`` launches over slices of the kv chunks (``FWD_CONFIG``)."""
    from longcat_tools.kernels import triton_bsa as TB

    saved = TB.FWD_CONFIG["kv_passes"]
    TB.FWD_CONFIG["kv_passes"] = n
    try:
        yield
    finally:
        TB.FWD_CONFIG["kv_passes"] = saved


def sampled_error(q, k, v, lq, lk, indices, counts, out, heads=2, n_chunks=48, seed=0):
    """Relative error of ``out`` against an fp32 reference on sampled query chunks."""
    g = torch.Generator().manual_seed(seed)
    sel = torch.randperm(lq.num_chunks, generator=g)[:n_chunks].to(q.device)
    qi, qv = lq.token_index(q.device)
    ki, kv = lk.token_index(q.device)
    num, den = 0.0, 0.0
    for h in range(heads):
        qc = q[0, h][qi[sel]].float()  # n C D
        kc = k[0, h][ki].float()  # Mk C D
        vc = v[0, h][ki].float()
        for j, m in enumerate(sel.tolist()):
            c = int(counts[0, h, m])
            chunks = indices[0, h, m, :c].long()
            kk = kc[chunks].flatten(0, 1)
            vv = vc[chunks].flatten(0, 1)
            ok = kv[chunks].flatten()
            s = (qc[j] @ kk.T) * HEAD_DIM**-0.5
            s = s.masked_fill(~ok, float("-inf"))
            ref = torch.softmax(s, -1) @ vv
            got = out[0, h][qi[m]].float()
            rows = qv[m]
            num += float((got[rows] - ref[rows]).pow(2).sum())
            den += float(ref[rows].pow(2).sum())
    return math.sqrt(num / den)


def dense_errors(device) -> dict:
    """Relative error of dense bf16 SDPA backends vs fp32, for scale (S=8192, 4 heads)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    F = torch.nn.functional
    q, k, v = (torch.randn(1, 4, 8192, HEAD_DIM, device=device, dtype=torch.bfloat16)
               for _ in range(3))
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    res = {"bf16_rounding_of_ref": float((ref.bfloat16().float() - ref).norm() / ref.norm())}
    for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel([be]):
                o = F.scaled_dot_product_attention(q, k, v)
            res[name] = float((o.float() - ref).norm() / ref.norm())
        except RuntimeError as e:
            res[name] = f"error: {e}"[:200]
    return res


def flex_runner(q, k, v, lq, lk, indices, counts):
    """FlexAttention over the chunk-permuted layout with our selection as its block mask."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    qc = R.to_chunks(q, lq).flatten(2, 3)
    kc = R.to_chunks(k, lk).flatten(2, 3)
    vc = R.to_chunks(v, lk).flatten(2, 3)
    # from_kv_blocks wants one column per kv block
    kv_idx = torch.zeros(*indices.shape[:-1], lk.num_chunks, device=q.device, dtype=torch.int32)
    kv_idx[..., : indices.shape[-1]] = torch.where(indices < 0, 0, indices)
    mask_mod = None
    if not lk.divisible:
        key_ok = lk.token_index(q.device)[1].flatten()
        mask_mod = lambda b, h, qi, ki: key_ok[ki]  # noqa: E731
    bm = BlockMask.from_kv_blocks(counts.to(torch.int32).contiguous(), kv_idx,
                                  BLOCK_SIZE=(lq.chunk_size, lk.chunk_size), mask_mod=mask_mod,
                                  seq_lengths=(qc.shape[2], kc.shape[2]))
    flex = torch.compile(flex_attention, dynamic=False)
    opts = {"BLOCK_M": 64, "BLOCK_N": 64}
    return lambda: flex(qc, kc, vc, block_mask=bm, kernel_options=opts)


def run_case(name, lat, sparsities, orig, vsa, do_dense, do_flex, rep_ms, log):
    dev = torch.device("cuda")
    S = math.prod(lat)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, S, HEAD_DIM, device=dev, dtype=torch.bfloat16)
               for _ in range(3))
    lq = lk = kernels.chunk_layout(lat, CHUNK)
    rows = []
    dense = {}
    if do_dense:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        F = torch.nn.functional
        for bname, be in (("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("flash", SDPBackend.FLASH_ATTENTION)):
            def fn(be=be):
                with sdpa_kernel([be]):
                    return F.scaled_dot_product_attention(q, k, v)
            try:
                dense[bname] = bench(fn, rep_ms=max(rep_ms, 3000))
            except RuntimeError as e:
                dense[bname] = None
                log(f"{name} dense {bname}: {e}")
            torch.cuda.empty_cache()
        log(f"{name} dense: {dense}")
    from longcat_tools.kernels import triton_bsa as TB

    for sp in sparsities:
        row = {"shape": name, "latent": list(lat), "sparsity": sp, **{f"{b}_ms": t for b, t in
                                                                       dense.items()}}
        full = lambda sp=sp: kernels.block_sparse_attention(  # noqa: E731
            q, k, v, lat, lat, sparsity=sp, chunk_q=CHUNK, chunk_k=CHUNK)
        out = full()
        indices, counts = kernels.select_chunks(q, k, lat, lat, sparsity=sp,
                                                chunk_q=CHUNK, chunk_k=CHUNK)
        row["kept_per_q_chunk"] = int(counts[0, 0, 0])
        row["num_chunks"] = lk.num_chunks
        row["ours_ms"] = bench(full, rep_ms)
        sel = lambda sp=sp: kernels.select_chunks(  # noqa: E731
            q, k, lat, lat, sparsity=sp, chunk_q=CHUNK, chunk_k=CHUNK)
        row["ours_select_ms"] = bench(sel, rep_ms)
        row["ours_attend_ms"] = bench(lambda: TB.attend(q, k, v, lq, lk, indices, counts),  # noqa: B023
                                      rep_ms)
        row["ours_attend_bf16pv_ms"] = bench(  # the kernel with P @ V in bf16 (less exact)
            lambda: TB.attend(q, k, v, lq, lk, indices, counts, pv_fp16=False), rep_ms)  # noqa: B023
        attend = lambda: TB.attend(q, k, v, lq, lk, indices, counts)  # noqa: B023, E731
        row["kv_passes_auto"] = TB.kv_passes_for(lk, HEAD_DIM)
        with kv_passes(1):
            one_pass = attend()
        for passes in (1, 2, 3):  # the same tiles over slices of the kv chunks (L2 reuse)
            with kv_passes(passes):
                row[f"ours_attend_{passes}pass_ms"] = bench(attend, rep_ms)
                row[f"ours_{passes}pass_bit_equal"] = torch.equal(attend(), one_pass)
        row["kv_load_floor_ms"] = bench(kv_load_floor(k, v, lk, indices, counts), rep_ms)
        pairs = float(counts.sum()) * lq.chunk_size * lk.chunk_size
        row["attend_tflops"] = 4 * HEAD_DIM * pairs / row["ours_attend_ms"] / 1e9
        row["ours_rel_err"] = sampled_error(q, k, v, lq, lk, indices, counts, out)
        row["ours_bf16pv_ms"] = bench(  # the whole call as the DiT makes it (P V in bf16)
            lambda sp=sp: kernels.block_sparse_attention(
                q, k, v, lat, lat, sparsity=sp, chunk_q=CHUNK, chunk_k=CHUNK, pv_fp16=False),
            rep_ms)
        if torch.cuda.get_device_capability() >= (8, 9):  # the fp8 mode's whole call
            fp8 = lambda sp=sp: kernels.block_sparse_attention(  # noqa: E731
                q, k, v, lat, lat, sparsity=sp, chunk_q=CHUNK, chunk_k=CHUNK, fp8=True)
            row["ours_fp8_ms"] = bench(fp8, rep_ms)
            row["ours_fp8_attend_ms"] = bench(  # quantized copies included
                lambda: TB.attend(q, k, v, lq, lk, indices, counts, fp8=True), rep_ms)  # noqa: B023
            row["ours_fp8_rel_err"] = sampled_error(q, k, v, lq, lk, indices, counts, fp8())
            for passes in (1, 2, 3):
                with kv_passes(passes):
                    row[f"ours_fp8_attend_{passes}pass_ms"] = bench(
                        lambda: TB.attend(q, k, v, lq, lk, indices, counts, fp8=True), rep_ms)  # noqa: B023
        if orig is not None and lq.divisible:
            ofn = lambda sp=sp: orig(q, k, v, list(lat), list(lat), sparsity=sp,  # noqa: E731
                                     cdf_threshold=None, chunk_3d_shape_q=list(CHUNK),
                                     chunk_3d_shape_k=list(CHUNK))
            try:
                with torch.no_grad():
                    o2 = ofn()
                    row["orig_ms"] = bench(ofn, rep_ms)
                row["orig_vs_ours_rel_diff"] = float((o2.float() - out.float()).norm()
                                                     / out.float().norm())
            except Exception as e:  # noqa: BLE001
                row["orig_ms"] = None
                log(f"{name} {sp} original failed: {type(e).__name__}: {str(e)[:300]}")
        # VSA keeps a prefix of each 64-slot block: full chunks only
        if vsa is not None and lq.chunk_size == lk.chunk_size == 64 and lk.divisible:
            try:
                forward, whole = vsa_runner(vsa, q, k, v, lq, lk, indices, counts)
                row["vsa_rel_err"] = sampled_error(q, k, v, lq, lk, indices, counts, whole())
                row["vsa_ms"] = bench(forward, rep_ms)
                row["vsa_with_copies_ms"] = bench(whole, rep_ms)
                del forward, whole
            except Exception as e:  # noqa: BLE001
                row["vsa_ms"] = None
                log(f"{name} {sp} VSA failed: {type(e).__name__}: {str(e)[:300]}")
            torch.cuda.empty_cache()
        if do_flex:
            try:
                ffn = flex_runner(q, k, v, lq, lk, indices, counts)
                ffn()
                row["flex_ms"] = bench(ffn, rep_ms)
            except Exception as e:  # noqa: BLE001
                row["flex_ms"] = None
                log(f"{name} {sp} flex failed: {type(e).__name__}: {str(e)[:300]}")
            torch.cuda.empty_cache()
        log(json.dumps(row))
        rows.append(row)
    return rows


def sweep(lat, sp, log, rep_ms):
    """Time the stages and kernel variants on one shape (selection fixed), plus baselines."""
    from longcat_tools.kernels import triton_bsa as TB

    dev = torch.device("cuda")
    S = math.prod(lat)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, S, HEAD_DIM, device=dev, dtype=torch.bfloat16)
               for _ in range(3))
    lq = lk = kernels.chunk_layout(lat, CHUNK)
    indices, counts = kernels.select_chunks(q, k, lat, lat, sparsity=sp, chunk_q=CHUNK,
                                            chunk_k=CHUNK)
    ir, cr = R.select_chunks(q, k, lq, lk, sp, None)
    log(f"selection equals reference on device: {torch.equal(ir, indices)}")
    qb, kb = TB.pool(q, lq), TB.pool(k, lk)
    sc = TB.scores(qb, kb)
    log(f"scores (int8) ms {bench(lambda: TB.scores(qb, kb), rep_ms):.3f}")
    kk = int(counts[0, 0, 0])
    times = [bench(lambda: TB.pool(q, lq), rep_ms),
             bench(lambda: TB.select(sc, counts, kk, q.dtype), rep_ms),
             bench(lambda: TB.select_chunks(q, k, lq, lk, sp, None), rep_ms),
             bench(lambda: TB._v_copy(v, lk, True), rep_ms)]
    log("pool_ms {:.3f} select_ms {:.3f} select_total_ms {:.3f} v_copy_ms {:.3f}".format(*times))
    pairs = float(counts.sum()) * lq.chunk_size * lk.chunk_size
    g = torch.Generator(device=dev).manual_seed(1)
    score_order = torch.sort(torch.rand(indices.shape, device=dev, generator=g), -1).indices
    shuffled = torch.gather(indices, -1, score_order).contiguous()
    same = torch.arange(kk, device=dev, dtype=torch.int32).expand_as(indices).contiguous()
    results = []
    # measured on H100 (NOTES): 64-key steps (kv 1), 4 warps, 2 stages won; pv 0: bf16 P@V,
    # 1: float16 P@V; "shuffled" walks each kv list in score order like the original
    for kv, warps, stages, pv, order in [(1, 4, 2, 1, "sorted"), (1, 4, 2, 0, "sorted"),
                                         (2, 4, 2, 1, "sorted"), (1, 8, 2, 1, "sorted"),
                                         (1, 4, 2, 1, "shuffled"), (1, 4, 2, 1, "same")]:
        # one kv pass: the shuffled lists are not ascending
        TB.FWD_CONFIG.update(kv_split=kv, num_warps=warps, num_stages=stages, pv_fp16=pv,
                             kv_passes=1)
        idx = {"sorted": indices, "shuffled": shuffled, "same": same}[order]
        try:
            fn = lambda: TB.attend(q, k, v, lq, lk, idx, counts)  # noqa: E731,B023
            out = fn()
            ms = bench(fn, rep_ms)
            err = (sampled_error(q, k, v, lq, lk, idx, counts, out, heads=1, n_chunks=32)
                   if order != "same" else None)
            res = dict(kv=kv, warps=warps, stages=stages, pv=pv, order=order, ms=ms,
                       tflops=4 * HEAD_DIM * pairs / ms / 1e9, err=err)
            res["nregs_spills_smem"] = _kernel_stats()
        except Exception as e:  # noqa: BLE001
            res = dict(kv=kv, warps=warps, stages=stages, pv=pv, order=order, error=str(e)[:300])
        log(json.dumps(res))
        results.append(res)
    TB.FWD_CONFIG.update(kv_split=0, num_warps=0, num_stages=0, pv_fp16=1)
    full = lambda: kernels.block_sparse_attention(q, k, v, lat, lat, sparsity=sp)  # noqa: E731
    log(f"ours full call ms {bench(full, rep_ms):.3f}")
    orig = load_original()
    if orig is not None:
        ofn = lambda: orig(q, k, v, list(lat), list(lat), sparsity=sp,  # noqa: E731
                           chunk_3d_shape_q=list(CHUNK), chunk_3d_shape_k=list(CHUNK))
        with torch.no_grad():
            o2, o1 = ofn(), full()
            log(f"original ms {bench(ofn, rep_ms):.3f} rel diff to ours "
                f"{float((o2.float() - o1.float()).norm() / o1.float().norm()):.2e}")
    return results


def selection_stages(name, lat, sp, log, rep_ms) -> dict:
    """Selection alone by stage (pool q and k; the scores: both grids and the int8 score
    kernel; select), whole, against the issue's target and, in the same run, the previous
    selection (pools, cuBLAS float64 matmul of the means, select on float64); the score
    kernel's configs; and whether it equals the reference run on the CPU."""
    from longcat_tools.kernels import triton_bsa as TB

    S = math.prod(lat)
    torch.manual_seed(0)
    q, k = (torch.randn(1, HEADS, S, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
            for _ in range(2))
    lq = lk = kernels.chunk_layout(lat, CHUNK)
    mq, mk = lq.num_chunks, lk.num_chunks
    shape = (1, HEADS, mq, mk)
    qb, kb = TB.pool(q, lq), TB.pool(k, lk)
    score = TB.scores(qb, kb)
    kk = kept_per_query(sp, mk)
    counts = torch.full(shape[:-1], kk, dtype=torch.int32, device="cuda")

    def previous():  # session 23's selection: float64 matmul of the means, 8-byte scores
        qm, km = TB.pool(q, lq), TB.pool(k, lk)
        s64 = torch.matmul(qm.double(), km.double().transpose(-1, -2).contiguous())
        return TB.select(s64, counts, kk, q.dtype)

    row = {"shape": name, "latent": list(lat), "sparsity": sp, "num_chunks": mk,
           "kept_per_q_chunk": kk,
           "pool_q_ms": bench(lambda: TB.pool(q, lq), rep_ms),
           "pool_k_ms": bench(lambda: TB.pool(k, lk), rep_ms),
           "grid_q_ms": bench(lambda: TB.grid(qb), rep_ms),
           "score_ms": bench(lambda: TB.scores(qb, kb), rep_ms),
           "select_ms": bench(lambda: TB.select(score, counts, kk, q.dtype), rep_ms),
           "selection_ms": bench(lambda: kernels.select_chunks(
               q, k, lat, lat, sparsity=sp, chunk_q=CHUNK, chunk_k=CHUNK), rep_ms),
           "target_ms": SELECTION_TARGET_MS.get(name),
           "previous_selection_ms": bench(previous, rep_ms)}
    q64, kt64 = qb.double(), kb.double().transpose(-1, -2).contiguous()
    s64 = torch.matmul(q64, kt64)
    row["previous_dgemm_ms"] = bench(lambda: torch.matmul(q64, kt64), rep_ms)
    row["previous_select_ms"] = bench(lambda: TB.select(s64, counts, kk, q.dtype), rep_ms)
    row["int8_tops"] = 9 * 2 * HEADS * mq * mk * HEAD_DIM / row["score_ms"] / 1e9
    row["same_picks_as_previous"] = torch.equal(previous(), TB.select(score, counts, kk,
                                                                      q.dtype))
    saved = dict(TB.SCORE_CONFIG)
    for bm, bn, warps, stages in ((64, 64, 4, 3), (64, 64, 4, 2), (64, 64, 4, 1),
                                  (128, 64, 8, 2), (64, 128, 4, 2)):
        TB.SCORE_CONFIG.update(block_m=bm, block_n=bn, num_warps=warps, num_stages=stages)
        key = f"score_ms_{bm}x{bn}_w{warps}_s{stages}"
        row[key] = bench(lambda: TB.scores(qb, kb), rep_ms)
        assert torch.equal(TB.scores(qb, kb), score)
        if row[key] <= min(v for k, v in row.items() if k.startswith("score_ms_")):
            row["fastest_score_config"] = dict(TB.SCORE_CONFIG)
    TB.SCORE_CONFIG.update(row["fastest_score_config"])
    row["selection_ms_fastest_score_config"] = bench(lambda: kernels.select_chunks(
        q, k, lat, lat, sparsity=sp, chunk_q=CHUNK, chunk_k=CHUNK), rep_ms)
    TB.SCORE_CONFIG.update(saved)
    idx, _ = kernels.select_chunks(q, k, lat, lat, sparsity=sp, chunk_q=CHUNK, chunk_k=CHUNK)
    heads = slice(0, 4)  # the CPU reference on 4 heads keeps this quick
    ref_idx, _ = R.select_chunks(q[:, heads].cpu(), k[:, heads].cpu(), lq, lk, sp, None)
    row["equals_cpu_reference_4_heads"] = torch.equal(idx[:, heads].cpu(), ref_idx)
    log(json.dumps(row))
    return row




def _kernel_stats():
    """(registers, spills, shared bytes) of the last compiled attention kernel, if known."""
    from longcat_tools.kernels import triton_bsa as TB

    try:
        cache = TB._bsa_fwd_kernel.device_caches[torch.cuda.current_device()][0]
        kern = list(cache.values())[-1]
        return [kern.n_regs, kern.n_spills, kern.metadata.shared]
    except Exception as e:  # noqa: BLE001
        return str(e)[:80]


def profile_once(lat, sp):
    """The forward kernel as the DiT runs it, for ncu: twice in bf16 (P V in bf16), then twice
    in fp8, so ``ncu -k regex:_bsa_fwd_kernel --launch-skip 1 --launch-count 3`` profiles the
    second bf16 launch and both fp8 ones (results/bsa_ncu_h100_session28.md)."""
    from longcat_tools.kernels import triton_bsa as TB

    S = math.prod(lat)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, S, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    lq = lk = kernels.chunk_layout(lat, CHUNK)
    indices, counts = kernels.select_chunks(q, k, lat, lat, sparsity=sp)
    for fp8 in (False, False, True, True):
        TB.attend(q, k, v, lq, lk, indices, counts, pv_fp16=False, fp8=fp8)
    torch.cuda.synchronize()


def versions(dev) -> dict:
    import triton

    return {"gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")}


def table(rows) -> str:
    head = ("| shape | sparsity | kept | ours ms (select + attend) | attend TFLOP/s"
            " | K/V load floor ms | original ms | cuDNN ms | flash ms | flex ms"
            " | VSA Triton ms (forward / with copies) | ours, P V in bf16, ms (attend)"
            " | VSA rel err | vs original"
            " | vs cuDNN | rel err | fp8 ms (attend) | fp8 rel err"
            " | kv passes (auto) | attend, 1 / 2 / 3 kv passes ms"
            " | fp8 attend, 1 / 2 / 3 kv passes ms |")
    out = [head, "|" + "---|" * 21]
    f = lambda x: "n/a" if x is None else f"{x:.2f}"  # noqa: E731
    for r in rows:
        o, c = r.get("orig_ms"), r.get("cudnn_ms")
        vs_o = "n/a" if o is None else f"{o / r['ours_ms']:.2f}x"
        vs_c = "n/a" if c is None else f"{c / r['ours_ms']:.1f}x"
        out.append(
            f"| {r['shape']} {'x'.join(map(str, r['latent']))} | {r['sparsity']} "
            f"| {r['kept_per_q_chunk']}/{r['num_chunks']} | {f(r['ours_ms'])} "
            f"({f(r['ours_select_ms'])} + {f(r['ours_attend_ms'])}) | {r['attend_tflops']:.0f} "
            f"| {f(r.get('kv_load_floor_ms'))} | {f(o)} | {f(c)} | {f(r.get('flash_ms'))} "
            f"| {f(r.get('flex_ms'))} | {f(r.get('vsa_ms'))} / {f(r.get('vsa_with_copies_ms'))} "
            f"| {f(r.get('ours_bf16pv_ms'))} ({f(r.get('ours_attend_bf16pv_ms'))}) "
            f"| {r.get('vsa_rel_err', float('nan')):.1e} | {vs_o} | {vs_c} "
            f"| {r['ours_rel_err']:.1e} | {f(r.get('ours_fp8_ms'))} "
            f"({f(r.get('ours_fp8_attend_ms'))}) | {r.get('ours_fp8_rel_err', float('nan')):.1e} "
            f"| {r.get('kv_passes_auto', 'n/a')} "
            f"| {' / '.join(f(r.get(f'ours_attend_{n}pass_ms')) for n in (1, 2, 3))} "
            f"| {' / '.join(f(r.get(f'ours_fp8_attend_{n}pass_ms')) for n in (1, 2, 3))} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)))
    ap.add_argument("--no-dense", action="store_true")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--rep-ms", type=float, default=400.0)
    ap.add_argument("--sweep", action="store_true", help="kernel config sweep at 720p")
    ap.add_argument("--profile-once", action="store_true", help="four forward launches, for ncu")
    ap.add_argument("--selection", action="store_true",
                    help="selection alone by stage at 720p and 720p-48f (0.9375), vs targets")
    ap.add_argument("--config", action="append", default=[], metavar="KEY=INT",
                    help="a triton_bsa.FWD_CONFIG override for our rows (repeatable)")
    ap.add_argument("--out", default=None, help="folder for JSON + markdown (default: results/)")
    ap.add_argument("--log", default=None)
    args = ap.parse_args()
    logf = open(args.log, "a") if args.log else None  # noqa: SIM115

    def log(msg):
        print(msg, flush=True)
        if logf:
            logf.write(msg + "\n")
            logf.flush()

    from longcat_tools.kernels import triton_bsa as TB

    for item in args.config:
        key, _, value = item.partition("=")
        if key not in TB.FWD_CONFIG or not value.lstrip("-").isdigit():
            ap.error(f"--config {item}: use KEY=INT, KEY one of {', '.join(TB.FWD_CONFIG)}")
        TB.FWD_CONFIG[key] = int(value)
    dev = torch.device("cuda")
    meta = {**versions(dev), "fwd_config": dict(TB.FWD_CONFIG)}
    log(json.dumps(meta))
    if args.sweep:
        sweep(SHAPES["720p"], 0.9375, log, args.rep_ms)
        return
    if args.profile_once:
        profile_once(SHAPES["720p"], 0.9375)
        return
    if args.selection:
        rows = [selection_stages(name, SHAPES[name], 0.9375, log, args.rep_ms)
                for name in SELECTION_TARGET_MS]
        out = Path(args.out) if args.out else RESULTS
        out.mkdir(parents=True, exist_ok=True)
        (out / "bsa_selection.json").write_text(json.dumps({"meta": meta, "rows": rows},
                                                           indent=1) + "\n")
        return
    orig = load_original()
    log(f"original kernel: {'loaded' if orig else 'not given (LONGCAT_BSA_SRC unset)'}")
    vsa = load_vsa(log)
    log(f"VSA Triton forward: {'loaded' if vsa else 'fastvideo-kernel not installed'}")
    sps = [float(s) for s in args.sparsities.split(",")]
    rows = []
    for name in args.shapes.split(","):
        rows += run_case(name, SHAPES[name], sps, orig, vsa, not args.no_dense,
                         not args.no_flex, args.rep_ms, log)
    errs = dense_errors(dev)
    log(f"dense bf16 SDPA rel err vs fp32 (S=8192): {errs}")
    md = table(rows)
    print(md)
    out = Path(args.out) if args.out else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    (out / "bsa_kernel.json").write_text(json.dumps(
        {"meta": meta, "config": {"batch": 1, "heads": HEADS, "head_dim": HEAD_DIM,
                                  "dtype": "bfloat16", "chunk": CHUNK},
         "dense_rel_err": errs, "rows": rows}, indent=1) + "\n")
    (out / "bsa_kernel.md").write_text(
        f"# Block sparse attention benchmark\n\n{meta['gpu']}, torch {meta['torch']}, "
        f"triton {meta['triton']}, CUDA {meta['cuda']}, cuDNN {meta['cudnn']}, {meta['date']}."
        f"\nB=1, {HEADS} heads, D={HEAD_DIM}, bf16, chunks {CHUNK}, random inputs; median ms."
        f"\n\n{md}\n\nDense bf16 SDPA relative error vs fp32 (S=8192, 4 heads): {errs}\n")


if __name__ == "__main__":
    main()
