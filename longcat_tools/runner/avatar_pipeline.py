"""The LongCat-Video-Avatar tasks (1.0 and 1.5): at2v, ai2v, avc, on the base pipeline's pieces.

``LongCatVideoAvatarPipeline`` is ``LongCatVideoPipeline`` (text encoder, VAE, scheduler, LoRA
adapters, reporter) with the avatar DiT and its audio. Each task reproduces the original
``LongCatVideoAvatarPipeline.generate_at2v`` / ``generate_ai2v`` / ``generate_avc`` step by step,
so given the same initial latents and audio embeddings the final latents match it:

* guidance is two scales, with three predictions per step when either is above 1: ``u_t``
  (negative text, the audio), ``c`` (the prompt, the audio) and ``u`` (negative text, zero
  audio); the prediction is ``u + text * (c - u_t) + audio * (u_t - u)`` (no CFG-Zero*). With
  several speakers the first two run as two batch-1 calls (the DiT takes speaker masks at batch
  1 only);
* condition latents are the VAE's posterior *mode* (no random draw); the only draw is the
  initial noise (fp32 for at2v/ai2v, the DiT's dtype for avc), from the one generator;
* images and videos are resized to cover the target size and centre-cropped;
* avc puts a reference latent (the first frame's) at tensor index 0 with RoPE time
  ``ref_img_index``, caches the condition frames' K/V once, applies ``enhance_hf`` unless
  distilled, and writes the re-encoded condition latents over the result. 1.0 starts from the
  previous clip's latents when given (``video_latent``), 1.5 always from the re-encoded frames;
* distillation: 1.5 activates ``lora/dmd_lora.safetensors`` and samples 8 fixed sigmas
  (``linspace(0, 1, 1000)`` read every 125th from the top); 1.0 has no LoRA, only the 50-point
  grid of the base model. Without guidance given, distillation runs at 1 (no CFG).

Audio: ``audio_from_files`` turns files into per-speaker embeddings (vocal separation, the
original's silence padding, the version's encoder) and the track to mux; ``clip`` cuts the
per-clip windows the tasks take (``audio_emb`` [speakers, frames, 5, S, C]).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from longcat_tools.errors import LongcatError, UsageError
from longcat_tools.model import avatar
from longcat_tools.runner import schedule
from longcat_tools.runner.audio_filters import NOISE_SEEDS
from longcat_tools.runner.pipeline import (
    DEFAULT_NEGATIVE_PROMPT,
    LORA_DISTILL,
    MAX_SEQUENCE_LENGTH,
    LongCatVideoPipeline,
    Reporter,
    Result,
    prepare_vae,
    quiet_libraries,
    rgb_image,
    to_pil_frames,
    validated,
)
from longcat_tools.runner.settings import (
    AVATAR_DISTILL_NAME,
    LOAD_RENAMES,
    MAX_SPEAKERS,
    check_avatar_files,
    check_flags,
    check_offload,
    guidance_of,
    resolve_device,
    spelled,
)

NEGATIVE_PROMPT = "Close-up, " + DEFAULT_NEGATIVE_PROMPT  # the single-speaker demo's
REF_IMG_INDEX = 10  # the demos' reference RoPE time for avc
MASK_FRAME_RANGE = 3  # noise frames within this of it do not see the reference
LORA_DMD = "dmd"
FACE_MARGIN = 0.1  # speaker boxes: each half of the frame less this margin on every side


@dataclass(frozen=True)
class Release:
    """What differs between the avatar releases beyond the DiT's config."""

    encoder: str  # audio_encoders.TIMINGS key
    reencode_cond: bool  # avc: condition latents from the frames (else the previous latents)
    distill_steps: int  # the distillation grid's size


RELEASES = {"avatar-1.0": Release("wav2vec2", reencode_cond=False, distill_steps=50),
            "avatar-1.5": Release("whisper", reencode_cond=True, distill_steps=8)}


def dit_folder(version: avatar.AvatarVersion, speakers: int = 1, int8: bool = False) -> str:
    """The DiT folder a run loads: 1.0 by speaker count, 1.5 plain or INT8."""
    if isinstance(speakers, bool) or not isinstance(speakers, numbers.Integral) \
            or not 1 <= speakers <= MAX_SPEAKERS:
        raise UsageError(f"speakers {speakers!r}: the number of speakers, 1 or {MAX_SPEAKERS} "
                         "(0 and 3 loaded the two-speaker DiT)")
    if int8:
        if not version.int8_folder:
            raise LongcatError(f"{version.name} has no INT8 DiT (INT8 is avatar 1.5's)")
        return version.int8_folder
    return version.dit_folders[min(int(speakers), len(version.dit_folders)) - 1]


