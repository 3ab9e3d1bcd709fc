"""The options of a run, declared once, and the one place that checks them.

``RunSettings`` is the declaration: each field's default, help text and flags make the
``longcat-tools run`` command line (``cli/run.py`` builds the command from it), ``run_job`` reads
it, and the pipeline's task methods map their keywords onto it. ``validate`` checks it before any
weights load: the command line and ``run_job`` call it with the input files, the pipeline's task
methods (``LongCatVideoPipeline.generate`` and the ``t2v``... methods) with the values they were
given. No torch at import: the CLI builds its command from this module.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import numbers
import os
import re
import tempfile
import types
import typing
from collections.abc import Collection, Iterator
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any

from longcat_tools.errors import LongcatError, UsageError, refuse_empty, why_not_a_file
from longcat_tools.io.atomic import enclosing_checkpoint, real_path
from longcat_tools.lora.registry import check_scale
from longcat_tools.model import avatar, bounds, bsa_presets, dtypes, keymap
from longcat_tools.model import fp8 as fp8_format
from longcat_tools.model.chunks import MAX_FRAMES, frames_problem, latent_frames, latent_grid
from longcat_tools.runner import footprint
from longcat_tools.runner.buckets import RESOLUTIONS, bucket_size

log = logging.getLogger(__name__)

TASKS = ("t2v", "i2v", "vc", "long", "refine")  # the base model's
AVATAR_TASKS = ("at2v", "ai2v", "avc")  # LongCat-Video-Avatar's (runner.avatar_pipeline)
# the tasks that read an input image, an input video (refine: a condition image, the stage-1 video)
CONTINUE_FPS = 15  # vc and long read their input video at about this rate (every n-th frame)
IMAGE_TASKS = ("i2v", "ai2v", "refine")
VIDEO_TASKS = ("vc", "avc", "refine", "long")
MAX_SPEAKERS = 2
BSA_CHOICES = ("config", "on", "off", *bsa_presets.PRESETS)
OFFLOAD_CHOICES = ("none", "text-encoder", "dit", "all")  # runner.offload
LORA_MODES = ("merge", "runtime")  # LongCatTransformer3DModel.lora_mode (runner.lora_merge)
# --precision -> load_transformer's fp8 (None: as the checkpoint is stored)
PRECISIONS: dict[str, bool | None] = {"auto": None, "fp8": True, "dtype": False}
# --fp8-attention -> the DiT's fp8_attention (None: kernels.fp8_attention.ENABLED's kinds)
FP8_ATTENTION: dict[str, frozenset[str] | None] = {
    "auto": None, "off": frozenset(), **{k: frozenset({k}) for k in fp8_format.ATTENTION_KINDS},
    "all": frozenset(fp8_format.ATTENTION_KINDS)}
CONTINUING = ("vc", "long", "avc")  # tasks that continue from condition frames
DEFAULT_COND_FRAMES = 13  # their condition frames without --cond-frames
MAX_GUIDANCE = 100.0  # CFG-Zero* scales in use are 1 to ~10
MIN_FPS, MAX_FPS = 1.0, 1000.0  # below 1 fps ffmpeg's mp4 muxer fails, after the whole run
MAX_STEPS = 1000  # the releases sample 50 (16 distilled); a huge count only fails allocating
T2V_SIZE = (480, 832)  # (height, width) of t2v and long without --height/--width
REFINE_SIZE = (720, 1280)  # the refinement stage's default (the 720p bucket of 16:9)

TASK_HELP = ("t2v (text to video), i2v (image to video), vc (video continuation), long "
             "(chained continuations), refine (480p -> 720p with the refinement LoRA and BSA); "
             "avatar checkpoints: at2v (text + audio), ai2v (image + audio), avc (continue a "
             "video with audio)")


OUTPUT_FIELDS = ("out", "save_latents")  # where a run writes, not what it computes


def seed_matters(s: RunSettings) -> bool:
    """Whether the seed changes the video: t2v from ``--latents-in`` draws no noise (the other
    tasks draw their condition latents, refining its noise, with the seed's generator)."""
    return not (s.latents_in and s.task == "t2v" and not s.refine)


def input_stamps(s: RunSettings) -> dict[str, list[int] | None]:
    """Size and mtime of each file a run reads besides the checkpoint, by path (None: gone): a
    matrix resuming makes a video again when a file it read changed at the same path."""
    paths = [s.image, s.video, s.latents_in, *(s.audio or ())]
    stamps: dict[str, list[int] | None] = {}
    for path in filter(None, paths):
        try:
            st = os.stat(path)
            stamps[path] = [st.st_size, st.st_mtime_ns]
        except OSError:
            stamps[path] = None
    return stamps


def comparable_settings(record: dict[str, Any], adapters: Any = None,
                        checkpoint: Any = None, precision: Any = None) -> dict[str, Any]:
    """A sidecar's settings as two runs are compared (a matrix resuming, ``compare`` pairing):
    output paths left out, the device as its kind (cuda:0 and cuda:1 compute alike), a
    guidance left out as the value it stands for, ``model`` as the real path of the folder it
    named (``checkpoint``: ``ck``, ``./ck/`` and ``$LONGCAT_TOOLS_MODEL`` alike), ``lora`` as the
    adapters it resolved to (``adapters``: the sidecar's list of names and scales), so
    ``style`` and ``style:0.5`` pair where 0.5 is its default, ``precision`` as the one the run
    computed in (``precision``: the sidecar's; ``auto`` and ``fp8`` alike on an fp8
    checkpoint), and no ``lora`` as if absent (sidecars written before the option have none)."""
    out = {k: v for k, v in record.items() if k not in OUTPUT_FIELDS
           and not (k == "lora" and v is None)}
    if isinstance(checkpoint, str | Path) and str(checkpoint):
        out["model"] = os.path.realpath(checkpoint)
    if isinstance(precision, str) and "precision" in out:
        out["precision"] = precision
    resolved = adapter_scales(adapters)
    if "lora" in out and resolved is not None:
        out["lora"] = resolved
    if isinstance(out.get("device"), str):
        out["device"] = out["device"].split(":")[0]
    if isinstance(out.get("distill"), bool) and out.get("task") != "refine":
        for key in ("guidance", "audio_guidance"):  # left out and given at its default alike
            if out.get(key) is None:
                out[key] = guidance_of(None, out["distill"])
    return out


def sidecar_settings(doc: dict[str, Any]) -> dict[str, Any]:
    """A sidecar's settings compared (``comparable_settings``) with what it records of the run:
    the adapters, the checkpoint's path and the precision it computed in."""
    made_from = doc.get("checkpoint")
    return comparable_settings(doc["settings"], doc.get("adapters"),
                               made_from.get("path") if isinstance(made_from, dict) else None,
                               doc.get("precision"))


def adapter_scales(adapters: Any) -> list[list[Any]] | None:
    """A sidecar's ``adapters`` as ``[[name, scale], ...]``; None where it is not a list of
    named, scaled entries (a sidecar from before the list, or edited by hand)."""
    if not isinstance(adapters, list):
        return None
    out = []
    for a in adapters:
        if not (isinstance(a, dict) and isinstance(a.get("name"), str)
                and isinstance(a.get("scale"), int | float) and not isinstance(a["scale"], bool)):
            return None
        out.append([a["name"], float(a["scale"])])
    return out


def run_precision(precision: str, stored_fp8: bool, dtype: str) -> str:
    """What a run's DiT computes in, as its sidecar records it: fp8, else its dtype
    (``--precision auto``: as the checkpoint is stored)."""
    fp8 = PRECISIONS.get(precision)
    return "fp8" if (stored_fp8 if fp8 is None else fp8) else dtype


def guidance_of(guidance: float | None, distill: bool) -> float:
    """The CFG scale a run uses: the given one, else 1 distilled (no CFG), else 4."""
    return guidance if guidance is not None else (1.0 if distill else 4.0)


def run_dtype(dtype: str | None, device: Any) -> str:
    """The dtype a run loads in: the given one, else bf16 on a GPU and fp32 on the CPU."""
    return dtype or ("bf16" if device.type == "cuda" else "fp32")


def option(default: Any, help: str, *flags: str, metavar: str | None = None,
           cli: bool = True, path: bool = False) -> Any:
    """A RunSettings field with its command-line help (``flags``: when not ``--field-name``;
    ``cli=False``: the command line declares the option itself, e.g. to take a list; ``path``:
    a file name, which may not be empty)."""
    return field(default=default, metadata={"help": help, "flags": flags, "metavar": metavar,
                                            "cli": cli, "path": path})


@dataclass
class RunSettings:
    """Every option of ``longcat-tools run``, in the order ``--help`` lists them."""

    task: str = option("t2v", TASK_HELP, "--task", "-t")
    prompt: str = option("", "What the video shows.", "--prompt", "-p")
    model: str | None = None  # the checkpoint folder (every command's --model)
    image: str | None = option(None, "First frame (i2v; optional condition for refine).",
                               metavar="FILE", path=True)
    video: str | None = option(None, "Video to continue (vc, long) or the stage-1 video "
                               "(refine).", metavar="FILE", path=True)
    audio: list[str] | None = option(None, "Driving speech (avatar tasks); repeat for a second "
                                     "speaker (ai2v, avc).", cli=False, path=True)
    audio_mode: str = option("mix", "Avatar, two speakers: mix (both talk over the whole "
                             "video; equal lengths) or concat (speaker 2 after speaker 1).")
    vocal_separation: bool = option(True, "Avatar: extract the speech from each --audio with "
                                    "vocal_separator/ first, as the original does.")
    audio_guidance: float | None = option(None, "Avatar: audio guidance scale (default 4; 1 "
                                          "with --distill).")
    int8: bool = option(False, "Avatar 1.5: load base_model_int8/ (weights kept in INT8).")
    distill: bool = option(False, "Distilled sampling: cfg_step LoRA, 16 steps, guidance 1 "
                           "(avatar 1.5: the DMD LoRA, 8 steps).")
    refine: bool = option(False, "Refine the result to 720p/30 fps afterwards (t2v, i2v, vc, "
                          "long).")
    lora_scale: float = option(1.0, "Scale of the hub LoRAs the run activates (distilled, "
                               "refinement).", cli=False)
    lora: str | None = option(None, "Your adapters of the checkpoint (lora list names them) to "
                              "run with, in every stage, summed in order; each at its recorded "
                              "default scale unless given.", metavar="NAME[:SCALE][,NAME...]")
    lora_mode: str = option("merge", "How LoRAs apply: merge (added into the weights once per "
                            "set, restored exactly after; no cost per step) or runtime (added "
                            "to every forward, weights untouched).")
    bsa: str = option("config", "Block sparse attention: config (what the transformer config "
                      "says; always on for refinement), on, off, or a preset "
                      f"({', '.join(bsa_presets.PRESETS)}).")
    steps: int | None = option(None, "Denoising steps (default 50; 16 with --distill).")
    guidance: float | None = option(None, "CFG-Zero* guidance scale (avatar: the text scale, "
                                    "plain CFG) (default 4; 1 with --distill; 1 disables CFG).")
    seed: int = option(42, "Seed of every random draw.")
    resolution: str = option("480p", "Bucket for i2v/vc sizes: 480p or 720p.")
    height: int | None = option(None, "Output height in px (multiple of 16); t2v default 480, "
                                "i2v/vc from the bucket, refine from the 720p bucket.")
    width: int | None = option(None, "Output width in px (multiple of 16); t2v default 832.")
    frames: int = option(93, "Frames to generate (4k+1).")
    fps: float | None = option(None, "Frame rate of the mp4, 1 to 1000 (default 15; 30 after "
                               "refinement; avatar: 16 (1.0) or 25 (1.5), fixed).")
    negative_prompt: str | None = option(None, "Negative prompt under CFG (default: the demos' "
                                         "Wan-style prompt).")
    num_cond_frames: int | None = option(None, "Condition frames (vc/long: default 13; refine: "
                                         "from --image).", "--cond-frames")
    segments: int = option(2, "long: number of continuation segments.")
    kv_cache: bool = option(True, "vc/long: cache the condition frames' K/V.")
    offload_kv_cache: bool = option(False, "Keep the KV cache in CPU memory.")
    offload: str = option("none", "GPU memory: none, text-encoder (UMT5 on the CPU between "
                          "prompts), dit (stream DiT blocks from CPU memory; fits 24 GB, slower) "
                          "or all.")
    vae_tiling: bool = option(False, "Tiled VAE decode (less GPU memory).")
    enhance_hf: bool | None = option(None, "vc: keep t>500 then 10 uniform steps (default on "
                                     "unless --distill).")
    t_thresh: float = option(0.5, "Refinement start noise level (0..1).")
    spatial_refine_only: bool = option(False, "Refine resolution only, keep the frame count.")
    refine_height: int | None = option(None, "Refinement height (default: the 720p bucket).")
    refine_width: int | None = option(None, "Refinement width.")
    out: str = option("output.mp4", "Output video; a FILE.mp4.json sidecar is written next to "
                      "it.", "--out", "-o", metavar="FILE.mp4", path=True)
    device: str = option("auto", "auto, cpu, cuda or cuda:N.")
    dtype: str | None = option(None, "fp32, bf16 or fp16 (default bf16 on GPU, fp32 on CPU).")
    precision: str = option("auto", "The DiT's block GEMMs: fp8 (e4m3 weights scaled per "
                            "channel, activations per token; an fp8 checkpoint loads as "
                            "stored, another is quantized on load), dtype (all in --dtype; an "
                            "fp8 checkpoint is dequantized) or auto (fp8 for an fp8 checkpoint, "
                            "else dtype).")
    fp8_attention: str = option("auto", "fp8 runs: which self-attention also runs quantized: "
                                "dense, bsa, all, off, or auto (the measured default: "
                                f"{', '.join(sorted(fp8_format.ATTENTION_DEFAULT)) or 'off'}).",
                                metavar="KIND")
    save_latents: str | None = option(None, "Save the final latents (a .safetensors file).",
                                      metavar="FILE", path=True)
    latents_in: str | None = option(None, "Initial noise (safetensors, tensor 'latents').",
                                    metavar="FILE", path=True)
    cp: int = option(1, "This process is one of N context-parallel ranks (under torchrun "
                     "--nproc-per-node N).")


OPTION_NAMES = frozenset(f.name for f in fields(RunSettings))
# Pipeline keywords named differently from the option they carry. The pipeline's ``image`` and
# ``video`` are frames, not file names, and its ``bsa`` may be params: none of them map.
API_NAMES = {"num_frames": "frames", "num_segments": "segments", "use_kv_cache": "kv_cache"}
NOT_OPTIONS = frozenset({"image", "video"})


@functools.cache
def setting_types() -> dict[str, Any]:
    """Each setting's type, from RunSettings' annotations."""
    return typing.get_type_hints(RunSettings)


def value_fits(value: Any, hint: Any) -> bool:
    """Whether a value is of a setting's type (JSON's: an int serves for a float, a bool for
    neither)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(value_fits(value, h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return isinstance(value, list) and all(value_fits(v, typing.get_args(hint)[0])
                                               for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return value is None if hint is type(None) else isinstance(value, hint)


def plain_scalars(keywords: dict[str, Any]) -> None:
    """In place: a numpy scalar, or a 0-d array or tensor, given for a number or flag setting
    becomes the Python value torch and the checks take (``np.int64`` seeds, ``np.float32`` or
    ``torch.tensor(4.0)`` guidance)."""
    for key, value in keywords.items():
        name = API_NAMES.get(key, key)
        if key in NOT_OPTIONS or name not in OPTION_NAMES or isinstance(value, (bool, str)):
            continue
        if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
            value = keywords[key] = value.item()
        if isinstance(value, bool):
            continue
        wants = typing.get_args(setting_types()[name]) or (setting_types()[name],)
        if int in wants and isinstance(value, numbers.Integral):
            keywords[key] = int(value)
        elif float in wants and isinstance(value, numbers.Real):
            keywords[key] = float(value)


def check_flags(**flags: Any) -> None:
    """``from_pretrained``'s switches are True or False: ``vae_tiling="no"`` turned it on."""
    for key, value in flags.items():
        if not isinstance(value, bool):
            raise UsageError(f"{key}={value!r}: True or False")


def from_call(task: str, keywords: dict[str, Any]) -> RunSettings:
    """The RunSettings of a pipeline task call (its keyword -> value), for ``validate``; a value
    of another type is refused here, naming the keyword (it failed deep in torch, or a numpy
    seed hung the range check)."""
    values = {}
    for key, value in keywords.items():
        name = API_NAMES.get(key, key)
        if key in NOT_OPTIONS or name not in OPTION_NAMES or value is None or name == "task":
            continue
        if name == "bsa" and not isinstance(value, str):
            continue  # params, True or False: always valid
        hint = setting_types()[name]
        if not value_fits(value, hint):  # in flag words, which the caller's spelling renames
            shown = getattr(hint, "__name__", str(hint))
            flag = flag_of(next(f for f in fields(RunSettings) if f.name == name))
            said = f"{key}={value!r}" if "/" in flag else f"{flag} {value!r}"  # a switch: as is
            raise UsageError(f"{said}: expected {shown}, not {type(value).__name__}")
        values[name] = value
    return RunSettings(task=task, **values)


def check_choice(flag: str, choice: str, choices: Collection[str]) -> None:
    """One line for a value outside its option's table (BSA_CHOICES, OFFLOAD_CHOICES, ...)."""
    if choice not in choices:
        names = " or ".join(choices) if len(choices) == 2 else ", ".join(choices)
        raise UsageError(f"{flag} {choice}: unknown (use {names})")


def check_bsa(choice: str) -> None:
    check_choice("--bsa", choice, BSA_CHOICES)


def check_offload(choice: str, device: Any = None) -> None:
    """A known choice; on a CPU ``device`` a warning that it does nothing (it said nothing)."""
    check_choice("--offload", choice, OFFLOAD_CHOICES)
    if choice != "none" and device is not None and device.type == "cpu":
        log.warning(callers_words(f"--offload {choice}: the run is on the CPU, where the "
                                  "weights are anyway; nothing is offloaded"))


def resolve_device(device: Any) -> Any:
    """``--device`` (or the API's ``device=``: a name, an index, a torch.device) -> a
    torch.device that exists here."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = (device if isinstance(device, torch.device) else
               torch.device("cuda", device) if isinstance(device, int) and device >= 0
               and not isinstance(device, bool) else torch.device(device))
    except (RuntimeError, TypeError):
        raise UsageError(f"--device {device}: not a device (use auto, cpu, cuda or "
                         "cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LongcatError(f"--device {device}: no CUDA GPU is available here (use --device "
                           "cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise LongcatError(f"--device {device}: this machine has {torch.cuda.device_count()} "
                           "CUDA GPU(s), numbered from 0")
    return dev


def validate(s: RunSettings, inputs: bool = True) -> None:
    """Every check that needs no weights: one clear line per problem, before any loading.

    ``inputs``: also the model folder, the input and output files and the device (the command
    line's and ``run_job``'s; a pipeline call already has its model and frames), and a
    negative prompt that an avatar run without CFG would not read (the avatar pipeline's
    methods accept one there, as the original's do)."""
    if s.task not in TASKS + AVATAR_TASKS:
        raise UsageError(f"--task {s.task}: unknown (choose from "
                         f"{', '.join(TASKS + AVATAR_TASKS)})")
    _check_paths_given(s)
    _check_task_options(s)
    if (inputs and s.task in AVATAR_TASKS and s.negative_prompt is not None
            and max(guidance_of(s.guidance, s.distill),
                    guidance_of(s.audio_guidance, s.distill)) <= 1.0):
        raise UsageError("--negative-prompt: this run samples without CFG (text and audio "
                         "guidance 1), so nothing reads it; drop it, or give --guidance or "
                         "--audio-guidance above 1")
    files = _check_inputs(s) if inputs else None
    if s.dtype is not None:
        dtypes.check(s.dtype, error=UsageError)
    check_scale(s.lora_scale, "--lora-scale", UsageError)
    if s.lora_scale != 1.0 and not (s.distill or s.refine or s.task == "refine"):
        raise UsageError(f"--lora-scale {s.lora_scale:g}: this run activates no hub LoRA (it "
                         "scales distilled with --distill and refinement when refining); "
                         "drop it or add --distill")
    if s.lora_mode != LORA_MODES[0] and not (s.distill or s.refine or s.task == "refine"
                                              or s.lora):
        raise UsageError(f"--lora-mode {s.lora_mode}: this run activates no LoRA (--distill, "
                         "refining and --lora do); drop it")
    if s.lora is not None:
        from longcat_tools.lora.fusion import parse_adapter_list

        parse_adapter_list(s.lora, "--lora")  # its syntax and scales, before the model's files
    if why := frames_problem(s.frames):
        raise UsageError(f"--frames {s.frames}: {why}")
    if s.frames > MAX_FRAMES:
        raise UsageError(f"--frames {s.frames}: at most {MAX_FRAMES} in one segment (the model "
                         "is trained on 93; use --task long for longer videos)")
    if s.task in CONTINUING and s.num_cond_frames is None and s.frames <= DEFAULT_COND_FRAMES:
        raise UsageError(f"--frames {s.frames}: --task {s.task} continues from the last "
                         f"{DEFAULT_COND_FRAMES} frames (--cond-frames), so it needs more than "
                         f"that (e.g. --frames {DEFAULT_COND_FRAMES + 4}, or --cond-frames 5)")
    if s.num_cond_frames is not None and (s.num_cond_frames < 0 or (
            s.task != "refine" and (s.num_cond_frames % 4 != 1
                                    or s.num_cond_frames >= s.frames))):
        raise UsageError(f"--cond-frames {s.num_cond_frames}: must be 4k+1 and below --frames")
    if s.task == "refine" and s.image and (s.num_cond_frames or 0) > 1:
        raise UsageError(f"--cond-frames {s.num_cond_frames}: an --image condition is one frame "
                         "(give --cond-frames 1, or leave it out)")
    if (s.height is None) != (s.width is None):
        bucket = " (or use --resolution)" if s.task in ("i2v", "vc", "ai2v", "avc") else ""
        raise UsageError(f"--height and --width go together{bucket}")
    if s.height is not None and s.resolution != RunSettings.resolution:
        raise UsageError(f"--resolution {s.resolution}: --height/--width {s.height}x{s.width} "
                         "set the size, so no bucket is chosen; give one or the other")
    if (s.refine_height is None) != (s.refine_width is None):
        raise UsageError("--refine-height and --refine-width go together")
    for h, w, opt in ((s.height, s.width, "--height/--width"),
                      (s.refine_height, s.refine_width, "--refine-height/--refine-width")):
        if h is not None and (h <= 0 or w <= 0 or h % 16 or w % 16):
            raise UsageError(f"{opt} {h}x{w}: both must be positive multiples of 16 px "
                             "(VAE 8x times DiT patch 2)")
    if (s.task == "refine" and s.height is not None and s.refine_height is not None
            and (s.height, s.width) != (s.refine_height, s.refine_width)):
        raise UsageError(f"--task refine: --height/--width {s.height}x{s.width} and "
                         f"--refine-height/--refine-width {s.refine_height}x{s.refine_width} "
                         "both size its output; give one")
    if s.resolution not in RESOLUTIONS:
        raise UsageError(f"--resolution {s.resolution}: use 480p or 720p")
    if s.steps is not None and not 1 <= s.steps <= MAX_STEPS:
        raise UsageError(f"--steps {s.steps}: must be 1 to {MAX_STEPS}")
    for opt, value in (("--guidance", s.guidance), ("--audio-guidance", s.audio_guidance)):
        if value is not None and not 0 <= value <= MAX_GUIDANCE:  # NaN fails too
            raise UsageError(f"{opt} {value}: must be a number from 0 to {MAX_GUIDANCE:g} "
                             "(1 disables CFG)")
    if not 0 < s.t_thresh <= 1:
        raise UsageError(f"--t-thresh {s.t_thresh}: must be in (0, 1]")
    if s.fps is not None and not MIN_FPS <= s.fps <= MAX_FPS:  # NaN fails too
        raise UsageError(f"--fps {s.fps}: must be a number from {MIN_FPS:g} to {MAX_FPS:g}")
    bounds.check_seed(s.seed)
    check_offload(s.offload)
    check_choice("--lora-mode", s.lora_mode, LORA_MODES)
    check_choice("--precision", s.precision, PRECISIONS)
    check_choice("--fp8-attention", s.fp8_attention, FP8_ATTENTION)
    if s.precision == "fp8" and s.dtype == "fp16":
        raise UsageError("--precision fp8 --dtype fp16: fp8 GEMMs run with bf16 activations "
                         "(fp16 output is missing from some torch builds' scaled GEMMs); use "
                         "--dtype bf16")
    if FP8_ATTENTION[s.fp8_attention] and s.precision == "dtype":
        raise UsageError(f"--fp8-attention {s.fp8_attention}: quantizes an fp8 run's "
                         "attention; it cannot go with --precision dtype")
    if s.task in ("vc", "avc") and s.distill and s.enhance_hf:
        raise UsageError("--enhance-hf cannot be combined with --distill")
    if s.segments < 1:  # 0 wrote the --video back, or made a plain t2v
        raise UsageError(f"--segments {s.segments}: a long run continues at least once (one "
                         "video alone: --task t2v, or vc to continue --video once)")
    if s.cp < 1:
        raise UsageError(f"--cp {s.cp}: must be at least 1")
    if s.cp > 1:  # every DiT forward needs a latent frame per rank (runner.context_parallel)
        if latent_frames(s.frames)[1] < s.cp:
            raise UsageError(f"--frames {s.frames}: {latent_frames(s.frames)[1]} latent frames "
                             f"cannot be split over {s.cp} processes (use at least "
                             f"{4 * s.cp - 3} frames, or fewer GPUs)")
        cond = s.num_cond_frames or DEFAULT_COND_FRAMES
        if s.task in ("vc", "long") and s.kv_cache and latent_frames(cond)[1] < s.cp:
            raise UsageError(f"--cond-frames {cond}: the KV cache pass over "
                             f"{latent_frames(cond)[1]} latent frames cannot be split over "
                             f"{s.cp} processes (use --no-kv-cache or fewer GPUs)")
    check_bsa(s.bsa)
    if files is not None and s.task in AVATAR_TASKS:
        resolve_device(s.device)
        _check_speaker_regions(s, files)
    elif files is not None:
        if files.dims.num_heads % s.cp:  # what the DiT checks when it is split
            raise UsageError(f"--cp/--gpus {s.cp}: the DiT's {files.dims.num_heads} heads do "
                             "not split evenly over that many processes (use a divisor)")
        device = resolve_device(s.device)
        check_memory(s, files, run_dtype(s.dtype, device), device)
        if FP8_ATTENTION[s.fp8_attention] and device.type == "cpu":  # as --offload says it
            _warn_once(callers_words(f"--fp8-attention {s.fp8_attention}: the run is on the "
                                     "CPU, where no quantized attention kernel runs; attention "
                                     "keeps the activations' dtype (the sidecar's "
                                     "fp8_attention.calls stays empty)"))
        _check_latents(s, files)


@functools.cache
def _warn_once(message: str) -> None:
    """A warning the checks would give again on each pass over the same settings."""
    log.warning(message)


def check_memory(s: RunSettings, files: InputFiles, dtype: str, device: Any) -> None:
    """Each sampling stage's DiT forward and output video fit this device and machine
    (``footprint.check``): one line instead of a process killed for memory."""
    footprint.check(files.dims, _stages(s, files), dtype, device, s.cp)


@functools.cache
def _keywords_by_flag() -> dict[str, tuple[str, bool]]:
    """Each RunSettings flag (``frames``, ``cond-frames``...) -> (the Python API's keyword for
    it, whether it is a switch)."""
    api = {name: key for key, name in API_NAMES.items()}
    out = {}
    for f in fields(RunSettings):
        for flag in f.metadata.get("flags") or (f"--{f.name.replace('_', '-')}",):
            if flag.startswith("--"):
                out[flag[2:]] = (api.get(f.name, f.name), "bool" in str(f.type))
    return out


# --FLAG, or --no-FLAG, or the pair --FLAG/--no-FLAG, then maybe its value: a number, a word
# right before a colon ("--frames 3: ...") or a placeholder ("--video FILE")
_FLAG_RE = re.compile(r"--(no-)?([a-z][a-z0-9-]*)(/--no-\2)?"
                      r"( (-?\d[^\s,:;)]*|[^\s:]+(?=:)|[A-Z]+\b))?")


# the messages' placeholders after a flag ("--video FILE"); a user's value such as "ON" stays
PLACEHOLDERS = frozenset({"FILE", "N", "DIR", "PATH", "NAME", "KIND", "OTHER"})


def api_words(message: str, renames: dict[str, str] | None = None) -> str:
    """A check's message as the Python API's caller would write it: ``--frames 3: ...`` is
    ``num_frames=3: ...``, ``--no-kv-cache`` is ``use_kv_cache=False`` (``renames``: keywords
    a caller spells otherwise, e.g. diffusers' ``num_inference_steps`` for ``steps``)."""
    table = _keywords_by_flag()

    def spell(m: re.Match) -> str:
        negated, flag, pair, _, value = m.groups()
        if flag not in table:
            return m.group(0)
        key, switch = table[flag]
        key = (renames or {}).get(key, key)
        if switch and not pair:
            return f"{key}={not negated}" + (f" {value}" if value is not None else "")
        if value in PLACEHOLDERS:
            return f"{key}="  # "give video=", as the API's own messages say
        return f"{key}={value}" if value is not None else key

    return _FLAG_RE.sub(spell, message)


FLAGS = None  # spelled(FLAGS): the command line's words
LOAD_RENAMES = {"dtype": "torch_dtype"}  # spelled(LOAD_RENAMES): from_pretrained's keyword
_SPELLING: contextvars.ContextVar[Any] = contextvars.ContextVar("spelling", default=...)


@contextlib.contextmanager
def spelled(renames: dict[str, str] | None) -> Iterator[None]:
    """Errors raised inside name each setting as the outermost caller writes it: by its flag
    (``FLAGS``: ``run_job``, a matrix run; the checks' own words), or by its Python API keyword
    (a dict: the pipeline's methods; ``api_words``' renames). Inner calls keep the outer words:
    the command line runs the pipeline's methods too."""
    if _SPELLING.get() is not ...:
        yield
        return
    token = _SPELLING.set(renames)
    try:
        yield
    except LongcatError as e:
        if renames is not FLAGS and type(e) in (LongcatError, UsageError) and e.args:
            e.args = (api_words(str(e.args[0]), renames), *e.args[1:])
        raise
    finally:
        _SPELLING.reset(token)


def callers_words(message: str) -> str:
    """A warning as the outermost caller writes its settings (errors are respelled as they
    leave ``spelled``; a warning is printed inside it)."""
    renames = _SPELLING.get()
    return message if renames is ... or renames is FLAGS else api_words(message, renames)


def flag_of(f: Field) -> str:
    """A RunSettings field's option as the command line spells it (typer's --x/--no-x pair for
    a switch)."""
    flag = (f.metadata.get("flags") or (f"--{f.name.replace('_', '-')}",))[0]
    return f"{flag}/--no-{flag[2:]}" if "bool" in str(f.type) else flag


def _check_paths_given(s: RunSettings) -> None:
    """An empty file name is refused, not taken as "not given": ``--image ''`` ran t2v."""
    for f in fields(RunSettings):
        value = getattr(s, f.name)
        if f.metadata.get("path"):
            for v in value if isinstance(value, list) else [value]:
                refuse_empty(v, flag_of(f))


# Options of the base tasks the avatar pipeline does not take, each with how it shows as used.
NOT_FOR_AVATAR = (("--refine", lambda s: s.refine), ("--cp", lambda s: s.cp != 1),
                  ("--precision", lambda s: s.precision != "auto"),
                  ("--fp8-attention", lambda s: s.fp8_attention != "auto"),
                  ("--bsa", lambda s: s.bsa != "config"),
                  ("--latents-in", lambda s: s.latents_in is not None))
# Options only the avatar tasks take.
AVATAR_ONLY = (("--audio", lambda s: bool(s.audio)), ("--audio-mode", lambda s: s.audio_mode
                                                      != avatar.AUDIO_MODES[0]),
               ("--no-vocal-separation", lambda s: not s.vocal_separation),
               ("--audio-guidance", lambda s: s.audio_guidance is not None),
               ("--int8", lambda s: s.int8))


# Options only some tasks read (field, which, the check): given to another task they did
# nothing, without a word.
TASK_OPTIONS = (
    (("segments",), "--task long", lambda s: s.task == "long"),
    (("kv_cache", "offload_kv_cache"), "--task vc, long or avc", lambda s: s.task in CONTINUING),
    (("enhance_hf",), "--task vc or avc", lambda s: s.task in ("vc", "avc")),
    (("num_cond_frames",), "--task vc, long, avc or refine",
     lambda s: s.task in (*CONTINUING, "refine")),
    (("t_thresh", "spatial_refine_only", "refine_height", "refine_width"),
     "--task refine or --refine", lambda s: s.task == "refine" or s.refine),
    (("resolution",), "--task i2v, vc, ai2v or avc: the size bucket of their input",
     lambda s: s.task in ("i2v", "vc", "ai2v", "avc")),
    (("frames",), "every task but refine, which keeps its --video's frames",
     lambda s: s.task != "refine"),
    (("guidance", "distill"), "every task but refine, which samples with its own LoRA and "
     "no CFG", lambda s: s.task != "refine"),
    (("refine",), "t2v, i2v, vc and long, whose videos it refines afterwards",
     lambda s: s.task != "refine"),
)


def _check_task_options(s: RunSettings) -> None:
    """Options that do not apply to the task: one line each."""
    by_name = {f.name: f for f in fields(RunSettings)}
    for names, which, reads in TASK_OPTIONS:
        for name in names:
            if getattr(s, name) != by_name[name].default and not reads(s):
                raise UsageError(f"{flag_of(by_name[name])}: --task {s.task} does not use it "
                                 f"(it is for {which}); drop it")
    if s.offload_kv_cache and not s.kv_cache:
        raise UsageError("--offload-kv-cache: with --no-kv-cache there is no cache to offload; "
                         "drop one")
    if not seed_matters(s) and s.seed != RunSettings.seed:
        raise UsageError(f"--seed {s.seed}: a t2v run from --latents-in draws no noise, so the "
                         "seed changes nothing; drop it")
    if s.task == "long" and s.video and s.latents_in:
        raise UsageError(f"--latents-in {s.latents_in}: a long run from --video samples no "
                         "first segment to start from them; drop one")
    if (s.negative_prompt is not None and s.task not in AVATAR_TASKS
            and (s.task == "refine" or guidance_of(s.guidance, s.distill) <= 1.0)):
        raise UsageError("--negative-prompt: this run samples without CFG (guidance 1: "
                         "--distill's, or --task refine), so nothing reads it; drop it, or "
                         "give --guidance above 1")
    if s.task not in AVATAR_TASKS:
        for opt, used in AVATAR_ONLY:
            if used(s):
                raise UsageError(f"{opt}: only for the avatar tasks (--task at2v, ai2v or "
                                 "avc)")
        return
    for opt, used in NOT_FOR_AVATAR:
        if used(s):
            raise UsageError(f"{opt}: not available for --task {s.task} (the avatar tasks)")
    if s.lora is not None:
        raise UsageError(f"--lora: not available for --task {s.task} (the avatar tasks); merge "
                         "the adapter into the avatar's DiT with `longcat-tools lora fuse`")
    if s.audio_mode not in avatar.AUDIO_MODES:
        raise UsageError(f"--audio-mode {s.audio_mode}: use {' or '.join(avatar.AUDIO_MODES)}")
    if s.audio and len(s.audio) > MAX_SPEAKERS:
        raise UsageError(f"--audio given {len(s.audio)} times: at most {MAX_SPEAKERS} "
                         "speakers")
    if s.task == "at2v" and s.audio and len(s.audio) > 1:
        raise UsageError("--task at2v takes one speaker; two --audio need ai2v or avc (the "
                         "speakers' regions come from the image)")


def check_avatar_files(ckpt: Any, folder: str) -> None:
    """Every file an avatar run reads stays inside its folder once links are followed (the
    base parts inside the base model's): its DiT ``folder``, the audio encoder, the vocal
    separator and adapters, the base model's tokenizer, text encoder, VAE and scheduler, as
    ``verify`` requires. The loaders would follow a link anywhere."""
    from longcat_tools.checkpoint import layouts
    from longcat_tools.checkpoint.hub import snapshot_roots

    base = ckpt.base
    base_allowed = ckpt.containment if base == ckpt.root else (
        snapshot_roots(base) or (base.resolve(),))
    own = [ckpt.root / folder, ckpt.audio_encoder, ckpt.root / avatar.VOCAL_SEPARATOR,
           ckpt.lora_dir, ckpt.root / "scheduler"]
    for paths, allowed in ((own, ckpt.containment),
                           ([base / p for p in (*ckpt.base_parts, "scheduler")], base_allowed)):
        for path in paths:
            if not os.path.lexists(path):
                continue
            layouts.check_contained(path, allowed)
            for f in sorted(path.rglob("*")) if path.is_dir() else ():
                layouts.check_contained(f, allowed)


def _check_avatar(s: RunSettings, ckpt: Any) -> keymap.DiTDims:
    """An avatar run's checkpoint and audio files, before any weights load; returns its DiT's
    dimensions."""
    from longcat_tools.checkpoint import layouts
    from longcat_tools.io import jsonio
    from longcat_tools.io.safetensors import read_header
    from longcat_tools.runner import audio, audio_tracks
    from longcat_tools.runner.audio_encoders import TIMINGS
    from longcat_tools.runner.audio_filters import BLOCK_S, NOISE_SEEDS
    from longcat_tools.runner.avatar_pipeline import RELEASES, dit_folder
    from longcat_tools.verify.components import check_transformer_config

    v = ckpt.version
    if not s.audio:
        raise UsageError(f"--task {s.task} needs --audio FILE (the driving speech)")
    if s.int8 and not v.int8_folder:
        raise UsageError(f"--int8: {ckpt.describe()} has no INT8 DiT (only avatar 1.5 ships "
                         "base_model_int8/)")
    if s.distill and not v.lora:
        raise UsageError(f"--distill: {ckpt.describe()} has no distillation LoRA (only "
                         "avatar 1.5 ships lora/dmd_lora.safetensors)")
    fused = ckpt.distill_fused
    check_fused(s, ckpt.root, fused, what=AVATAR_DISTILL_NAME)
    if s.distill:
        if not (ckpt.root / v.lora).is_file() and fused is None:
            raise LongcatError(f"--distill: {ckpt.root / v.lora} is missing")
        fixed = RELEASES[v.name].distill_steps
        if s.steps is not None and s.steps != fixed:
            raise UsageError(f"--steps {s.steps}: avatar 1.5 distillation samples {fixed} "
                             "fixed steps (leave --steps out)")
    if RELEASES[v.name].encoder == "wav2vec2" and s.seed not in NOISE_SEEDS:  # failed in numpy
        raise UsageError(f"--seed {s.seed}: {ckpt.describe()} seeds its audio noise floor with "
                         "numpy's RandomState, which takes 0 to 2**32 - 1; pick a seed there")
    rate = TIMINGS[RELEASES[v.name].encoder].video_fps
    if s.fps is not None and s.fps != rate:  # the mp4 and its audio cut, out of step with lips
        raise UsageError(f"--fps {s.fps:g}: {ckpt.describe()} embeds the speech at {rate} fps, "
                         f"so its video plays at that rate; leave --fps out")
    if s.audio_mode != avatar.AUDIO_MODES[0] and len(s.audio) < 2:
        raise UsageError(f"--audio-mode {s.audio_mode}: joins two speakers' --audio; this run "
                         "has one")
    folder = ckpt.root / dit_folder(v, len(s.audio), s.int8)
    if not folder.is_dir():
        raise LongcatError(f"{ckpt.root}: no {folder.name}/, the DiT this run needs"
                           + (" (two speakers)" if len(s.audio) > 1 else ""))
    ckpt.require_base()
    check_avatar_files(ckpt, folder.name)
    if s.int8:  # a NaN scale made a NaN video, found after the whole run
        from longcat_tools.model import int8
        from longcat_tools.verify.quantized import check_scales

        check_scales(layouts.shard_infos(ckpt.dit(folder.name)), int8.SCALE, int8.QMAX, folder)
    if s.vocal_separation and not (ckpt.root / avatar.VOCAL_SEPARATOR).is_file():
        raise LongcatError(f"{ckpt.root / avatar.VOCAL_SEPARATOR}: missing (vocal separation "
                           "needs it; or pass --no-vocal-separation)")
    lengths = []
    for path in s.audio:
        try:
            if s.vocal_separation:  # refused by the separator, after the weights had loaded
                x = audio.decode(path, mono=False)
                audio.check_separable(x.shape[0], path)
                track = x.mean(axis=0)
                audio.check_not_silent(track, path)
            else:
                track = audio.load(path)
        except LongcatError as e:
            raise type(e)(f"--audio {e}") from None
        lengths.append(len(track))
        # padded to the clip's length, then loudness-normalised in blocks: the normaliser
        # found a shorter track after the weights had loaded
        if max(len(track) / audio.SAMPLE_RATE, s.frames / rate) < BLOCK_S:
            raise UsageError(f"--audio {path}: {len(track) / audio.SAMPLE_RATE:.2f} s of audio "
                             f"and {s.frames} frames at {rate} fps; the audio's loudness is "
                             f"measured over {BLOCK_S} s: give that much audio, or more frames")
    if s.audio_mode == avatar.AUDIO_MODES[0] and (
            problem := audio_tracks.mix_problem(lengths, s.audio)):
        raise UsageError(f"--audio-mode mix: {problem}")  # found after loading, with exit 1
    if s.audio_mode == avatar.AUDIO_MODES[1] and s.task == "ai2v" and len(lengths) > 1 \
            and lengths[0] / audio.SAMPLE_RATE >= s.frames / rate:  # speaker 2 went unheard
        raise UsageError(f"--audio-mode concat: the second speaker starts after the first's "
                         f"{lengths[0] / audio.SAMPLE_RATE:.2f} s, and the video ends at "
                         f"{s.frames / rate:.2f} s ({s.frames} frames at {rate} fps): give more "
                         "--frames, a shorter first --audio, or --audio-mode mix")
    cfg_path = folder / "config.json"
    cfg = jsonio.read(cfg_path, what="transformer config")
    dims = keymap.dit_dims(cfg, str(cfg_path))  # as every reader
    check_transformer_config(cfg, str(cfg_path))
    layouts.shard_headers(ckpt.dit(folder.name))  # a truncated shard: before any loading
    for comp in ("text_encoder", "vae"):
        for path in sorted((ckpt.base / comp).glob("*.safetensors")):
            read_header(path)
    return dims


# how errors name the fused distillation LoRA: the base model's hub adapter, the avatar's DMD one
DISTILL_NAME, AVATAR_DISTILL_NAME = "distilled LoRA", "distillation LoRA"


def check_fused(s: RunSettings, root: Path | None, distill: float | None,
                 refinement: float | None = None, what: str = DISTILL_NAME) -> None:
    """A DiT with a hub LoRA fused in (``lora fuse``; ``distill``, ``refinement``: the fused
    scales, None when not fused) runs only the stage that LoRA belongs to, at the fused scale,
    and the run applies nothing more: the original never runs one stage with the other's LoRA."""
    refining = s.task == "refine" or s.refine
    if distill is not None and refinement is not None:
        raise UsageError(f"{root}: the {what} and the refinement LoRA are both fused into the "
                         "DiT, and no stage of the original runs with both; fuse one of them "
                         "into a copy of the checkpoint they came from")
    if refinement is not None and s.task != "refine":
        raise UsageError(f"{root}: the refinement LoRA is fused into the DiT; its weights only "
                         "make sense for refinement: use --task refine")
    if distill is not None and refining:
        raise UsageError(f"{root}: the {what} is fused into the DiT, and the original refines "
                         "without it: refine with the checkpoint it was fused from")
    if distill is not None and not s.distill:
        raise UsageError(f"{root}: the {what} is fused into the DiT; its weights only make "
                         "sense distilled: pass --distill")
    fused, name = (distill, what) if distill is not None else (refinement, "refinement LoRA")
    if fused is not None and fused != s.lora_scale:
        raise UsageError(f"--lora-scale {s.lora_scale:g}: the {name} is fused into the DiT at "
                         f"scale {fused:g}; run at that scale or fuse again")


@dataclass(frozen=True)
class InputFiles:
    """What the input files say, read from headers (and a video's first frame): the DiT's
    dimensions and the input image's and video's (width, height)."""

    dims: keymap.DiTDims
    image_size: tuple[int, int] | None
    video_size: tuple[int, int] | None


def _check_inputs(s: RunSettings) -> InputFiles:
    """The model's config, the input files (headers, and a short decode of the video) and the
    output path: everything the run reads or writes, checked without loading weights."""
    from longcat_tools.checkpoint import layouts
    from longcat_tools.lora import formats as lora_formats
    from longcat_tools.runner import video as vio
    from longcat_tools.runner.lora import check_finite_file, lora_path, run_adapters
    from longcat_tools.verify.components import check_components

    ckpt = layouts.detect_any(layouts.resolve_model(s.model))
    if isinstance(ckpt, layouts.AvatarCheckpoint) != (s.task in AVATAR_TASKS):
        if s.task in AVATAR_TASKS:
            raise UsageError(f"--task {s.task}: needs a LongCat-Video-Avatar checkpoint; "
                             f"{ckpt.root} is the base model")
        raise UsageError(f"--task {s.task}: {ckpt.root} is {ckpt.describe()}; it runs "
                         f"--task {', '.join(AVATAR_TASKS)}")
    if isinstance(ckpt, layouts.AvatarCheckpoint):
        dims = _check_avatar(s, ckpt)
    else:
        cfg = ckpt.config()
        dims = keymap.dit_dims(cfg, str(ckpt.config_path))  # as every reader
        check_components(ckpt)
        if ckpt.is_fp8:  # a NaN scale made a NaN video, found after the whole run
            from longcat_tools.model import fp8
            from longcat_tools.verify.quantized import check_scales

            check_scales(layouts.shard_infos(ckpt), fp8.SCALE, fp8.E4M3_MAX,
                         ckpt.transformer_dir)
        fused = {n: layouts.fused_scale(cfg, "name", n)
                 for n in (layouts.LORA_DISTILL, layouts.LORA_REFINE)}
        check_fused(s, ckpt.root, *fused.values())
        for name, used in ((layouts.LORA_DISTILL, s.distill),
                           (layouts.LORA_REFINE, s.refine or s.task == "refine")):
            if used and fused[name] is None:  # present, inside the checkpoint, sound
                check_finite_file(lora_path(ckpt.root, name), lora_formats.linear_shapes(dims))
        if s.lora is not None:
            run_adapters(ckpt.root, s.lora)
        if FP8_ATTENTION.get(s.fp8_attention) and s.precision == "auto" and not ckpt.is_fp8:
            raise UsageError(f"--fp8-attention {s.fp8_attention}: {ckpt.root} is not an fp8 "
                             "checkpoint; add --precision fp8 to run its GEMMs in fp8 too")
        if s.dtype == "fp16" and s.precision == "auto" and ckpt.is_fp8:
            raise UsageError(f"--dtype fp16: {ckpt.root} is an fp8 checkpoint, whose GEMMs run "
                             "with bf16 activations; use --dtype bf16, or --precision dtype")
    if s.task in ("i2v", "ai2v") and not s.image:
        raise UsageError(f"--task {s.task} needs --image FILE (the first frame)")
    if s.task in ("vc", "avc", "refine") and not s.video:
        what = "the stage-1 video" if s.task == "refine" else "the video to continue"
        raise UsageError(f"--task {s.task} needs --video FILE ({what})")
    if s.task == "refine" and s.image and s.num_cond_frames == 0:  # ran with 1, silently
        raise UsageError("--cond-frames 0: --task refine conditions on its --image (one frame); "
                         "drop --cond-frames, or drop --image to refine without a condition")
    if s.task == "refine" and (s.num_cond_frames or 0) > 0 and not s.image:
        raise UsageError(f"--cond-frames {s.num_cond_frames}: --task refine conditions on an "
                         "--image (one frame), and none is given; add --image, or drop "
                         "--cond-frames")
    for opt, path, tasks in (("--image", s.image, IMAGE_TASKS), ("--video", s.video, VIDEO_TASKS)):
        if path and s.task not in tasks:
            raise UsageError(f"{opt} {path}: --task {s.task} reads no {opt[2:]} (it is for "
                             f"--task {', '.join(tasks)}); drop it or pick that task")
    inputs = [("--image", s.image), ("--video", s.video), ("--latents-in", s.latents_in),
              *(("--audio", a) for a in s.audio or ())]
    for opt, path in inputs[:3]:  # the audio files are read by the avatar checks
        if path and not Path(path).is_file():
            raise UsageError(f"{opt} {path}: {why_not_a_file(path)}")
    if not s.out.endswith(".mp4"):
        raise UsageError(f"--out {s.out}: the output is an H.264 .mp4 file")
    if Path(s.out).name == ".mp4":  # a hidden file that compare and ls skip
        raise UsageError(f"--out {s.out}: name the video (NAME.mp4)")
    if s.save_latents and not s.save_latents.endswith(".safetensors"):
        raise UsageError(f"--save-latents {s.save_latents}: the latents are written as a "
                         ".safetensors file")
    if s.save_latents and Path(s.save_latents).name == ".safetensors":
        raise UsageError(f"--save-latents {s.save_latents}: name the file (NAME.safetensors)")
    outputs = [("--out", s.out), ("--out (its sidecar)", f"{s.out}.json"),
               ("--save-latents", s.save_latents)]
    for opt, path in outputs:
        if path:
            _check_output(opt, Path(path), (ckpt.root.resolve(), *ckpt.containment))
    _check_not_inputs(outputs, inputs)
    image_size = video_size = None
    if s.image:
        try:
            image_size = vio.image_size(s.image)
        except LongcatError as e:
            raise type(e)(f"--image {e}") from None
    if s.video:
        try:
            info = vio.probe(s.video, max_frames=1)
        except LongcatError as e:
            raise type(e)(f"--video {e}") from None
        video_size = (info["width"], info["height"])
        if s.task in ("vc", "avc", "long"):
            _check_cond_frames(s, info, _continue_fps(s, ckpt), s.num_cond_frames
                               or DEFAULT_COND_FRAMES, f"--task {s.task} continues from")
        if s.task == "vc" and s.refine:  # found after the whole first stage
            _check_cond_frames(s, info, *vc_refine_condition(s), "--refine conditions on")
    return InputFiles(dims, image_size, video_size)


def _check_speaker_regions(s: RunSettings, files: InputFiles) -> None:
    """Two speakers: each one's default region (a half of the source frame) must cover a DiT
    token at the output size; the pipeline found that after the weights had loaded."""
    source = {"ai2v": files.image_size, "avc": files.video_size}.get(s.task)
    if not s.audio or len(s.audio) < 2 or source is None:
        return
    from longcat_tools.runner.avatar_pipeline import fit_masks, speaker_masks

    w, h = source
    size = (s.height, s.width) if s.height and s.width else bucket_size(h, w, s.resolution)
    try:
        fit_masks(speaker_masks(h, w), *size)
    except LongcatError as e:
        raise UsageError(str(e)) from None


def _continue_fps(s: RunSettings, ckpt: Any) -> float:
    """The frame rate a continuation reads its input at: the base model's, or the avatar's."""
    if s.task != "avc":
        return CONTINUE_FPS
    from longcat_tools.runner.audio_encoders import TIMINGS
    from longcat_tools.runner.avatar_pipeline import RELEASES

    return TIMINGS[RELEASES[ckpt.version.name].encoder].video_fps


def source_stride(in_fps: float | None, fps: float) -> int:
    """Every how many frames a task reads its input video to get about ``fps``."""
    return max(1, round(in_fps / fps)) if in_fps else 1


def vc_refine_condition(s: RunSettings) -> tuple[float, int]:
    """vc with --refine: the rate the refinement reads the input video at and how many of its
    last frames condition it, those the refined video starts with (twice stage 1's, at twice
    its rate, unless --spatial-refine-only)."""
    cond = s.num_cond_frames or DEFAULT_COND_FRAMES
    return (CONTINUE_FPS, cond) if s.spatial_refine_only else (2 * CONTINUE_FPS, 2 * cond)


def _check_cond_frames(s: RunSettings, info: dict[str, Any], fps: float, cond: int,
                       use: str) -> None:
    """The input video holds ``cond`` condition frames, read as the job reads them (every n-th
    frame at ``fps``, ``job.Job.source``): by decoding just that many."""
    from longcat_tools.runner import video as vio

    stride = source_stride(info.get("fps"), fps)
    need = (cond - 1) * stride + 1
    got = vio.probe(s.video, max_frames=need)["frames"] if need > 1 else 1
    if got is not None and got < need:
        have = (got - 1) // stride + 1 if got else 0
        raise UsageError(f"--video {s.video}: {have} frames at {fps:g} fps; {use} the last "
                         f"{cond}: give a longer video or a smaller --cond-frames (4k+1)")


def _check_not_inputs(outputs: list[tuple[str, str | None]],
                      inputs: list[tuple[str, str | None]]) -> None:
    """No output is one of the run's own input files: `--out` equal to `--video` replaced the
    video it continued, `--save-latents` equal to `--latents-in` the noise it started from."""
    read = {real_path(Path(p)): opt for opt, p in inputs if p}
    for opt, path in outputs:
        if path and (same := read.get(real_path(Path(path)))) is not None:
            raise UsageError(f"{opt} {path}: is also the run's input {same}; write the output "
                             "to another file")


def _check_output(opt: str, path: Path, model: tuple[Path, ...]) -> None:
    """An output file the run may write: not a folder, in a writable folder, and not inside
    the checkpoint (``model``: its real folders) or any other one, whose files belong to the
    model."""
    from longcat_tools.checkpoint import layouts
    from longcat_tools.runner import video as vio

    if path.is_dir():
        raise UsageError(f"{opt} {path}: is a folder (give a file name)")
    real = real_path(path)
    outer = model[0] if any(real == m or m in real.parents for m in model) else (
        enclosing_checkpoint(path))
    if outer is not None:
        raise UsageError(f"{opt} {path}: inside the checkpoint {outer}; write outputs "
                         "outside the model's folder")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:  # missing folders are created
        folder = folder.parent
    if not folder.is_dir():
        raise UsageError(f"{opt} {path}: {folder} is not a folder")
    try:  # a file made and removed: os.access passed /proc and /sys, and the write failed
        # after the whole generation, as an internal error
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".longcat-write-check-"):
            pass
    except OSError as e:
        raise LongcatError(f"{opt} {path}: cannot write in the folder {folder} "
                           f"({e.strerror or e}); pick a writable folder") from None
    if path.suffix == ".mp4":
        scratches = vio.scratch_names(path)
        longest, limit = max(len(os.fsencode(p.name)) for p in scratches), \
            os.pathconf(folder, "PC_NAME_MAX")
        if longest > limit:  # ffmpeg failed on it after the generation
            raise UsageError(f"{opt} {path}: the name is too long for its scratch files "
                             f"({longest} bytes with their prefix and suffix, at most {limit} "
                             "here); pick a shorter name")
        for scratch in scratches:  # a link there would take the write elsewhere
            try:
                layouts.check_plain(scratch, f"the scratch file of {opt}")
            except LongcatError as e:
                raise UsageError(str(e)) from None


def _stage1_size(s: RunSettings, files: InputFiles) -> tuple[int, int]:
    """(height, width) of the first stage, as the pipeline will choose it."""
    if s.height is not None and s.width is not None:
        return s.height, s.width
    source = files.image_size if s.task == "i2v" else (
        files.video_size if s.task == "vc" else None)
    if source is not None:
        return bucket_size(source[1], source[0], s.resolution)
    return T2V_SIZE


def _stages(s: RunSettings, files: InputFiles) -> list[footprint.Stage]:
    """The sampling stages of this run with their sizes, for the memory estimate."""
    cfg = guidance_of(s.guidance, s.distill) > 1.0
    refine_size = ((s.refine_height, s.refine_width) if s.refine_height and s.refine_width
                   else REFINE_SIZE)
    if s.task == "refine":
        h, w = (s.height, s.width) if s.height and s.width else refine_size
        n_out = s.frames if s.spatial_refine_only else 2 * s.frames
        return [footprint.stage("--task refine", h, w, n_out, False, refine=True)]
    h, w = _stage1_size(s, files)
    cond = s.num_cond_frames or DEFAULT_COND_FRAMES
    total = s.frames + (s.segments * (s.frames - cond) if s.task == "long" else 0)
    what = f"--height/--width {h}x{w}, --frames {s.frames}" + (
        f", --segments {s.segments}" if s.task == "long" else "")
    stages = [footprint.stage(what, h, w, s.frames, cfg, frames_out=total)]
    if s.refine:
        n = s.frames if s.spatial_refine_only else 2 * s.frames
        n_out = total if s.spatial_refine_only else 2 * total
        stages.append(footprint.stage(f"--refine at {refine_size[0]}x{refine_size[1]}",
                                      *refine_size, n, False, frames_out=n_out, refine=True))
    return stages


def _check_latents(s: RunSettings, files: InputFiles) -> None:
    """--latents-in: a safetensors file holding ``latents`` of this run's latent shape (read
    from the header; refine's noise shape follows the input video, so only its rank and
    channels are checked)."""
    if not s.latents_in:
        return
    from longcat_tools.io.safetensors import read_header

    where = f"--latents-in {s.latents_in}"
    try:
        header = read_header(s.latents_in)
    except LongcatError as e:
        raise type(e)(f"--latents-in {e}") from None
    info = header.tensors.get("latents")
    if info is None:
        raise LongcatError(f"{where}: no tensor named 'latents' (found: "
                           f"{', '.join(list(header.tensors)[:5]) or 'none'})")
    if info.dtype not in ("F32", "F16", "BF16", "F64"):
        raise LongcatError(f"{where}: 'latents' is {info.dtype}, not a float tensor")
    channels = files.dims.in_channels
    if s.task == "refine" or (s.task == "long" and s.video):
        ok = len(info.shape) == 5 and info.shape[:2] == (1, channels)
        want = f"[1, {channels}, T, H, W]"
    else:
        h, w = _stage1_size(s, files)
        expected = (1, channels, latent_frames(s.frames)[1], *latent_grid(1, h, w)[1:])
        ok, want = tuple(info.shape) == expected, str(list(expected))
    if not ok:
        raise LongcatError(f"{where}: 'latents' has shape {list(info.shape)}, this run needs "
                           f"{want}")
    import torch
    from safetensors import safe_open

    with safe_open(s.latents_in, "pt") as f:  # a latent's size: read whole, before the weights
        if not bool(torch.isfinite(f.get_tensor("latents")).all()):
            raise LongcatError(f"{where}: 'latents' holds NaN or Inf values (the video would "
                               "come out NaN)")
