"""What every part of a synthetic checkpoint shares: the size presets, the seeded random values
its tensors take, and the safetensors metadata its files carry.

``synth`` (the DiT, LoRAs and the whole folder) and ``synth_components`` (tokenizer, text encoder,
VAE) both import this module, and neither imports the other's internals.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch

from longcat_tools.model.keymap import RELEASE_DIMS

ST_METADATA = {"format": "pt"}
GB = 10**9


@dataclass(frozen=True)
class Preset:
    dit: dict[str, Any]
    text_encoder: dict[str, Any]
    vae: dict[str, Any]
    lora_rank: int
    dit_shard_bytes: int
    te_shard_bytes: int
    materialize: bool  # build text encoder / VAE modules for real weights (small presets only)
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # the avatar DiT's own widths (audio_proj), and overrides of the audio encoders' hub configs
    avatar: dict[str, Any] = field(default_factory=dict)
    wav2vec2: dict[str, Any] = field(default_factory=dict)
    whisper: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        dit=dict(hidden_size=64, depth=2, num_heads=2, caption_channels=32, adaln_tembed_dim=32),
        text_encoder=dict(d_model=32, d_ff=64, d_kv=16, num_heads=2, num_layers=2),
        vae=dict(base_dim=8, num_res_blocks=1),
        lora_rank=4, dit_shard_bytes=200_000, te_shard_bytes=60_000, materialize=True,
        note="runs the whole pipeline on a 2-core CPU in seconds",
        avatar=dict(intermediate_dim=32, output_dim=32, context_tokens=4),
        wav2vec2=dict(hidden_size=32, num_attention_heads=2, intermediate_size=64,
                      conv_dim=[16] * 7),
        whisper=dict(d_model=32, encoder_attention_heads=2, decoder_attention_heads=2,
                     encoder_ffn_dim=64, decoder_ffn_dim=64, decoder_layers=2)),
    "small": Preset(
        dit=dict(hidden_size=256, depth=4, num_heads=4, caption_channels=128, adaln_tembed_dim=128),
        text_encoder=dict(d_model=128, d_ff=256, d_kv=32, num_heads=4, num_layers=2),
        vae=dict(base_dim=16, num_res_blocks=1),
        lora_rank=16, dit_shard_bytes=20_000_000, te_shard_bytes=2_000_000, materialize=True,
        note="benchmark-sized, still CPU friendly",
        avatar=dict(intermediate_dim=128, output_dim=128, context_tokens=8),
        wav2vec2=dict(hidden_size=64, num_attention_heads=4, intermediate_size=128,
                      conv_dim=[32] * 7),
        whisper=dict(d_model=64, encoder_attention_heads=4, decoder_attention_heads=4,
                     encoder_ffn_dim=128, decoder_ffn_dim=128, decoder_layers=2)),
    "real": Preset(
        dit={k: getattr(RELEASE_DIMS, k) for k in ("hidden_size", "depth", "num_heads",
                                                   "caption_channels", "adaln_tembed_dim")},
        text_encoder=dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
                          vocab_size=256384),
        vae=dict(base_dim=96, num_res_blocks=2),
        lora_rank=128, dit_shard_bytes=10 * GB, te_shard_bytes=5 * GB, materialize=False,
        note="the hub's dimensions: 13,581,071,424 DiT parameters in 1,022 tensors",
        avatar=dict(intermediate_dim=512, output_dim=768, context_tokens=32)),
}


def generator(seed: int, name: str) -> torch.Generator:
    """A generator of its own for each (seed, tensor name): tensors can be drawn in any order."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


def random_tensor(name: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> torch.Tensor:
    """A plausible random value for a tensor: norms near one, small biases, fan-in scaled
    weights, so that a synthetic model gives finite, non-trivial outputs."""
    x = torch.randn(shape, generator=generator(seed, name), dtype=torch.float32)
    if name.endswith("norm.weight"):
        x = 1.0 + 0.05 * x
    elif name.endswith(".bias") or len(shape) < 2:
        x = 0.02 * x
    else:
        x = x / math.sqrt(math.prod(shape[1:]))
    return x.to(dtype)