def distill_sigmas_15(steps: int) -> torch.Tensor:
    """1.5's DMD schedule: every (1000/steps)-th value of ``linspace(0, 1, 1000)`` from the top."""
    grid = torch.linspace(0, 1, schedule.NUM_TRAIN_TIMESTEPS).flip(0)
    stride = schedule.NUM_TRAIN_TIMESTEPS // steps
    picks = (torch.arange(1, steps + 1, dtype=torch.float32) * stride).round().long()
    return grid[(schedule.NUM_TRAIN_TIMESTEPS - picks)].flip(0).float()


def speaker_masks(height: int, width: int) -> torch.Tensor:
    """[3, H, W] 0/1 masks at the source size, as the multi-speaker demo draws them without
    boxes: speaker 1 in the left half, speaker 2 in the right (each less a 10 % margin), and the
    background."""
    masks = torch.zeros(3, height, width)
    y0, y1 = int(height * FACE_MARGIN), int(height * (1 - FACE_MARGIN))
    half = width // 2
    x0, x1 = int(half * FACE_MARGIN), int(half * (1 - FACE_MARGIN))
    masks[0, y0:y1, x0:x1] = 1
    masks[1, y0:y1, int(half * FACE_MARGIN + half):int(half * (1 - FACE_MARGIN) + half)] = 1
    masks[2] = ((masks[0] + masks[1]) <= 0).float()
    return masks


