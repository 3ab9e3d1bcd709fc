"""Key names of the LongCat-Video DiT, as data.

Two flavours name the same weights:

* ``native``: the hub release (``LongCatVideoTransformer3DModel``), with fused ``attn.qkv`` and
  ``cross_attn.kv_linear`` projections;
* ``fastvideo``: FastVideo's ``LongCatTransformer3DModel``, with those projections split row-wise
  (``torch.chunk(n, dim=0)``) into ``to_q/to_k/to_v`` and ``to_k/to_v``, and other modules renamed.

The tables below are the single source of truth for convert, verify, lora and the runner. They map
*modules*; parameter names follow by appending ``.weight``/``.bias``. A native module that maps to
several FastVideo modules is their row-wise concatenation, in table order.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from longcat_tools.errors import LongcatError
from longcat_tools.model import bounds

FLAVOURS = ("native", "fastvideo")
NATIVE_CLASS = "LongCatVideoTransformer3DModel"
FASTVIDEO_CLASS = "LongCatTransformer3DModel"
CLASS_BY_FLAVOUR = {"native": NATIVE_CLASS, "fastvideo": FASTVIDEO_CLASS}


def config_flavour(config: Mapping[str, Any]) -> str:
    """The key flavour a transformer config.json declares. Our diffusers class shares
    FastVideo's class name but saves native keys; its config keeps ``num_heads`` (FastVideo's
    converter writes ``num_attention_heads`` instead)."""
    cls = config.get("_class_name")
    if cls == NATIVE_CLASS or (cls == FASTVIDEO_CLASS and "num_heads" in config
                               and config.get("num_attention_heads") is None):
        return "native"
    return "fastvideo"

# native module (inside blocks.{i}) -> fastvideo module(s)
BLOCK_MODULES: dict[str, tuple[str, ...]] = {
    "adaLN_modulation.1": ("adaln_linear_1",),
    "pre_crs_attn_norm": ("norm_cross",),
    "attn.qkv": ("self_attn.to_q", "self_attn.to_k", "self_attn.to_v"),
    "attn.q_norm": ("self_attn.q_norm",),
    "attn.k_norm": ("self_attn.k_norm",),
    "attn.proj": ("self_attn.to_out",),
    "cross_attn.q_linear": ("cross_attn.to_q",),
    "cross_attn.kv_linear": ("cross_attn.to_k", "cross_attn.to_v"),
    "cross_attn.proj": ("cross_attn.to_out",),
    "cross_attn.q_norm": ("cross_attn.q_norm",),
    "cross_attn.k_norm": ("cross_attn.k_norm",),
    "ffn.w1": ("ffn.w1",),
    "ffn.w2": ("ffn.w2",),
    "ffn.w3": ("ffn.w3",),
}

# native module outside the blocks -> fastvideo module(s)
GLOBAL_MODULES: dict[str, tuple[str, ...]] = {
    "x_embedder.proj": ("patch_embed.proj",),
    "t_embedder.mlp.0": ("time_embedder.linear_1",),
    "t_embedder.mlp.2": ("time_embedder.linear_2",),
    "y_embedder.y_proj.0": ("caption_embedder.linear_1",),
    "y_embedder.y_proj.2": ("caption_embedder.linear_2",),
    "final_layer.linear": ("final_layer.proj",),
    "final_layer.adaLN_modulation.1": ("final_layer.adaln_linear",),
}


@dataclass(frozen=True)
class DiTDims:
    """Every dimension of the DiT that a tensor shape depends on, read from its config."""

    in_channels: int
    out_channels: int
    hidden_size: int
    depth: int
    num_heads: int
    caption_channels: int
    mlp_ratio: float
    adaln_tembed_dim: int
    frequency_embedding_size: int
    patch_size: tuple[int, int, int]

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_hidden(self) -> int:
        # SwiGLU hidden size of the original: 2/3 of C*mlp_ratio, rounded up to a multiple of 256.
        h = int(2 * int(self.hidden_size * self.mlp_ratio) / 3)
        return 256 * ((h + 255) // 256)

    @property
    def patch_volume(self) -> int:
        t, h, w = self.patch_size
        return t * h * w


# The 13.6B release (the hub's dit/config.json): what synth's "real" preset writes and what
# `bsa check` assumes without a checkpoint.
RELEASE_DIMS = DiTDims(in_channels=16, out_channels=16, hidden_size=4096, depth=48, num_heads=32,
                       caption_channels=4096, mlp_ratio=4, adaln_tembed_dim=512,
                       frequency_embedding_size=256, patch_size=(1, 2, 2))

_DIM_FIELDS = ("in_channels", "out_channels", "hidden_size", "depth", "caption_channels",
               "adaln_tembed_dim", "frequency_embedding_size")
# every config field that sizes a weight: two configs that differ in one describe other weights
SHAPE_FIELDS = (*_DIM_FIELDS, "num_heads", "num_attention_heads", "mlp_ratio", "patch_size")


def dit_dims(config: Mapping[str, Any], where: str = "transformer config") -> DiTDims:
    """Read the dimensions from a transformer config of either flavour (``num_heads`` or
    ``num_attention_heads``); a missing, mistyped or absurd field (beyond ``model.bounds``) is a
    LongcatError naming ``where`` and the field, raised before anything is sized from it."""
    values = {name: bounds.check_int(config.get(name), name, where) for name in _DIM_FIELDS}
    heads_key = "num_heads" if "num_heads" in config else "num_attention_heads"
    if heads_key not in config:
        raise LongcatError(f"{where}: field 'num_heads' (or 'num_attention_heads') must be a "
                           f"positive integer, got None")
    heads = bounds.check_int(config[heads_key], heads_key, where)
    if values["hidden_size"] % heads:
        raise LongcatError(f"{where}: hidden_size {values['hidden_size']} is not divisible by "
                           f"num_heads {heads}")
    ratio = bounds.check_ratio(config.get("mlp_ratio", 4), "mlp_ratio", where)
    patch = config.get("patch_size", [1, 2, 2])
    if not isinstance(patch, (list, tuple)) or len(patch) != 3:
        raise LongcatError(f"{where}: field 'patch_size' must be three positive integers, "
                           f"got {patch!r}")
    for p in patch:
        bounds.check_int(p, "patch_size", where)
    return DiTDims(num_heads=heads, mlp_ratio=ratio, patch_size=tuple(patch), **values)


def native_tensor_specs(dims: DiTDims) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of the native DiT, in the original state_dict order."""
    c, ct, d, f = dims.hidden_size, dims.adaln_tembed_dim, dims.head_dim, dims.ffn_hidden
    specs: list[tuple[str, tuple[int, ...]]] = [
        ("x_embedder.proj.weight", (c, dims.in_channels, *dims.patch_size)),
        ("x_embedder.proj.bias", (c,)),
        ("t_embedder.mlp.0.weight", (ct, dims.frequency_embedding_size)),
        ("t_embedder.mlp.0.bias", (ct,)),
        ("t_embedder.mlp.2.weight", (ct, ct)),
        ("t_embedder.mlp.2.bias", (ct,)),
        ("y_embedder.y_proj.0.weight", (c, dims.caption_channels)),
        ("y_embedder.y_proj.0.bias", (c,)),
        ("y_embedder.y_proj.2.weight", (c, c)),
        ("y_embedder.y_proj.2.bias", (c,)),
    ]
    block: list[tuple[str, tuple[int, ...]]] = [
        ("adaLN_modulation.1.weight", (6 * c, ct)),
        ("adaLN_modulation.1.bias", (6 * c,)),
        ("pre_crs_attn_norm.weight", (c,)),
        ("pre_crs_attn_norm.bias", (c,)),
        ("attn.qkv.weight", (3 * c, c)),
        ("attn.qkv.bias", (3 * c,)),
        ("attn.q_norm.weight", (d,)),
        ("attn.k_norm.weight", (d,)),
        ("attn.proj.weight", (c, c)),
        ("attn.proj.bias", (c,)),
        ("cross_attn.q_linear.weight", (c, c)),
        ("cross_attn.q_linear.bias", (c,)),
        ("cross_attn.kv_linear.weight", (2 * c, c)),
        ("cross_attn.kv_linear.bias", (2 * c,)),
        ("cross_attn.proj.weight", (c, c)),
        ("cross_attn.proj.bias", (c,)),
        ("cross_attn.q_norm.weight", (d,)),
        ("cross_attn.k_norm.weight", (d,)),
        ("ffn.w1.weight", (f, c)),
        ("ffn.w2.weight", (c, f)),
        ("ffn.w3.weight", (f, c)),
    ]
    for i in range(dims.depth):
        specs.extend((f"blocks.{i}.{name}", shape) for name, shape in block)
    specs += [
        ("final_layer.linear.weight", (dims.patch_volume * dims.out_channels, c)),
        ("final_layer.linear.bias", (dims.patch_volume * dims.out_channels,)),
        ("final_layer.adaLN_modulation.1.weight", (2 * c, ct)),
        ("final_layer.adaLN_modulation.1.bias", (2 * c,)),
    ]
    return specs


