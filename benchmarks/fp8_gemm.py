"""The DiT's e4m3 GEMMs (``kernels.fp8.linear``) with and without the tensor cores' fast
accumulation (``kernels.fp8.FAST_ACCUM``), alternating on one GPU: time, TFLOP/s, and the
relative error of each against float32 products of the same e4m3 operands.

  PYTHONPATH=. python3 benchmarks/fp8_gemm.py        # on the GPU: a table, fp8_gemm.json

Shapes: one 480p/93 forward's tokens (37,440) through the real config's linear layers (hidden
4096, SwiGLU width 11008), random unit-variance activations and N(0, 0.02) weights quantized as
``to_fp8`` does. Three rounds, the order of the two settings swapped each round.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bsa_ab import rotated  # noqa: E402

from longcat_tools.kernels import fp8  # noqa: E402
from longcat_tools.model.keymap import RELEASE_DIMS  # noqa: E402

TOKENS = 24 * 30 * 52
H, F = RELEASE_DIMS.hidden_size, RELEASE_DIMS.ffn_hidden
SHAPES = {"qkv": (H, 3 * H), "proj / cross q": (H, H), "w1, w3": (H, F), "w2": (F, H)}


def measure(name: str, K: int, N: int, g: torch.Generator) -> list[dict]:
    """One GEMM shape: both settings, three alternating rounds; a row per setting."""
    import triton.testing

    x = torch.randn(TOKENS, K, device="cuda", generator=g).bfloat16()
    w, scale = fp8.quantize_weight((torch.randn(N, K, device="cuda", generator=g) * 0.02)
                                   .bfloat16())
    rows_in = fp8.quantize_input(x)
    exact = (rows_in.q.float() * rows_in.scale) @ fp8.dequantize_weight(w, scale).t()
    times: dict[bool, list[float]] = {False: [], True: []}
    errs, saved = {}, fp8.FAST_ACCUM
    try:
        for rnd in range(3):
            for fast in rotated([False, True], rnd):
                fp8.FAST_ACCUM = fast
                times[fast].append(triton.testing.do_bench(
                    lambda: fp8.linear(rows_in, w, scale), warmup=25, rep=200,
                    return_mode="median"))
                y = fp8.linear(rows_in, w, scale).float()
                errs[fast] = ((y - exact).norm() / exact.norm()).item()
    finally:
        fp8.FAST_ACCUM = saved
    flop = 2 * TOKENS * K * N
    rows = []
    for fast in (False, True):
        ms = sorted(times[fast])[1]
        rows.append({"gemm": name, "K": K, "N": N, "M": TOKENS, "fast_accum": fast,
                     "median_ms": round(ms, 4), "times_ms": [round(t, 4) for t in times[fast]],
                     "tflops": round(flop / ms / 1e9, 1), "rel_err_vs_fp32": errs[fast]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    g = torch.Generator("cuda").manual_seed(0)
    rows = [row for name, (K, N) in SHAPES.items() for row in measure(name, K, N, g)]
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "tokens": TOKENS}
    print(f"\n{'gemm':<15} {'K':>6} {'N':>6} {'ms':>8} {'fast ms':>8} {'ratio':>6} "
          f"{'TFLOP/s':>8} {'fast':>8} {'err':>9} {'fast err':>9}")
    for slow, fast in zip(rows[::2], rows[1::2], strict=True):
        print(f"{slow['gemm']:<15} {slow['K']:>6} {slow['N']:>6} {slow['median_ms']:>8.3f} "
              f"{fast['median_ms']:>8.3f} {fast['median_ms'] / slow['median_ms']:>6.3f} "
              f"{slow['tflops']:>8.1f} {fast['tflops']:>8.1f} {slow['rel_err_vs_fp32']:>9.2e} "
              f"{fast['rel_err_vs_fp32']:>9.2e}")
    out = Path(os.environ.get("OUT", "benchmarks/results"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "fp8_gemm.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
