"""The LongCat-Video-Avatar DiT (1.0 and 1.5) as data: the config fields it adds to the base DiT,
the tensors it adds (every base tensor is kept, under its base name and shape), and what differs
between the two releases.

One class, ``LongCatVideoAvatarTransformer3DModel``, serves both versions. 1.5 only made the audio
encoder's shape (``audio_block`` x ``audio_channel``) configurable; a 1.0 config may lack those two
fields, and then the class defaults (the 1.0 values, 12 x 768) apply.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from longcat_tools.errors import LongcatError
from longcat_tools.model import bounds, keymap
from longcat_tools.model.keymap import DiTDims

AVATAR_CLASS = "LongCatVideoAvatarTransformer3DModel"
BASE_FOLDER = "LongCat-Video"  # the sibling folder the avatar reads tokenizer/text encoder/VAE from
VOCAL_SEPARATOR = "vocal_separator/Kim_Vocal_2.onnx"
WAV2VEC2 = "chinese-wav2vec2-base"  # 1.0's audio encoder folder
WHISPER = "whisper-large-v3"  # 1.5's
WAV2VEC2_PICKLE = "pytorch_model.bin"  # what the original torch.loads; never read here
ENCODER_CLASSES = {WAV2VEC2: "Wav2Vec2Model", WHISPER: "WhisperModel"}  # transformers
AUDIO_MODES = ("mix", "concat")  # two speakers: over the same span, or one after the other


@dataclass(frozen=True)
class AudioDims:
    """The avatar's own constructor arguments; the defaults are the class's."""

    audio_window: int = 5  # W: audio frames around each video frame
    audio_block: int = 12  # S: encoder layers (wav2vec2) or layer groups (whisper)
    audio_channel: int = 768  # Ca: the audio encoder's width
    intermediate_dim: int = 512  # I: audio_proj's hidden width
    output_dim: int = 768  # Do: width of the audio tokens
    context_tokens: int = 32  # M: audio tokens per latent frame
    vae_scale: int = 4  # V: video frames per latent frame
    audio_prenorm: bool = False  # a LayerNorm on the audio tokens before each cross-attention
    class_range: int = 24  # speaker-slot RoPE range
    class_interval: int = 4

    @property
    def window_vf(self) -> int:
        """Audio frames a later latent frame sees: its V video frames' windows, overlapping."""
        return self.audio_window + self.vae_scale - 1


AUDIO_FIELDS = tuple(f.name for f in fields(AudioDims))
AUDIO_DEFAULTS = AudioDims()


def audio_dims(config: Mapping[str, Any], where: str = "transformer config") -> AudioDims:
    """The avatar fields of a config, the class defaults for absent ones; a mistyped or absurd
    value is one LongcatError naming ``where`` and the field."""
    values: dict[str, Any] = {}
    for name in AUDIO_FIELDS:
        if name not in config:
            continue
        v = config[name]
        if name == "audio_prenorm":
            if not isinstance(v, bool):
                raise LongcatError(f"{where}: field 'audio_prenorm' must be true or false, "
                                   f"got {v!r}")
        elif (not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= bounds.MAX_WIDTH):
            raise LongcatError(f"{where}: field '{name}' must be a positive integer up to "
                               f"{bounds.MAX_WIDTH}, got {v!r}")
        values[name] = v
    return AudioDims(**values)


# A tensor's shape from the DiT's and the avatar's dimensions; None where the tensor is absent.
Shape = Callable[[DiTDims, AudioDims], "tuple[int, ...] | None"]


def _h(n: int = 1) -> Shape:
    return lambda d, a: (n * d.hidden_size,)


# Tensors each block adds, keyed by the base block tensor they come before in the original's
# state_dict order (the order its modules are created in).
BLOCK_TENSORS: dict[str, tuple[tuple[str, Shape], ...]] = {
    "pre_crs_attn_norm.weight": (
        ("audio_adaLN_modulation.1.weight", lambda d, a: (3 * d.hidden_size, d.adaln_tembed_dim)),
        ("audio_adaLN_modulation.1.bias", _h(3)),
    ),
    "attn.qkv.weight": (
        ("pre_video_crs_attn_norm.weight", _h()),
        ("pre_video_crs_attn_norm.bias", _h()),
        ("pre_audio_crs_attn_norm.weight", lambda d, a: (a.output_dim,) if a.audio_prenorm
         else None),
        ("pre_audio_crs_attn_norm.bias", lambda d, a: (a.output_dim,) if a.audio_prenorm
         else None),
    ),
    "ffn.w1.weight": (
        ("audio_cross_attn.q_linear.weight", lambda d, a: (d.hidden_size, d.hidden_size)),
        ("audio_cross_attn.q_linear.bias", _h()),
        ("audio_cross_attn.q_norm.weight", lambda d, a: (d.head_dim,)),
        ("audio_cross_attn.proj.weight", lambda d, a: (d.hidden_size, d.hidden_size)),
        ("audio_cross_attn.proj.bias", _h()),
        ("audio_cross_attn.kv_linear.weight", lambda d, a: (2 * d.hidden_size, a.output_dim)),
        ("audio_cross_attn.kv_linear.bias", _h(2)),
        ("audio_cross_attn.k_norm.weight", lambda d, a: (d.head_dim,)),
    ),
}

