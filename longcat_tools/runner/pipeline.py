"""The tasks of LongCat-Video on our DiT: t2v, i2v, vc, long, refine; ``distill`` for any.

Each task reproduces the original ``LongCatVideoPipeline`` step by step (same schedules, same
casts, same RNG draws in the same order), so given the same initial latents and generator the
final latents match it. Semantics worth knowing:

* the DiT predicts ``x0 - noise``; it is negated before the Euler step;
* guidance > 1 runs CFG-Zero* on ``[negative; positive]`` (the negative prompt defaults to "" here,
  as in the original pipeline; the CLI passes the demos' Wan-style negative prompt);
* condition frames (i2v: the image; vc: the last ``num_cond_frames`` frames; refine: an image or
  a video) are VAE posterior *samples* drawn with the generator, normalised, written over the
  first latent frames, given timestep 0 and never stepped;
* vc caches the condition frames' K/V once (``use_kv_cache``) and applies ``enhance_hf`` (the
  timesteps above 500, then 10 uniform ones) unless distilled;
* refine upsamples the stage-1 video (2x frames unless ``spatial_refine_only``), pads it to whole
  4-latent BSA chunks, VAE-encodes it, mixes ``(1 - t) z + t noise`` and denoises from
  ``t_thresh * 1000`` with the refinement LoRA and BSA, without CFG.

RNG (how a seed maps to noise): one ``torch.Generator`` seeded with ``seed`` drives every draw of
a task in the original's order (initial noise, then condition-frame posterior samples). The
original takes refinement's stage-1 posterior sample and mixing noise from the *global* RNG; we
draw them from a second generator (``noise_generator``, seeded with ``seed`` too) so runs are
reproducible. A ``long`` run passes the one generator through all its stages, like the demo.
Pass ``latents=`` to fix the initial noise (refine: the mixing noise) exactly.
"""

from __future__ import annotations

import functools
import html
import inspect
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from PIL import Image

from longcat_tools.checkpoint import layouts
from longcat_tools.checkpoint.layouts import LORA_DISTILL, LORA_REFINE
from longcat_tools.errors import LongcatError, UsageError
from longcat_tools.model import chunks, dtypes
from longcat_tools.model.chunks import refine_latent_frames
from longcat_tools.runner import schedule
from longcat_tools.runner.attention import BSAParams, BSASetting, kept_chunks, resolve_bsa
from longcat_tools.runner.buckets import bucket_size
from longcat_tools.runner.context_parallel import ContextParallel
from longcat_tools.runner.dit import LongCatTransformer3DModel, torch_dtype_of
from longcat_tools.runner.loading import parse_dtype, resolve_checkpoint
from longcat_tools.runner.settings import (
    DISTILL_NAME,
    LOAD_RENAMES,
    TASKS,
    InputFiles,
    RunSettings,
    check_flags,
    check_fused,
    check_memory,
    check_offload,
    from_call,
    guidance_of,
    plain_scalars,
    resolve_device,
    spelled,
    validate,
    value_fits,
)
from longcat_tools.runner.video import to_rgb
from longcat_tools.verify.components import check_components

MAX_SEQUENCE_LENGTH = 512
DEFAULT_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, "
    "images, static, overall gray, worst quality, low quality, JPEG compression residue, ugly, "
    "incomplete, extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, "
    "misshapen limbs, fused fingers, still picture, messy background, three legs, many people "
    "in the background, walking backwards")
OUTPUT_TYPES = ("np", "pil", "pt", "latent")
# __call__'s keywords (diffusers') for the task methods' steps and guidance
CALL_RENAMES = {"steps": "num_inference_steps", "guidance": "guidance_scale"}
CALL_RENAMES_BACK = {v: k for k, v in CALL_RENAMES.items()}
TaskMethod = TypeVar("TaskMethod", bound=Callable[..., Any])
log = logging.getLogger(__name__)
# (token grid, BSA params) already warned to keep no key chunk: once a size, not each step
_WARNED_BSA: set[tuple] = set()


def one_generator(key: str, value: Any) -> torch.Generator | None:
    """A generator keyword: one torch.Generator, or diffusers' list of one per video (a list of
    one here: a call makes one video)."""
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    if value is not None and not isinstance(value, torch.Generator):
        got = (f"a list of {len(value)}" if isinstance(value, (list, tuple))
               else type(value).__name__)
        raise UsageError(f"{key}: expected a torch.Generator (or a list of one: a call makes "
                         f"one video), not {got}")
    return value


# Tensor keywords of the task methods: given, each must be a finite torch.Tensor (numpy arrays
# failed deep inside; NaN audio or latents made NaN frames without a word).
TENSOR_ARGS = ("latents", "audio_emb", "video_latent", "ref_latent", "ref_target_masks")


