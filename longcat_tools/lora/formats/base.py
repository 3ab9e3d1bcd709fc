"""The canonical form every LoRA format reads into and writes from, and the format interface.

Every format stores, per native DiT module, the same update
``delta W = scale * alpha_scale * blockdiag(up_0 .. up_{n-1}) @ down`` with ``down`` of shape
``[n*r, in]`` and each ``up_j`` of shape ``[out/n, r]`` (``n`` is the original's ``n_seperate``).
A file is parsed into :class:`ModuleEntry` objects (one per native module: shapes, exact
``alpha_scale``, a loader for the tensors) without reading the large tensors, so a converter can
plan its output first and stream module by module.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from longcat_tools.errors import LongcatError
from longcat_tools.io import safetensors as st
from longcat_tools.io.safetensors import Header, read_tensor
from longcat_tools.model import avatar, keymap

if TYPE_CHECKING:  # torch is imported where tensors are made: header-level readers start fast
    import torch

# Native modules (inside blocks.{i}, or global) whose hub adapters split the up-projection into
# blocks although FastVideo sees one target: the adaLN modulations (6 and 2 chunks). FastVideo
# writes their lora_B block-diagonal; reading such a file back, this count is the default.
BLOCK_DIAGONAL_BLOCKS: dict[str, int] = {"blocks.*.adaLN_modulation.1": 6,
                                         "final_layer.adaLN_modulation.1": 2}

# safetensors metadata key (JSON) of a fastvideo- or peft-format file: per native module, what
# the native form needs beyond the defaults ({"n": blocks, "alpha_scale": {...}}).
EXACT_METADATA_KEY = "longcat_tools.native_lora"
FORMAT_METADATA_KEY = "longcat_tools.lora_format"

# Native modules that are Conv3d layers whose kernel equals their stride (the patch embedding):
# on flattened patches they are Linear maps, so their adapter is held as one over ``in * kernel``
# inputs and its ``kernel`` is kept to write PEFT's Conv3d LoRA back.
CONV_MODULES = frozenset({"x_embedder.proj"})

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
# Modules only the avatar DiT has (audio cross-attention, its modulation, audio_proj): valid
# targets on an avatar checkpoint; FastVideo's and ComfyUI's key maps have no names for them.
_AVATAR_BLOCK_MODULES = frozenset(n.rpartition(".")[0] for extras in
                                  avatar.BLOCK_TENSORS.values() for n, _ in extras)
_AVATAR_GLOBAL_MODULES = frozenset(n.rpartition(".")[0] for extras in
                                   avatar.GLOBAL_TENSORS.values() for n, _ in extras)

Shapes = Mapping[str, tuple[int, int]]  # native module -> (out, in)
OutSpec = tuple[str, "torch.dtype", tuple[int, ...]]  # name, dtype, shape
Cast = Callable[["torch.Tensor"], "torch.Tensor"]


@dataclass
class ModuleLora:
    """One native module's adapter, as tensors."""

    module: str  # native module path, e.g. blocks.0.attn.qkv
    down: torch.Tensor  # [n*r, in]
    ups: list[torch.Tensor]  # n tensors [out/n, r]
    alpha_scale: torch.Tensor  # as stored natively (normally a 0-d float32)
    kernel: tuple[int, ...] = ()  # a Conv3d target's kernel (``in`` is channels * its volume)

    @property
    def n(self) -> int:
        return len(self.ups)

    @property
    def rank(self) -> int:
        return self.down.shape[0] // self.n

    def delta(self, scale: float = 1.0, dtype: torch.dtype | None = None,
              rows: tuple[int, int] | None = None) -> torch.Tensor:
        """``scale * alpha_scale * blockdiag(ups) @ down`` as an [out, in] matrix (float64
        unless ``dtype``), or only its output rows ``[start, stop)`` (a split target of a fused
        module)."""
        import torch

        dtype = dtype or torch.float64
        a = float(self.alpha_scale.double().mean())
        r, h = self.rank, self.ups[0].shape[0]
        start, stop = rows if rows is not None else (0, h * self.n)
        parts = []
        for j, up in enumerate(self.ups):
            lo, hi = max(start, j * h), min(stop, (j + 1) * h)
            if lo < hi:
                parts.append(up[lo - j * h:hi - j * h].to(dtype)
                             @ self.down[j * r:(j + 1) * r].to(dtype))
        return torch.cat(parts, 0) * (scale * a)


