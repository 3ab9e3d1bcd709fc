"""One DiT forward split over N GPUs (context parallel) vs the same forward on one GPU.

Run under torchrun. Every rank builds the real 13.58B config with the same random bf16 weights
(as ``dit_forward.py``: no download) and the fused glue on. Per shape, rank 0 first times the
forward alone (the other ranks wait), then all ranks time it split; the table gives both times,
the speed-up, each rank's peak memory and the split output's difference from the one-GPU output.

  torchrun --nproc-per-node 2 benchmarks/cp_forward.py            # on a 2-GPU machine
  torchrun --nproc-per-node 2 benchmarks/cp_forward.py --small    # logic check on CPU (gloo)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_forward import SHAPES, SMALL_SHAPES, build, inputs, rel, time_forward  # noqa: E402

from longcat_tools.runner import context_parallel  # noqa: E402


def save(info: dict, rows: list[dict], out: str) -> str:
    """Write the JSON and the markdown table (after every shape: a cut-off run keeps its rows)."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "cp_forward.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    n = info["gpus"]
    lines = [f"# DiT forward over {n} GPUs vs one, {info['device']}, torch {info['torch']}, "
             f"{info['date']}", "",
             f"| shape | tokens | 1 GPU (s) | 1 GPU peak (GiB) | {n} GPUs (s) | speed-up | "
             "peak per GPU (GiB) | rel err vs 1 GPU |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['tokens']:,} | {r['one_gpu_s']:.3f} | "
                     f"{r['one_gpu_peak_gib']:.1f} | {r['split_s']:.3f} | {r['speedup']:.2f}x | "
                     f"{' / '.join(f'{p:.1f}' for p in r['split_peak_gib_per_rank'])} | "
                     f"{r['rel_err_split_vs_one_gpu']:.1e} |")
    md = "\n".join(lines) + "\n"
    (out_dir / "cp_forward.md").write_text(md)
    return md


def exact_check(cp: context_parallel.ContextParallel, dev: torch.device) -> dict[str, float]:
    """Split vs one GPU in fp32 at real width: differences are fp32 rounding or a bug."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    model = build("real", 2, str(dev), torch.float32, seed=3)
    out = {}
    for name, latent, bsa in (("fp32 dense 4x32x64", (16, 4, 32, 64), False),
                              ("fp32 BSA 0.75 8x32x64", (16, 8, 32, 64), True)):
        args = inputs(latent, model.dims.caption_channels, str(dev), seed=4)
        model.enable_bsa({"sparsity": 0.75}) if bsa else model.disable_bsa()
        with torch.inference_mode():
            model.enable_context_parallel(None)
            single = model(*args)
            model.enable_context_parallel(cp)
            split = model(*args)
        out[name] = rel(split, single)
    print("exact:", json.dumps(out), flush=True)
    del model
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="CPU logic check at tiny sizes (gloo)")
    ap.add_argument("--shapes", default="720p refine/93 BSA 0.9375",
                    help="comma-separated names from dit_forward.SHAPES")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--exact", action="store_true",
                    help="also: real width, 2 blocks, fp32 (TF32 off), small shapes: the split "
                    "must equal one GPU to fp32 rounding, dense and BSA")
    a = ap.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cp, dev = context_parallel.init(world, torch.device("cpu" if a.small else "cuda"))
    if cp is None:
        sys.exit("run this under torchrun with --nproc-per-node 2 or more")
    device = dev.type
    shapes = SMALL_SHAPES if a.small else {k: SHAPES[k] for k in a.shapes.split(",")}
    t0 = time.perf_counter()
    model = build("small" if a.small else "real", 2 if a.small else None, str(dev),
                  torch.bfloat16, seed=0)
    model.enable_fast_ops(not a.small)
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
        "gpus": cp.size, "torch": torch.__version__, "python": platform.python_version(),
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if device == "cuda" else None,
        "params": sum(p.numel() for p in model.parameters()), "dtype": "bf16", "batch": 1,
        "reps": a.reps, "build_s": round(time.perf_counter() - t0, 1),
        "split": "latent frames over ranks, Ulysses all-to-all around self-attention",
    }
    rows = []
    for name, (latent, bsa) in shapes.items():
        args = inputs(latent, model.dims.caption_channels, str(dev), seed=1)
        model.enable_bsa({"sparsity": 0.9375}) if bsa else model.disable_bsa()
        row = {"shape": name, "latent": list(latent),
               "tokens": latent[1] * latent[2] * latent[3] // 4}
        model.enable_context_parallel(None)
        single = None
        if cp.rank == 0:
            med, times, peak, _, single = time_forward(model, args, device, a.reps)
            row.update(one_gpu_s=round(med, 4), one_gpu_times_s=[round(t, 4) for t in times],
                       one_gpu_peak_gib=round(peak, 2))
            single = single.float().cpu()
        dist.barrier()
        if device == "cuda":
            torch.cuda.empty_cache()
        model.enable_context_parallel(cp)
        med, times, peak, _, out = time_forward(model, args, device, a.reps)
        peaks = [torch.zeros(1, device=dev) for _ in range(cp.size)]
        dist.all_gather(peaks, torch.tensor([peak], device=dev))
        if cp.rank == 0:
            row.update(split_s=round(med, 4), split_times_s=[round(t, 4) for t in times],
                       split_peak_gib_per_rank=[round(float(p), 2) for p in peaks],
                       speedup=round(row["one_gpu_s"] / med, 2),
                       rel_err_split_vs_one_gpu=rel(out.float().cpu(), single),
                       finite=bool(torch.isfinite(out).all()))
            rows.append(row)
            print(json.dumps(row), flush=True)
            save(info, rows, a.out)
        del out, single
        if device == "cuda":
            torch.cuda.empty_cache()
    if a.exact:
        info["exact"] = exact_check(cp, dev)
        save(info, rows, a.out)
    if cp.rank == 0:
        info["total_wall_s"] = round(time.perf_counter() - t0, 1)
        print(save(info, rows, a.out))
    context_parallel.finish(cp)


if __name__ == "__main__":
    main()
