"""Synthetic LongCat-Video checkpoints in the native hub layout, with random weights.

Same folders, file names, shard/index structure and config fields as the hub release
(``meituan-longcat/LongCat-Video``); only the dimensions differ for ``tiny`` and ``small``. Every
tensor is drawn from its own generator seeded by (seed, name), so a checkpoint is reproducible and
can be streamed at full scale. ``sparse`` leaves tensor data as file holes (headers only).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from longcat_tools.errors import UsageError
from longcat_tools.io.atomic import atomic_folder
from longcat_tools.io.safetensors import TensorSpec, write_file, write_json, write_sharded
from longcat_tools.model import dtypes, keymap

DIFFUSERS_VERSION = "0.35.1"
ST_METADATA = {"format": "pt"}

# The Wan 2.1 VAE statistics that LongCat ships (vae/config.json).
LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
               3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]

SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler",
                    "_diffusers_version": "0.33.0.dev0", "shift": 12.0,
                    "use_dynamic_shifting": False, "invert_sigmas": False,
                    "time_shift_type": "linear"}

# LoRA targets of the two hub adapters: native module (in blocks.{i} or global) -> up-block count.
CFG_STEP_TARGETS: dict[str, int] = {
    "attn.qkv": 3, "attn.proj": 1, "cross_attn.q_linear": 1, "cross_attn.kv_linear": 2,
    "ffn.w1": 1, "ffn.w2": 1, "ffn.w3": 1,
}
REFINEMENT_TARGETS: dict[str, int] = {**CFG_STEP_TARGETS, "adaLN_modulation.1": 6}
REFINEMENT_GLOBAL_TARGETS: dict[str, int] = {"final_layer.adaLN_modulation.1": 2,
                                             "final_layer.linear": 1}
LORA_PREFIX = "lora___lorahyphen___"
LORA_HYPHEN = "___lorahyphen___"

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


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        dit=dict(hidden_size=64, depth=2, num_heads=2, caption_channels=32, adaln_tembed_dim=32),
        text_encoder=dict(d_model=32, d_ff=64, d_kv=16, num_heads=2, num_layers=2),
        vae=dict(base_dim=8, num_res_blocks=1),
        lora_rank=4, dit_shard_bytes=200_000, te_shard_bytes=60_000, materialize=True,
        note="runs the whole pipeline on a 2-core CPU in seconds"),
    "small": Preset(
        dit=dict(hidden_size=256, depth=4, num_heads=4, caption_channels=128, adaln_tembed_dim=128),
        text_encoder=dict(d_model=128, d_ff=256, d_kv=32, num_heads=4, num_layers=2),
        vae=dict(base_dim=16, num_res_blocks=1),
        lora_rank=16, dit_shard_bytes=20_000_000, te_shard_bytes=2_000_000, materialize=True,
        note="benchmark-sized, still CPU friendly"),
    "real": Preset(
        dit=dict(hidden_size=4096, depth=48, num_heads=32, caption_channels=4096,
                 adaln_tembed_dim=512),
        text_encoder=dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
                          vocab_size=256384),
        vae=dict(base_dim=96, num_res_blocks=2),
        lora_rank=128, dit_shard_bytes=10 * GB, te_shard_bytes=5 * GB, materialize=False,
        note="the hub's dimensions: 13,581,071,424 DiT parameters in 1,022 tensors"),
}


def dit_config(preset: str, depth: int | None = None) -> dict[str, Any]:
    """``dit/config.json`` with the hub release's field set; dimensions from the preset."""
    p = PRESETS[preset].dit
    cfg = {
        "_class_name": keymap.NATIVE_CLASS,
        "_diffusers_version": DIFFUSERS_VERSION,
        "adaln_tembed_dim": p["adaln_tembed_dim"],
        "bsa_params": {"chunk_3d_shape_k": [4, 4, 4], "chunk_3d_shape_q": [4, 4, 4],
                       "sparsity": 0.9375},
        "caption_channels": p["caption_channels"],
        "cp_split_hw": None,
        "depth": depth if depth is not None else p["depth"],
        "enable_bsa": False,
        "enable_flashattn2": True,
        "enable_flashattn3": False,
        "enable_xformers": False,
        "frequency_embedding_size": 256,
        "hidden_size": p["hidden_size"],
        "in_channels": 16,
        "mlp_ratio": 4,
        "num_heads": p["num_heads"],
        "out_channels": 16,
        "patch_size": [1, 2, 2],
        "text_tokens_zero_pad": True,
    }
    return cfg


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


