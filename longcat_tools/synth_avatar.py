"""A synthetic LongCat-Video-Avatar checkpoint (1.0 or 1.5), with the base checkpoint it reads.

The original loads the avatar's tokenizer, text encoder and VAE (and 1.0's scheduler) from
``<avatar folder>/../LongCat-Video``, so ``synth --model avatar-1.5 DST`` writes the weights tree
it expects, in one atomic step::

    DST/LongCat-Video/              the base checkpoint, as ``synth --model base`` writes it
    DST/LongCat-Video-Avatar-1.5/   the avatar folder, in the hub's layout

The avatar DiT's weights are drawn per folder (``avatar_single`` and ``avatar_multi`` differ); the
INT8 folder is the quantization of ``base_model``'s stored weights, as the original's script would
make it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from longcat_tools import synth_audio
from longcat_tools.errors import LongcatError
from longcat_tools.io.atomic import atomic_folder, check_outside_checkpoints, check_parent
from longcat_tools.io.safetensors import (
    TensorSpec,
    plan_shards,
    write_file,
    write_json,
    write_sharded,
)
from longcat_tools.model import avatar, int8, keymap
from longcat_tools.model.avatar import AudioDims, AvatarVersion
from longcat_tools.synth import (
    CFG_STEP_TARGETS,
    SCHEDULER_CONFIG,
    SynthResult,
    disk_usage,
    dit_config,
    lora_specs,
    write_native,
)
from longcat_tools.synth_presets import PRESETS, ST_METADATA, random_tensor

DIT_STEM = "diffusion_pytorch_model"
# The DMD LoRA's targets: not published. The hub file's reported size (about 0.6 B parameters,
# 2.5 GB in fp32 at rank 128) is the base cfg_step adapter's target set (630.7 M parameters).
DMD_TARGETS = CFG_STEP_TARGETS


def audio_dims(version: AvatarVersion, preset: str) -> AudioDims:
    """The avatar fields of a preset: its audio_proj widths, the encoder's width and shape."""
    p = PRESETS[preset]
    return AudioDims(audio_block=version.audio_block,
                     audio_channel=synth_audio.audio_width(version.audio_encoder, p), **p.avatar)


def avatar_dit_config(model: str, preset: str, depth: int | None = None) -> dict[str, Any]:
    """The avatar DiT's ``config.json`` for a preset."""
    version = avatar.VERSIONS[model]
    return avatar.avatar_config(dit_config(preset, depth), version, audio_dims(version, preset))


