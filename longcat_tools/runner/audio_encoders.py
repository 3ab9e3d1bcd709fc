"""Audio to the per-frame embeddings the avatar DiT reads, and the per-clip windows of them.

* 1.0, ``chinese-wav2vec2-base``: loudness to -23 LUFS, a -45 dBFS noise floor (seeded: see
  ``audio_filters``), a 3 kHz low pass, zero-mean unit-variance in float32 (the feature
  extractor's defaults: the original passes the folder as ``feature_size`` by mistake, so its
  ``preprocessor_config.json`` is never read); the conv features (50 Hz) linearly interpolated
  (``align_corners=True``) to ``int(seconds * 32)`` frames, projected, and the 12 transformer
  layers' outputs stacked: [T, 12, C] at 32 fps (16 fps video, 2 audio frames per video frame).
* 1.5, ``whisper-large-v3``: loudness only; log-mel in 30 s chunks (each padded to 30 s), the
  encoder on each 3000-frame chunk, its 33 hidden states (the input of each of the 32 layers,
  then the final layer norm's output) cropped to ``2 * int(seconds * 25)`` frames at 50 Hz,
  grouped as the means of states 0-7, 8-15, 16-23, 24-31 and state 32, each interpolated to
  ``int(seconds * 25)`` frames: [T, 5, C] at 25 fps.

Weights load from ``model.safetensors`` only. The hub's wav2vec2 folder ships a pickle
(``pytorch_model.bin``), which is never opened here: the error says how to convert it once.
Everything runs in float32, as the original's encoders do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from longcat_tools.errors import LongcatError
from longcat_tools.io import jsonio
from longcat_tools.io.safetensors import read_header, read_tensor
from longcat_tools.model import avatar
from longcat_tools.model.avatar import AUDIO_DEFAULTS
from longcat_tools.runner import audio_filters
from longcat_tools.runner.audio import SAMPLE_RATE

WEIGHTS = "model.safetensors"
PICKLE = avatar.WAV2VEC2_PICKLE
CONVERT_HINT = "docs/avatar.md, section Audio, gives the one-line conversion"
WAV2VEC2_PREFIX = "wav2vec2."
WEIGHT_NORM = {".weight_g": ".parametrizations.weight.original0",
               ".weight_v": ".parametrizations.weight.original1"}
WHISPER_PREFIX = "model.encoder."
WHISPER_LAYERS = 32  # the groups below need exactly these
WHISPER_POSITIONS = 1500
WHISPER_GROUPS = ((0, 8), (8, 16), (16, 24), (24, 32), (32, 33))  # hidden-state ranges, averaged
WHISPER_FPS = 50  # encoder frames a second
MEL_CHUNK = 30 * SAMPLE_RATE  # samples per feature-extractor call
MEL_FRAMES = 3000  # mel frames per encoder call
NORM_EPS = 1e-7  # the wav2vec2 feature extractor's variance epsilon


@dataclass(frozen=True)
class Timing:
    """How an encoder's frames line up with the video's."""

    video_fps: int  # the output video's frame rate
    stride: int  # audio frames per video frame

    @property
    def fps(self) -> int:
        return self.video_fps * self.stride


TIMINGS = {"wav2vec2": Timing(video_fps=16, stride=2), "whisper": Timing(video_fps=25, stride=1)}


def _config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        cfg = jsonio.read(path, what="audio encoder config")
    except jsonio.Missing:
        raise LongcatError(f"{path}: missing (an audio encoder folder needs config.json)") from None
    if not isinstance(cfg, dict) or cfg.get("model_type") not in TIMINGS:
        raise LongcatError(f"{path}: model_type must be one of {sorted(TIMINGS)}")
    return cfg


def _state(folder: Path, prefix: str, rename: Callable[[str], str] = str
           ) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix`` in ``folder/model.safetensors``, renamed, as float32."""
    path = folder / WEIGHTS
    if not path.is_file():
        if (folder / PICKLE).is_file():
            raise LongcatError(f"{folder}: has only {PICKLE}, a pickle, which longcat-tools never "
                               f"loads; convert it once to {WEIGHTS} ({CONVERT_HINT})")
        raise LongcatError(f"{folder}: no {WEIGHTS}")
    header = read_header(path)
    out = {}
    with open(path, "rb") as f:
        for name, info in header.tensors.items():
            if name.startswith(prefix):
                out[rename(name[len(prefix):])] = read_tensor(f, info).float()
    return out