@dataclass
class ModuleEntry:
    """One native module's adapter as a file describes it, before its tensors are read."""

    module: str
    n: int  # up blocks
    rank: int  # rows of down per up block
    in_features: int
    out_features: int
    dtype: torch.dtype  # of down and ups
    alpha_scale: torch.Tensor  # exact native value (small; read while parsing)
    source_keys: tuple[str, ...]
    load: Callable[[], ModuleLora]
    kernel: tuple[int, ...] = ()  # a Conv3d target's kernel, as in ModuleLora

    @property
    def nbytes(self) -> int:
        return (self.n * self.rank * (self.in_features + self.out_features // self.n)
                * self.dtype.itemsize)


@dataclass
class LoraFile:
    """A parsed adapter file: its format and one entry per native module, in file order."""

    path: Path
    format: str
    modules: dict[str, ModuleEntry]
    tensors: int  # tensors in the file
    nbytes: int  # tensor bytes in the file
    config: dict | None = None  # PEFT: the adapter config that gave the alphas
    notes: list[str] = field(default_factory=list)  # assumptions a user should hear about

    def load_all(self) -> dict[str, ModuleLora]:
        return {m: e.load() for m, e in self.modules.items()}


@dataclass
class Parsed:
    """What a format's parser gives :func:`read_lora`: the entries, and for PEFT its config."""

    modules: dict[str, ModuleEntry]
    config: dict | None = None
    notes: list[str] = field(default_factory=list)


class LoraFormat:
    """One LoRA file format: how its keys are named, read into and written from the canonical
    form. Subclasses are stateless; :mod:`longcat_tools.lora.formats` holds one of each."""

    name: ClassVar[str]
    label: ClassVar[str]  # in messages
    example: ClassVar[str]  # a key of the format, in messages
    flavour: ClassVar[str]  # the DiT key flavour of the module names it writes
    takes_keys: ClassVar[bool] = False  # writing lets the caller pick module names (--keys)
    config_file: ClassVar[str] = ""  # name of the config written beside an exported file
    holds_conv: ClassVar[bool] = False  # can write an adapter of a Conv3d (CONV_MODULES)

    def owns(self, key: str) -> bool:
        """Whether ``key`` marks a file as this format."""
        raise NotImplementedError

    def key_part(self, key: str) -> tuple[str, str] | None:
        """(module in the file's own naming, role) of a key, or None where it is no key of this
        format; role is ``down``, ``up``, ``up.J`` (up block J) or ``alpha``."""
        raise NotImplementedError

    def parse(self, header: Header, shapes: Shapes | None, *,
              adapter_config: Mapping | str | Path | None, inspect_blocks: bool) -> Parsed:
        raise NotImplementedError

    def effective_deltas(self, header: Header, scale: float,
                         adapter_config: Mapping | str | Path | None
                         ) -> dict[str, torch.Tensor]:
        """Native module -> ``scale * alpha/rank * B @ A`` (float64) from the stored tensors."""
        raise NotImplementedError

    def output_specs(self, entry: ModuleEntry, dtype: torch.dtype, keys: str | None
                     ) -> list[OutSpec]:
        raise NotImplementedError

    def output_tensors(self, m: ModuleLora, cast: Cast, keys: str | None
                       ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def metadata(self, entries: list[ModuleEntry], keys: str | None) -> dict[str, str]:
        """safetensors metadata this format adds to a written file."""
        return {}

    def adapter_config(self, entries: Iterable[ModuleEntry], keys: str | None) -> dict | None:
        """The content of ``config_file``, written beside an exported file (None: none)."""
        return None

    def key_names(self, keys: str | None) -> str | None:
        """The module naming a written file uses where the caller may pick it, else None."""
        return None

    def file_targets(self, lora: LoraFile) -> set[str]:
        """The adapted modules in the file's own names."""
        return {part[0] for e in lora.modules.values() for k in e.source_keys
                if (part := self.key_part(k)) and part[1] == "down"}


# ---------------------------------------------------------------------------------------------
# module names and shapes


def is_avatar_module(module: str) -> bool:
    """Whether a native module path is one only the avatar DiT has."""
    m = _BLOCK_RE.match(module)
    return m.group(2) in _AVATAR_BLOCK_MODULES if m else module in _AVATAR_GLOBAL_MODULES


def is_dit_module(module: str) -> bool:
    """Whether a native module path is a module of the base or the avatar DiT."""
    return keymap.native_module_to_fastvideo(module) is not None or is_avatar_module(module)


def split_targets(module: str, flavour: str) -> tuple[str, ...]:
    """The module(s) of a flavour that a native module's adapter is written on."""
    if flavour == "native":
        return (module,)
    if is_avatar_module(module):
        raise LongcatError(f"LoRA target '{module}' is a module of the avatar DiT, which the "
                           "FastVideo and ComfyUI key maps do not name; export this adapter with "
                           "--format native or peft (PEFT with native --keys)")
    targets = keymap.native_module_to_fastvideo(module)
    if targets is None:
        raise LongcatError(f"LoRA target '{module}' is not a module of the LongCat DiT")
    return targets


def default_blocks(module: str) -> int:
    """The up-block count a module's adapter has unless a file says otherwise: the split count
    for fused projections, the modulation chunk count for adaLN, else 1."""
    targets = keymap.native_module_to_fastvideo(module) or (module,)
    if len(targets) > 1:
        return len(targets)
    if module in BLOCK_DIAGONAL_BLOCKS:
        return BLOCK_DIAGONAL_BLOCKS[module]
    m = _BLOCK_RE.match(module)
    return BLOCK_DIAGONAL_BLOCKS.get(f"blocks.*.{m.group(2)}", 1) if m else 1


def linear_shapes(dims: keymap.DiTDims, audio: avatar.AudioDims | None = None
                  ) -> dict[str, tuple[int, int]]:
    """Native module -> (out, in) of every Linear of the DiT (the avatar DiT's with ``audio``),
    and of each of CONV_MODULES over its flattened patch (in = channels * kernel volume): what a
    LoRA may target."""
    specs = (avatar.tensor_specs(dims, audio) if audio is not None
             else keymap.native_tensor_specs(dims))
    return {name[: -len(".weight")]: (shape[0], math.prod(shape[1:]))
            for name, shape in specs
            if name.endswith(".weight") and (len(shape) == 2
                                             or name[: -len(".weight")] in CONV_MODULES)}


# what to do with an adapter that targets no module of the DiT, in every command that reads one
NOT_OURS = "(an adapter of another model? convert leaves it out with --lora)"


def check_target(where: str, key: str, module: str, out_f: int, in_f: int,
                 shapes: Shapes | None, kernel: tuple[int, ...] = ()) -> None:
    """The module exists in the DiT and (with ``shapes``) the adapter fits its layer; a Conv3d
    layer takes a Conv3d adapter (``kernel``) only, a Linear a Linear one only."""
    if not is_dit_module(module):
        raise LongcatError(f"{where}: tensor '{key}' targets '{module}', which is not a module of "
                           f"the LongCat DiT {NOT_OURS}")
    if (module in CONV_MODULES) != bool(kernel):
        want = "Conv3d (5-D PEFT lora_A/lora_B)" if module in CONV_MODULES else "Linear (2-D)"
        raise LongcatError(f"{where}: tensor '{key}': '{module}' is a {want} layer; its adapter "
                           "must have that form")
    if shapes is None:
        return
    if module not in shapes:
        why = ("a module of the avatar DiT, not of this one" if is_avatar_module(module)
               else "not a Linear layer of this DiT (wrong depth?)")
        raise LongcatError(f"{where}: tensor '{key}' targets '{module}', which is {why}")
    if shapes[module] != (out_f, in_f):
        raise LongcatError(f"{where}: adapter of '{module}' is {out_f}x{in_f} but the DiT layer "
                           f"is {shapes[module][0]}x{shapes[module][1]} (adapter for another "
                           "model size?)")


# ---------------------------------------------------------------------------------------------
# tensors


def reader(header: Header) -> Callable[[str], torch.Tensor]:
    """Reads one named tensor of the file (opened per call: a loader may run much later)."""
    def read(name: str) -> torch.Tensor:
        with open(header.path, "rb") as f:
            return read_tensor(f, header.tensors[name])
    return read


def dtype_of(name: str) -> torch.dtype:
    return st.DTYPES[name][0]


def alpha_value(alpha_scale: torch.Tensor) -> float:
    """A stored ``alpha_scale`` (one value: every reader refuses more) as a number."""
    return alpha_scale.item()


def block_diagonal(ups: list[torch.Tensor]) -> torch.Tensor:
    """One matrix with the up blocks on its diagonal (FastVideo's and PEFT's single-target B)."""
    import torch

    if len(ups) == 1:
        return ups[0]
    rows, r = ups[0].shape
    b = torch.zeros(rows * len(ups), r * len(ups), dtype=ups[0].dtype)
    for j, up in enumerate(ups):
        b[j * rows:(j + 1) * rows, j * r:(j + 1) * r] = up
    return b
