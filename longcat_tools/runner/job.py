"""One ``longcat-tools run``: validate everything up front, load, run the task (and optional
refinement), write the mp4 and its JSON sidecar. The CLI only parses options and prints."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from longcat_tools.checkpoint import layouts
from longcat_tools.errors import LongcatError
from longcat_tools.io import jsonio
from longcat_tools.io.atomic import atomic_write_bytes, writer_lock
from longcat_tools.kernels import fp8_attention
from longcat_tools.runner import context_parallel
from longcat_tools.runner.lora import enable_run_adapters, run_adapters
from longcat_tools.runner.pipeline import (
    LongCatVideoPipeline,
    Reporter,
    Result,
    negative_prompt_of,
)
from longcat_tools.runner.settings import (
    AVATAR_TASKS,
    CONTINUE_FPS,
    DEFAULT_COND_FRAMES,
    FLAGS,
    FP8_ATTENTION,
    PRECISIONS,
    RunSettings,
    guidance_of,
    input_stamps,
    resolve_device,
    run_dtype,
    source_stride,
    spelled,
    validate,
    vc_refine_condition,
)

__all__ = ["RunSettings", "run_job", "validate"]


def _peak_memory(device: torch.device) -> dict[str, int]:
    out = {"cpu_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        out["gpu_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return out


@dataclass
class Job:
    """A loaded run: its settings, the pipeline and the inputs every task reads."""

    s: RunSettings
    root: Path
    pipe: LongCatVideoPipeline
    image: Image.Image | None
    in_frames: list[Image.Image]
    in_fps: float
    init: torch.Tensor | None  # --latents-in
    guidance: float  # what the pipeline uses when --guidance is left out
    negative_prompt: str | None
    generator: torch.Generator
    inputs: dict[str, list[int] | None]  # input_stamps, taken before the files were read
    audio: Any = None  # avatar tasks: the DrivingAudio (runner.avatar_pipeline)

    @property
    def cond_frames(self) -> int:
        """Condition frames of vc and long (DEFAULT_COND_FRAMES unless --cond-frames)."""
        return self.s.num_cond_frames or DEFAULT_COND_FRAMES

    def source(self, fps: float) -> list[Image.Image]:
        """The input video's frames at about ``fps`` (every n-th frame)."""
        return self.in_frames[::source_stride(self.in_fps, fps)]

    def common(self) -> dict[str, Any]:
        """The keywords t2v, i2v, vc and long share."""
        s = self.s
        return dict(prompt=s.prompt, negative_prompt=self.negative_prompt, steps=s.steps,
                    guidance=s.guidance, distill=s.distill, seed=s.seed, bsa=s.bsa,
                    num_frames=s.frames, generator=self.generator, latents=self.init,
                    lora_scale=s.lora_scale)


def _t2v(j: Job) -> tuple[Result, np.ndarray]:
    r = j.pipe.t2v(height=j.s.height or 480, width=j.s.width or 832, **j.common())
    return r, r.frames


def _i2v(j: Job) -> tuple[Result, np.ndarray]:
    r = j.pipe.i2v(j.image, resolution=j.s.resolution, height=j.s.height, width=j.s.width,
                   **j.common())
    return r, r.frames


def after_input(src: list[Image.Image], frames: np.ndarray, ncf: int) -> np.ndarray:
    """A continuation's video as the original's demos write it: the whole input (resized to the
    output's size), then the frames after the ``ncf`` condition frames."""
    size = (frames.shape[2], frames.shape[1])
    head = np.stack([np.asarray(f.convert("RGB").resize(size, Image.BICUBIC))
                     for f in src]).astype(np.float32) / 255.0
    return np.concatenate([head, frames[ncf:]])


def _vc(j: Job) -> tuple[Result, np.ndarray]:
    s, src, ncf = j.s, j.source(CONTINUE_FPS), j.cond_frames
    r = j.pipe.vc(src, resolution=s.resolution, height=s.height, width=s.width,
                  num_cond_frames=ncf, use_kv_cache=s.kv_cache,
                  offload_kv_cache=s.offload_kv_cache, enhance_hf=s.enhance_hf, **j.common())
    return r, after_input(src, r.frames, ncf)


def _long(j: Job) -> tuple[Result, np.ndarray]:
    s = j.s
    r = j.pipe.long(video=j.source(CONTINUE_FPS) or None, height=s.height or 480,
                    width=s.width or 832, num_cond_frames=j.cond_frames,
                    num_segments=s.segments, refine=s.refine,
                    refine_height=s.refine_height, refine_width=s.refine_width,
                    t_thresh=s.t_thresh, spatial_refine_only=s.spatial_refine_only,
                    use_kv_cache=s.kv_cache, offload_kv_cache=s.offload_kv_cache, **j.common())
    return r, r.frames


