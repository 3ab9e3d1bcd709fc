"""The VAE decode of a 480p/93 video (diffusers' ``AutoencoderKLWan`` at LongCat's size, random
weights, bf16): as the pipeline runs it, and with the Conv3d weights in ``channels_last_3d``
(``runner.pipeline.VAE_CONFIG``). cuDNN's autotuner, timed here once, changed nothing and went.

Other Wan-family runners report that channels-last 3D convs move the decoder off slow
vol2col paths onto cuDNN's kernels; whether that holds for this VAE on this GPU is what this
measures. Each variant's frames are compared with the default's (the algorithms differ, so
the bits may too).

  PYTHONPATH=. python3 benchmarks/vae_decode.py                  # GPU: prints a table, JSON
  PYTHONPATH=. python3 benchmarks/vae_decode.py --small --device cpu   # logic check
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import torch

VARIANTS = {"default": {}, "channels_last": {"channels_last": 1}}


def decode_s(vae, z, reps: int, device: str) -> tuple[float, torch.Tensor]:
    """Median seconds of ``reps`` decodes after one warm-up, and the frames."""
    times = []
    for i in range(reps + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = vae.decode(z, return_dict=False)[0]
        if device == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], out


def main() -> None:
    from diffusers import AutoencoderKLWan

    from longcat_tools.runner import pipeline
    from longcat_tools.synth_components import vae_config
    from longcat_tools.synth_presets import PRESETS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny VAE and latents (CPU check)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    a = ap.parse_args()
    preset = PRESETS["tiny" if a.small else "real"]
    cfg = {k: v for k, v in vae_config(preset).items() if not k.startswith("_")}
    torch.manual_seed(0)
    dtype = torch.float32 if a.device == "cpu" else torch.bfloat16
    vae = AutoencoderKLWan(**cfg).to(a.device, dtype).eval()
    shape = (1, 16, 3, 4, 6) if a.small else (1, 16, 24, 60, 104)  # 480p/93
    z = torch.randn(*shape, device=a.device, dtype=dtype)
    saved = dict(pipeline.VAE_CONFIG)
    rows, base = [], None
    for name, settings in VARIANTS.items():
        pipeline.VAE_CONFIG.update({**saved, **settings})
        pipeline.conv3d_memory_format(vae, bool(pipeline.VAE_CONFIG["channels_last"]))
        if a.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        s, frames = decode_s(vae, z, a.reps, a.device)
        base = frames if base is None else base
        diff = ((frames.float() - base.float()).norm() / base.float().norm()).item()
        rows.append({"variant": name, **settings, "decode_s": round(s, 3),
                     "rel_diff_vs_default": diff,
                     "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
                     if a.device == "cuda" else None})
        print(json.dumps(rows[-1]), flush=True)
    pipeline.VAE_CONFIG.update(saved)
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(0) if a.device == "cuda"
            else platform.processor(), "torch": torch.__version__,
            "cudnn": torch.backends.cudnn.version(), "latents": list(shape),
            "dtype": str(dtype).split(".")[-1]}
    print(f"\n{'variant':<16} {'decode s':>9} {'vs default':>11} {'rel diff':>9}")
    for r in rows:
        print(f"{r['variant']:<16} {r['decode_s']:>9.3f} "
              f"{r['decode_s'] / rows[0]['decode_s']:>11.3f} {r['rel_diff_vs_default']:>9.2e}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vae_decode.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1)
                                         + "\n")


if __name__ == "__main__":
    main()