def check_tensors(arguments: dict[str, Any]) -> None:
    """One line for a tensor keyword that is not a torch.Tensor, or holds NaN or Inf."""
    for name in TENSOR_ARGS:
        value = arguments.get(name)
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            hint = (" (torch.from_numpy)" if isinstance(value, np.ndarray) else
                    " (its clip: audio.clip(start_frame, num_frames))" if hasattr(value, "clip")
                    else "")
            raise UsageError(f"{name}=: expected a torch.Tensor{hint}, not "
                             f"{type(value).__name__}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise UsageError(f"{name}=: holds NaN or Inf values")


def refuse_avatar(source: Path) -> None:
    """The base pipeline given an avatar folder: name the class that loads it (the loader's own
    refusal speaks of commands)."""
    try:
        found = layouts.detect_any(source)
    except LongcatError:
        return  # resolve_checkpoint says what is wrong
    if isinstance(found, layouts.AvatarCheckpoint):
        raise LongcatError(f"{source}: is a {found.describe()} checkpoint; load it with "
                           "LongCatVideoAvatarPipeline.from_pretrained")


def frame_size(x: Any) -> tuple[int, int] | None:
    """(width, height) of an image, or of a video's first frame (PIL or array), if it has one."""
    if isinstance(x, Image.Image):
        return x.size
    if isinstance(x, np.ndarray) and x.ndim >= 3:
        return x.shape[-2], x.shape[-3]
    if isinstance(x, (list, tuple)) and x:
        return frame_size(x[0])
    return None


def validated(method: TaskMethod) -> TaskMethod:
    """A task method that first checks its options with ``settings.validate`` (the same checks
    as the command line's), so bad values stop before any work with one clear line."""
    signature = inspect.signature(method)

    @functools.wraps(method)
    @spelled({})
    def checked(self, *args: Any, **kw: Any) -> Result:
        unknown = [k for k in kw if k not in signature.parameters or k == "self"]
        if unknown:  # Python's TypeError named neither the method nor what it takes
            offered = [p for p in signature.parameters if p != "self"]
            hint = f"; {CALL_RENAMES_BACK[unknown[0]]}= here" \
                if unknown[0] in CALL_RENAMES_BACK else ""
            raise UsageError(f"{method.__name__}() takes no '{unknown[0]}'{hint} (its options: "
                             f"{', '.join(offered)})")
        try:
            call = signature.bind(self, *args, **kw)
        except TypeError as e:  # a required one left out, or too many given by position
            raise UsageError(f"{method.__name__}(): {e}") from None
        if ("height" in call.arguments) != ("width" in call.arguments) and (
                "width" in signature.parameters):  # the other one's default was taken silently
            raise UsageError("height= and width= go together: give both, or neither for the "
                             "task's default size")
        call.apply_defaults()
        if "prompt" in call.arguments and call.arguments["prompt"] is None:
            raise UsageError("prompt=None: give the prompt's text")  # failed in the tokenizer
        for key in ("generator", "noise_generator"):
            if key in call.arguments:
                call.arguments[key] = one_generator(key, call.arguments[key])
        plain_scalars(call.arguments)
        check_tensors(call.arguments)
        s = from_call(method.__name__, call.arguments)
        validate(s, inputs=False)
        if s.task in ("t2v", "i2v", "vc", "long"):  # as run checks them (sizes from the inputs)
            a = call.arguments
            files = InputFiles(self.transformer.dims, frame_size(a.get("image")),
                               frame_size(a.get("video")))
            dtype = dtypes.ALIASES.get(str(self.dtype).removeprefix("torch."), "bf16")  # fp8: bf16
            ranks = self.cp.size if self.cp is not None else 1  # a rank holds its share
            check_memory(replace(s, cp=ranks), files, dtype, self.device)
        self.check_fused(s, scale_given=call.arguments.get("lora_scale") is not None)
        return method(*call.args, **call.kwargs)

    return checked


@dataclass
class Result:
    """Frames ``[F, H, W, 3]`` in [0, 1] (float32), the final latents, the frame rate."""

    frames: np.ndarray
    latents: torch.Tensor
    fps: int
    info: dict[str, Any] = field(default_factory=dict)


class Reporter:
    """Times named stages (summed when repeated) and denoising steps, and shows step bars
    (tqdm: rate and ETA)."""

    def __init__(self, show: bool = False, say=None) -> None:
        self.show = show
        self.say = say
        self.timings: dict[str, float] = {}
        # seconds per denoising step, in order: the first ones carry compilation and autotuning,
        # which a stage total hides
        self.step_s: list[float] = []
        self._last: str | None = None

    def reset(self) -> None:
        """Forget the times (the next video of a matrix run)."""
        self.timings.clear()
        self.step_s.clear()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.say and name != self._last:
            self.say(f"- {name}")
        self._last = name
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    def steps(self, items: Iterable, total: int, desc: str,
              device: torch.device | None = None) -> Iterable:
        """``items`` with a bar when shown; with ``device``, each step's time goes into
        ``step_s`` (a CUDA device is synchronized at the end of each step, so the time is the
        step's own and not its launches')."""
        if self.show:
            import sys

            from tqdm import tqdm

            items = tqdm(items, total=total, desc=desc, file=sys.stderr, leave=False,
                         dynamic_ncols=True)
        return items if device is None else self._timed(items, device)

    def _timed(self, items: Iterable, device: torch.device) -> Iterator:
        sync = device.type == "cuda"
        t0 = time.perf_counter()
        for item in items:
            yield item
            if sync:
                torch.cuda.synchronize(device)
            t1 = time.perf_counter()
            self.step_s.append(t1 - t0)
            t0 = t1


def prompt_clean(text: str) -> str:
    """ftfy, double HTML unescape, whitespace collapse: the original's prompt cleaning."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """transformers/diffusers chatter (load bars, optional-dependency hints) off while our
    loads run, and the caller's settings back afterwards (they stayed off for the whole
    process)."""
    import diffusers
    import transformers

    logs = (transformers.utils.logging, diffusers.utils.logging)
    before = [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in logs]
    for lib in logs:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, (verbosity, bars) in zip(logs, before, strict=True):
            lib.set_verbosity(verbosity)
            lib.enable_progress_bar() if bars else lib.disable_progress_bar()


def _step_callback(pipe: LongCatVideoPipeline, callback: Callable[..., dict[str, Any]] | None,
                   names: Sequence[str]):
    """diffusers' ``callback_on_step_end`` as the denoising loop's hook (latents only)."""
    if callback is None:
        return None
    if not callable(callback):
        raise UsageError(f"callback_on_step_end: a function expected, not "
                         f"{type(callback).__name__}")
    names = getattr(callback, "tensor_inputs", names)
    names = [names] if isinstance(names, str) else list(names)  # not its letters
    if any(n not in LongCatVideoPipeline._callback_tensor_inputs for n in names):
        raise LongcatError(f"callback_on_step_end_tensor_inputs {names}: only "
                           f"{LongCatVideoPipeline._callback_tensor_inputs} are offered")

    def hook(step: int, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        out = callback(pipe, step, t, {"latents": latents})
        out = {} if out is None else out  # a tensor's truth value is an error
        new = out.get("latents", latents) if isinstance(out, dict) else out
        ok = isinstance(new, torch.Tensor) and new.shape == latents.shape
        if ok and new.is_floating_point() and not bool(torch.isfinite(new).all()):
            raise UsageError(f"callback_on_step_end returned latents with NaN or Inf at step "
                             f"{step}")
        if not (ok and isinstance(out, dict)):  # a bad return failed deep in the DiT
            shown = list(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
            raise UsageError(f"callback_on_step_end returned latents {shown} at step {step}: "
                             f"give back a dict with 'latents' of shape {list(latents.shape)}")
        return new.to(latents.device, latents.dtype)

    return hook


def negative_prompt_of(negative_prompt: str | None, guidance: float) -> str | None:
    """What ``run`` and ``pipe()`` pass: the demos' negative prompt when CFG is on and none was
    given (the task methods themselves default to the original pipeline's empty one)."""
    if negative_prompt is None and guidance > 1.0:
        return DEFAULT_NEGATIVE_PROMPT
    return negative_prompt


# How the VAE runs on CUDA. channels_last: its Conv3d weights (and so its activations) in
# channels_last_3d. Off: on an H100 it made the 480p/93 decode 10% faster (0.2 s), and its frames
# 1.6% away from the default's (benchmarks/results/vae_decode.md).
VAE_CONFIG: dict[str, int] = {"channels_last": 0}


def conv3d_memory_format(module: torch.nn.Module, channels_last: bool) -> None:
    """Every Conv3d weight of ``module`` in ``channels_last_3d`` (or back to contiguous); the
    Wan VAE's 4D weights (2D resamplers, norm gammas) cannot take that format, so only these."""
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    for m in module.modules():
        if isinstance(m, torch.nn.Conv3d):
            m.weight.data = m.weight.data.contiguous(memory_format=fmt)


def prepare_vae(vae: torch.nn.Module) -> None:
    """The VAE's conv weights in channels_last_3d on CUDA, if ``VAE_CONFIG`` asks for it (as
    loaded they are contiguous)."""
    if VAE_CONFIG["channels_last"] and next(vae.parameters()).is_cuda:
        conv3d_memory_format(vae, True)


def rgb_image(image: Any, what: str = "image") -> Image.Image:
    """A PIL image as the model reads it, in RGB (the command line converted an RGBA or gray
    file; the API handed 4 or 1 channels to the VAE's convolution)."""
    if not isinstance(image, Image.Image):
        raise UsageError(f"{what}: a PIL image expected, not {type(image).__name__}")
    if 0 in image.size:
        raise UsageError(f"{what}: an empty image ({image.size[0]}x{image.size[1]} px)")
    return image if image.mode == "RGB" else to_rgb(image, what)


def to_pil_frames(video: Any) -> list[Image.Image]:
    """Frames as RGB PIL images, from PIL images or an array [F, H, W, 3] (also the "np"
    output's [1, F, H, W, 3]) of uint8, or of floats in [0, 1] as the pipeline returns them."""
    if isinstance(video, np.ndarray):
        if video.ndim == 5 and video.shape[0] == 1:
            video = video[0]
        if video.ndim != 4 or video.shape[-1] != 3:
            raise UsageError(f"video: frames [F, H, W, 3] expected, not an array of shape "
                             f"{list(video.shape)}")
        if np.issubdtype(video.dtype, np.floating):
            if not (np.isfinite(video).all() and video.min() >= 0.0 and video.max() <= 1.0):
                raise UsageError("video: float frames must lie in [0, 1] (frames of 0..255 "
                                 "are uint8), without NaN or Inf")  # were clipped to white
            video = (video * 255).round().astype(np.uint8)
        elif video.dtype != np.uint8:
            raise UsageError(f"video: uint8 frames or floats in [0, 1] expected, not "
                             f"{video.dtype}")
        return [Image.fromarray(f) for f in video]
    return [rgb_image(f, "video frame") for f in video]


@dataclass
class LongCatVideoPipelineOutput(BaseOutput):
    """``frames``: [1, F, H, W, 3] in [0, 1] for "np", a list of one list of PIL images for "pil",
    [1, F, 3, H, W] for "pt", the final latents for "latent"."""

    frames: Any


class LongCatVideoPipeline(DiffusionPipeline):
    """Tokenizer, text encoder, VAE, scheduler and our DiT, with the tasks as methods.

    ``pipe(prompt=...)`` is the diffusers-style entry (WanPipeline's argument names; ``image`` /
    ``video`` / ``task`` pick i2v, vc, refine or long); ``generate`` and the task methods are what
    ``longcat-tools run`` calls, with every option of each task."""

    _optional_components = ["text_encoder"]  # context-parallel ranks other than 0 have none
    _callback_tensor_inputs = ["latents"]

    def __init__(self, tokenizer, text_encoder, vae, scheduler,
                 transformer: LongCatTransformer3DModel) -> None:
        from diffusers.video_processor import VideoProcessor

        super().__init__()
        self.register_modules(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                              scheduler=scheduler, transformer=transformer)
        self.root: Path | None = None
        self.fused_scales: dict[str, float] = {}  # hub LoRAs lora fuse merged into the DiT
        self.layout = getattr(transformer, "layout", "diffusers")
        self.scale_t = int(getattr(vae.config, "scale_factor_temporal", 4))
        self.scale_s = int(getattr(vae.config, "scale_factor_spatial", 8))
        self.video_processor = VideoProcessor(vae_scale_factor=self.scale_s)
        self.reporter = Reporter()
        self.last_run: dict[str, Any] = {}
        self.offload_text_encoder = False  # runner.offload: encoder lives on the CPU
        self.cp: ContextParallel | None = None  # context parallel: rank 0 encodes and decodes
        self.run_device: torch.device | None = None  # set by from_pretrained (see ``device``)
        self.step_callback: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    # ---- loading ---------------------------------------------------------------------------
    @classmethod
    @spelled(LOAD_RENAMES)
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path,
                        torch_dtype: Any = None, device: Any = "cpu",
                        text_encoder_dtype: Any = None, reporter: Reporter | None = None,
                        offload: str = "none", vae_tiling: bool = False, fast: bool = True,
                        cp: ContextParallel | None = None,
                        fp8: bool | None = None, dtype: Any = None) -> LongCatVideoPipeline:
        """Load every component of a checkpoint (any layout, or a cached Hugging Face repo id)
        straight onto ``device`` in ``torch_dtype`` (or ``dtype``; default fp32). ``offload``
        (runner.offload): "text-encoder" keeps UMT5 on the CPU between prompts, "dit" streams
        the DiT's blocks from CPU memory, "all" both. ``fast``: fused glue for bf16/fp16 on CUDA
        (runner.fast_ops). ``cp``: this process is one rank of a context-parallel job
        (runner.context_parallel); only rank 0 loads UMT5. ``fp8`` (None: as the checkpoint
        is stored): the DiT's block GEMMs in e4m3 (``load_transformer``).

        Every component's files and config are checked before any weights load (one line per
        problem, as ``run`` does). diffusers' generic loader is not used: a native checkpoint
        has no model_index.json, and the DiT has its own loader
        (``LongCatTransformer3DModel.from_pretrained``)."""
        from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler
        from transformers import AutoTokenizer, UMT5EncoderModel

        from longcat_tools.checkpoint.hub import resolve_source
        from longcat_tools.runner import offload as off
        from longcat_tools.runner.loading import empty_transformer, finish_loading

        check_flags(vae_tiling=vae_tiling, fast=fast,
                    **({} if fp8 is None else {"fp8": fp8}))
        torch_dtype = torch_dtype_of(torch_dtype, dtype)
        # as run checks it (torch's assert, its list of device types or, for 0, no GPU came through)
        device = resolve_device(device)
        check_offload(offload, device)
        te_home = torch.device("cpu") if offload in ("text-encoder", "all") else None
        swap = offload in ("dit", "all")
        source = resolve_source(pretrained_model_name_or_path)
        refuse_avatar(source)
        ckpt = resolve_checkpoint(source)
        root = ckpt.root
        dtype = parse_dtype(torch_dtype or "fp32")
        te_dtype = dtype if text_encoder_dtype is None else dtypes.parse(
            text_encoder_dtype, option="text_encoder_dtype")  # not named torch_dtype=
        rep = reporter or Reporter()
        check_components(ckpt)
        use_fp8 = ckpt.is_fp8 if fp8 is None else fp8
        if use_fp8 and dtype == torch.float16:
            raise LongcatError("fp8 GEMMs run with bf16 activations (fp16 output is missing from "
                               "some torch builds' scaled GEMMs): use --dtype bf16")
        if use_fp8 and device.type == "cuda" \
                and torch.cuda.get_device_capability(device) < (8, 9):
            raise LongcatError(f"fp8 GEMMs need an sm89+ GPU (Ada, Hopper or newer); "
                               f"{torch.cuda.get_device_name(device)} is sm"
                               f"{''.join(map(str, torch.cuda.get_device_capability(device)))} "
                               "(use --precision dtype, or fp8=False)")
        with quiet_libraries(), rep.stage("load"):
            tok = AutoTokenizer.from_pretrained(root / "tokenizer")
            # The DiT's skeleton first: transformers sets the process-wide default dtype while
            # it builds UMT5, so nothing else may construct modules meanwhile. Then UMT5 loads on
            # a thread while the DiT's tensors stream in: both mostly wait on reads and copies.
            dit, dit_ckpt = empty_transformer(ckpt.root, device="cpu" if swap else device,
                                              dtype=dtype, fp8=fp8)

            def text_encoder() -> Any:
                return UMT5EncoderModel.from_pretrained(
                    root / "text_encoder", torch_dtype=te_dtype,
                    use_safetensors=True).to(te_home or device).eval()

            with ThreadPoolExecutor(1, thread_name_prefix="longcat-umt5") as pool:
                te_job = pool.submit(text_encoder) if cp is None or cp.rank == 0 else None
                finish_loading(dit, dit_ckpt)
                te = te_job.result() if te_job is not None else None
            vae = AutoencoderKLWan.from_pretrained(root / "vae", torch_dtype=dtype,
                                                   use_safetensors=True).to(device).eval()
            prepare_vae(vae)
            sched = FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler")
            if swap:
                off.enable_block_swap(dit, device)
        dit.enable_fast_ops(fast and device.type == "cuda")
        dit.enable_context_parallel(cp)
        if vae_tiling:
            off.enable_vae_tiling(vae)
        pipe = cls(tok, te, vae, sched, dit)
        pipe.root, pipe.layout, pipe.run_device = root, ckpt.describe(), device
        cfg = ckpt.config()
        pipe.fused_scales = {n: sc for n in (LORA_DISTILL, LORA_REFINE)
                             if (sc := layouts.fused_scale(cfg, "name", n)) is not None}
        pipe.reporter = rep
        pipe.offload_text_encoder = te_home is not None
        pipe.cp = cp
        return pipe

    FUSED_DISTILL = DISTILL_NAME

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
        """diffusers' ``save_pretrained``, checked before any component is written (the DiT's
        ``check_save``: it refused only after the other components were, inside a checkpoint
        too). A new folder is written whole or not at all."""
        from longcat_tools.io.atomic import atomic_folder

        dst = Path(save_directory)
        self.transformer.check_save(dst / "transformer")  # where diffusers will write it
        if dst.exists() or kwargs.get("push_to_hub"):  # the caller's folder, or the hub repo
            return super().save_pretrained(save_directory, *args, **kwargs)  # named after it
        dst.parent.mkdir(parents=True, exist_ok=True)  # as diffusers makes them
        with atomic_folder(dst) as tmp:
            super().save_pretrained(str(tmp), *args, **kwargs)

    def check_fused(self, s: RunSettings, scale_given: bool) -> None:
        """The command line's rule for a checkpoint with a hub LoRA fused in (``settings.
        check_fused``): only that LoRA's stage runs. A call without ``lora_scale`` runs at the
        fused scale."""
        distill, refine = self.fused_scales.get(LORA_DISTILL), self.fused_scales.get(LORA_REFINE)
        if distill is None and refine is None:
            return
        if not scale_given:
            s = replace(s, lora_scale=distill if distill is not None else refine)
        check_fused(s, self.root, distill, refine, what=self.FUSED_DISTILL)

    @property
    def device(self) -> torch.device:
        """Where the work runs: the device given at load (even while the DiT's blocks or the text
        encoder wait in CPU memory), else where the modules are."""
        return self.run_device or super().device

    def to(self, *args: Any, **kwargs: Any) -> LongCatVideoPipeline:
        self.run_device = None  # the modules' device from now on
        return super().to(*args, **kwargs)

    def _no_hook_offload(self, *args: Any, **kwargs: Any) -> None:
        """diffusers' hook-based offloads of the whole pipeline move the modules behind the
        tasks' back (they create tensors on ``device``): refused, pointing at what works."""
        raise LongcatError("LongCatVideoPipeline: diffusers' pipeline-wide offloading is not "
                           "supported; load with from_pretrained(..., offload='text-encoder' | "
                           "'dit' | 'all'), or call pipe.transformer.enable_group_offload(...)")

    enable_model_cpu_offload = enable_sequential_cpu_offload = _no_hook_offload
    enable_group_offload = _no_hook_offload

    @property
    def is_main(self) -> bool:
        """Whether this process writes results (always, unless a non-zero cp rank)."""
        return self.cp is None or self.cp.rank == 0

    def _shared(self, x: torch.Tensor | None) -> torch.Tensor:
        """Rank 0's ``x`` on every rank (the others' ``x`` is ignored): all ranks step
        identical latents."""
        return x if self.cp is None else self.cp.broadcast(x, self.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(seed)

    # ---- building blocks -------------------------------------------------------------------
    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """UMT5 states [B, 1, 512, C] in the DiT dtype and the attention mask [B, 512]."""
        from longcat_tools.runner.offload import on_device

        if not self.is_main:  # rank 0 encodes once for the whole job
            with self.reporter.stage("text_encoder"):
                return self._shared(None), self._shared(None)
        te_on_gpu = on_device(self.text_encoder, self.device,
                              blocks=getattr(getattr(self.text_encoder, "encoder", None),
                                             "block", None)) \
            if self.offload_text_encoder else nullcontext()
        cleaned = [prompt_clean(p) for p in prompts]
        lengths = self.tokenizer(cleaned, max_length=MAX_SEQUENCE_LENGTH + 1, truncation=True,
                                 add_special_tokens=True).input_ids
        for p, ids in zip(prompts, lengths, strict=True):
            if len(ids) > MAX_SEQUENCE_LENGTH:  # cut without a word before
                log.warning(f"a prompt of {len(p):,} characters is longer than the text "
                            f"encoder's {MAX_SEQUENCE_LENGTH} tokens: it reads the first "
                            f"{MAX_SEQUENCE_LENGTH}, as the original does (\"{p[:40]}...\")")
        with self.reporter.stage("text_encoder"), torch.no_grad(), te_on_gpu:
            tokens = self.tokenizer(cleaned, padding="max_length",
                                    max_length=MAX_SEQUENCE_LENGTH, truncation=True,
                                    add_special_tokens=True, return_attention_mask=True,
                                    return_tensors="pt")
            ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
            states = self.text_encoder(ids, mask).last_hidden_state.to(self.dtype)
            states = states.view(len(prompts), 1, states.shape[1], -1)
        if self.cp is not None:
            states, mask = self._shared(states), self._shared(mask)
        return states, mask

    def encode_text(self, prompt: str, negative_prompt: str | None, cfg: bool):
        if not cfg:
            return self.encode_prompt([prompt])
        emb, mask = self.encode_prompt([prompt])
        neg, neg_mask = self.encode_prompt([negative_prompt or ""])
        return torch.cat([neg, emb]), torch.cat([neg_mask, mask])

    def _latent_stats(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.vae.config.z_dim
        mean = torch.tensor(self.vae.config.latents_mean).view(1, z, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(self.vae.config.latents_std).view(1, z, 1, 1, 1)
        return mean.to(latents.device, latents.dtype), inv_std.to(latents.device, latents.dtype)

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        mean, inv_std = self._latent_stats(latents)
        return (latents - mean) * inv_std

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        mean, inv_std = self._latent_stats(latents)
        return latents / inv_std + mean

    def vae_sample(self, pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """A posterior sample of the VAE encoding of ``pixels`` [B, 3, F, H, W] in [-1, 1]."""
        with self.reporter.stage("vae_encode"), torch.no_grad():
            dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
            return dist.sample(generator)

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents -> frames [F, H, W, 3] in [0, 1] (decoded by rank 0 alone under cp)."""
        with self.reporter.stage("vae_decode"), torch.no_grad():
            frames = None
            if self.is_main:
                latents = self.denormalize(latents.to(self.vae.dtype))
                video = self.vae.decode(latents, return_dict=False)[0]
                frames = self.video_processor.postprocess_video(video, output_type="np")[0]
            if self.cp is not None:
                frames = self.cp.broadcast_frames(frames, self.device)
            return frames

    def cond_latents(self, pixels: torch.Tensor, generator, dtype: torch.dtype) -> torch.Tensor:
        return self.normalize(self.vae_sample(pixels, generator).to(dtype))

    def _noise(self, shape, generator, dtype) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=self.device, dtype=dtype)

    def _predict(self, latents, t, text, mask, guidance: float, bsa: BSAParams | None,
                 n_cond: int = 0, per_frame: bool = False, kv_cache=None) -> torch.Tensor:
        """The negated (scheduler-ready) guided prediction for one step."""
        cfg = guidance > 1.0
        inp = (torch.cat([latents] * 2) if cfg else latents).to(self.dtype)
        timestep = t.expand(inp.shape[0]).to(self.dtype)
        if per_frame:
            timestep = timestep.unsqueeze(-1).repeat(1, inp.shape[2])
            timestep[:, :n_cond] = 0
        with torch.no_grad():
            pred = self.transformer(inp, timestep, text, mask, num_cond_latents=n_cond,
                                    kv_cache=kv_cache, bsa=bsa)
        if cfg:
            uncond, cond = pred.chunk(2)
            pred = schedule.cfg_zero_star(cond, uncond, guidance)
        return -pred

    def _denoise(self, latents, timesteps, text, mask, guidance, bsa: BSAParams | None, n_cond=0,
                 per_frame=False, kv_cache=None, step_all=True, desc="denoise") -> torch.Tensor:
        self.last_run = {"loras": list(self.transformer.active_loras),
                         "merged_loras": self.transformer.merged_loras,  # one latent frame: dense
                         "bsa": None if bsa is None or latents.shape[2] <= 1 else asdict(bsa)}
        if bsa is not None:
            self._check_bsa(latents.shape[2:], bsa)
        latents = self._shared(latents)
        with self.reporter.stage("denoise"):
            steps = enumerate(timesteps)
            for i, t in self.reporter.steps(steps, len(timesteps), desc, self.device):
                pred = self._predict(latents, t, text, mask, guidance, bsa, n_cond, per_frame,
                                     kv_cache)
                if step_all:
                    latents = self.scheduler.step(pred, t, latents, return_dict=False)[0]
                else:
                    latents[:, :, n_cond:] = self.scheduler.step(
                        pred[:, :, n_cond:], t, latents[:, :, n_cond:], return_dict=False)[0]
                if self.step_callback is not None:
                    latents = self.step_callback(i, t, latents)
        return latents

    def _check_bsa(self, latent: tuple[int, ...], bsa: BSAParams) -> None:
        """Record the key chunks BSA keeps at this size; warn (once a size) where that is none."""
        grid = chunks.token_grid(tuple(latent), self.transformer.dims.patch_size)
        kept = kept_chunks(grid, bsa)
        self.last_run["bsa_kept_chunks"] = kept
        if kept == 0 and (grid, bsa) not in _WARNED_BSA:
            _WARNED_BSA.add((grid, bsa))
            log.warning("BSA at sparsity %g keeps no key chunk at %dx%dx%d tokens: the "
                        "attention output is zero there, as in the original. Use a lower "
                        "sparsity or --bsa off for videos this small.", bsa.sparsity, *grid)

    def _latent_shape(self, height: int, width: int, num_frames: int) -> tuple[int, ...]:
        return (1, self.transformer.dims.in_channels, (num_frames - 1) // self.scale_t + 1,
                height // self.scale_s, width // self.scale_s)

    @contextmanager
    def adapters(self, lora: str | None, scale: float | None = None) -> Iterator[None]:
        """Run with this hub LoRA active too (or no extra one), then give the caller's set back.
        ``scale`` (None: the scale it was loaded with) is set on the loaded adapter, so a scale
        sweep reads nothing again; the adapter's own scale is put back afterwards, so a LoRA the
        caller loaded keeps the scale they gave it.

        In merge mode (``transformer.lora_mode``) the caller's set comes back lazily: the call's
        set stays merged until the model is next used, so the next call with the same adapters
        and scales (a matrix, a scale sweep's repeats) merges nothing, while anything else (a
        call with another set or scale, a forward, ``state_dict``, ``save_pretrained``,
        ``disable_loras``) restores the weights exactly first. ``active_loras`` says the
        caller's set at once; ``merged_loras`` what the weights hold."""
        from longcat_tools.runner.lora import lora_path

        model = self.transformer
        before_loras = list(model.active_loras)
        saved: dict[str, float] = {}
        if lora is not None and lora in self.fused_scales:
            lora = None  # in the weights already (lora fuse): nothing to apply
        try:
            if lora is None:
                model.sync_loras()  # a set the last call left merged goes now
            else:
                if lora not in model.lora_registry:
                    if self.root is None:
                        raise LongcatError(f"no '{lora}' LoRA loaded and no checkpoint folder to "
                                           f"find it in: pipe.transformer.load_lora(path, "
                                           f"'{lora}') first, or use from_pretrained")
                    model.load_lora(lora_path(self.root, lora), lora)
                if scale is not None:
                    deltas = model.lora_registry[lora]
                    saved = {module: d.multiplier for module, d in deltas.items()}
                    for d in deltas.values():
                        d.multiplier = scale
                # a new scale takes effect even if already active (runtime: enabling copies the
                # deltas; merge: the set's scales differ, so it is merged again)
                model.enable_loras(before_loras if lora in before_loras
                                   else before_loras + [lora])
            yield
        finally:
            for module, multiplier in saved.items():
                model.lora_registry[lora][module].multiplier = multiplier
            if lora is not None:
                model.enable_loras(before_loras, lazy=True)

    def bsa_params(self, setting: BSASetting, refinement: bool = False) -> BSAParams | None:
        """The BSA params a task runs with (``attention.resolve_bsa`` on this model's config)."""
        return resolve_bsa(setting, self.transformer.bsa, self.transformer.config.bsa_params,
                           refinement)

    # ---- the diffusers entry ----------------------------------------------------------------
    @torch.no_grad()
    @spelled(CALL_RENAMES)
    def __call__(self, prompt: str | None = None, negative_prompt: str | None = None,
                 height: int | None = None, width: int | None = None,
                 num_frames: int | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, generator: torch.Generator | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "np",
                 return_dict: bool = True,
                 callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
                 callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
                 *, task: str | None = None, image: Image.Image | None = None,
                 video: Any = None, distill: bool = False,
                 **options: Any) -> LongCatVideoPipelineOutput | tuple[Any]:
        """Generate one video, WanPipeline-style. The task is ``task``, else i2v when ``image`` is
        given, vc when ``video`` is, else t2v; "refine" takes the stage-1 video as ``video``
        (and a condition image as ``image``), "long" continues ``video`` or its own t2v. Left out,
        size, frames, steps and guidance are the task's defaults (distill: 16 steps, no CFG), and
        with CFG the negative prompt is the demos' (as in ``longcat-tools run``; pass "" for the
        original pipeline's empty one).
        ``options``: any other keyword of the task's method (``num_cond_frames``, ``bsa``,
        ``seed``, ``use_kv_cache``, ``t_thresh``...). ``callback_on_step_end(pipe, step, t,
        {"latents": ...})`` may return new latents. ``output_type``: "np", "pil", "pt" or
        "latent"."""
        if output_type not in OUTPUT_TYPES:
            raise LongcatError(f"output_type '{output_type}': use one of "
                               f"{', '.join(OUTPUT_TYPES)}")
        task = task or ("vc" if video is not None else "i2v" if image is not None else "t2v")
        if task not in TASKS:
            raise LongcatError(f"task '{task}': unknown (choose from {', '.join(TASKS)})")
        kw = {"prompt": prompt, "negative_prompt": negative_prompt, "height": height,
              "width": width, "num_frames": num_frames, "steps": num_inference_steps,
              "guidance": guidance_scale, "generator": generator, "latents": latents,
              "image": image, "video": video, "distill": distill, **options}
        if task == "refine":  # the stage-1 video is video= (stage1_video= its method's name)
            if video is not None:
                kw["stage1_video"] = kw.pop("video")
            kw["video"] = options.get("condition_video")
            kw.pop("condition_video", None)
        method = getattr(self, task)
        accepted = inspect.signature(method).parameters
        kw = {k: v for k, v in kw.items() if v is not None or k in options}
        words = {**CALL_RENAMES, "stage1_video": "video", "video": "condition_video"} \
            if task == "refine" else CALL_RENAMES  # the method's names as this call spells them
        unknown = [k for k in kw if k not in accepted]
        if unknown:
            offered = [words.get(p, p) for p in accepted if p not in ("self", "decode")]
            raise LongcatError(f"task {task} takes no '{words.get(unknown[0], unknown[0])}' "
                               f"(its options: {', '.join(offered)})")
        missing = [n for n, p in accepted.items() if p.default is p.empty and n not in kw]
        if missing:
            raise LongcatError(f"task {task} needs {words.get(missing[0], missing[0])}=")
        if generator is not None and options.get("seed") is not None:  # the generator decided
            raise UsageError("seed= and generator=: give one (the generator's state is the "
                             "seed)")
        plain_scalars(kw)  # the guidance is used next, before the task checks its options
        guidance = kw.get("guidance")
        if guidance is not None and not value_fits(guidance, float):
            raise UsageError(f"guidance_scale={guidance!r}: expected a number")
        if "negative_prompt" in accepted:
            kw["negative_prompt"] = negative_prompt_of(negative_prompt,
                                                       guidance_of(guidance, distill))
        if "decode" in accepted:
            kw["decode"] = output_type != "latent"
        self.step_callback = _step_callback(self, callback_on_step_end,
                                            callback_on_step_end_tensor_inputs)
        try:
            result = method(**kw)
        finally:
            self.step_callback = None
        frames = self._output(result, output_type)
        return LongCatVideoPipelineOutput(frames=frames) if return_dict else (frames,)

    def _output(self, result: Result, output_type: str) -> Any:
        if output_type == "latent":
            return result.latents
        if output_type == "pil":
            return [[Image.fromarray(f) for f in (result.frames * 255).round().astype(np.uint8)]]
        frames = result.frames[None]
        return torch.from_numpy(frames).permute(0, 1, 4, 2, 3) if output_type == "pt" else frames

    # ---- tasks -----------------------------------------------------------------------------
    @spelled({})
    def generate(self, task: str = "t2v", **kw: Any) -> Result:
        """Run a task. Common keywords: prompt, negative_prompt, num_frames, steps, guidance,
        distill, seed / generator, latents, height / width (or the input's resolution bucket),
        bsa (None or "config": the config's setting; False/True, "off"/"on", a preset name,
        params), lora_scale (the hub LoRA's scale; None: as loaded). See the ``t2v``...
        methods; each checks its options like the command line."""
        if task not in TASKS:
            raise UsageError(f"--task {task}: unknown (choose from {', '.join(TASKS)})")
        return getattr(self, task)(**kw)

    def _common(self, distill: bool, steps: int | None, guidance: float | None, seed: int,
                generator: torch.Generator | None):
        steps = steps if steps is not None else (16 if distill else 50)
        guidance = guidance_of(guidance, distill)
        gen = generator if generator is not None else self.generator(seed)
        return steps, guidance, gen

    @staticmethod
    def _size_for(frame: Image.Image, resolution: str, height: int | None, width: int | None,
                  granularity: int = 16) -> tuple[int, int]:
        if height is not None and width is not None:
            return height, width
        return bucket_size(frame.height, frame.width, resolution, granularity)

    @validated
    def t2v(self, prompt: str, negative_prompt: str | None = None, height: int = 480,
            width: int = 832, num_frames: int = 93, steps: int | None = None,
            guidance: float | None = None, distill: bool = False, seed: int = 42,
            generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
            bsa: BSASetting = None, decode: bool = True,
            lora_scale: float | None = None) -> Result:
        steps, guidance, gen = self._common(distill, steps, guidance, seed, generator)
        bsa = self.bsa_params(bsa)
        with self.adapters(LORA_DISTILL if distill else None, lora_scale):
            text, mask = self.encode_text(prompt, negative_prompt, guidance > 1.0)
            timesteps = schedule.set_schedule(self.scheduler, steps, distill, self.device)
            shape = self._latent_shape(height, width, num_frames)
            latents = self._init(latents, shape, gen, torch.float32)
            latents = self._denoise(latents, timesteps, text, mask, guidance, bsa)
        frames = self.decode(latents) if decode else None
        return Result(frames, latents, 15, {"steps": len(timesteps), "guidance": guidance,
                                            "height": height, "width": width, **self.last_run})

    def _init(self, latents, shape, gen, dtype) -> torch.Tensor:
        if latents is None:
            return self._noise(shape, gen, dtype)
        if tuple(latents.shape) != tuple(shape):
            raise LongcatError(f"initial latents have shape {list(latents.shape)}, this run needs "
                               f"{list(shape)}")
        return latents.to(self.device, dtype).clone()

    @validated
    def i2v(self, image: Image.Image, prompt: str, negative_prompt: str | None = None,
            resolution: str = "480p", height: int | None = None, width: int | None = None,
            num_frames: int = 93, steps: int | None = None, guidance: float | None = None,
            distill: bool = False, seed: int = 42, generator: torch.Generator | None = None,
            latents: torch.Tensor | None = None, bsa: BSASetting = None,
            decode: bool = True, lora_scale: float | None = None) -> Result:
        if image is None:
            raise LongcatError("task i2v needs an input image (--image FILE)")
        image = rgb_image(image)
        height, width = self._size_for(image, resolution, height, width)
        steps, guidance, gen = self._common(distill, steps, guidance, seed, generator)
        bsa = self.bsa_params(bsa)
        with self.adapters(LORA_DISTILL if distill else None, lora_scale):
            text, mask = self.encode_text(prompt, negative_prompt, guidance > 1.0)
            timesteps = schedule.set_schedule(self.scheduler, steps, distill, self.device)
            pixels = self.video_processor.preprocess(image, height=height, width=width)
            pixels = pixels.to(self.device, self.dtype)
            shape = self._latent_shape(height, width, num_frames)
            latents = self._init(latents, shape, gen, torch.float32)
            latents[:, :, :1] = self.cond_latents(pixels[:, :, None], gen, torch.float32)
            latents = self._denoise(latents, timesteps, text, mask, guidance, bsa, n_cond=1,
                                    per_frame=True, step_all=False)
        frames = self.decode(latents) if decode else None
        return Result(frames, latents, 15, {"steps": len(timesteps), "guidance": guidance,
                                            "height": height, "width": width, **self.last_run})

    @validated
    def vc(self, video: Any, prompt: str, negative_prompt: str | None = None,
           resolution: str = "480p", height: int | None = None, width: int | None = None,
           num_frames: int = 93, num_cond_frames: int = 13, steps: int | None = None,
           guidance: float | None = None, distill: bool = False, seed: int = 42,
           generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
           use_kv_cache: bool = True, offload_kv_cache: bool = False,
           enhance_hf: bool | None = None, bsa: BSASetting = None,
           decode: bool = True, lora_scale: float | None = None) -> Result:
        frames_in = to_pil_frames(video) if video is not None else []
        if not frames_in:
            raise LongcatError("task vc needs an input video (--video FILE)")
        if len(frames_in) < num_cond_frames:
            raise LongcatError(f"the input video has {len(frames_in)} frames; video "
                               f"continuation needs at least {num_cond_frames}")
        enhance_hf = (not distill) if enhance_hf is None else enhance_hf
        height, width = self._size_for(frames_in[0], resolution, height, width)
        steps, guidance, gen = self._common(distill, steps, guidance, seed, generator)
        bsa = self.bsa_params(bsa)
        n_cond = 1 + (num_cond_frames - 1) // self.scale_t
        with self.adapters(LORA_DISTILL if distill else None, lora_scale):
            text, mask = self.encode_text(prompt, negative_prompt, guidance > 1.0)
            timesteps = schedule.set_schedule(self.scheduler, steps, distill, self.device)
            if enhance_hf:
                timesteps = schedule.apply_enhance_hf(self.scheduler, self.device)
            pixels = self.video_processor.preprocess_video(frames_in, height=height, width=width)
            pixels = pixels.to(self.device, self.dtype)
            shape = self._latent_shape(height, width, num_frames)
            latents = self._init(latents, shape, gen, self.dtype)
            latents[:, :, :n_cond] = self.cond_latents(pixels[:, :, -num_cond_frames:], gen,
                                                       self.dtype)
            latents = self._shared(latents)
            if use_kv_cache:
                cond = latents[:, :, :n_cond]
                with self.reporter.stage("kv_cache"), torch.no_grad():
                    empty = torch.zeros(cond.shape[0], 1, MAX_SEQUENCE_LENGTH,
                                        self.transformer.dims.caption_channels, device=self.device,
                                        dtype=self.dtype)
                    t0 = torch.zeros(cond.shape[0], n_cond, device=self.device, dtype=self.dtype)
                    _, cache = self.transformer(cond, t0, empty, return_kv=True,
                                                skip_crs_attn=True,
                                                offload_kv_cache=offload_kv_cache, bsa=bsa)
                noise = self._denoise(latents[:, :, n_cond:], timesteps, text, mask, guidance,
                                      bsa, n_cond=n_cond, kv_cache=cache)
                latents = torch.cat([cond, noise], dim=2)
                del cache
            else:
                latents = self._denoise(latents, timesteps, text, mask, guidance, bsa,
                                        n_cond=n_cond, per_frame=True, step_all=False)
        frames = self.decode(latents) if decode else None
        return Result(frames, latents, 15, {
            "steps": len(timesteps), "guidance": guidance, "height": height, "width": width,
            "num_cond_frames": num_cond_frames, "kv_cache": use_kv_cache,
            "enhance_hf": enhance_hf, **self.last_run})

    @validated
    def refine(self, stage1_video: Any, prompt: str = "", image: Image.Image | None = None,
               video: Any = None, num_cond_frames: int = 0, height: int | None = None,
               width: int | None = None, steps: int = 50, t_thresh: float = 0.5,
               spatial_refine_only: bool = False, seed: int = 42,
               generator: torch.Generator | None = None,
               noise_generator: torch.Generator | None = None,
               latents: torch.Tensor | None = None, bsa: BSASetting = None,
               distill: bool = False, decode: bool = True,
               lora_scale: float | None = None) -> Result:
        """480p -> 720p (and 2x frames unless ``spatial_refine_only``). ``latents`` is the mixing
        noise. ``bsa``: None/"config" runs BSA (the model's params, else the config's), as
        refinement always does unless turned off. ``distill`` is refused (True): refinement
        has its own LoRA."""
        stage1 = to_pil_frames(stage1_video) if stage1_video is not None else []
        if not stage1:
            raise LongcatError("task refine needs a stage-1 video to refine (--video FILE)")
        if image is not None and video is not None:
            raise LongcatError("refine takes an image or a video as its condition, not both")
        height, width = self._size_for(stage1[0], "720p", height, width, granularity=64
                                       if height is None else 16)
        gen = generator if generator is not None else self.generator(seed)
        ngen = noise_generator if noise_generator is not None else self.generator(seed)
        cond_frames_in = to_pil_frames(video) if video is not None else None
        if num_cond_frames > 0 and image is None and cond_frames_in is None:
            raise UsageError(f"num_cond_frames {num_cond_frames}: refine takes its condition "
                             "frames from image= (one) or video=; give one, or leave it out")
        if image is not None and num_cond_frames > 1:  # broke a tensor expand mid-run
            raise UsageError(f"num_cond_frames {num_cond_frames}: an image condition is one "
                             "frame; give video= for more")
        if image is not None:
            image, num_cond_frames = rgb_image(image), 1
        if cond_frames_in is not None and len(cond_frames_in) < num_cond_frames:
            raise LongcatError(f"the condition video has {len(cond_frames_in)} frames, fewer than "
                               f"num_cond_frames {num_cond_frames}")
        bsa = self.bsa_params(bsa, refinement=True)
        with self.adapters(LORA_REFINE, lora_scale):
            text, mask = self.encode_text(prompt, None, False)
            schedule.set_schedule(self.scheduler, steps, False, self.device)
            timesteps = schedule.apply_t_thresh(self.scheduler, t_thresh)

            n_frames = len(stage1)
            new_frames = n_frames if spatial_refine_only else 2 * n_frames
            with self.reporter.stage("upsample"):
                x = torch.from_numpy(np.array([np.asarray(f.convert("RGB")) for f in stage1]))
                x = x.permute(0, 3, 1, 2).to(self.device, self.dtype)
                x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=True)
                x = x.permute(1, 0, 2, 3).unsqueeze(0) / 255.0
                x = F.interpolate(x, size=(new_frames, height, width), mode="trilinear",
                                  align_corners=True) * 2 - 1
            n_noise_frames = x.shape[2] - num_cond_frames
            n_cond, added = 0, 0
            if num_cond_frames > 0:
                n_cond = refine_latent_frames(1 + math.ceil((num_cond_frames - 1) / self.scale_t))
                added = 1 + (n_cond - 1) * self.scale_t - num_cond_frames
            n_noise = refine_latent_frames(math.ceil(n_noise_frames / self.scale_t))
            back = n_noise * self.scale_t - n_noise_frames
            x = torch.cat([x[:, :, :1].repeat(1, 1, added, 1, 1), x,
                           x[:, :, -1:].repeat(1, 1, back, 1, 1)], dim=2)
            z = self.normalize(self.vae_sample(x, ngen))
            noise = latents.to(self.device, z.dtype) if latents is not None else \
                torch.randn(z.shape, generator=ngen, device=self.device, dtype=z.dtype)
            if tuple(noise.shape) != tuple(z.shape):
                raise LongcatError(f"refine noise has shape {list(noise.shape)}, this run needs "
                                   f"{list(z.shape)}")
            lat = ((1 - t_thresh) * z + t_thresh * noise.contiguous()).to(torch.float32)
            if n_cond:
                if image is not None:
                    pix = self.video_processor.preprocess(image, height=height, width=width)
                    pix = pix.to(self.device, self.dtype)[:, :, None]
                else:
                    pix = self.video_processor.preprocess_video(cond_frames_in, height=height,
                                                                width=width)
                    pix = pix.to(self.device, self.dtype)[:, :, -num_cond_frames:]
                pix = torch.cat([pix[:, :, :1].repeat(1, 1, added, 1, 1), pix], dim=2)
                lat[:, :, :n_cond] = self.cond_latents(pix, gen, torch.float32)
            lat = self._denoise(lat, timesteps, text, mask, 1.0, bsa, n_cond=n_cond,
                                per_frame=True, step_all=False, desc="refine")
        frames = None
        if decode:
            frames = self.decode(lat)[added:added + new_frames]
        return Result(frames, lat, 15 if spatial_refine_only else 30, {
            "steps": len(timesteps), "height": height, "width": width,
            "t_thresh": t_thresh, "num_cond_frames": num_cond_frames,
            "cond_latents": n_cond, "padded_front": added, "padded_back": back, **self.last_run})

    @validated
    def long(self, prompt: str, negative_prompt: str | None = None, video: Any = None,
             height: int = 480, width: int = 832, num_frames: int = 93, num_cond_frames: int = 13,
             num_segments: int = 2, steps: int | None = None, guidance: float | None = None,
             distill: bool = False, seed: int = 42, generator: torch.Generator | None = None,
             latents: torch.Tensor | None = None, refine: bool = False,
             refine_height: int | None = None, refine_width: int | None = None,
             t_thresh: float = 0.5, spatial_refine_only: bool = False, bsa: BSASetting = None,
             use_kv_cache: bool = True, offload_kv_cache: bool = False,
             lora_scale: float | None = None) -> Result:
        """t2v (or the given video), then ``num_segments`` continuations of ``num_frames -
        num_cond_frames`` new frames each, conditioned on the previous segment (uint8 frames in
        between, like the demo); with ``refine``, refine in windows of ``num_frames`` stage-1
        frames, each conditioned on the previous refined window's last frames."""
        if video is not None and latents is not None:  # taken by nothing: no t2v segment
            raise UsageError("latents=: a long run from video= samples no first segment to "
                             "start from them; drop latents")
        gen = generator if generator is not None else self.generator(seed)
        last = None
        if video is None:
            first = self.t2v(prompt, negative_prompt, height=height, width=width,
                             num_frames=num_frames, steps=steps, guidance=guidance,
                             distill=distill, generator=gen, latents=latents, bsa=bsa,
                             lora_scale=lora_scale)
            segment = [Image.fromarray(f) for f in (first.frames * 255).astype(np.uint8)]
            last = first.latents
        else:
            segment = to_pil_frames(video)
        target = segment[0].size
        all_frames = list(segment)
        for _ in range(num_segments):
            out = self.vc(segment, prompt, negative_prompt, height=height, width=width,
                          num_frames=num_frames, num_cond_frames=num_cond_frames, steps=steps,
                          guidance=guidance, distill=distill, generator=gen, lora_scale=lora_scale,
                          use_kv_cache=use_kv_cache, offload_kv_cache=offload_kv_cache, bsa=bsa)
            new = [Image.fromarray(f).resize(target, Image.BICUBIC)
                   for f in (out.frames * 255).astype(np.uint8)]
            all_frames.extend(new[num_cond_frames:])
            segment, last = new, out.latents
        # what each stage ran (step_s lists the first video's steps, then each segment's, then
        # each refined window's); the adapters and BSA of the last stage, as other tasks give
        info = {"segments": num_segments, "stage1_frames": len(all_frames),
                "first": None if video is not None else first.info, "continuation": out.info,
                **self.last_run}
        if not refine:
            frames = np.stack([np.asarray(f) for f in all_frames]).astype(np.float32) / 255.0
            return Result(frames, last, 15, info)
        refined: list[np.ndarray] = []
        cond_video, cond_n, start, windows = None, 0, 0, 0
        ngen = self.generator(seed)
        while start == 0 or start + num_cond_frames < len(all_frames):
            window = all_frames[start:start + num_frames]
            r = self.refine(window, "", video=cond_video, num_cond_frames=cond_n,
                            height=refine_height, width=refine_width, t_thresh=t_thresh,
                            spatial_refine_only=spatial_refine_only, generator=gen,
                            noise_generator=ngen, bsa=bsa, lora_scale=lora_scale)
            win = [Image.fromarray(f) for f in (r.frames * 255).astype(np.uint8)]
            refined.extend(np.asarray(f) for f in win[cond_n:])
            cond_video = win
            cond_n = num_cond_frames if spatial_refine_only else 2 * num_cond_frames
            start += num_frames - num_cond_frames
            windows += 1
        info.update(refined_frames=len(refined), windows=windows, refine=r.info, **self.last_run)
        return Result(np.stack(refined).astype(np.float32) / 255.0, r.latents,
                      15 if spatial_refine_only else 30, info)