def _refine(j: Job) -> tuple[Result, np.ndarray]:
    s = j.s
    r = j.pipe.refine(j.in_frames, s.prompt, image=j.image, num_cond_frames=s.num_cond_frames or 0,
                      height=s.height or s.refine_height, width=s.width or s.refine_width,
                      steps=s.steps or 50, t_thresh=s.t_thresh,
                      spatial_refine_only=s.spatial_refine_only, generator=j.generator,
                      latents=j.init, bsa=s.bsa, lora_scale=s.lora_scale)
    return r, r.frames


def _avatar(j: Job, seconds: float, start: int, size: tuple[int, int] | None
            ) -> dict[str, Any]:
    """The keywords the avatar tasks share: the clip's audio windows from ``start`` (a video
    frame), the whole audio padded to ``seconds`` as the original pads it; two speakers: their
    default regions (left and right half) at the source ``size`` (width, height)."""
    from longcat_tools.runner.avatar_pipeline import speaker_masks

    s = j.s
    j.audio = j.pipe.audio_from_files(s.audio, s.audio_mode, s.vocal_separation, seconds, s.seed)
    kw = dict(prompt=s.prompt, negative_prompt=j.negative_prompt, steps=s.steps,
              guidance=s.guidance, audio_guidance=s.audio_guidance, distill=s.distill,
              seed=s.seed, num_frames=s.frames, generator=j.generator, lora_scale=s.lora_scale,
              audio_emb=j.audio.clip(start, s.frames))
    if len(s.audio) > 1 and size is not None:
        kw["ref_target_masks"] = speaker_masks(size[1], size[0])
    return kw


def _at2v(j: Job) -> tuple[Result, np.ndarray]:
    r = j.pipe.at2v(height=j.s.height or 480, width=j.s.width or 832,
                    **_avatar(j, j.s.frames / j.pipe.fps, 0, None))
    return r, r.frames


def _ai2v(j: Job) -> tuple[Result, np.ndarray]:
    r = j.pipe.ai2v(j.image, resolution=j.s.resolution, height=j.s.height, width=j.s.width,
                    **_avatar(j, j.s.frames / j.pipe.fps, 0, j.image.size))
    return r, r.frames


def _avc(j: Job) -> tuple[Result, np.ndarray]:
    """The audio covers the whole output: the input video (at the model's frame rate), then
    the new frames; the clip's audio starts where its condition frames do."""
    s, src, ncf = j.s, j.source(j.pipe.fps), j.cond_frames
    if len(src) < ncf:
        raise LongcatError(f"--video {s.video}: {len(src)} frames at {j.pipe.fps} fps; avc "
                           f"continues from the last {ncf} (--cond-frames): give a longer video "
                           "or a smaller --cond-frames (4k+1)")
    seconds = (len(src) + s.frames - ncf) / j.pipe.fps
    r = j.pipe.avc(src, resolution=s.resolution, height=s.height, width=s.width,
                   num_cond_frames=ncf, use_kv_cache=s.kv_cache,
                   offload_kv_cache=s.offload_kv_cache, enhance_hf=s.enhance_hf,
                   **_avatar(j, seconds, len(src) - ncf, src[0].size))
    return r, after_input(src, r.frames, ncf)


TASK_RUNS: dict[str, Callable[[Job], tuple[Result, np.ndarray]]] = {
    "t2v": _t2v, "i2v": _i2v, "vc": _vc, "long": _long, "refine": _refine,
    "at2v": _at2v, "ai2v": _ai2v, "avc": _avc}


def _vc_refine_condition(j: Job) -> dict[str, Any]:
    fps, frames = vc_refine_condition(j.s)
    return {"video": j.source(fps), "num_cond_frames": frames}


# --refine after these tasks: the condition the refinement stage gets (long refines by itself).
REFINE_CONDITION: dict[str, Callable[[Job], dict[str, Any]]] = {
    "t2v": lambda j: {},
    "i2v": lambda j: {"image": j.image, "num_cond_frames": 1},
    "vc": _vc_refine_condition,
}


def _check_finite(frames: np.ndarray) -> None:
    """Frames of NaN would be written as a garbage video: refuse them, before anything is
    written."""
    if not np.isfinite(frames).all():
        raise LongcatError("the video came out NaN or infinite, so nothing was written: the "
                           "weights or the inputs hold such values (`longcat-tools verify "
                           "--deep` finds weights that do)")