def _assign(model: torch.nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    """Load every tensor the model has (extra ones, e.g. a pretraining head, are ignored)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise LongcatError(f"{where / WEIGHTS}: {len(missing)} tensor(s) missing, e.g. "
                           f"'{missing[0]}'")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise LongcatError(f"{where / WEIGHTS}: '{k}' has shape {list(state[k].shape)}, the "
                               f"config needs {list(v.shape)}")
    model.load_state_dict({k: state[k] for k in expected}, strict=True, assign=True)


def _wav2vec2_name(name: str) -> str:
    for old, new in WEIGHT_NORM.items():
        if name.endswith(old):
            return name[:-len(old)] + new
    return name


def load_wav2vec2(folder: str | Path, device: str | torch.device = "cpu") -> Any:
    """``Wav2Vec2Model`` (eager attention, float32, eval) from ``folder``."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    folder = Path(folder)
    cfg = Wav2Vec2Config(**{k: v for k, v in _config(folder).items() if not k.startswith("_")})
    cfg._attn_implementation = "eager"
    with torch.device("meta"):
        model = Wav2Vec2Model(cfg)
    _assign(model, _state(folder, WAV2VEC2_PREFIX, _wav2vec2_name), folder)
    return model.eval().requires_grad_(False).to(device)


def load_whisper(folder: str | Path, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """Whisper's encoder (float32, eval) and feature extractor from ``folder``; the decoder's
    weights are never read."""
    from transformers import WhisperConfig, WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    folder = Path(folder)
    raw = _config(folder)
    if (raw.get("encoder_layers"), raw.get("max_source_positions")) != (WHISPER_LAYERS,
                                                                         WHISPER_POSITIONS):
        raise LongcatError(f"{folder / 'config.json'}: the avatar needs whisper's "
                           f"{WHISPER_LAYERS} encoder layers and {WHISPER_POSITIONS} positions, "
                           f"got {raw.get('encoder_layers')} and "
                           f"{raw.get('max_source_positions')}")
    cfg = WhisperConfig(**{k: v for k, v in raw.items() if not k.startswith("_")})
    cfg._attn_implementation = "eager"
    with torch.device("meta"):
        encoder = WhisperEncoder(cfg)
    _assign(encoder, _state(folder, WHISPER_PREFIX), folder)
    try:
        extractor = WhisperFeatureExtractor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise LongcatError(f"{folder}: cannot read preprocessor_config.json ({e})") from None
    if extractor.feature_size != cfg.num_mel_bins:
        raise LongcatError(f"{folder}: preprocessor feature_size {extractor.feature_size} != "
                           f"config num_mel_bins {cfg.num_mel_bins}")
    return encoder.eval().requires_grad_(False).to(device), extractor


def _interpolate(x: torch.Tensor, frames: int) -> torch.Tensor:
    """[1, T, C] -> [1, frames, C], linear with ``align_corners=True``."""
    return F.interpolate(x.transpose(1, 2), size=frames, mode="linear",
                         align_corners=True).transpose(1, 2)


def _tensor(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, tuple) else x


@torch.no_grad()
def wav2vec2_embedding(model: Any, wave: np.ndarray, noise_seed: int,
                       fps: int = TIMINGS["wav2vec2"].fps, rate: int = SAMPLE_RATE
                       ) -> torch.Tensor:
    """[int(seconds * fps), layers, C]: each transformer layer's output per audio frame."""
    x = np.asarray(wave, np.float64)
    frames = int(len(x) / rate * fps)
    x = audio_filters.loudness_normalize(x, rate)
    x = audio_filters.add_noise_floor(x, noise_seed)
    x = audio_filters.smooth_transients(x, rate).astype(np.float32)
    x = (x - x.mean()) / np.sqrt(x.var() + NORM_EPS)
    device = next(model.parameters()).device
    features = model.feature_extractor(torch.from_numpy(x)[None].to(device)).transpose(1, 2)
    hidden, _ = model.feature_projection(_interpolate(features, frames))
    outputs: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda m, a, out: outputs.append(_tensor(out)))
             for layer in model.encoder.layers]
    try:
        model.encoder(hidden)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(outputs, dim=2)[0]


