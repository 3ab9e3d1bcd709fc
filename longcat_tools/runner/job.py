"""One ``longcat-tools run``: validate everything up front, load, run the task (and optional
refinement), write the mp4 and its JSON sidecar. The CLI only parses options and prints."""

from __future__ import annotations

import json
import platform
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from longcat_tools.checkpoint import layouts
from longcat_tools.errors import LongcatError
from longcat_tools.io.atomic import atomic_write_text
from longcat_tools.model import bsa_presets
from longcat_tools.runner import context_parallel
from longcat_tools.runner.pipeline import DEFAULT_NEGATIVE_PROMPT, TASKS, Pipeline, Reporter

BSA_CHOICES = ("config", "on", "off", *bsa_presets.PRESETS)


@dataclass
class RunSettings:
    model: str
    task: str
    prompt: str = ""
    out: str = "output.mp4"
    image: str | None = None
    video: str | None = None
    negative_prompt: str | None = None  # None: the demos' Wan-style prompt when guidance > 1
    distill: bool = False
    refine: bool = False
    bsa: str = "config"
    steps: int | None = None
    guidance: float | None = None
    seed: int = 42
    resolution: str = "480p"
    height: int | None = None
    width: int | None = None
    frames: int = 93
    fps: float | None = None
    num_cond_frames: int | None = None
    segments: int = 2
    kv_cache: bool = True
    offload_kv_cache: bool = False
    offload: str = "none"  # runner.offload: none, text-encoder, dit, all
    vae_tiling: bool = False
    enhance_hf: bool | None = None
    t_thresh: float = 0.5
    spatial_refine_only: bool = False
    refine_height: int | None = None
    refine_width: int | None = None
    device: str = "auto"
    dtype: str | None = None
    save_latents: str | None = None
    latents_in: str | None = None
    cp: int = 1  # context-parallel processes (runner.context_parallel); this is one of them
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise LongcatError(f"--device {device}: not a device (use auto, cpu, cuda or "
                           "cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LongcatError(f"--device {device}: no CUDA GPU is available here (use --device cpu)")
    return dev


def bsa_setting(choice: str, task_default: bool) -> Any:
    """--bsa -> the pipeline's ``bsa`` argument (None: the config decides, False/True/params)."""
    if choice not in BSA_CHOICES:
        raise LongcatError(f"--bsa {choice}: unknown (choose from {', '.join(BSA_CHOICES)})")
    if choice == "config":
        return True if task_default else None
    if choice == "off":
        return False
    if choice == "on":
        return True
    p = bsa_presets.PRESETS[choice]
    return dict(p.params) if p.enable_bsa and p.params else False


def validate(s: RunSettings) -> None:
    """Every check that needs no model: one clear line per problem, before any loading."""
    if s.task not in TASKS:
        raise LongcatError(f"--task {s.task}: unknown (choose from {', '.join(TASKS)})")
    layouts.detect(layouts.resolve_model(s.model))
    if s.task == "i2v" and not s.image:
        raise LongcatError("--task i2v needs --image FILE (the first frame)")
    if s.task in ("vc", "refine") and not s.video:
        what = "the video to continue" if s.task == "vc" else "the stage-1 video"
        raise LongcatError(f"--task {s.task} needs --video FILE ({what})")
    for opt, path in (("--image", s.image), ("--video", s.video), ("--latents-in", s.latents_in)):
        if path and not Path(path).is_file():
            raise LongcatError(f"{opt} {path}: no such file")
    if s.frames < 1 or s.frames % 4 != 1:
        raise LongcatError(f"--frames {s.frames}: must be 4k+1 (e.g. 93, 45, 9): the VAE packs 4 "
                           "frames per latent after the first")
    if s.num_cond_frames is not None and (s.num_cond_frames < 0 or (
            s.task != "refine" and (s.num_cond_frames % 4 != 1
                                    or s.num_cond_frames >= s.frames))):
        raise LongcatError(f"--cond-frames {s.num_cond_frames}: must be 4k+1 and below --frames")
    if (s.height is None) != (s.width is None):
        raise LongcatError("--height and --width go together (or use --resolution)")
    if (s.refine_height is None) != (s.refine_width is None):
        raise LongcatError("--refine-height and --refine-width go together")
    for h, w, opt in ((s.height, s.width, "--height/--width"),
                      (s.refine_height, s.refine_width, "--refine-height/--refine-width")):
        if h is not None and (h <= 0 or w <= 0 or h % 16 or w % 16):
            raise LongcatError(f"{opt} {h}x{w}: both must be positive multiples of 16 px "
                               "(VAE 8x times DiT patch 2)")
    if s.resolution not in ("480p", "720p"):
        raise LongcatError(f"--resolution {s.resolution}: use 480p or 720p")
    if s.steps is not None and s.steps < 1:
        raise LongcatError(f"--steps {s.steps}: must be at least 1")
    if s.guidance is not None and s.guidance < 0:
        raise LongcatError(f"--guidance {s.guidance}: must be >= 0 (1 disables CFG)")
    if not 0 < s.t_thresh <= 1:
        raise LongcatError(f"--t-thresh {s.t_thresh}: must be in (0, 1]")
    if s.fps is not None and s.fps <= 0:
        raise LongcatError(f"--fps {s.fps}: must be positive")
    if s.offload not in ("none", "text-encoder", "dit", "all"):
        raise LongcatError(f"--offload {s.offload}: unknown (use none, text-encoder, dit or all)")
    if s.task == "vc" and s.distill and s.enhance_hf:
        raise LongcatError("--enhance-hf cannot be combined with --distill")
    if not s.out.endswith(".mp4"):
        raise LongcatError(f"--out {s.out}: the output is an H.264 .mp4 file")
    if s.segments < 0:
        raise LongcatError(f"--segments {s.segments}: must be >= 0")
    if s.cp < 1:
        raise LongcatError(f"--cp {s.cp}: must be at least 1")
    if s.cp > 1:  # every DiT forward needs a latent frame per rank (runner.context_parallel)
        if (s.frames - 1) // 4 + 1 < s.cp:
            raise LongcatError(f"--frames {s.frames}: {(s.frames - 1) // 4 + 1} latent frames "
                               f"cannot be split over {s.cp} processes (use at least "
                               f"{4 * s.cp - 3} frames, or fewer GPUs)")
        cond = s.num_cond_frames or 13
        if s.task in ("vc", "long") and s.kv_cache and (cond - 1) // 4 + 1 < s.cp:
            raise LongcatError(f"--cond-frames {cond}: the KV cache pass over "
                               f"{(cond - 1) // 4 + 1} latent frames cannot be split over "
                               f"{s.cp} processes (use --no-kv-cache or fewer GPUs)")
    bsa_setting(s.bsa, False)
    resolve_device(s.device)


def _peak_memory(device: torch.device) -> dict[str, int]:
    out = {"cpu_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        out["gpu_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return out


def _stride(src_fps: float, target: float) -> int:
    return max(1, round(src_fps / target)) if src_fps else 1


def run_job(s: RunSettings, reporter: Reporter, say=lambda _t: None) -> dict[str, Any]:
    """Run ``s`` end to end; returns the sidecar document (also written next to the mp4).
    With ``s.cp > 1`` this process is one rank of a job (runner.launch or torchrun started
    them all); only rank 0 writes."""
    validate(s)
    t_start = time.perf_counter()
    cp, device = context_parallel.init(s.cp, resolve_device(s.device))
    # no clean-up on failure: the failing rank exits and the launcher stops the others
    doc = _run(s, reporter, say, cp, device, t_start)
    context_parallel.finish(cp)
    return doc


def _run(s: RunSettings, reporter: Reporter, say, cp, device: torch.device,
         t_start: float) -> dict[str, Any]:
    from PIL import Image
    from safetensors.torch import load_file, save_file

    from longcat_tools.runner import video as vio

    dtype = s.dtype or ("bf16" if device.type == "cuda" else "fp32")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    root = layouts.resolve_model(s.model)
    image = vio.read_image(s.image) if s.image else None
    in_frames, in_fps = vio.read_video(s.video) if s.video else ([], 0.0)
    init = None
    if s.latents_in:
        doc = load_file(s.latents_in)
        if "latents" not in doc:
            raise LongcatError(f"--latents-in {s.latents_in}: no tensor named 'latents'")
        init = doc["latents"]
    say(f"loading {root} on {device} ({dtype})")
    pipe = Pipeline.load(root, device=device, dtype=dtype, reporter=reporter, offload=s.offload,
                         vae_tiling=s.vae_tiling, cp=cp)
    guidance = s.guidance if s.guidance is not None else (1.0 if s.distill else 4.0)
    neg = s.negative_prompt
    if neg is None and guidance > 1.0:
        neg = DEFAULT_NEGATIVE_PROMPT
    size = {"height": s.height, "width": s.width}
    bsa = bsa_setting(s.bsa, s.task == "refine")
    common = dict(prompt=s.prompt, steps=s.steps, guidance=s.guidance, distill=s.distill,
                  seed=s.seed, bsa=bsa)
    gen = pipe.generator(s.seed)
    ncf = s.num_cond_frames
    fps_out = 15
    say(f"task {s.task}" + (" (distilled)" if s.distill else "") + (" + refine" if s.refine
                                                                       else ""))
    if s.task == "t2v":
        r = pipe.t2v(negative_prompt=neg, height=s.height or 480, width=s.width or 832,
                     num_frames=s.frames, generator=gen, latents=init, **common)
        frames = r.frames
    elif s.task == "i2v":
        r = pipe.i2v(image, negative_prompt=neg, resolution=s.resolution, num_frames=s.frames,
                     generator=gen, latents=init, **size, **common)
        frames = r.frames
    elif s.task == "vc":
        src = in_frames[::_stride(in_fps, 15)]
        ncf = ncf or 13
        r = pipe.vc(src, negative_prompt=neg, resolution=s.resolution, num_frames=s.frames,
                    num_cond_frames=ncf, generator=gen, latents=init, use_kv_cache=s.kv_cache,
                    offload_kv_cache=s.offload_kv_cache, enhance_hf=s.enhance_hf, **size,
                    **common)
        out_size = (r.frames.shape[2], r.frames.shape[1])
        head = np.stack([np.asarray(f.convert("RGB").resize(out_size, Image.BICUBIC))
                         for f in src]).astype(np.float32) / 255.0
        frames = np.concatenate([head, r.frames[ncf:]])
    elif s.task == "long":
        r = pipe.long(negative_prompt=neg, video=in_frames[::_stride(in_fps, 15)] or None,
                      height=s.height or 480, width=s.width or 832, num_frames=s.frames,
                      num_cond_frames=ncf or 13, num_segments=s.segments, generator=gen,
                      latents=init, refine=s.refine, refine_height=s.refine_height,
                      refine_width=s.refine_width, t_thresh=s.t_thresh,
                      spatial_refine_only=s.spatial_refine_only, use_kv_cache=s.kv_cache,
                      offload_kv_cache=s.offload_kv_cache, **common)
        frames, fps_out = r.frames, r.fps
    else:  # refine
        r = pipe.refine(in_frames, s.prompt, image=image, num_cond_frames=ncf or 0,
                        height=s.height, width=s.width, steps=s.steps or 50,
                        t_thresh=s.t_thresh, spatial_refine_only=s.spatial_refine_only,
                        generator=gen, latents=init, bsa=bsa)
        frames, fps_out = r.frames, r.fps
    stage1_info = dict(r.info)
    if s.refine and s.task in ("t2v", "i2v", "vc"):
        say("refine: 720p with the refinement LoRA and BSA")
        stage1 = [Image.fromarray(f) for f in (r.frames * 255).astype(np.uint8)]
        kw: dict[str, Any] = {}
        if s.task == "i2v":
            kw = {"image": image, "num_cond_frames": 1}
        elif s.task == "vc":
            kw = {"video": in_frames[::_stride(in_fps, 30)],
                  "num_cond_frames": ncf if s.spatial_refine_only else 2 * ncf}
        r = pipe.refine(stage1, s.prompt, height=s.refine_height, width=s.refine_width,
                        t_thresh=s.t_thresh, spatial_refine_only=s.spatial_refine_only,
                        generator=gen, bsa=bsa_setting(s.bsa, True), **kw)
        frames, fps_out = r.frames, r.fps
    fps = s.fps or fps_out
    out = Path(s.out)
    with reporter.stage("write"):
        if pipe.is_main:
            vio.write_mp4(out, frames, fps)
        if s.save_latents and pipe.is_main:
            save_file({"latents": r.latents.detach().float().cpu().contiguous()}, s.save_latents,
                      metadata={"task": s.task, "seed": str(s.seed)})
    sidecar = {
        "output": str(out), "task": s.task, "settings": {**asdict(s), "dtype": dtype,
                                                         "device": str(device)},
        "seed": s.seed, "negative_prompt": neg, "guidance": guidance,
        "video": {"frames": int(frames.shape[0]), "height": int(frames.shape[1]),
                  "width": int(frames.shape[2]), "fps": fps, "codec": "h264",
                  "pix_fmt": "yuv420p"},
        "stage1": stage1_info, "final": dict(r.info),
        "bsa": r.info.get("bsa"), "loras": r.info.get("loras", []),
        "checkpoint": {"path": str(root), "layout": pipe.layout},
        "timings_s": {k: round(v, 3) for k, v in reporter.timings.items()},
        "total_s": round(time.perf_counter() - t_start, 3),
        "peak_memory": _peak_memory(device),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    if pipe.is_main:
        atomic_write_text(Path(f"{out}.json"), json.dumps(sidecar, indent=2, default=str) + "\n")
    return sidecar
