"""LoRA adapter formats of LongCat-Video, read and written exactly.

One module per format (:mod:`.native`, :mod:`.fastvideo`, :mod:`.peft`, :mod:`.comfy`), each
reading a file into the canonical form of :mod:`.base` (one :class:`ModuleEntry` per native
module) and writing from it; this module holds them by name and is all a caller needs:
:func:`sniff_format`, :func:`parse_keys` (header only), :func:`read_lora`, :func:`write_lora` and
the streaming pieces a converter uses. Conversions are exact both ways; the rank is always read
from the tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from longcat_tools.errors import LongcatError
from longcat_tools.io.safetensors import TensorSpec, read_header, write_file
from longcat_tools.lora.formats.base import (
    EXACT_METADATA_KEY,
    FORMAT_METADATA_KEY,
    LoraFile,
    LoraFormat,
    ModuleEntry,
    ModuleLora,
    OutSpec,
    Shapes,
    default_blocks,
    linear_shapes,
    reader,
    split_targets,
)
from longcat_tools.lora.formats.comfy import Comfy
from longcat_tools.lora.formats.fastvideo import FastVideo
from longcat_tools.lora.formats.native import (
    NATIVE_HYPHEN,
    NATIVE_PREFIX,
    Native,
    native_key_module,
)
from longcat_tools.lora.formats.peft import (
    PEFT_CONFIG_NAME,
    PEFT_METADATA_KEY,
    Peft,
    peft_config,
    peft_config_of,
)

__all__ = [
    "EXACT_METADATA_KEY", "FORMAT_METADATA_KEY", "FORMATS", "NATIVE_HYPHEN", "NATIVE_PREFIX",
    "PEFT_CONFIG_NAME", "PEFT_METADATA_KEY", "KeyParse", "LoraFile", "LoraFormat", "ModuleEntry",
    "ModuleLora", "check_finite", "convert_bytes", "default_blocks", "effective_deltas",
    "file_metadata", "get_format", "linear_shapes", "native_key_module", "output_specs",
    "output_tensors", "parse_keys", "peft_config", "peft_config_of", "read_lora", "sniff_format",
    "split_targets", "tensor_specs", "write_lora",
]

if TYPE_CHECKING:  # imported where tensors are made: header-level readers start fast
    import torch

_ALL: dict[str, LoraFormat] = {f.name: f for f in (Native(), FastVideo(), Peft(), Comfy())}
FORMATS = tuple(_ALL)


def get_format(name: str) -> LoraFormat:
    if name not in _ALL:
        raise LongcatError(f"unknown LoRA format '{name}' (use one of {', '.join(FORMATS)})")
    return _ALL[name]


def sniff_format(names: Iterable[str], where: str = "LoRA file") -> str:
    """The format a file's key names say; exactly one format may claim keys (the formats' key
    shapes do not overlap, so keys of two formats are a mixed file, never an ambiguous one)."""
    names = list(names)
    if not names:
        raise LongcatError(f"{where}: holds no tensors")
    claimed = [f for f in _ALL.values() if any(f.owns(n) for n in names)]
    if len(claimed) > 1:
        a, b = claimed[:2]
        raise LongcatError(f"{where}: mixes {a.label} keys ({a.example}) and {b.label} keys "
                           f"({b.example}); one file must use one LoRA format")
    if claimed:
        return claimed[0].name
    known = [f"{f.label} '{f.example}'" for f in _ALL.values()]
    raise LongcatError(f"{where}: not a LongCat LoRA file (first key '{names[0]}'); expected "
                       f"{', '.join(known[:-1])} or {known[-1]} keys")


@dataclass
class KeyParse:
    """A file's key names as its format reads them, before any tensor is: per module (in the
    file's own naming), role (``down``, ``up``, ``up.J``, ``alpha``) -> key."""

    format: str
    modules: dict[str, dict[str, str]]
    unknown: list[str]  # names that are no key of that format