@torch.no_grad()
def whisper_embedding(encoder: Any, extractor: Any, wave: np.ndarray,
                      fps: int = TIMINGS["whisper"].fps, rate: int = SAMPLE_RATE
                      ) -> torch.Tensor:
    """[int(seconds * fps), 5, C]: the layer groups' means per video frame."""
    x = audio_filters.loudness_normalize(np.asarray(wave, np.float64), rate)
    frames = int(len(x) / rate * fps)
    mel = torch.cat([extractor(x[i:i + MEL_CHUNK], sampling_rate=rate,
                               return_tensors="pt").input_features
                     for i in range(0, len(x), MEL_CHUNK)], dim=-1)
    device = next(encoder.parameters()).device
    states: list[torch.Tensor] = []
    hooks = [layer.register_forward_pre_hook(lambda m, args: states.append(args[0]))
             for layer in encoder.layers]
    hooks.append(encoder.layer_norm.register_forward_hook(lambda m, a, out: states.append(out)))
    chunks = []
    try:
        for i in range(0, mel.shape[-1], MEL_FRAMES):
            states.clear()
            encoder(mel[:, :, i:i + MEL_FRAMES].to(device, torch.float32))
            chunks.append(torch.stack(states, dim=2))  # [1, 1500, 33, C]
    finally:
        for h in hooks:
            h.remove()
    hidden = torch.cat(chunks, dim=1)[:, :frames * 2]
    groups = [_interpolate(hidden[:, :, a:b].mean(dim=2), frames) for a, b in WHISPER_GROUPS]
    return torch.stack(groups, dim=2)[0]


@dataclass
class AudioEncoder:
    """A loaded audio encoder: ``embed`` turns a 16 kHz mono track into its embedding."""

    kind: str  # "wav2vec2" (1.0) or "whisper" (1.5)
    model: Any
    extractor: Any = None

    @property
    def timing(self) -> Timing:
        return TIMINGS[self.kind]

    def embed(self, wave: np.ndarray, noise_seed: int) -> torch.Tensor:
        """[T, S, C] at ``timing.fps``; ``noise_seed`` seeds 1.0's noise floor (1.5 has none)."""
        if self.kind == "wav2vec2":
            return wav2vec2_embedding(self.model, wave, noise_seed)
        return whisper_embedding(self.model, self.extractor, wave)


def load_encoder(folder: str | Path, device: str | torch.device = "cpu") -> AudioEncoder:
    """The encoder in ``folder``, by its config's ``model_type``."""
    kind = _config(Path(folder))["model_type"]
    if kind == "wav2vec2":
        return AudioEncoder(kind, load_wav2vec2(folder, device))
    return AudioEncoder(kind, *load_whisper(folder, device))


def clip_start(clip: int, num_frames: int, num_cond_frames: int, stride: int) -> int:
    """The first audio frame of clip ``clip``: each later clip advances by its new frames."""
    return clip * stride * (num_frames - num_cond_frames)


def clip_windows(embeddings: list[torch.Tensor], start: int, num_frames: int, stride: int,
                 window: int = AUDIO_DEFAULTS.audio_window) -> torch.Tensor:
    """[speakers, num_frames, window, S, C]: for video frame f of the clip, the audio frames
    ``start + f * stride + (-window//2 .. window//2)``, clamped to the track."""
    offsets = torch.arange(window) - window // 2
    centre = torch.arange(start, start + stride * num_frames, stride)[:, None] + offsets
    return torch.stack([e[centre.clamp(0, e.shape[0] - 1)] for e in embeddings])