def fit_masks(masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Masks [K, H, W] resized (bilinear) to cover ``height x width``, then centre-cropped: the
    image's own resize."""
    _, H, W = masks.shape
    if width / height > W / H:
        new_h, new_w = int(H * width / W), width
    else:
        new_h, new_w = height, int(W * height / H)
    out = F.interpolate(masks[None].float(), size=(new_h, new_w), mode="bilinear",
                        align_corners=False)[0]
    top, left = (new_h - height) // 2, (new_w - width) // 2
    out = out[:, top:top + height, left:left + width]
    tokens = F.interpolate(out[None], size=(height // 16, width // 16), mode="nearest")[0]
    empty = [k for k in range(len(tokens)) if not (tokens[k] > 0).any()]
    if empty:  # the DiT would divide by its empty area: NaN everywhere
        raise LongcatError(f"speaker region {empty[0] + 1} covers no token of a {height}x{width} "
                           "video (each DiT token is 16x16 px); use a larger size")
    return out


@dataclass
class DrivingAudio:
    """The audio of a run: each speaker's full embedding [T, S, C] at the encoder's rate, the
    track to mux (16 kHz mono), and what the sidecar records."""

    embeddings: list[torch.Tensor]
    stride: int  # audio frames per video frame
    mux: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    def clip(self, start_frame: int, num_frames: int) -> torch.Tensor:
        """[speakers, num_frames, 5, S, C]: the windows of the clip starting at that video
        frame."""
        from longcat_tools.runner.audio_encoders import clip_windows

        for name, value, least in (("start_frame", start_frame, 0), ("num_frames", num_frames, 1)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) \
                    or value < least:
                raise UsageError(f"clip({name}={value!r}): a whole number, at least {least}")
        return clip_windows(self.embeddings, int(start_frame) * self.stride, int(num_frames),
                            self.stride)


class LongCatVideoAvatarPipeline(LongCatVideoPipeline):
    """Tokenizer, text encoder, VAE, scheduler (from the sibling base folder; 1.5's own
    scheduler), the avatar DiT and the audio encoder, with ``at2v``, ``ai2v`` and ``avc``."""

    FUSED_DISTILL = AVATAR_DISTILL_NAME

    def __init__(self, tokenizer, text_encoder, vae, scheduler, transformer,
                 version: str = "avatar-1.5", audio_encoder: Any = None) -> None:
        super().__init__(tokenizer, text_encoder, vae, scheduler, transformer)
        if version not in RELEASES:
            raise LongcatError(f"avatar version {version!r}: use one of {', '.join(RELEASES)}")
        self.version = version
        self.release = RELEASES[version]
        self.audio_encoder = audio_encoder
        self.separator_path: Path | None = None  # vocal_separator/Kim_Vocal_2.onnx
        self.dmd_path: Path | None = None  # 1.5's distillation LoRA

    @property
    def fps(self) -> int:
        from longcat_tools.runner.audio_encoders import TIMINGS

        return TIMINGS[self.release.encoder].video_fps

    @classmethod
    @spelled(LOAD_RENAMES)
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path,
                        torch_dtype: Any = None, device: Any = "cpu", speakers: int = 1,
                        int8: bool = False, reporter: Reporter | None = None,
                        offload: str = "none", vae_tiling: bool = False, audio: bool = True,
                        dtype: Any = None, **unused: Any) -> LongCatVideoAvatarPipeline:
        """An avatar folder (1.0 or 1.5) and the base parts from ``../LongCat-Video``, on
        ``device`` in ``torch_dtype`` (or ``dtype``; default fp32). The DiT: 1.0's
        ``avatar_multi`` for two speakers, else ``avatar_single``; 1.5's ``base_model_int8``
        (kept INT8) with ``int8``, else ``base_model``. ``audio``: also load the audio encoder
        (float32).

        ``offload`` as the base pipeline's: "text-encoder" keeps the encoders (UMT5 and the
        audio encoder) in CPU memory, each copied to the GPU only while it encodes; "dit"
        streams the ``AvatarBlock``s from CPU memory (``BlockSwap``: INT8 layers' int8 weights
        and float32 scales travel with their block); "all" both."""
        from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler
        from transformers import AutoTokenizer, UMT5EncoderModel

        from longcat_tools.checkpoint import layouts
        from longcat_tools.checkpoint.hub import resolve_source
        from longcat_tools.runner import offload as off
        from longcat_tools.runner.audio_encoders import load_encoder
        from longcat_tools.runner.avatar_dit import load_avatar_transformer
        from longcat_tools.runner.dit import torch_dtype_of
        from longcat_tools.runner.loading import parse_dtype

        if unused:
            raise LongcatError(f"the avatar pipeline takes no '{next(iter(unused))}'")
        check_flags(int8=int8, vae_tiling=vae_tiling, audio=audio)
        device = resolve_device(device)
        check_offload(offload, device)
        encoder_home = torch.device("cpu") if offload in ("text-encoder", "all") else None
        swap = offload in ("dit", "all")
        ckpt = layouts.detect_any(resolve_source(pretrained_model_name_or_path))
        if not isinstance(ckpt, layouts.AvatarCheckpoint):
            raise LongcatError(f"{pretrained_model_name_or_path}: not a LongCat-Video-Avatar "
                               "folder (load the base model with LongCatVideoPipeline)")
        base = ckpt.require_base()
        folder = dit_folder(ckpt.version, speakers, int8)
        if not (ckpt.root / folder).is_dir():
            raise LongcatError(f"{ckpt.root}: no {folder}/ (the DiT this run needs)")
        check_avatar_files(ckpt, folder)
        dtype = parse_dtype(torch_dtype_of(torch_dtype, dtype) or "fp32")
        rep = reporter or Reporter()
        with quiet_libraries(), rep.stage("load"):
            tok = AutoTokenizer.from_pretrained(base / "tokenizer")
            dit = load_avatar_transformer(ckpt.root / folder, "cpu" if swap else device, dtype)
            te = UMT5EncoderModel.from_pretrained(base / "text_encoder", torch_dtype=dtype,
                                                  use_safetensors=True).to(
                encoder_home or device).eval()
            vae = AutoencoderKLWan.from_pretrained(base / "vae", torch_dtype=dtype,
                                                   use_safetensors=True).to(device).eval()
            prepare_vae(vae)
            sched_home = ckpt.root if ckpt.version.own_scheduler else base
            sched = FlowMatchEulerDiscreteScheduler.from_pretrained(sched_home / "scheduler")
            encoder = load_encoder(ckpt.audio_encoder, encoder_home or device) if audio else None
            if swap:
                off.enable_block_swap(dit, device)
        if vae_tiling:
            off.enable_vae_tiling(vae)
        pipe = cls(tok, te, vae, sched, dit, ckpt.version.name, encoder)
        pipe.root, pipe.layout, pipe.run_device = ckpt.root, f"{ckpt.describe()}, DiT " \
            f"{folder}/", device
        pipe.reporter = rep
        pipe.offload_text_encoder = encoder_home is not None
        pipe.separator_path = ckpt.root / avatar.VOCAL_SEPARATOR
        if ckpt.version.lora:
            pipe.dmd_path = ckpt.root / ckpt.version.lora
            if ckpt.distill_fused is not None:  # in the DiT's weights already (lora fuse)
                pipe.fused_scales = {LORA_DISTILL: ckpt.distill_fused}
        return pipe

    # ---- audio -----------------------------------------------------------------------------
    def audio_from_files(self, paths: str | Path | Sequence[str | Path], mode: str = "mix",
                         separate: bool = True, seconds: float = 0.0,
                         seed: int = 42) -> DrivingAudio:
        """Each speaker's embedding from audio files (one path, or one a speaker): the vocals
        (``separate``: through ``vocal_separator/``; else the decoded file), arranged
        (``mode``, several speakers), padded with silence up to ``seconds`` as the original
        does, embedded with this release's encoder (1.0's noise floor seeded with ``seed``).
        The muxed track is the raw files arranged the same way."""
        from longcat_tools.runner import audio, audio_tracks, vocal_separation

        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        if not paths or not all(isinstance(p, (str, Path)) for p in paths):
            raise UsageError("audio_from_files: give one audio file's path, or a list of one "
                             "path a speaker")
        if len(paths) > MAX_SPEAKERS:
            raise UsageError(f"audio_from_files: {len(paths)} files; at most {MAX_SPEAKERS} "
                             "speakers")
        if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real) \
                or not 0 <= seconds <= audio.MAX_SECONDS:
            raise UsageError(f"audio_from_files(seconds={seconds!r}): the video's length in "
                             f"seconds, 0 to {audio.MAX_SECONDS:g}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or (
                self.release.encoder == "wav2vec2" and seed not in NOISE_SEEDS):
            raise UsageError(f"audio_from_files(seed={seed!r}): a whole number (1.0's noise "
                             "floor: numpy's RandomState, 0 to 2**32 - 1)")
        if self.audio_encoder is None:
            raise LongcatError("the pipeline was loaded without its audio encoder (audio=False)")
        with self.reporter.stage("audio"):
            raw = [audio.load(p) for p in paths]
            if separate:
                if self.separator_path is None or not self.separator_path.is_file():
                    raise LongcatError(f"{self.separator_path}: missing (vocal separation "
                                       "needs it; or pass --no-vocal-separation)")
                session = vocal_separation.load_model(self.separator_path)
                speech = [vocal_separation.separate_file(session, p) for p in paths]
            else:
                speech = raw
            mux = raw[0]
            if len(paths) > 1:  # the files' lengths decide (mix: equal); the stems follow them
                mux = audio_tracks.merged(audio_tracks.arrange(raw, mode, paths))
                if mode == "mix":
                    speech = [s[:min(map(len, speech))] for s in speech]
                speech = audio_tracks.arrange(speech, mode, paths)
            padded = audio_tracks.missing_samples(speech[0], seconds) / audio.SAMPLE_RATE
            tracks = [audio_tracks.pad_to(s, seconds) for s in speech]
            with self._audio_encoder_on_device():
                embeddings = [self.audio_encoder.embed(t, noise_seed=seed) for t in tracks]
        return DrivingAudio(embeddings, self.audio_encoder.timing.stride, mux, {
            "files": list(paths), "mode": mode if len(paths) > 1 else None,
            "vocal_separation": separate, "padded_s": round(padded, 3),
            "encoder": self.audio_encoder.kind})

    def _audio_encoder_on_device(self) -> AbstractContextManager[Any]:
        """Where the audio encoder runs: with the encoders offloaded it waits in CPU memory
        (``on_device``) and comes to the GPU whole for the embedding (whisper-large-v3's
        encoder is 0.64 B parameters, 2.5 GB in float32, and it runs before the DiT needs the
        memory, so it is not streamed block by block as UMT5 is); else it stays where it was
        loaded."""
        from longcat_tools.runner.offload import on_device

        if not self.offload_text_encoder:
            return nullcontext()
        return on_device(self.audio_encoder.model, self.device)

    # ---- building blocks -------------------------------------------------------------------
    def _encode_mode(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE posterior's mode of ``pixels`` [B, 3, F, H, W] (no random draw)."""
        with self.reporter.stage("vae_encode"), torch.no_grad():
            return self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mode()

    def image_latent(self, image: Image.Image, height: int, width: int) -> torch.Tensor:
        """The normalised fp32 latent [1, C, 1, h, w] of an image, cropped to the size."""
        pixels = self.video_processor.preprocess(image, height=height, width=width,
                                                 resize_mode="crop")
        return self.normalize(self._encode_mode(pixels.to(self.device, self.dtype)[:, :, None])
                              .to(torch.float32))

    def _steps(self, distill: bool, steps: int | None, guidance: float | None,
               audio_guidance: float | None) -> tuple[int, float, float]:
        steps = steps if steps is not None else (self.release.distill_steps if distill else 50)
        return steps, guidance_of(guidance, distill), guidance_of(audio_guidance, distill)

    def _schedule(self, steps: int, distill: bool) -> torch.Tensor:
        if not (distill and self.version == "avatar-1.5"):
            return schedule.set_schedule(self.scheduler, steps, distill, self.device)
        if steps != self.release.distill_steps:
            raise LongcatError(f"avatar 1.5 distillation samples {self.release.distill_steps}"
                               f" fixed steps; got steps={steps}")
        self.scheduler.set_timesteps(steps, sigmas=distill_sigmas_15(steps).numpy(),
                                     device=self.device)
        return self.scheduler.timesteps

    def _lora(self, distill: bool, lora_scale: float | None) -> str | None:
        """The release's distillation LoRA when distilling (read once). 1.0 ships none: there
        ``distill`` changes only the schedule, as the original's ``use_distill`` does (the CLI
        refuses ``--distill`` on 1.0, since nothing distilled exists for it)."""
        lora = avatar.VERSIONS[self.version].lora
        if not distill or lora is None or LORA_DISTILL in self.fused_scales:
            if lora_scale not in (None, 1.0) and LORA_DISTILL not in self.fused_scales:
                raise UsageError(f"lora_scale={lora_scale}: this run activates no LoRA ("
                                 + ("distill=True loads the DMD LoRA)" if lora else
                                    f"{self.version} ships none)"))
            return None
        if LORA_DMD not in self.transformer.lora_registry:
            if self.dmd_path is None or not self.dmd_path.is_file():
                raise LongcatError(f"{self.dmd_path or lora}: missing; avatar distillation "
                                   "needs it (or load it with "
                                   "pipe.transformer.load_lora(path, 'dmd'))")
            self.transformer.load_lora(str(self.dmd_path), LORA_DMD)
        return LORA_DMD

    def _audio_in(self, audio_emb: torch.Tensor, masks: torch.Tensor | None,
                  num_frames: int) -> torch.Tensor:
        """The clip's audio on the device: one window a video frame of the clip (avc's KV cache
        path took a shorter clip without a word), one region a speaker plus the background."""
        if audio_emb is None or audio_emb.dim() != 5:
            raise UsageError("audio_emb must be [speakers, frames, window, blocks, channels] "
                             "(DrivingAudio.clip)")
        speakers, frames = audio_emb.shape[:2]
        if frames != num_frames:
            raise UsageError(f"audio_emb covers {frames} video frames, the clip has {num_frames}"
                             f": pass audio.clip(start, {num_frames})")
        if speakers > MAX_SPEAKERS:
            raise UsageError(f"audio_emb has {speakers} speakers; at most {MAX_SPEAKERS}")
        if speakers > 1 and masks is None:
            raise UsageError(f"audio_emb has {speakers} speakers: several speakers need "
                             "ref_target_masks (ai2v or avc)")
        if masks is not None and masks.shape[0] != speakers + 1:
            raise UsageError(f"ref_target_masks has {masks.shape[0]} regions; {speakers} "
                             f"speaker(s) need {speakers + 1} (each speaker's, then the "
                             "background: speaker_masks)")
        return audio_emb.to(self.device)

    def _masks(self, masks: torch.Tensor | None, height: int, width: int) -> torch.Tensor | None:
        if masks is None:
            return None
        if masks.dim() != 3:
            raise UsageError(f"ref_target_masks: [regions, height, width] expected, not "
                             f"{list(masks.shape)} (speaker_masks makes them)")
        return fit_masks(masks, height, width).to(self.device)

    def _denoise_avatar(self, latents: torch.Tensor, timesteps: torch.Tensor, text, mask,
                        audio: torch.Tensor, tg: float, ag: float, n_cond: int = 0,
                        per_frame: bool = False, zero_cond: bool = True, step_from: int = 0,
                        masks: torch.Tensor | None = None, **dit_kw: Any) -> torch.Tensor:
        """The original's loop: ``step_from`` latent frames stay clean (not stepped)."""
        self.last_run = {"loras": list(self.transformer.active_loras),
                         "merged_loras": self.transformer.merged_loras}
        cfg = tg > 1.0 or ag > 1.0
        neg, neg_mask = (text[:1], mask[:1]) if cfg else (None, None)
        B = latents.shape[0]

        def timestep(t: torch.Tensor, n: int, frames: int) -> torch.Tensor:
            ts = t.expand(n).to(self.dtype)
            if per_frame:
                ts = ts.unsqueeze(-1).repeat(1, frames)
                if zero_cond:
                    ts[:, :n_cond] = 0
            return ts

        def dit(x, ts, txt, txt_mask, a):
            return self.transformer(x, ts, txt, txt_mask, num_cond_latents=n_cond, audio_embs=a,
                                    ref_target_masks=masks, **dit_kw)

        with self.reporter.stage("denoise"), torch.no_grad():
            for i, t in self.reporter.steps(enumerate(timesteps), len(timesteps), "denoise",
                                            self.device):
                x = latents.to(self.dtype)
                T = x.shape[2]
                if not cfg:
                    pred = dit(x, timestep(t, B, T), text, mask, audio)
                else:
                    if masks is not None:  # speaker masks: batch 1 per call
                        ut = dit(x, timestep(t, 1, T), text[:1], mask[:1], audio)
                        c = dit(x, timestep(t, 1, T), text[1:], mask[1:], audio)
                    else:
                        both = dit(torch.cat([x, x]), timestep(t, 2 * B, T), text, mask,
                                   torch.cat([audio, audio]))
                        ut, c = both.chunk(2)
                    u = dit(x, timestep(t, B, T), neg, neg_mask, torch.zeros_like(audio))
                    pred = u + tg * (c - ut) + ag * (ut - u)
                pred = -pred
                if step_from:
                    latents[:, :, step_from:] = self.scheduler.step(
                        pred[:, :, step_from:], t, latents[:, :, step_from:],
                        return_dict=False)[0]
                else:
                    latents = self.scheduler.step(pred, t, latents, return_dict=False)[0]
                if self.step_callback is not None:
                    latents = self.step_callback(i, t, latents)
        return latents

    def _info(self, timesteps, tg, ag, height, width, **extra) -> dict[str, Any]:
        return {"steps": len(timesteps), "guidance": tg, "audio_guidance": ag, "height": height,
                "width": width, "version": self.version, **extra, **self.last_run}

    # ---- tasks -----------------------------------------------------------------------------
    def _base_task(self, *_args: Any, **_kw: Any) -> Any:
        raise UsageError("the avatar pipeline runs at2v, ai2v and avc (pipe.at2v(audio_emb, "
                         "prompt, ...), the embedding from pipe.audio_from_files); pipe(...), "
                         "t2v, i2v, vc, long and refine are the base model's "
                         "(LongCatVideoPipeline)")

    # inherited, they failed deep in the DiT for want of audio, after the text encoder ran
    __call__ = t2v = i2v = vc = long = refine = _base_task

    @spelled({})
    def generate(self, task: str = "at2v", **kw: Any) -> Result:
        """Run ``at2v``, ``ai2v`` or ``avc`` (see each)."""
        if task not in ("at2v", "ai2v", "avc"):
            raise UsageError(f"--task {task}: the avatar runs at2v, ai2v or avc")
        return getattr(self, task)(**kw)

    @validated
    def at2v(self, audio_emb: torch.Tensor, prompt: str, negative_prompt: str | None = None,
             height: int = 480, width: int = 832, num_frames: int = 93, steps: int | None = None,
             guidance: float | None = None, audio_guidance: float | None = None,
             distill: bool = False, seed: int = 42, generator: torch.Generator | None = None,
             latents: torch.Tensor | None = None, decode: bool = True,
             lora_scale: float | None = None) -> Result:
        """Text and audio to video (one speaker). ``audio_emb`` [1, num_frames, 5, S, C]."""
        audio = self._audio_in(audio_emb, None, num_frames)
        steps, tg, ag = self._steps(distill, steps, guidance, audio_guidance)
        gen = generator if generator is not None else self.generator(seed)
        with self.adapters(self._lora(distill, lora_scale), lora_scale):
            text, mask = self.encode_text(prompt, negative_prompt, tg > 1.0 or ag > 1.0)
            timesteps = self._schedule(steps, distill)
            shape = self._latent_shape(height, width, num_frames)
            latents = self._init(latents, shape, gen, torch.float32)
            latents = self._denoise_avatar(latents, timesteps, text, mask, audio, tg, ag)
        frames = self.decode(latents) if decode else None
        return Result(frames, latents, self.fps, self._info(timesteps, tg, ag, height, width))

    @validated
    def ai2v(self, image: Image.Image, audio_emb: torch.Tensor, prompt: str,
             negative_prompt: str | None = None, resolution: str = "480p",
             height: int | None = None, width: int | None = None, num_frames: int = 93,
             steps: int | None = None, guidance: float | None = None,
             audio_guidance: float | None = None, distill: bool = False, seed: int = 42,
             generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
             ref_target_masks: torch.Tensor | None = None, decode: bool = True,
             lora_scale: float | None = None) -> Result:
        """Image, text and audio to video. Several speakers: ``audio_emb`` [K, ...] and
        ``ref_target_masks`` [3, H, W] at the image's size (``speaker_masks``)."""
        if image is None:
            raise LongcatError("task ai2v needs an input image (--image FILE)")
        image = rgb_image(image)  # as i2v: a str, an array or an empty image failed deep inside
        height, width = self._size_for(image, resolution, height, width)
        masks = self._masks(ref_target_masks, height, width)
        audio = self._audio_in(audio_emb, masks, num_frames)
        steps, tg, ag = self._steps(distill, steps, guidance, audio_guidance)
        gen = generator if generator is not None else self.generator(seed)
        with self.adapters(self._lora(distill, lora_scale), lora_scale):
            text, mask = self.encode_text(prompt, negative_prompt, tg > 1.0 or ag > 1.0)
            timesteps = self._schedule(steps, distill)
            shape = self._latent_shape(height, width, num_frames)
            latents = self._init(latents, shape, gen, torch.float32)
            latents[:, :, :1] = self.image_latent(image, height, width)
            latents = self._denoise_avatar(latents, timesteps, text, mask, audio, tg, ag,
                                           n_cond=1, per_frame=True, step_from=1, masks=masks)
        frames = self.decode(latents) if decode else None
        return Result(frames, latents, self.fps, self._info(
            timesteps, tg, ag, height, width, speakers=int(audio.shape[0])))

    @validated
    def avc(self, video: Any, audio_emb: torch.Tensor, prompt: str,
            negative_prompt: str | None = None, resolution: str = "480p",
            height: int | None = None, width: int | None = None, num_frames: int = 93,
            num_cond_frames: int = 13, steps: int | None = None, guidance: float | None = None,
            audio_guidance: float | None = None, distill: bool = False, seed: int = 42,
            generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
            video_latent: torch.Tensor | None = None, ref_latent: torch.Tensor | None = None,
            ref_img_index: int = REF_IMG_INDEX, mask_frame_range: int = MASK_FRAME_RANGE,
            use_kv_cache: bool = True, offload_kv_cache: bool = False,
            enhance_hf: bool | None = None, ref_target_masks: torch.Tensor | None = None,
            decode: bool = True, lora_scale: float | None = None) -> Result:
        """Continue ``video`` (its last ``num_cond_frames`` frames) for ``num_frames`` frames
        with the audio of that clip. ``ref_latent`` (default: the latent of the video's first
        frame, as ai2v's image latent) is the identity reference; ``video_latent`` (1.0: the
        previous clip's latents, whose last condition latents it starts from)."""
        frames_in = to_pil_frames(video) if video is not None else []
        if not frames_in:
            raise LongcatError("task avc needs an input video (--video FILE)")
        if len(frames_in) < num_cond_frames:
            raise LongcatError(f"the input video has {len(frames_in)} frames; avc continues "
                               f"from the last {num_cond_frames}")
        for name, value, least in (("ref_img_index", ref_img_index, None),  # RoPE time: any
                                   ("mask_frame_range", mask_frame_range, 0)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (
                    least is not None and value < least):
                raise UsageError(f"{name}={value!r}: a whole number"
                                 + ("" if least is None else f", {least} or more"))
        enhance_hf = (not distill) if enhance_hf is None else enhance_hf
        if distill and enhance_hf:
            raise LongcatError("enhance_hf cannot be combined with distill")
        height, width = self._size_for(frames_in[0], resolution, height, width)
        if ref_latent is not None and tuple(ref_latent.shape) != (
                ref_shape := self._latent_shape(height, width, 1)):
            raise UsageError(f"ref_latent has shape {list(ref_latent.shape)}; this clip's "
                             f"reference latent is {list(ref_shape)}")
        masks = self._masks(ref_target_masks, height, width)
        audio = self._audio_in(audio_emb, masks, num_frames)
        steps, tg, ag = self._steps(distill, steps, guidance, audio_guidance)
        gen = generator if generator is not None else self.generator(seed)
        n_cond = 1 + (num_cond_frames - 1) // self.scale_t
        with self.adapters(self._lora(distill, lora_scale), lora_scale):
            text, mask = self.encode_text(prompt, negative_prompt, tg > 1.0 or ag > 1.0)
            timesteps = self._schedule(steps, distill)
            if enhance_hf:
                timesteps = schedule.apply_enhance_hf(self.scheduler, self.device)
            if ref_latent is None:
                ref_latent = self.image_latent(frames_in[0], height, width)
            pixels = self.video_processor.preprocess(frames_in[-num_cond_frames:], height=height,
                                                     width=width, resize_mode="crop")
            pixels = pixels.permute(1, 0, 2, 3)[None].to(self.device, self.dtype)
            cond = self.normalize(self._encode_mode(pixels))
            shape = self._latent_shape(height, width, num_frames)
            latents = self._init(latents, shape, gen, self.dtype)
            start = cond if self.release.reencode_cond or video_latent is None \
                else video_latent[:, :, -n_cond:]
            latents[:, :, :n_cond] = start.to(latents.device)
            latents = torch.cat([ref_latent.to(latents.device), latents], dim=2)
            n_all = n_cond + 1
            ref = dict(num_ref_latents=1, ref_img_index=ref_img_index,
                       mask_frame_range=mask_frame_range)
            if use_kv_cache:
                clean = latents[:, :, :n_all]
                with self.reporter.stage("kv_cache"), torch.no_grad():
                    empty = torch.zeros(clean.shape[0], 1, MAX_SEQUENCE_LENGTH,
                                        self.transformer.dims.caption_channels,
                                        device=self.device, dtype=self.dtype)
                    t0 = torch.zeros(clean.shape[0], n_all, device=self.device, dtype=self.dtype)
                    _, cache = self.transformer(clean.to(self.dtype), t0, empty,
                                                num_cond_latents=n_all, return_kv=True,
                                                skip_crs_attn=True,
                                                offload_kv_cache=offload_kv_cache,
                                                num_ref_latents=1, ref_img_index=ref_img_index)
                noise = self._denoise_avatar(latents[:, :, n_all:], timesteps, text, mask, audio,
                                             tg, ag, n_cond=n_all, per_frame=True,
                                             zero_cond=False, masks=masks, kv_cache=cache,
                                             **ref)
                latents = torch.cat([clean, noise], dim=2)
                del cache
            else:
                latents = self._denoise_avatar(latents, timesteps, text, mask, audio, tg, ag,
                                               n_cond=n_all, per_frame=True, step_from=n_all,
                                               masks=masks, **ref)
            latents = latents[:, :, 1:]
            latents[:, :, :n_cond] = cond
        frames = self.decode(latents) if decode else None
        return Result(frames, latents, self.fps, self._info(
            timesteps, tg, ag, height, width, num_cond_frames=num_cond_frames,
            kv_cache=use_kv_cache, enhance_hf=enhance_hf, ref_img_index=ref_img_index,
            mask_frame_range=mask_frame_range, speakers=int(audio.shape[0])))

