"""Synthetic LongCat-Video checkpoints in the native hub layout, with random weights.

Same folders, file names, shard/index structure and config fields as the hub release
(``meituan-longcat/LongCat-Video``); only the dimensions differ for ``tiny`` and ``small``. Every
tensor is drawn from its own generator seeded by (seed, name), so a checkpoint is reproducible and
can be streamed at full scale. ``sparse`` leaves tensor data as file holes (headers only).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from longcat_tools import synth_components
from longcat_tools.errors import UsageError
from longcat_tools.io.atomic import atomic_folder, check_replaceable
from longcat_tools.io.safetensors import TensorSpec, write_file, write_json, write_sharded
from longcat_tools.lora.formats.native import native_key_module
from longcat_tools.model import bounds, dtypes, keymap
from longcat_tools.model.keymap import RELEASE_DIMS
from longcat_tools.synth_presets import GB as GB  # re-exported for the benchmarks
from longcat_tools.synth_presets import PRESETS, ST_METADATA, generator, random_tensor

DIFFUSERS_VERSION = "0.35.1"

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
        "frequency_embedding_size": RELEASE_DIMS.frequency_embedding_size,
        "hidden_size": p["hidden_size"],
        "in_channels": RELEASE_DIMS.in_channels,
        "mlp_ratio": RELEASE_DIMS.mlp_ratio,
        "num_heads": p["num_heads"],
        "out_channels": RELEASE_DIMS.out_channels,
        "patch_size": list(RELEASE_DIMS.patch_size),
        "text_tokens_zero_pad": True,
    }
    return cfg


def dit_specs(cfg: dict[str, Any], seed: int, dtype: torch.dtype) -> list[TensorSpec]:
    dims = keymap.dit_dims(cfg)
    return [TensorSpec(n, dtype, s, (lambda n=n, s=s: random_tensor(n, s, seed, dtype)))
            for n, s in keymap.native_tensor_specs(dims)]


def lora_targets(cfg: dict[str, Any], kind: str) -> dict[str, int]:
    """Native module path -> up-block count of a hub adapter ('cfg_step' or 'refinement')."""
    depth = cfg["depth"]
    per_block = CFG_STEP_TARGETS if kind == "cfg_step" else REFINEMENT_TARGETS
    out = {f"blocks.{i}.{m}": n for i in range(depth) for m, n in per_block.items()}
    if kind == "refinement":
        out.update(REFINEMENT_GLOBAL_TARGETS)
    return out


def lora_specs(cfg: dict[str, Any], kind: str, rank: int, seed: int,
               dtype: torch.dtype, targets: dict[str, int] | None = None) -> list[TensorSpec]:
    """Tensors of a native-format LoRA file (the layout ``LoRANetwork`` loads strictly); its
    targets are the hub adapter ``kind``'s unless ``targets`` names them (module -> up blocks)."""
    shapes = dict(keymap.native_tensor_specs(keymap.dit_dims(cfg)))
    specs: list[TensorSpec] = []
    for module, n in (lora_targets(cfg, kind) if targets is None else targets).items():
        out_dim, in_dim = shapes[f"{module}.weight"]
        base = native_key_module(module)

        def make(name: str, shape: tuple[int, ...], std: float) -> TensorSpec:
            key = f"{kind}/{name}"
            return TensorSpec(name, dtype, shape, lambda: (torch.randn(
                shape, generator=generator(seed, key)) * std).to(dtype))

        specs.append(make(f"{base}.lora_down.weight", (n * rank, in_dim), 1 / math.sqrt(in_dim)))
        if n == 1:
            specs.append(make(f"{base}.lora_up.weight", (out_dim, rank), 0.1 / math.sqrt(rank)))
        else:
            specs += [make(f"{base}.lora_up.blocks.{j}.weight", (out_dim // n, rank),
                           0.1 / math.sqrt(rank)) for j in range(n)]
        specs.append(TensorSpec(f"{base}.alpha_scale", torch.float32, (),
                                lambda: torch.tensor(0.5, dtype=torch.float32)))
    return specs


MODELS = ("base", "avatar-1.0", "avatar-1.5")


@dataclass
class SynthResult:
    path: Path
    preset: str
    dit_tensors: int
    dit_parameters: int
    dit_bytes: int
    files: int
    bytes_on_disk: int
    model: str = "base"
    avatar: Path | None = None  # the avatar folder inside ``path`` (avatar models)
    base: Path | None = None  # the base folder beside it


# what write_native puts in a folder: --force replaces a folder that holds nothing else
WRITTEN = ("config.json", "dit", "lora", "model_index.json", "scheduler", "text_encoder",
           "tokenizer", "vae")


def write_native(folder: Path, preset: str, cfg: dict[str, Any], *, seed: int,
                 dtype: torch.dtype, sparse: bool,
                 progress: Callable[[int], None] | None = None) -> None:
    """The base checkpoint's files into an existing, empty ``folder``."""
    p = PRESETS[preset]
    write_json(folder / "model_index.json", {"model_name": "LongCat-Video"})
    write_json(folder / "config.json", {"model_name": "LongCat-Video"})
    (folder / "dit").mkdir()
    write_json(folder / "dit" / "config.json", cfg)
    write_sharded(folder / "dit", "diffusion_pytorch_model", dit_specs(cfg, seed, dtype),
                  p.dit_shard_bytes, ST_METADATA, sparse=sparse, progress=progress)
    (folder / "lora").mkdir()
    for kind, fname in (("cfg_step", "cfg_step_lora.safetensors"),
                        ("refinement", "refinement_lora.safetensors")):
        write_file(folder / "lora" / fname, lora_specs(cfg, kind, p.lora_rank, seed, dtype),
                   ST_METADATA, sparse=sparse, progress=progress)
    (folder / "scheduler").mkdir()
    write_json(folder / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
    vocab = synth_components.write_tokenizer(folder / "tokenizer")
    synth_components.write_text_encoder(folder / "text_encoder", p, vocab, seed, dtype, sparse)
    synth_components.write_vae(folder / "vae", p, seed, sparse)


def disk_usage(root: Path) -> tuple[int, int]:
    """(file count, bytes actually allocated) under ``root``."""
    files = [f for f in root.rglob("*") if f.is_file()]
    return len(files), sum(f.stat().st_blocks * 512 for f in files)


def synth(dst: str | Path, preset: str = "tiny", *, depth: int | None = None,
          dtype: str = "fp32", sparse: bool = False, seed: int = 0, force: bool = False,
          progress: Callable[[int], None] | None = None, model: str = "base") -> SynthResult:
    """Write a native-layout checkpoint at ``dst`` (atomically: ``dst.partial`` then rename).

    ``model`` other than ``base`` writes an avatar weights tree instead (``synth_avatar``)."""
    if model not in MODELS:
        raise UsageError(f"unknown model '{model}' (choose from {', '.join(MODELS)})")
    if preset not in PRESETS:
        raise UsageError(f"unknown preset '{preset}' (choose from {', '.join(PRESETS)})")
    if depth is not None:
        bounds.check_int(depth, "depth", "--depth", error=UsageError)
    bounds.check_seed(seed)
    torch_dtype = dtypes.parse(dtype, choices=("fp32", "bf16"))
    if model != "base":
        from longcat_tools.synth_avatar import synth_avatar

        return synth_avatar(Path(dst), model, preset, depth=depth, dtype=torch_dtype,
                            sparse=sparse, seed=seed, force=force, progress=progress)
    cfg = dit_config(preset, depth)
    dst = Path(dst)
    check_replaceable(dst, "checkpoint", force=force, writes=WRITTEN)
    with atomic_folder(dst, force=force, what="checkpoint", writes=WRITTEN) as tmp:
        write_native(tmp, preset, cfg, seed=seed, dtype=torch_dtype, sparse=sparse,
                     progress=progress)
    dit_specs_ = keymap.native_tensor_specs(keymap.dit_dims(cfg))
    n_params = sum(math.prod(s) for _, s in dit_specs_)
    return SynthResult(dst, preset, len(dit_specs_), n_params, n_params * torch_dtype.itemsize,
                       *disk_usage(dst))
