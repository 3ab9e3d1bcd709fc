"""End-to-end pipeline time per stage: t2v 480p (50 steps, CFG), distill (16 steps), distill+refine.

Runs the ``runner`` pipeline on a checkpoint (any layout; for real-size random weights make one
with ``longcat-tools synth --preset real``) and reports, per scenario and memory option, the
seconds spent in each stage (text encoder, denoise, VAE, ...) and the peak GPU memory.

  PYTHONPATH=. python3 benchmarks/pipeline.py -m CKPT --device cuda --offload none,all
  PYTHONPATH=. python3 benchmarks/pipeline.py -m TINY --device cpu --small    # logic check
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runner import load_pipeline  # noqa: E402
from runner.pipeline import Reporter  # noqa: E402

# name: (t2v kwargs, refine after it)
SCENARIOS = {
    "t2v 480p 50 steps CFG": (dict(steps=50, guidance=4.0, distill=False), False),
    "t2v 480p distill 16 steps": (dict(steps=16, guidance=1.0, distill=True), False),
    "t2v 480p distill + refine 720p": (dict(steps=16, guidance=1.0, distill=True), True),
}


def run_scenario(pipe, kw: dict, refine: bool, size: dict, refine_size: dict | None,
                 refine_steps: int) -> dict:
    pipe.reporter = Reporter()
    cuda = pipe.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    r = pipe.t2v(prompt="a red panda eating bamboo in the snow", seed=0, **size, **kw)
    if refine:
        from PIL import Image

        stage1 = [Image.fromarray(f) for f in (r.frames * 255).astype("uint8")]
        pipe.refine(stage1, "a red panda eating bamboo in the snow", steps=refine_steps,
                    **(refine_size or {}))
    if cuda:
        torch.cuda.synchronize()
    return {"total_s": round(time.perf_counter() - t0, 2),
            "stages_s": {k: round(v, 2) for k, v in pipe.reporter.timings.items()},
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--offload", default="none", help="comma-separated runner.offload choices")
    ap.add_argument("--vae-tiling", action="store_true")
    ap.add_argument("--scenarios", default=None, help="comma-separated names (default: all)")
    ap.add_argument("--small", action="store_true",
                    help="tiny sizes and 1-2 steps (logic check on a tiny checkpoint)")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    a = ap.parse_args()

    dtype = a.dtype or ("bf16" if a.device.startswith("cuda") else "fp32")
    size = dict(height=32, width=32, num_frames=5) if a.small else \
        dict(height=480, width=832, num_frames=93)
    refine_size = dict(height=48, width=48) if a.small else None
    scenarios = SCENARIOS
    if a.scenarios:
        scenarios = {k: v for k, v in SCENARIOS.items() if k in a.scenarios.split(",")}
    rows = []
    for offload in a.offload.split(","):
        t0 = time.perf_counter()
        pipe = load_pipeline(a.model, device=a.device, dtype=dtype, offload=offload,
                             vae_tiling=a.vae_tiling)
        load_s = round(time.perf_counter() - t0, 1)
        for name, (kw, refine) in scenarios.items():
            kw = dict(kw, steps=min(kw["steps"], 2)) if a.small else kw
            row = {"scenario": name, "offload": offload, "vae_tiling": a.vae_tiling,
                   "load_s": load_s,
                   **run_scenario(pipe, kw, refine, size, refine_size, 1 if a.small else 50)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        del pipe
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
           "torch": torch.__version__, "model": str(a.model), "small": a.small, "rows": rows}
    (out / "pipeline.json").write_text(json.dumps(doc, indent=1))
    print("| scenario | offload | total (s) | peak (GiB) | stages (s) |\n|---|---|---|---|---|")
    for r in rows:
        stages = ", ".join(f"{k} {v}" for k, v in r["stages_s"].items())
        print(f"| {r['scenario']} | {r['offload']} | {r['total_s']} | {r['peak_gib']} | "
              f"{stages} |")


if __name__ == "__main__":
    main()