@spelled(FLAGS)
def run_job(s: RunSettings, reporter: Reporter, say=lambda _t: None) -> dict[str, Any]:
    """Run ``s`` end to end; returns the sidecar document (also written next to the mp4).
    With ``s.cp > 1`` this process is one rank of a job (runner.launch or torchrun started
    them all); only rank 0 writes."""
    validate(s)
    reporter.reset()  # a reporter given again: its timings are this run's alone
    t_start = time.perf_counter()
    cp, device = context_parallel.init(s.cp, resolve_device(s.device))
    # no clean-up on failure: the failing rank exits and the launcher stops the others
    with output_lock(s.out, cp is None or cp.rank == 0):
        doc = _run(s, reporter, say, cp, device, t_start)
    context_parallel.finish(cp)
    return doc


@contextlib.contextmanager
def output_lock(out: str, writes: bool = True) -> Iterator[None]:
    """The writer lock of a video (``.NAME.mp4.lock``) for its whole run, when this process
    ``writes`` it: a second run to the same --out is refused at once. Both wrote the same
    scratch file, and the mp4 published was neither's video."""
    if not writes:
        yield
        return
    Path(out).parent.mkdir(parents=True, exist_ok=True)  # missing folders are made, as documented
    with writer_lock(Path(out)):
        yield


def load_pipeline(s: RunSettings, reporter: Reporter, say: Callable[[str], None], cp: Any,
                  device: torch.device, dtype: str) -> tuple[Path, LongCatVideoPipeline]:
    """The checkpoint's folder and its pipeline, loaded as ``s`` says (the per-video settings
    of ``s`` do not matter: a matrix run loads once for all its videos)."""
    root = layouts.resolve_model(s.model)
    say(f"loading {root} on {device} ({dtype})")
    if s.task in AVATAR_TASKS:
        from longcat_tools.runner.avatar_pipeline import LongCatVideoAvatarPipeline

        return root, LongCatVideoAvatarPipeline.from_pretrained(
            root, torch_dtype=dtype, device=device, speakers=len(s.audio or ()), int8=s.int8,
            reporter=reporter, offload=s.offload, vae_tiling=s.vae_tiling)
    pipe = LongCatVideoPipeline.from_pretrained(root, torch_dtype=dtype, device=device,
                                                reporter=reporter, offload=s.offload,
                                                vae_tiling=s.vae_tiling, cp=cp,
                                                fp8=PRECISIONS[s.precision])
    pipe.transformer.fp8_attention = FP8_ATTENTION[s.fp8_attention]
    return root, pipe


def _job(s: RunSettings, root: Path, pipe: LongCatVideoPipeline) -> Job:
    """The inputs of one video: image, video frames, initial noise, guidance, generator."""
    from safetensors.torch import load_file

    from longcat_tools.runner import video as vio

    inputs = input_stamps(s)  # a file replaced while this video runs is not taken for its own
    image = vio.read_image(s.image) if s.image else None
    in_frames, in_fps = vio.read_video(s.video) if s.video else ([], 0.0)
    init = None
    if s.latents_in:
        doc = load_file(s.latents_in)
        if "latents" not in doc:
            raise LongcatError(f"--latents-in {s.latents_in}: no tensor named 'latents'")
        init = doc["latents"]
    guidance = guidance_of(s.guidance, s.distill)
    neg = negative_prompt_of(s.negative_prompt, guidance)
    if s.task in AVATAR_TASKS:
        from longcat_tools.runner.avatar_pipeline import NEGATIVE_PROMPT

        cfg = max(guidance, guidance_of(s.audio_guidance, s.distill)) > 1.0
        neg = s.negative_prompt if s.negative_prompt is not None else (
            NEGATIVE_PROMPT if cfg else None)
    return Job(s, root, pipe, image, in_frames, in_fps, init, guidance, neg,
               pipe.generator(s.seed), inputs)


