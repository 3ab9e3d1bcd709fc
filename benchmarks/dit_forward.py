"""One DiT forward of the real 13.58B LongCat config on one GPU, with random bf16 weights.

Builds ``runner.dit.LongCatDiT`` from the real config directly on the GPU (no checkpoint, no
download), then times one forward (B=1, 512 text tokens, timestep 500) at the shapes of SPEC §6:
480p/93 frames dense (24x30x52 tokens), 720p refine/93 frames (24x44x80) dense and with BSA.
Median of ``--repeats`` timed forwards after one warm-up, CUDA events; peak memory is
``torch.cuda.max_memory_allocated`` over the forward. The original cannot run on the device
(it needs flash-attn or xformers), so ratios are against the SPEC §6 figures (H100, torch 2.11),
and the table says so.

    PYTHONPATH=. python3 benchmarks/dit_forward.py --out results_dir [--small]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
from pathlib import Path

import torch

from longcat_tools.synth import dit_config
from runner.dit import LongCatDiT

# SPEC §6: the original LongCat-Video DiT, real config, random bf16 weights, one H100.
ORIGINAL = {"480p dense": (4.82, 30.3), "720p refine dense": (15.78, 36.4),
            "720p refine BSA 0.9375": (7.85, 36.4)}
CASES = [  # name, latent (T, H, W), BSA params or None
    ("480p dense", (24, 60, 104), None),
    ("720p refine BSA 0.9375", (24, 88, 160), {"sparsity": 0.9375, "chunk_3d_shape_q": [4, 4, 4],
                                               "chunk_3d_shape_k": [4, 4, 4]}),
    ("720p refine dense", (24, 88, 160), None),
]


def build(config: dict, device: str, dtype: torch.dtype) -> LongCatDiT:
    with torch.device("meta"):
        model = LongCatDiT(config)
    model = model.to(dtype).to_empty(device=device)  # never materialise fp32 first
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif p.dim() < 2:
                p.normal_(0, 0.02, generator=g)
            else:
                p.normal_(0, 1 / math.sqrt(math.prod(p.shape[1:])), generator=g)
    return model.eval()


def time_forward(model: LongCatDiT, latent: tuple[int, int, int], repeats: int,
                 device: str, dtype: torch.dtype) -> dict:
    T, H, W = latent
    caption = model.dims.caption_channels
    x = torch.randn(1, 16, T, H, W, device=device, dtype=dtype)
    y = torch.randn(1, 1, 512, caption, device=device, dtype=dtype)
    mask = torch.ones(1, 512, device=device, dtype=torch.long)
    t = torch.full((1,), 500.0, device=device)
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                start.record()
            out = model(x, t, y, mask)
            if device == "cuda":
                end.record()
                torch.cuda.synchronize()
                if i:
                    times.append(start.elapsed_time(end) / 1000)
            elif i:
                times.append(float("nan"))
    finite = bool(torch.isfinite(out).all())
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return {"tokens": T * (H // 2) * (W // 2), "seconds": statistics.median(times),
            "all_seconds": times, "peak_gib": peak, "finite": finite}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="tiny config on CPU: checks the script")
    args = ap.parse_args()
    device = "cpu" if args.small else "cuda"
    dtype = torch.float32 if args.small else torch.bfloat16
    config = dit_config("tiny" if args.small else "real")
    cases = [(n, (2, 8, 8) if args.small else lat, bsa) for n, lat, bsa in CASES]
    model = build(config, device, dtype)
    rows = []
    for name, latent, bsa in cases:
        if bsa:
            model.enable_bsa(bsa)
        else:
            model.disable_bsa()
        r = time_forward(model, latent, args.repeats, device, dtype)
        ref_s, ref_gib = ORIGINAL[name]
        rows.append({"case": name, "latent": list(latent), **r, "original_seconds": ref_s,
                     "original_peak_gib": ref_gib, "ratio_to_original": r["seconds"] / ref_s})
        print(f"{name:24s} {r['tokens']:>7,} tokens  {r['seconds']:7.3f} s  "
              f"peak {r['peak_gib']:6.1f} GiB  vs original {r['seconds'] / ref_s:5.2f}x  "
              f"finite={r['finite']}", flush=True)
    env = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "params": sum(p.numel() for p in model.parameters()), "dtype": str(dtype),
           "baseline": "SPEC §6 figures for the original (it cannot run here: no flash-attn)"}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dit_forward.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    lines = [f"# DiT forward, real config, random bf16 weights ({env['gpu']}, torch "
             f"{env['torch']}, {env['date']})", "",
             f"{env['params']:,} parameters; B=1, 512 text tokens, timestep 500; median of "
             f"{args.repeats} after one warm-up. Baseline: {env['baseline']}.", "",
             "| case | tokens | ours s | peak GiB | original s | original GiB | ours / original |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['tokens']:,} | {r['seconds']:.3f} | {r['peak_gib']:.1f}"
                     f" | {r['original_seconds']} | {r['original_peak_gib']} | "
                     f"{r['ratio_to_original']:.2f}x |")
    (args.out / "dit_forward.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
