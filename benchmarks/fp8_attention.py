"""Dense attention at the DiT's shapes: cuDNN SDPA in bf16 against the fp8-mode kernel
(int8 Q K^T, e4m3 P V; ``kernels.triton_fp8_attention``), with each one's error against fp32.

  PYTHONPATH=. python3 benchmarks/fp8_attention.py                 # H200: prints a table, JSON
  PYTHONPATH=. python3 benchmarks/fp8_attention.py --sweep         # kernel configs at 480p
  PYTHONPATH=. python3 benchmarks/fp8_attention.py --small --device cpu   # logic check (reference)

cuDNN's FP8 SDPA, where NVIDIA's ``cudnn`` frontend is installed (``pip install
nvidia-cudnn-frontend``): ``kernels.cudnn_fp8_attention``, timed with its scaling passes.

FlashAttention-3, where built from its sources (``flash_attn_interface``): its FP8 forward
through ``kernels.fa3_fp8_attention`` and its bf16 forward.

The per-tensor recipe's statistics ("stats": means and scales of q, k and v) are timed alone,
by ``column_stats.tensor_scales`` and by the PyTorch reductions it replaced ("stats pt",
``fp8_attention.per_tensor_scales``); ``*_torch_stats_ms`` are the passes and FA3's FP8 call
with the latter (``torch_statistics``).

Peer, where installed: SageAttention 1.0.6 (``pip install sageattention==1.0.6``, pure Triton:
int8 Q K^T per block with K smoothed, fp16 P V), the public kernel of the recipe family ours
follows, timed and checked the same way.

The fp8 time includes quantizing q, k and v (the kernel's three ``_quantize_kernel`` passes
and the two reductions before them); "quantize" is that part alone. Errors are measured on
the first ``--err-heads`` heads against fp32 SDPA (memory-efficient backend), on random
unit-variance q, k, v (the hard case: little signal survives the average).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

HEADS, HEAD_DIM = 32, 128
SHAPES = {"480p/93": 24 * 30 * 52, "720p/93": 24 * 45 * 80}  # tokens of one forward


def bench_ms(fn, device: str) -> float:
    if device == "cpu":
        import time

        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=300, return_mode="median"))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@contextlib.contextmanager
def torch_statistics(on: bool = True):
    """With ``on``, every fp8 path's statistics as the PyTorch reductions of
    ``fp8_attention`` (as before ``kernels.column_stats``; CUDA only)."""
    if not on:
        yield
        return
    from longcat_tools.kernels import cudnn_fp8_attention, triton_bsa, triton_fp8_attention
    from longcat_tools.kernels import fp8_attention as ref

    patches = [(cudnn_fp8_attention, "tensor_scales", ref.per_tensor_scales)]
    patches += [(m, n, getattr(ref, n)) for m in (triton_bsa, triton_fp8_attention)
                for n in ("key_mean", "value_scales")]
    saved = [(m, n, getattr(m, n)) for m, n, _ in patches]
    try:
        for m, n, f in patches:
            setattr(m, n, f)
        yield
    finally:
        for m, n, f in saved:
            setattr(m, n, f)


def measure(name: str, S: int, heads: int, D: int, device: str, err_heads: int) -> dict:
    """One shape: times, throughput and errors of both paths."""
    from longcat_tools.kernels import dense
    from longcat_tools.kernels import fp8_attention as ref

    g = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(1, S, 3, heads, D, device=device, generator=g, dtype=torch.bfloat16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # the DiT's strided views
    flop = 4 * S * S * D * heads
    h = slice(0, err_heads)
    exact = F.scaled_dot_product_attention(q[:, h].float(), k[:, h].float(), v[:, h].float())
    bf16_ms = bench_ms(lambda: dense.sdpa(q, k, v), device)
    row = {"shape": name, "tokens": S, "heads": heads, "head_dim": D,
           "bf16_sdpa_ms": round(bf16_ms, 3), "bf16_tflops": round(flop / bf16_ms / 1e9, 1),
           "bf16_rel_err_vs_fp32": rel(dense.sdpa(q[:, h], k[:, h], v[:, h]), exact),
           "reference_rel_err_vs_fp32": rel(ref.reference(q[:, h], k[:, h], v[:, h]), exact)
           if S <= 40000 else None}  # the reference holds the whole score matrix
    if device == "cpu":
        return row
    from longcat_tools.kernels import triton_fp8_attention as tfa

    cfg = tfa.FP8_ATTN_CONFIG
    fp8_ms = bench_ms(lambda: tfa.attention(q, k, v), device)
    quant_ms = bench_ms(lambda: (tfa.quantize_qk(q, cfg["block_m"]),
                                 tfa.quantize_qk(k, cfg["block_n"], smooth=True),
                                 tfa.quantize_v(v, cfg["block_n"])), device)
    row.update(fp8_ms=round(fp8_ms, 3), fp8_quantize_ms=round(quant_ms, 3),
               fp8_tflops=round(flop / fp8_ms / 1e9, 1), fp8_vs_bf16=round(fp8_ms / bf16_ms, 3),
               fp8_rel_err_vs_fp32=rel(tfa.attention(q[:, h], k[:, h], v[:, h]), exact),
               config=dict(cfg))
    row.update(cudnn_fp8(q, k, v, h, exact, bf16_ms, device, flop))
    row.update(fa3(q, k, v, h, exact, bf16_ms, device, flop))
    try:
        from sageattention import sageattn
    except ImportError:
        return row
    import importlib.metadata

    row["sage_version"] = importlib.metadata.version("sageattention")
    try:
        sage_ms = bench_ms(lambda: sageattn(q, k, v), device)
        row.update(sage_ms=round(sage_ms, 3), sage_vs_bf16=round(sage_ms / bf16_ms, 3),
                   sage_rel_err_vs_fp32=rel(sageattn(q[:, h], k[:, h], v[:, h]), exact))
    except Exception as e:  # noqa: BLE001 - a peer that refuses these inputs is a result too
        row["sage_error"] = f"{type(e).__name__}: {e}"[:200]
    return row


def cudnn_fp8(q, k, v, h: slice, exact: torch.Tensor, bf16_ms: float, device: str,
              flop: float) -> dict:
    """``kernels.cudnn_fp8_attention`` (cuDNN's FP8 SDPA, per-tensor scales), where the
    ``cudnn`` frontend is installed: time (scaling passes included), their part, the error."""
    from longcat_tools.kernels import cudnn_fp8_attention as C
    from longcat_tools.kernels import fp8_attention as ref
    from longcat_tools.kernels.column_stats import tensor_scales

    if not C.supported(q):
        return {}
    import cudnn

    row = {"cudnn_backend": cudnn.backend_version(), "cudnn_frontend": cudnn.__version__}
    if C.attention(q, k, v) is None:
        return {**row, "cudnn_fp8_error": "cuDNN built no FP8 graph for this shape"}
    B, H, S, D = q.shape
    plan = C._PLANS[(B, H, S, k.shape[2], D, q.dtype, q.device.index)]
    ms = bench_ms(lambda: C.attention(q, k, v), device)

    def scaling(stats):
        s_q, s_k, s_v, k_mean, v_mean = stats(q, k, v)
        for x, s, m in ((q, s_q, None), (k, s_k, k_mean), (v, s_v, v_mean)):
            C.scale_cast(x, C.token_major(B, H, S, D, ref.E4M3, q.device), s, m)

    return {**row, "cudnn_fp8_ms": round(ms, 3), "cudnn_fp8_vs_bf16": round(ms / bf16_ms, 3),
            "cudnn_fp8_tflops": round(flop / ms / 1e9, 1),
            "cudnn_fp8_scaling_ms": round(bench_ms(lambda: scaling(tensor_scales), device), 3),
            # the statistics alone, and the passes with them as PyTorch reductions (before
            # column_stats)
            "stats_ms": round(bench_ms(lambda: tensor_scales(q, k, v), device), 3),
            "stats_torch_ms": round(bench_ms(lambda: ref.per_tensor_scales(q, k, v), device), 3),
            "cudnn_fp8_scaling_torch_stats_ms": round(
                bench_ms(lambda: scaling(ref.per_tensor_scales), device), 3),
            "cudnn_fp8_output": "e4m3" if plan.out_e4m3 else str(q.dtype).split(".")[-1],
            "cudnn_fp8_rel_err_vs_fp32": rel(C.attention(q[:, h], k[:, h], v[:, h]), exact)}


def fa3(q, k, v, h: slice, exact: torch.Tensor, bf16_ms: float, device: str,
        flop: float) -> dict:
    """FlashAttention-3, where built (``flash_attn_interface``): its FP8 forward through
    ``kernels.fa3_fp8_attention`` (cuDNN's per-tensor recipe and passes; time with them), and
    its bf16 forward on the same views (a candidate for the bf16 path)."""
    from longcat_tools.kernels import fa3 as fa3_build
    from longcat_tools.kernels import fa3_fp8_attention as A
    from longcat_tools.kernels import fp8_attention as ref

    func = fa3_build.build().func
    if func is None:
        return {}
    import importlib.metadata

    try:
        version = importlib.metadata.version("flash_attn_3")
    except importlib.metadata.PackageNotFoundError:
        version = "source build"
    row = {"fa3_version": version}

    def bf16(q, k, v):
        o = func(*(x.transpose(1, 2) for x in (q, k, v)), causal=False)
        return (o[0] if isinstance(o, tuple) else o).transpose(1, 2)

    ms = bench_ms(lambda: bf16(q, k, v), device)
    row.update(fa3_bf16_ms=round(ms, 3), fa3_bf16_vs_bf16=round(ms / bf16_ms, 3),
               fa3_bf16_tflops=round(flop / ms / 1e9, 1),
               fa3_bf16_rel_err_vs_fp32=rel(bf16(q[:, h], k[:, h], v[:, h]), exact))
    if not A.supported(q) or A.attention(q, k, v) is None:
        return {**row, "fa3_fp8_error": "FA3 took no FP8 call for this shape"}
    ms = bench_ms(lambda: A.attention(q, k, v), device)
    got = A.attention(q[:, h], k[:, h], v[:, h])
    row.update(fa3_fp8_ms=round(ms, 3), fa3_fp8_vs_bf16=round(ms / bf16_ms, 3),
               fa3_fp8_tflops=round(flop / ms / 1e9, 1), fa3_fp8_rel_err_vs_fp32=rel(got, exact))
    with torch_statistics():
        row["fa3_fp8_torch_stats_ms"] = round(bench_ms(lambda: A.attention(q, k, v), device), 3)
    if q.shape[2] <= 40000:  # the reference holds the whole score matrix
        row["fa3_fp8_rel_err_vs_recipe"] = rel(got, ref.reference_per_tensor(
            q[:, h], k[:, h], v[:, h], p_scale=256.0))
    return row


SWEEP = [dict(block_m=bm, block_n=bn, num_warps=w, num_stages=st, tma=tma)
         for bm in (64, 128) for bn in (64, 128) for w in (4, 8) for st in (2, 3)
         for tma in (0, 1) if not (bm == 128 and w == 4)]


def sweep(S: int, device: str) -> list[dict]:
    """Every ``SWEEP`` config of the kernel at ``S`` tokens (the table says which is best)."""
    from longcat_tools.kernels import triton_fp8_attention as tfa

    g = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(1, S, 3, HEADS, HEAD_DIM, device=device, generator=g, dtype=torch.bfloat16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    saved, rows = dict(tfa.FP8_ATTN_CONFIG), []
    for cfg in SWEEP:
        tfa.FP8_ATTN_CONFIG.update(cfg)
        try:
            ms = round(bench_ms(lambda: tfa.attention(q, k, v), device), 3)
        except Exception as e:  # noqa: BLE001 - a config the compiler or the SM cannot take
            ms = f"failed: {type(e).__name__}"
        rows.append({**cfg, "ms": ms})
        print(json.dumps(rows[-1]), flush=True)
    tfa.FP8_ATTN_CONFIG.update(saved)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU logic check)")
    ap.add_argument("--err-heads", type=int, default=2)
    ap.add_argument("--sweep", action="store_true", help="time every kernel config at 480p")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    a = ap.parse_args()
    if a.sweep:
        rows = sweep(SHAPES["480p/93"], a.device)
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "fp8_attention_sweep.json").write_text(json.dumps(rows, indent=1) + "\n")
        return
    shapes = {"small": 300} if a.small else SHAPES
    heads, D = (2, 64) if a.small else (HEADS, HEAD_DIM)
    rows = []
    for name, S in shapes.items():
        rows.append(measure(name, S, heads, D, a.device, a.err_heads))
        print(json.dumps(rows[-1]), flush=True)
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(0) if a.device != "cpu" else platform.processor(),
            "torch": torch.__version__, "python": platform.python_version(),
            "error_heads": a.err_heads}
    nan = float("nan")
    print(f"\n{'shape':<9} {'bf16 ms':>8} {'fp8 ms':>8} {'ratio':>6} {'quant ms':>9} "
          f"{'err bf16':>9} {'err fp8':>9} {'cudnn8 ms':>9} {'err cudnn8':>10} {'sage ms':>8} "
          f"{'err sage':>9} {'fa3 8 ms':>8} {'err fa3 8':>9} {'fa3 bf16':>8} {'stats':>6} "
          f"{'stats pt':>8}")
    for r in rows:
        print(f"{r['shape']:<9} {r['bf16_sdpa_ms']:>8.2f} {r.get('fp8_ms', nan):>8.2f} "
              f"{r.get('fp8_vs_bf16', nan):>6.3f} {r.get('fp8_quantize_ms', nan):>9.2f} "
              f"{r['bf16_rel_err_vs_fp32']:>9.2e} {r.get('fp8_rel_err_vs_fp32', nan):>9.2e} "
              f"{r.get('cudnn_fp8_ms', nan):>9.2f} "
              f"{r.get('cudnn_fp8_rel_err_vs_fp32', nan):>10.2e} "
              f"{r.get('sage_ms', nan):>8.2f} {r.get('sage_rel_err_vs_fp32', nan):>9.2e} "
              f"{r.get('fa3_fp8_ms', nan):>8.2f} {r.get('fa3_fp8_rel_err_vs_fp32', nan):>9.2e} "
              f"{r.get('fa3_bf16_ms', nan):>8.2f} {r.get('stats_ms', nan):>6.2f} "
              f"{r.get('stats_torch_ms', nan):>8.2f}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fp8_attention.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1)
                                            + "\n")


if __name__ == "__main__":
    main()