def parse_keys(names: Iterable[str], where: str = "LoRA file") -> KeyParse:
    """Header-level reading of a LoRA file's key names, by the same rules as
    :func:`read_lora` (a LongcatError where no format, or several, claim the names)."""
    names = list(names)
    fmt = _ALL[sniff_format(names, where)]
    modules: dict[str, dict[str, str]] = {}
    unknown = []
    for key in names:
        part = fmt.key_part(key)
        if part is None:
            unknown.append(key)
        else:
            modules.setdefault(part[0], {})[part[1]] = key
    return KeyParse(fmt.name, modules, unknown)


def read_lora(path: str | Path, shapes: Shapes | None = None, *,
              adapter_config: Mapping | str | Path | None = None,
              inspect_blocks: bool = True) -> LoraFile:
    """Parse a LoRA file of any format (header, plus its small alpha tensors).

    ``shapes`` (native module -> (out, in), see :func:`linear_shapes`) checks every target
    against the DiT; without it only the module names are checked. ``adapter_config`` (a dict
    or a JSON file) gives a PEFT file's alphas; without it they come from the file's metadata
    or an ``adapter_config.json`` beside it. ``inspect_blocks=False`` trusts the conventional
    block split of a single-target ``lora_B`` instead of reading it (a header-only summary).
    """
    path = Path(path)
    header = read_header(path)
    fmt = _ALL[sniff_format(header.tensors, str(path))]
    parsed = fmt.parse(header, shapes, adapter_config=adapter_config,
                       inspect_blocks=inspect_blocks)
    for e in parsed.modules.values():  # each would be registered, fused or run as it is
        if e.rank < 1:
            raise LongcatError(f"{path}: the adapter of '{e.module}' has rank 0 (lora_down "
                               "has no rows): a broken file")
        alpha = float(e.alpha_scale.double().mean())
        if not (alpha > 0 and math.isfinite(alpha)):
            raise LongcatError(f"{path}: the adapter of '{e.module}' has alpha_scale {alpha:g}, "
                               "not a positive number: its update would vanish, flip sign or "
                               "be undefined")
    return LoraFile(path, fmt.name, parsed.modules, len(header.tensors),
                    sum(t.nbytes for t in header.tensors.values()), parsed.config, parsed.notes)


def effective_deltas(path: str | Path, scale: float = 1.0, *,
                     adapter_config: Mapping | str | Path | None = None
                     ) -> dict[str, torch.Tensor]:
    """Native module -> ``scale * alpha/rank * B @ A`` (float64, [out, in]) computed directly
    from the file's own tensors, whatever its format: the number every conversion must keep."""
    path = Path(path)
    header = read_header(path)
    fmt = _ALL[sniff_format(header.tensors, str(path))]
    return fmt.effective_deltas(header, scale, adapter_config)


# ---------------------------------------------------------------------------------------------
# writing


def _holding(fmt: str, module: str, kernel: tuple[int, ...]) -> LoraFormat:
    """The format ``fmt``, refused where it cannot hold a Conv3d adapter it is asked to write."""
    f = get_format(fmt)
    if kernel and not f.holds_conv:
        raise LongcatError(f"the adapter of '{module}' is a Conv3d LoRA, which the {f.label} "
                           "format cannot hold; export it with --format peft, or fuse it into "
                           "the DiT (lora fuse)")
    return f


def output_specs(entry: ModuleEntry, fmt: str, dtype: torch.dtype | None = None,
                 keys: str | None = None) -> list[OutSpec]:
    """(name, dtype, shape) of the tensors ``entry`` becomes in ``fmt``, in write order; ``dtype``
    casts the weights (alphas keep theirs); ``keys`` names PEFT modules (default native)."""
    return _holding(fmt, entry.module, entry.kernel).output_specs(entry, dtype or entry.dtype,
                                                                   keys)


