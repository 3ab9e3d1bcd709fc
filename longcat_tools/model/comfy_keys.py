"""Key names of the LongCat-Video DiT in ComfyUI's flavour, as data.

``comfy`` is how Kijai's ComfyUI-WanVideoWrapper names the DiT (its ``WanModel`` built with
``is_longcat``; the single files of ``Kijai/LongCat-Video_comfy``): Wan module names, the fused
``attn.qkv`` / ``cross_attn.kv_linear`` split row-wise into ``q/k/v`` and ``k/v`` exactly as
FastVideo splits them. A file may carry the ``model.diffusion_model.`` prefix (the loader strips
it). A ``fp8_e4m3fn_scaled`` file stores Linear weights as float8 with one float32 scale per
layer in ``<module>.scale_weight`` and a ``scaled_fp8`` marker; ``<module>.scale_input`` (an
activation scale for fp8 matmuls) may sit beside it and never changes a weight. ComfyUI LoRAs
name these modules ``lora_unet_<module with . as _>`` or ``diffusion_model.<module>``. Sources
are listed in docs/convert.md and docs/lora.md.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from longcat_tools.errors import LongcatError
from longcat_tools.model import keymap

FLAVOUR = "comfy"
PREFIX = "model.diffusion_model."
SCALED_FP8_MARKER = "scaled_fp8"
SCALE_SUFFIX = ".scale_weight"
INPUT_SCALE_SUFFIX = ".scale_input"
KOHYA_PREFIX = "lora_unet_"
# ComfyUI's generic LoRA naming: the model's own parameter path minus ``.weight``
LORA_MODULE_PREFIX = "diffusion_model."

# native module (inside blocks.{i}) -> comfy module(s), row-wise split in table order
BLOCK_MODULES: dict[str, tuple[str, ...]] = {
    "adaLN_modulation.1": ("modulation.1",),
    "pre_crs_attn_norm": ("norm3",),
    "attn.qkv": ("self_attn.q", "self_attn.k", "self_attn.v"),
    "attn.q_norm": ("self_attn.norm_q",),
    "attn.k_norm": ("self_attn.norm_k",),
    "attn.proj": ("self_attn.o",),
    "cross_attn.q_linear": ("cross_attn.q",),
    "cross_attn.kv_linear": ("cross_attn.k", "cross_attn.v"),
    "cross_attn.proj": ("cross_attn.o",),
    "cross_attn.q_norm": ("cross_attn.norm_q",),
    "cross_attn.k_norm": ("cross_attn.norm_k",),
    "ffn.w1": ("ffn.w1",),
    "ffn.w2": ("ffn.w2",),
    "ffn.w3": ("ffn.w3",),
}

# native module outside the blocks -> comfy module
GLOBAL_MODULES: dict[str, tuple[str, ...]] = {
    "x_embedder.proj": ("patch_embedding",),
    "t_embedder.mlp.0": ("time_embedding.mlp.0",),
    "t_embedder.mlp.2": ("time_embedding.mlp.2",),
    "y_embedder.y_proj.0": ("text_embedding.0",),
    "y_embedder.y_proj.2": ("text_embedding.2",),
    "final_layer.linear": ("head.head",),
    "final_layer.adaLN_modulation.1": ("head.modulation.1",),
}

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_KOHYA_BLOCK_RE = re.compile(r"^blocks_(\d+)_(.+)$")


def _reverse(table: Mapping[str, tuple[str, ...]]) -> dict[str, tuple[str, int, int]]:
    return {c: (nat, j, len(cs)) for nat, cs in table.items() for j, c in enumerate(cs)}


_C_GLOBAL, _C_BLOCK = _reverse(GLOBAL_MODULES), _reverse(BLOCK_MODULES)
_KOHYA_GLOBAL = {c.replace(".", "_"): c for c in _C_GLOBAL}
_KOHYA_BLOCK = {c.replace(".", "_"): c for c in _C_BLOCK}


def native_module_to_comfy(module: str) -> tuple[str, ...] | None:
    """Comfy module(s) of a native module path, or None when the table has no entry."""
    if module in GLOBAL_MODULES:
        return GLOBAL_MODULES[module]
    m = _BLOCK_RE.match(module)
    if m and m.group(2) in BLOCK_MODULES:
        return tuple(f"blocks.{m.group(1)}.{c}" for c in BLOCK_MODULES[m.group(2)])
    return None


def comfy_module_to_native(module: str) -> tuple[str, int, int] | None:
    """(native module, slice index, slice count) of a comfy module path, or None."""
    if module in _C_GLOBAL:
        return _C_GLOBAL[module]
    m = _BLOCK_RE.match(module)
    if m and m.group(2) in _C_BLOCK:
        nat, j, n = _C_BLOCK[m.group(2)]
        return f"blocks.{m.group(1)}.{nat}", j, n
    return None


def comfy_to_native(key: str) -> keymap.Part:
    """The native tensor a comfy tensor is (a row slice of); unknown keys raise LongcatError.
    ``Part.fastvideo`` holds the comfy name."""
    module, _, param = key.rpartition(".")
    found = comfy_module_to_native(module) if module else None
    if found is None:
        raise LongcatError(f"unknown ComfyUI DiT tensor '{key}' (not in the LongCat key map)")
    nat, j, n = found
    return keymap.Part(f"{nat}.{param}", key, j, n)


def native_to_comfy(key: str) -> list[keymap.Part]:
    """The comfy tensor(s) a native tensor becomes (``Part.fastvideo`` holds the comfy name)."""
    module, _, param = key.rpartition(".")
    targets = native_module_to_comfy(module) if module else None
    if targets is None:
        raise LongcatError(f"unknown native DiT tensor '{key}' (not in the LongCat key map)")
    return [keymap.Part(key, f"{t}.{param}", j, len(targets)) for j, t in enumerate(targets)]


def tensor_specs(dims: keymap.DiTDims) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every DiT tensor in the comfy flavour, in native order."""
    out = []
    for name, shape in keymap.native_tensor_specs(dims):
        for part in native_to_comfy(name):
            out.append((part.fastvideo, (shape[0] // part.count, *shape[1:])))
    return out


def kohya_module(module: str) -> str:
    """``blocks.0.self_attn.q`` -> ``lora_unet_blocks_0_self_attn_q`` (ComfyUI's LoRA naming)."""
    return KOHYA_PREFIX + module.replace(".", "_")


def module_of_kohya(stem: str) -> str | None:
    """The comfy module of a ``lora_unet_…`` name (underscores are ambiguous, so the table
    decides), or None."""
    if not stem.startswith(KOHYA_PREFIX):
        return None
    rest = stem[len(KOHYA_PREFIX):]
    if rest in _KOHYA_GLOBAL:
        return _KOHYA_GLOBAL[rest]
    m = _KOHYA_BLOCK_RE.match(rest)
    if m and m.group(2) in _KOHYA_BLOCK:
        return f"blocks.{int(m.group(1))}.{_KOHYA_BLOCK[m.group(2)]}"
    return None


def module_of_lora_stem(stem: str) -> str | None:
    """The comfy module a ComfyUI LoRA key stem names, ``lora_unet_blocks_0_self_attn_q`` or
    ``diffusion_model.blocks.0.self_attn.q`` (both map to the same weight in ComfyUI), or None."""
    if stem.startswith(KOHYA_PREFIX):
        return module_of_kohya(stem)
    if stem.startswith(LORA_MODULE_PREFIX):
        module = stem[len(LORA_MODULE_PREFIX):]
        return module if comfy_module_to_native(module) else None
    return None


def dims_from_shapes(shapes: Mapping[str, tuple[int, ...]], where: str) -> keymap.DiTDims:
    """The DiT dimensions a comfy state dict's shapes imply (a single file has no config):
    ``mlp_ratio`` is the release's 4, checked against the SwiGLU width."""
    def shape(name: str, ndim: int) -> tuple[int, ...]:
        s = shapes.get(name)
        if s is None or len(s) != ndim or not all(s):
            raise LongcatError(f"{where}: tensor '{name}' is missing or has a wrong shape "
                               f"({None if s is None else list(s)}); not a LongCat DiT file")
        return s

    hidden, in_ch, *patch = shape("patch_embedding.weight", 5)
    depth = len({int(m.group(1)) for k in shapes if (m := _BLOCK_RE.match(k))})
    head_dim = shape("blocks.0.self_attn.norm_q.weight", 1)[0]
    t_out, freq = shape("time_embedding.mlp.0.weight", 2)
    head_out = shape("head.head.weight", 2)[0]
    if hidden % head_dim or head_out % math.prod(patch):
        raise LongcatError(f"{where}: shapes of patch_embedding, norm_q and head disagree")
    dims = keymap.DiTDims(
        in_channels=in_ch, out_channels=head_out // math.prod(patch), hidden_size=hidden,
        depth=depth, num_heads=hidden // head_dim,
        caption_channels=shape("text_embedding.0.weight", 2)[1],
        mlp_ratio=keymap.RELEASE_DIMS.mlp_ratio, adaln_tembed_dim=t_out,
        frequency_embedding_size=freq, patch_size=tuple(patch))
    w1 = shape("blocks.0.ffn.w1.weight", 2)[0]
    if w1 != dims.ffn_hidden:
        raise LongcatError(f"{where}: ffn.w1 has {w1} rows; mlp_ratio "
                           f"{keymap.RELEASE_DIMS.mlp_ratio} implies {dims.ffn_hidden} (not a "
                           "LongCat-Video DiT)")
    return dims
