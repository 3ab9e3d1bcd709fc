"""fp8 forward with the glue writing its GEMM inputs as e4m3 rows, or in bf16 for the GEMMs to
scale (``runner.fast_ops.E4M3_GLUE``), alternating on one model so that neither gets the cooler
GPU: time and peak memory at 480p/93 dense and 720p refine/93 BSA.

  PYTHONPATH=. python3 benchmarks/fp8_glue.py      # on the GPU: a table, fp8_glue_ab.json

Real 13.58B config, random bf16 weights quantized by ``to_fp8`` (the run's defaults otherwise:
fused glue, dense attention by the default fp8 kernel), B=1. Three rounds per shape, each timing
both settings (two forwards each, the first round after a warm-up), their order swapped from
round to round.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bsa_ab import rotated  # noqa: E402
from dit_forward import SHAPES, build, inputs, time_forward  # noqa: E402
from vs_original import BSA  # noqa: E402

from longcat_tools.runner import fast_ops  # noqa: E402


def main() -> None:
    model = build("real", None, "cuda", torch.bfloat16, seed=0)
    model.enable_fast_ops(True)
    model.to_fp8()
    rows = []
    out = Path(os.environ.get("OUT", "benchmarks/results"))
    out.mkdir(parents=True, exist_ok=True)
    try:
        measure(model, rows, out)
    finally:
        fast_ops.E4M3_GLUE = True
    summary(rows)


def measure(model, rows: list[dict], out: Path) -> None:
    """Three rounds per shape, both settings each, the order swapped between rounds; the JSON
    rewritten after every row."""
    for shape in ("480p/93 dense", "720p refine/93 BSA 0.9375"):
        latent, bsa = SHAPES[shape]
        args = inputs(latent, model.dims.caption_channels, "cuda", seed=1)
        model.enable_bsa(BSA) if bsa else model.disable_bsa()
        for rnd in range(3):
            for on in rotated([True, False], rnd):
                fast_ops.E4M3_GLUE = on
                med, times, peak, _, y = time_forward(model, args, "cuda", 2, warm_up=rnd == 0)
                del y
                rows.append({"shape": shape, "glue_e4m3": on, "rep": rnd, "median_s": round(med, 4),
                             "times_s": [round(t, 4) for t in times],
                             "peak_alloc_gib": round(peak, 2)})
                print(json.dumps(rows[-1]), flush=True)
                (out / "fp8_glue_ab.json").write_text(json.dumps(
                    {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                     "rows": rows}, indent=1))


def summary(rows: list[dict]) -> None:
    print(f"\n{'shape':<28} {'glue writes':<12} {'mean of medians':>16} {'peak GiB':>9}")
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for on in (True, False):
            mine = [r for r in rows if r["shape"] == shape and r["glue_e4m3"] == on]
            mean = sum(r["median_s"] for r in mine) / len(mine)
            print(f"{shape:<28} {'e4m3' if on else 'bf16':<12} {mean:>16.4f} "
                  f"{mine[0]['peak_alloc_gib']:>9}")


if __name__ == "__main__":
    main()