def output_tensors(m: ModuleLora, fmt: str, dtype: torch.dtype | None = None,
                   keys: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of ``m`` in ``fmt`` (same names and order as :func:`output_specs`)."""
    def cast(t: torch.Tensor) -> torch.Tensor:
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    return _holding(fmt, m.module, m.kernel).output_tensors(m, cast, keys)


def file_metadata(entries: Iterable[ModuleEntry], fmt: str,
                  base: Mapping[str, str] | None = None, keys: str | None = None
                  ) -> dict[str, str]:
    """safetensors metadata of an adapter file in ``fmt``: ``base`` plus the format and what
    that format adds (the records that make a split form reversible exactly, PEFT's config)."""
    meta = dict(base or {})
    meta[FORMAT_METADATA_KEY] = fmt
    meta.update(get_format(fmt).metadata(list(entries), keys))
    return meta


def convert_bytes(entries: Iterable[ModuleEntry], fmt: str,
                  dtype: torch.dtype | None = None, keys: str | None = None) -> int:
    """Tensor bytes of ``entries`` written in ``fmt``."""
    return sum(math.prod(s) * d.itemsize
               for e in entries for _, d, s in output_specs(e, fmt, dtype, keys))


def _first_bad(lora: LoraFile, entry: ModuleEntry, bad: Callable[[torch.Tensor], bool]) -> str:
    """The first of a module's stored tensors for which ``bad`` holds (error path only)."""
    read = reader(read_header(lora.path))
    for key in entry.source_keys:
        t = read(key)
        if t.is_floating_point() and bad(t):
            return key
    return entry.source_keys[0]


def _non_finite(t: torch.Tensor) -> bool:
    import torch

    return not bool(torch.isfinite(t).all())


def _overflows_fp16(t: torch.Tensor) -> bool:
    """Whether a finite value of ``t`` becomes inf in float16 (|x| > 65504 after rounding)."""
    import torch

    return bool((torch.isinf(t.to(torch.float16)) & torch.isfinite(t)).any())


def check_finite(lora: LoraFile, module: str, m: ModuleLora, outcome: str) -> None:
    """Refuse a module's loaded tensors holding NaN or Inf, naming the stored tensor."""
    if any(_non_finite(t) for t in (m.down, *m.ups, m.alpha_scale)):
        raise LongcatError(f"{lora.path}: tensor "
                           f"'{_first_bad(lora, lora.modules[module], _non_finite)}' (adapter of "
                           f"'{module}') holds NaN or Inf values; {outcome}")


def tensor_specs(lora: LoraFile, fmt: str, dtype: torch.dtype | None = None,
                 keys: str | None = None, *, finite: bool = False) -> list[TensorSpec]:
    """Every output tensor of ``lora`` in ``fmt`` as a lazy :class:`TensorSpec`: a module's
    tensors are read and converted when its first output is written, so memory holds one
    module at a time. A weight float16 cannot hold is refused when casting to it (as the DiT's
    are), and with ``finite`` a module holding NaN or Inf; the message names the stored tensor."""
    import torch

    cache: dict[str, dict[str, torch.Tensor]] = {}

    def produce(module: str, name: str) -> torch.Tensor:
        if module not in cache:
            cache.clear()
            entry = lora.modules[module]
            m = entry.load()
            if finite:
                check_finite(lora, module, m, "nothing was written")
            if dtype == torch.float16 and any(_overflows_fp16(t) for t in (m.down, *m.ups)):
                raise LongcatError(f"{lora.path}: tensor "
                                   f"'{_first_bad(lora, entry, _overflows_fp16)}' overflows "
                                   "float16 (|x| > 65504); use --dtype bf16")
            cache[module] = output_tensors(m, fmt, dtype, keys)
        return cache[module][name]

    return [TensorSpec(name, d, shape, lambda m=m, name=name: produce(m, name))
            for m, e in lora.modules.items()
            for name, d, shape in output_specs(e, fmt, dtype, keys)]


def write_lora(path: str | Path, lora: LoraFile, fmt: str, dtype: torch.dtype | None = None,
               metadata: Mapping[str, str] | None = None, keys: str | None = None) -> int:
    """Write ``lora`` as a ``fmt`` file at ``path`` (streamed module by module); returns bytes.
    ``keys`` names the modules of a PEFT file (native by default, or fastvideo)."""
    meta = file_metadata(lora.modules.values(), fmt, {"format": "pt", **(metadata or {})}, keys)
    return write_file(path, tensor_specs(lora, fmt, dtype, keys), meta)