def random_tensor(name: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> torch.Tensor:
    """A plausible random value for a DiT tensor: norms near one, small biases, fan-in scaled
    weights, so that a synthetic model gives finite, non-trivial outputs."""
    g = _generator(seed, name)
    x = torch.randn(shape, generator=g, dtype=torch.float32)
    if name.endswith("norm.weight"):
        x = 1.0 + 0.05 * x
    elif name.endswith(".bias") or len(shape) < 2:
        x = 0.02 * x
    else:
        x = x / math.sqrt(math.prod(shape[1:]))
    return x.to(dtype)


def dit_specs(cfg: dict[str, Any], seed: int, dtype: torch.dtype) -> list[TensorSpec]:
    dims = keymap.dit_dims(cfg)
    return [TensorSpec(n, dtype, s, (lambda n=n, s=s: random_tensor(n, s, seed, dtype)))
            for n, s in keymap.native_tensor_specs(dims)]


def lora_module_name(module: str) -> str:
    return LORA_PREFIX + module.replace(".", LORA_HYPHEN)


def lora_targets(cfg: dict[str, Any], kind: str) -> dict[str, int]:
    """Native module path -> up-block count of a hub adapter ('cfg_step' or 'refinement')."""
    depth = cfg["depth"]
    per_block = CFG_STEP_TARGETS if kind == "cfg_step" else REFINEMENT_TARGETS
    out = {f"blocks.{i}.{m}": n for i in range(depth) for m, n in per_block.items()}
    if kind == "refinement":
        out.update(REFINEMENT_GLOBAL_TARGETS)
    return out


def lora_specs(cfg: dict[str, Any], kind: str, rank: int, seed: int,
               dtype: torch.dtype) -> list[TensorSpec]:
    """Tensors of a native-format LoRA file (the layout ``LoRANetwork`` loads strictly)."""
    shapes = dict(keymap.native_tensor_specs(keymap.dit_dims(cfg)))
    specs: list[TensorSpec] = []
    for module, n in lora_targets(cfg, kind).items():
        out_dim, in_dim = shapes[f"{module}.weight"]
        base = lora_module_name(module)

        def make(name: str, shape: tuple[int, ...], std: float) -> TensorSpec:
            key = f"{kind}/{name}"
            return TensorSpec(name, dtype, shape, lambda: (torch.randn(
                shape, generator=_generator(seed, key)) * std).to(dtype))

        specs.append(make(f"{base}.lora_down.weight", (n * rank, in_dim), 1 / math.sqrt(in_dim)))
        if n == 1:
            specs.append(make(f"{base}.lora_up.weight", (out_dim, rank), 0.1 / math.sqrt(rank)))
        else:
            specs += [make(f"{base}.lora_up.blocks.{j}.weight", (out_dim // n, rank),
                           0.1 / math.sqrt(rank)) for j in range(n)]
        specs.append(TensorSpec(f"{base}.alpha_scale", torch.float32, (),
                                lambda: torch.tensor(0.5, dtype=torch.float32)))
    return specs


@dataclass
class SynthResult:
    path: Path
    preset: str
    dit_tensors: int
    dit_parameters: int
    dit_bytes: int
    files: int
    bytes_on_disk: int


def synth(dst: str | Path, preset: str = "tiny", *, depth: int | None = None,
          dtype: str = "fp32", sparse: bool = False, seed: int = 0, force: bool = False,
          progress: Callable[[int], None] | None = None) -> SynthResult:
    """Write a native-layout checkpoint at ``dst`` (atomically: ``dst.partial`` then rename)."""
    if preset not in PRESETS:
        raise UsageError(f"unknown preset '{preset}' (choose from {', '.join(PRESETS)})")
    if depth is not None and depth < 1:
        raise UsageError(f"--depth must be at least 1, got {depth}")
    torch_dtype = dtypes.parse(dtype, choices=("fp32", "bf16"))
    p = PRESETS[preset]
    cfg = dit_config(preset, depth)
    dst = Path(dst)
    with atomic_folder(dst, force=force) as tmp:
        write_json(tmp / "model_index.json", {"model_name": "LongCat-Video"})
        write_json(tmp / "config.json", {"model_name": "LongCat-Video"})
        (tmp / "dit").mkdir()
        write_json(tmp / "dit" / "config.json", cfg)
        specs = dit_specs(cfg, seed, torch_dtype)
        write_sharded(tmp / "dit", "diffusion_pytorch_model", specs, p.dit_shard_bytes,
                      ST_METADATA, sparse=sparse, progress=progress)
        (tmp / "lora").mkdir()
        for kind, fname in (("cfg_step", "cfg_step_lora.safetensors"),
                            ("refinement", "refinement_lora.safetensors")):
            write_file(tmp / "lora" / fname, lora_specs(cfg, kind, p.lora_rank, seed, torch_dtype),
                       ST_METADATA, sparse=sparse, progress=progress)
        (tmp / "scheduler").mkdir()
        write_json(tmp / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
        from longcat_tools import synth_components

        vocab = synth_components.write_tokenizer(tmp / "tokenizer")
        synth_components.write_text_encoder(tmp / "text_encoder", p, vocab, seed, torch_dtype,
                                            sparse)
        synth_components.write_vae(tmp / "vae", p, seed, sparse)
    files = [f for f in dst.rglob("*") if f.is_file()]
    dit_specs_ = keymap.native_tensor_specs(keymap.dit_dims(cfg))
    n_params = sum(math.prod(s) for _, s in dit_specs_)
    return SynthResult(dst, preset, len(dit_specs_), n_params, n_params * torch_dtype.itemsize,
                       len(files), sum(f.stat().st_blocks * 512 for f in files))