def _shapes(cfg: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    return avatar.tensor_specs(keymap.dit_dims(cfg), avatar.audio_dims(cfg))


def avatar_dit_specs(cfg: dict[str, Any], folder: str, seed: int,
                     dtype: torch.dtype) -> list[TensorSpec]:
    """The avatar DiT's tensors, drawn under ``folder/name``."""
    return [TensorSpec(n, dtype, s, lambda n=n, s=s: random_tensor(f"{folder}/{n}", s, seed,
                                                                    dtype))
            for n, s in _shapes(cfg)]


def int8_specs(cfg: dict[str, Any], folder: str, seed: int,
               dtype: torch.dtype) -> list[TensorSpec]:
    """The INT8 state dict of the DiT stored in ``folder`` at ``dtype``."""
    @functools.lru_cache(maxsize=1)
    def quantized(weight: str) -> tuple[torch.Tensor, torch.Tensor]:
        return int8.quantize(source(weight))

    def source(name: str) -> torch.Tensor:
        return random_tensor(f"{folder}/{name}", shapes[name], seed, dtype)

    shapes = dict(_shapes(cfg))
    specs: list[TensorSpec] = []
    for name, shape, role in int8.quantized_specs(list(shapes.items())):
        weight = name.rpartition(".")[0] + ".weight"
        if role == "int8":
            specs.append(TensorSpec(name, torch.int8, shape, lambda w=weight: quantized(w)[0]))
        elif role == "scale":
            specs.append(TensorSpec(name, torch.float32, shape, lambda w=weight: quantized(w)[1]))
        elif role == "bias":
            specs.append(TensorSpec(name, torch.bfloat16, shape,
                                    lambda n=name: source(n).to(torch.bfloat16)))
        else:
            specs.append(TensorSpec(name, dtype, shape, lambda n=name: source(n)))
    return specs


def _write_int8(folder: Path, cfg: dict[str, Any], source: str, seed: int, dtype: torch.dtype,
                max_shard_bytes: int, sparse: bool, progress: Callable[[int], None] | None) -> None:
    folder.mkdir()
    write_json(folder / "config.json", cfg)
    write_json(folder / int8.CONFIG_NAME, int8.QUANTIZATION_CONFIG)
    specs = int8_specs(cfg, source, seed, dtype)
    shards = plan_shards(specs, max_shard_bytes)
    names = int8.shard_names(len(shards))
    for name, shard in zip(names, shards, strict=True):
        write_file(folder / name, shard, ST_METADATA, sparse=sparse, progress=progress)
    write_json(folder / int8.INDEX_NAME, {
        "metadata": {"total_size": sum(s.nbytes for s in specs)},
        "weight_map": {s.name: name for name, shard in zip(names, shards, strict=True)
                       for s in shard}})


def write_avatar(folder: Path, model: str, preset: str, *, depth: int | None, seed: int,
                 dtype: torch.dtype, sparse: bool,
                 progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """An avatar folder in the hub's layout into an existing, empty ``folder``; returns the DiT
    config."""
    version = avatar.VERSIONS[model]
    p = PRESETS[preset]
    cfg = avatar_dit_config(model, preset, depth)
    for name in version.root_files:
        write_json(folder / name, {"model_name": version.folder})
    for sub in version.dit_folders:
        (folder / sub).mkdir()
        write_json(folder / sub / "config.json", cfg)
        write_sharded(folder / sub, DIT_STEM, avatar_dit_specs(cfg, sub, seed, dtype),
                      p.dit_shard_bytes, ST_METADATA, sparse=sparse, force_index=True,
                      progress=progress)
    if version.int8_folder:
        _write_int8(folder / version.int8_folder, cfg, version.dit_folders[0], seed, dtype,
                    min(int8.MAX_SHARD_BYTES, p.dit_shard_bytes), sparse, progress)
    if version.lora:
        (folder / version.lora).parent.mkdir()
        write_file(folder / version.lora,
                   lora_specs(cfg, "dmd", p.lora_rank, seed, dtype, targets={
                       f"blocks.{i}.{m}": n for i in range(cfg["depth"])
                       for m, n in DMD_TARGETS.items()}),
                   ST_METADATA, sparse=sparse, progress=progress)
    if version.own_scheduler:
        (folder / "scheduler").mkdir()
        write_json(folder / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
    if version.audio_encoder == avatar.WAV2VEC2:
        synth_audio.write_wav2vec2(folder / version.audio_encoder, p, seed, sparse)
    else:
        synth_audio.write_whisper(folder / version.audio_encoder, p, seed, sparse, progress)
    synth_audio.write_separator(folder / avatar.VOCAL_SEPARATOR, seed)
    return cfg


def _tree_problem(dst: Path) -> str | None:
    """Why ``--force`` may not replace ``dst``: only a folder of the checkpoints synth writes
    (the base folder and avatar folders) is replaced."""
    if dst.is_symlink():
        return "is a symbolic link; --force never replaces a link (remove it yourself)"
    if not dst.is_dir():
        return "exists and is not a folder; --force only replaces a weights folder"
    ours = {avatar.BASE_FOLDER, *(v.folder for v in avatar.VERSIONS.values())}
    others = sorted(p.name for p in dst.iterdir() if p.name not in ours)
    if others:
        return (f"holds {others[0]}, which synth does not write; refusing to replace it even "
                "with --force (remove it yourself)")
    return None


def _check_destination(dst: Path, force: bool) -> None:
    if dst.exists() or dst.is_symlink():
        if not force:
            raise LongcatError(f"{dst}: already exists (pass --force to replace it)")
        problem = _tree_problem(dst)
        if problem:
            raise LongcatError(f"{dst}: {problem}")
    check_parent(dst)
    check_outside_checkpoints(dst)


def synth_avatar(dst: Path, model: str, preset: str, *, depth: int | None, dtype: torch.dtype,
                 sparse: bool, seed: int, force: bool,
                 progress: Callable[[int], None] | None = None) -> SynthResult:
    """Write ``dst/LongCat-Video`` and ``dst/<avatar folder>`` (atomically, as one folder)."""
    synth_audio.require_onnx()
    version = avatar.VERSIONS[model]
    _check_destination(dst, force)
    with atomic_folder(dst, force=force) as tmp:
        _check_destination(dst, force)  # again, under the writer lock
        (tmp / avatar.BASE_FOLDER).mkdir()
        write_native(tmp / avatar.BASE_FOLDER, preset, dit_config(preset, depth), seed=seed,
                     dtype=dtype, sparse=sparse, progress=progress)
        (tmp / version.folder).mkdir()
        cfg = write_avatar(tmp / version.folder, model, preset, depth=depth, seed=seed,
                           dtype=dtype, sparse=sparse, progress=progress)
    shapes = _shapes(cfg)
    n_params = sum(math.prod(s) for _, s in shapes)
    return SynthResult(dst, preset, len(shapes), n_params, n_params * dtype.itemsize,
                       *disk_usage(dst), model=model, avatar=dst / version.folder,
                       base=dst / avatar.BASE_FOLDER)