def _age_at(t: float) -> float | None:
    """How old this process was at ``perf_counter() == t`` (Linux; None elsewhere). For a
    single run it is what ``total_s`` leaves out before it: the interpreter's start, the
    imports and the input checks."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        age = uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    return round(age - (time.perf_counter() - t), 2)


def settings_record(s: RunSettings, device: torch.device) -> dict[str, Any]:
    """The settings as the sidecar records them (a matrix run skips a video whose sidecar
    records the same)."""
    return {**asdict(s), "dtype": run_dtype(s.dtype, device), "device": str(device)}


def _run(s: RunSettings, reporter: Reporter, say, cp, device: torch.device,
         t_start: float) -> dict[str, Any]:
    dtype = run_dtype(s.dtype, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    root, pipe = load_pipeline(s, reporter, say, cp, device, dtype)
    return run_video(s, root, pipe, reporter, say, device, t_start)


def run_video(s: RunSettings, root: Path, pipe: LongCatVideoPipeline, reporter: Reporter,
              say: Callable[[str], None], device: torch.device,
              t_start: float) -> dict[str, Any]:
    """One video on a loaded pipeline: the task (and refinement), the mp4 and its sidecar
    (written sidecar first, mp4 last); returns the sidecar document."""
    from safetensors.torch import save

    from longcat_tools.runner import video as vio

    job = _job(s, root, pipe)
    pipe.transformer.lora_mode = s.lora_mode
    adapters = run_adapters(root, s.lora) if s.lora is not None else []
    if adapters:  # else the caller's own set stays (run_matrix(pipe=...))
        enable_run_adapters(pipe.transformer, adapters)
    fp8_attention.CALLS.clear()
    say(f"task {s.task}" + (" (distilled)" if s.distill else "") + (" + refine" if s.refine
                                                                       else ""))
    r, frames = TASK_RUNS[s.task](job)
    _check_finite(frames)
    stage1_info = dict(r.info)
    if s.refine and s.task in REFINE_CONDITION:
        say("refine: 720p with the refinement LoRA and BSA")
        stage1 = [Image.fromarray(f) for f in (r.frames * 255).astype(np.uint8)]
        cond = REFINE_CONDITION[s.task](job)
        r = pipe.refine(stage1, s.prompt, height=s.refine_height, width=s.refine_width,
                        t_thresh=s.t_thresh, spatial_refine_only=s.spatial_refine_only,
                        generator=job.generator, bsa=s.bsa, lora_scale=s.lora_scale, **cond)
        frames = after_input(cond["video"], r.frames, cond["num_cond_frames"]) \
            if s.task == "vc" else r.frames  # as at stage 1 (the original's vc demo too)
        _check_finite(frames)
    fps = s.fps or r.fps
    out = Path(s.out)
    staged = None
    try:
        with reporter.stage("write"):
            if pipe.is_main:
                mux = job.audio.mux if job.audio is not None else None
                staged = vio.encode_mp4(out, frames, fps, audio=mux)
            if s.save_latents and pipe.is_main:
                Path(s.save_latents).parent.mkdir(parents=True, exist_ok=True)
                # whole or not at all, with the mode other outputs get (save_file made 0600)
                atomic_write_bytes(Path(s.save_latents), save(
                    {"latents": r.latents.detach().float().cpu().contiguous()},
                    metadata={"task": s.task, "seed": str(s.seed)}))
    except BaseException:
        if staged is not None:
            staged.unlink(missing_ok=True)
        raise
    sidecar = {
        "output": str(out), "task": s.task, "settings": settings_record(s, device),
        "seed": s.seed, "negative_prompt": job.negative_prompt, "guidance": job.guidance,
        "video": {"frames": int(frames.shape[0]), "height": int(frames.shape[1]),
                  "width": int(frames.shape[2]), "fps": fps, "codec": "h264",
                  "pix_fmt": "yuv420p"},
        "stage1": stage1_info, "final": dict(r.info),
        "bsa": r.info.get("bsa"), "loras": r.info.get("loras", []),
        "adapters": [{"name": a.name, "scale": a.scale, "file": a.file} for a in adapters],
        "checkpoint": {"path": os.path.realpath(job.root), "layout": pipe.layout,
                       "stamp": layouts.content_stamp(job.root)},
        "inputs": job.inputs,
        "precision": "fp8" if pipe.transformer.is_fp8 else run_dtype(s.dtype, device),
        "fp8_attention": {"kinds": sorted(pipe.transformer.quantized_attention()),
                          "calls": dict(sorted(fp8_attention.CALLS.items()))},
        "timings_s": {k: round(v, 3) for k, v in reporter.timings.items()},
        "step_s": [round(t, 3) for t in reporter.step_s],
        "total_s": round(time.perf_counter() - t_start, 3),
        "process_age_at_start_s": _age_at(t_start),
        "peak_memory": _peak_memory(device),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    if job.audio is not None:
        sidecar["avatar"] = {"version": pipe.version, "int8": s.int8, "dit": pipe.layout,
                             "audio_guidance": r.info.get("audio_guidance"), **job.audio.info}
        sidecar["video"]["audio"] = {"codec": "aac", "rate": vio.AUDIO_RATE}
    if staged is not None:  # the sidecar first, the mp4 last (video.publish)
        sidecar["video"]["bytes"] = staged.stat().st_size  # a resumed list checks it
        vio.publish(staged, out, jsonio.dumps(jsonio.finite(sidecar), default=str))
    return sidecar