_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Part:
    """One FastVideo tensor: row-slice ``index`` of ``count`` equal slices of a native one."""

    native: str
    fastvideo: str
    index: int
    count: int


def _split_param(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    if not module:
        raise LongcatError(f"tensor name '{key}' has no module part")
    return module, param


def native_module_to_fastvideo(module: str) -> tuple[str, ...] | None:
    """FastVideo module(s) for a native module path, or None when the table has no entry."""
    if module in GLOBAL_MODULES:
        return GLOBAL_MODULES[module]
    m = _BLOCK_RE.match(module)
    if m and m.group(2) in BLOCK_MODULES:
        return tuple(f"blocks.{m.group(1)}.{t}" for t in BLOCK_MODULES[m.group(2)])
    return None


def _reverse_tables() -> tuple[dict[str, tuple[str, int, int]], dict[str, tuple[str, int, int]]]:
    glob: dict[str, tuple[str, int, int]] = {}
    for nat, fvs in GLOBAL_MODULES.items():
        for j, fv in enumerate(fvs):
            glob[fv] = (nat, j, len(fvs))
    blk: dict[str, tuple[str, int, int]] = {}
    for nat, fvs in BLOCK_MODULES.items():
        for j, fv in enumerate(fvs):
            blk[fv] = (nat, j, len(fvs))
    return glob, blk


_FV_GLOBAL, _FV_BLOCK = _reverse_tables()


def fastvideo_module_to_native(module: str) -> tuple[str, int, int] | None:
    """(native module, slice index, slice count) for a FastVideo module path, or None."""
    if module in _FV_GLOBAL:
        return _FV_GLOBAL[module]
    m = _BLOCK_RE.match(module)
    if m and m.group(2) in _FV_BLOCK:
        nat, j, n = _FV_BLOCK[m.group(2)]
        return f"blocks.{m.group(1)}.{nat}", j, n
    return None


def native_to_fastvideo(key: str) -> list[Part]:
    """The FastVideo tensor(s) a native tensor becomes; unknown keys raise LongcatError."""
    module, param = _split_param(key)
    targets = native_module_to_fastvideo(module)
    if targets is None:
        raise LongcatError(f"unknown native DiT tensor '{key}' (not in the LongCat key map)")
    return [Part(key, f"{t}.{param}", j, len(targets)) for j, t in enumerate(targets)]


def fastvideo_to_native(key: str) -> Part:
    """The native tensor a FastVideo tensor is (a slice of); unknown keys raise LongcatError."""
    module, param = _split_param(key)
    found = fastvideo_module_to_native(module)
    if found is None:
        raise LongcatError(f"unknown FastVideo DiT tensor '{key}' (not in the LongCat key map)")
    nat, j, n = found
    return Part(f"{nat}.{param}", key, j, n)


def tensor_specs(dims: DiTDims, flavour: str, fp8: bool = False
                 ) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every DiT tensor in the given key flavour (``fp8``: with the weight
    scales of an fp8 checkpoint, ``model.fp8``)."""
    native = native_tensor_specs(dims)
    if fp8:
        from longcat_tools.model import fp8 as fp8_format

        native = fp8_format.with_scales(native)
    if flavour == "native":
        return native
    if flavour != "fastvideo":
        raise LongcatError(f"unknown key flavour '{flavour}' (use one of {', '.join(FLAVOURS)})")
    out = []
    for name, shape in native:
        for part in native_to_fastvideo(name):
            out.append((part.fastvideo, (shape[0] // part.count, *shape[1:])))
    return out


def detect_flavour(keys: set[str] | list[str]) -> str | None:
    """The flavour of a set of DiT tensor names, judged by distinctive names; else None."""
    keys = set(keys)
    if "x_embedder.proj.weight" in keys or any(k.endswith(".attn.qkv.weight") for k in keys):
        return "native"
    if "patch_embed.proj.weight" in keys or any(k.endswith(".self_attn.to_q.weight") for k in keys):
        return "fastvideo"
    return None