# Tensors outside the blocks, keyed by the base tensor they come before.
GLOBAL_TENSORS: dict[str, tuple[tuple[str, Shape], ...]] = {
    "final_layer.linear.weight": (
        ("audio_proj.proj1.weight", lambda d, a: (
            a.intermediate_dim, a.audio_window * a.audio_block * a.audio_channel)),
        ("audio_proj.proj1.bias", lambda d, a: (a.intermediate_dim,)),
        ("audio_proj.proj1_vf.weight", lambda d, a: (
            a.intermediate_dim, a.window_vf * a.audio_block * a.audio_channel)),
        ("audio_proj.proj1_vf.bias", lambda d, a: (a.intermediate_dim,)),
        ("audio_proj.proj2.weight", lambda d, a: (a.intermediate_dim, a.intermediate_dim)),
        ("audio_proj.proj2.bias", lambda d, a: (a.intermediate_dim,)),
        ("audio_proj.proj3.weight", lambda d, a: (
            a.context_tokens * a.output_dim, a.intermediate_dim)),
        ("audio_proj.proj3.bias", lambda d, a: (a.context_tokens * a.output_dim,)),
        ("audio_proj.norm.weight", lambda d, a: (a.output_dim,)),
        ("audio_proj.norm.bias", lambda d, a: (a.output_dim,)),
    ),
}

_BLOCK_RE = re.compile(r"^(blocks\.\d+\.)(.+)$")


def tensor_specs(dims: DiTDims, audio: AudioDims) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of the avatar DiT, in the original state_dict order: the
    base DiT's tensors with the avatar's spliced in."""
    out: list[tuple[str, tuple[int, ...]]] = []
    for name, shape in keymap.native_tensor_specs(dims):
        m = _BLOCK_RE.match(name)
        prefix, extras = ((m.group(1), BLOCK_TENSORS.get(m.group(2), ())) if m
                          else ("", GLOBAL_TENSORS.get(name, ())))
        for extra, shape_of in extras:
            extra_shape = shape_of(dims, audio)
            if extra_shape is not None:
                out.append((prefix + extra, extra_shape))
        out.append((name, shape))
    return out


def is_avatar_config(config: Mapping[str, Any]) -> bool:
    return config.get("_class_name") == AVATAR_CLASS


@dataclass(frozen=True)
class AvatarVersion:
    """One avatar release: its hub repo and folder, where its parts live, its audio shape."""

    name: str  # the --model name
    repo: str
    folder: str  # its name in the weights tree, beside BASE_FOLDER
    dit_folders: tuple[str, ...]  # diffusers-style DiT folders (config.json + shards + index)
    audio_encoder: str  # subfolder of the audio encoder
    audio_block: int  # S: wav2vec2-base's 12 layers, or whisper's 5 layer groups
    optional_fields: tuple[str, ...]  # config fields the release leaves out when at the default
    int8_folder: str | None  # the INT8 copy of the first DiT folder
    lora: str | None  # the distillation LoRA, relative to the folder
    own_scheduler: bool  # scheduler/ in the folder (else the base folder's)
    root_files: tuple[str, ...]  # JSON files at the folder's root


VERSIONS: dict[str, AvatarVersion] = {
    "avatar-1.0": AvatarVersion(
        name="avatar-1.0", repo="meituan-longcat/LongCat-Video-Avatar",
        folder="LongCat-Video-Avatar", dit_folders=("avatar_single", "avatar_multi"),
        audio_encoder=WAV2VEC2, audio_block=12,
        optional_fields=("audio_block", "audio_channel"), int8_folder=None, lora=None,
        own_scheduler=False, root_files=()),
    "avatar-1.5": AvatarVersion(
        name="avatar-1.5", repo="meituan-longcat/LongCat-Video-Avatar-1.5",
        folder="LongCat-Video-Avatar-1.5", dit_folders=("base_model",),
        audio_encoder=WHISPER, audio_block=5, optional_fields=(),
        int8_folder="base_model_int8", lora="lora/dmd_lora.safetensors", own_scheduler=True,
        root_files=("config.json", "model_index.json")),
}


def avatar_config(base_config: Mapping[str, Any], version: AvatarVersion,
                  audio: AudioDims) -> dict[str, Any]:
    """A ``config.json`` of the avatar DiT: the base DiT's fields, the avatar class, and the
    avatar's fields (a version's optional ones only where they differ from the class default)."""
    cfg = {**base_config, "_class_name": AVATAR_CLASS}
    for name in AUDIO_FIELDS:
        value = getattr(audio, name)
        if name in version.optional_fields and value == getattr(AUDIO_DEFAULTS, name):
            continue
        cfg[name] = value
    return dict(sorted(cfg.items()))
