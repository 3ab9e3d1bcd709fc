"""Avatar DiT forward side by side: the original Avatar-1.5 against ours in bf16 and INT8.

Everything runs on one GPU, with the same random weights, in one run. The shape is an ai2v
forward at 480p/93 frames:
- a reference latent (``num_ref_latents`` 1, ``ref_img_index`` 0);
- one condition latent;
- one speaker's whisper features, ``[1, 93, 5, 5, 1280]``.

The variants:
- **the original** ``LongCatVideoAvatarTransformer3DModel``, from the checkout given with
  ``--original`` (scratch, never committed). Its attention flags are set to
  ``enable_flashattn2``, with a ``flash_attn`` stand-in on cuDNN SDPA (see ``vs_original.py``).
  Without a flag its audio cross-attention silently does nothing.
- **ours bf16**.
- **ours INT8 as stored**: ``to_int8``; int8 weights, dequantized in every forward as the
  original's INT8 release does.
- **ours INT8 dequantized on load**: bf16 weights equal to ``bf16(q * bf16(s))``. It has the
  speed of bf16, so only its output error is reported.

Errors are relative to an fp32 forward of ours.

  PYTHONPATH=. python3 benchmarks/avatar_vs_original.py --original /path/to/LongCat-Video
  PYTHONPATH=. python3 benchmarks/avatar_vs_original.py --original ... --small   # CPU check
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import types
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from dit_forward import random_fill, rel, time_forward  # noqa: E402
from vs_original import flash_attn_standin  # noqa: E402

from longcat_tools.model import int8  # noqa: E402
from longcat_tools.runner.avatar_dit import LongCatVideoAvatarTransformer3DModel  # noqa: E402
from longcat_tools.synth_avatar import avatar_dit_config  # noqa: E402

# imported by the original's audio utilities next to the DiT's speaker map, never used by it
AUDIO_ONLY = ("librosa", "pyloudnorm", "scipy", "scipy.signal", "imageio", "torchvision")


def original_class(path: Path):
    import importlib.util

    sys.modules.setdefault("flash_attn", flash_attn_standin())
    for name in AUDIO_ONLY:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            sys.modules[name] = types.ModuleType(name)
    sys.path.insert(0, str(path))
    from longcat_video.modules.avatar.longcat_video_dit_avatar import (
        LongCatVideoAvatarTransformer3DModel as Original,
    )

    return Original


def build(cls, config: dict, device: str, dtype: torch.dtype):
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    cfg.update(enable_flashattn2=True, enable_flashattn3=False, enable_xformers=False,
               cp_split_hw=[1, 1])
    with torch.device("meta"):
        model = cls(**cfg)
    return torch.nn.Module.to(model, dtype).to_empty(device=device).eval().requires_grad_(False)


def inputs(config: dict, latent_hw: tuple[int, int], frames: int, device: str):
    """ai2v at the first step: [ref | cond | noise] latents, text, one speaker's audio."""
    g = torch.Generator(device=device).manual_seed(1)
    t_lat = (frames - 1) // 4 + 1
    x = torch.randn(1, 16, 1 + t_lat, *latent_hw, generator=g, device=device)
    y = torch.randn(1, 1, 512, config["caption_channels"], generator=g, device=device)
    mask = torch.zeros(1, 512, dtype=torch.long, device=device)
    mask[:, :180] = 1
    audio = torch.randn(1, frames, config.get("audio_window", 5), config["audio_block"],
                        config["audio_channel"], generator=g, device=device)
    t = torch.full((1, 1 + t_lat), 632.0, device=device)  # a bf16 value: every dtype sees it
    t[:, :2] = 0.0  # the reference and the condition latent are clean
    return (x, t, y, mask), {"num_cond_latents": 2, "audio_embs": audio, "num_ref_latents": 1,
                             "ref_img_index": 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--original", type=Path, required=True)
    ap.add_argument("--small", action="store_true", help="CPU logic check at tiny sizes")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    a = ap.parse_args()
    device = "cpu" if a.small else "cuda"
    dtype = torch.float32 if a.small else torch.bfloat16  # the original's fp32 regions: CUDA
    config = avatar_dit_config("avatar-1.5", "tiny" if a.small else "real")
    latent_hw, frames = ((4, 4), 9) if a.small else ((60, 104), 93)
    args, kwargs = inputs(config, latent_hw, frames, device)
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
            "torch": torch.__version__, "python": platform.python_version(),
            "shape": f"ai2v {frames} frames, latent {list(args[0].shape)}, ref + cond latent",
            "original": str(a.original)}
    rows, outs = [], {}
    start = time.perf_counter()

    def timed(name: str, model) -> None:
        call = lambda *xs: model(*xs, **kwargs)  # noqa: E731
        # what sits on the GPU besides this variant's forward (other models included)
        resident = torch.cuda.memory_allocated() / 2**30 if device == "cuda" else float("nan")
        med, times, peak, res, out = time_forward(call, args, device, a.reps)
        outs[name] = out.float().cpu()
        rows.append({"variant": name, "median_s": round(med, 4),
                     "times_s": [round(t, 4) for t in times], "peak_alloc_gib": round(peak, 2),
                     "peak_reserved_gib": round(res, 2), "resident_before_gib": round(resident, 2)})
        print(json.dumps(rows[-1]), flush=True)

    ours = build(LongCatVideoAvatarTransformer3DModel, config, device, dtype)
    random_fill(ours, device, seed=0)
    orig = build(original_class(a.original), config, device, dtype)
    orig.load_state_dict(ours.state_dict(), strict=True)
    timed("original bf16", orig)
    del orig
    if device == "cuda":
        torch.cuda.empty_cache()
    timed("ours bf16", ours)
    ref = build(LongCatVideoAvatarTransformer3DModel, config, device, torch.float32)
    ref.load_state_dict(ours.state_dict())
    timed("ours fp32", ref)
    with torch.no_grad():  # INT8 dequantized on load: bf16(q * bf16(s)) into a bf16 copy
        for name, p in ref.named_parameters():
            module = name.rpartition(".")[0]
            if name.endswith(".weight") and int8.is_quantized(module, tuple(p.shape)):
                q, s = int8.quantize(dict(ours.named_parameters())[name])
                p.copy_(int8.dequantize(q, s, dtype))
    ref = torch.nn.Module.to(ref, dtype)
    timed("ours INT8 dequantized on load", ref)
    del ref
    ours.to_int8()
    timed("ours INT8 as stored", ours)
    base = rows[0]["median_s"]
    for r in rows:
        r["ratio_to_original"] = round(r["median_s"] / base, 3)
        r["rel_err_vs_fp32"] = rel(outs[r["variant"]], outs["ours fp32"])
    info["total_wall_s"] = round(time.perf_counter() - start, 1)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "avatar_vs_original.json").write_text(
        json.dumps({"info": info, "rows": rows}, indent=1))
    print(f"\n{'variant':<32} {'time (s)':>9} {'vs orig':>8} {'peak GiB':>9} {'err vs fp32':>12}")
    for r in rows:
        print(f"{r['variant']:<32} {r['median_s']:>9.3f} {r['ratio_to_original']:>8.3f} "
              f"{r['peak_alloc_gib']:>9} {r['rel_err_vs_fp32']:>12.3e}")


if __name__ == "__main__":
    main()
