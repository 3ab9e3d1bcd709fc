"""LoRA adapter formats of LongCat-Video, read and written exactly.

Every format stores, per native DiT module, the same update
``delta W = scale * alpha_scale * blockdiag(up_0 .. up_{n-1}) @ down`` with ``down`` of shape
``[n*r, in]`` and each ``up_j`` of shape ``[out/n, r]`` (``n`` is the original's ``n_seperate``).

* ``native``: the hub files (``lora___lorahyphen___<module>.lora_down.weight``, ``.lora_up.weight``
  or ``.lora_up.blocks.{j}.weight``, ``.alpha_scale``) on native module names.
* ``fastvideo``: FastVideo's converter output (``<module>.lora_A``, ``.lora_B``, ``.lora_alpha``)
  on FastVideo module names: a fused qkv/kv module becomes one LoRA per split target (rows of
  ``down`` and one up block each), a single target with several up blocks (the adaLN modulations)
  gets a block-diagonal ``lora_B``, and ``lora_alpha = alpha_scale * rank`` is a 0-d float32.
* ``peft``: PEFT / diffusers (``<prefix><module>.lora_A.weight``, ``.lora_B.weight``; the alpha
  in an adapter config: ``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``,
  ``target_modules``, ``use_rslora``). Read: the prefixes ``base_model.model.`` (PEFT),
  ``transformer.`` (diffusers), ``diffusion_model.`` / ``model.`` (ComfyUI) and ``dit.`` are
  stripped, module names may be native (SimpleTuner, which trains the native class) or FastVideo
  (split ``to_q/to_k/to_v``), kohya-style ``<module>.alpha`` tensors override the config, and the
  config comes from the caller, else the file's ``lora_adapter_metadata`` (diffusers), else an
  ``adapter_config.json`` beside the file. Written: diffusers' layout, ``transformer.`` + native
  module names (what SimpleTuner's LongCat LoRAs look like and the native class loads with
  PEFT), a fused qkv/kv/adaLN target as one LoRA with a block-diagonal ``lora_B`` (its rank is
  ``n*r``, listed in ``rank_pattern``), and the config in the file's metadata; ``keys="fastvideo"``
  writes FastVideo module names instead (split targets, rank ``r``).

A file is parsed into :class:`ModuleEntry` objects (one per native module: shapes, exact
``alpha_scale``, a loader for the tensors) without reading the large tensors, so a converter can
plan its output first and stream module by module. Conversions are exact both ways: where the
FastVideo form alone cannot give the native tensors back bit for bit (an ``alpha_scale`` that
does not survive ``* rank / rank`` in float32, an unusual block count), the file's safetensors
metadata records what is needed. The rank is always read from the tensors.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from longcat_tools.errors import LongcatError
from longcat_tools.io.safetensors import (
    DTYPE_NAMES,
    DTYPES,
    Header,
    TensorSpec,
    read_header,
    read_tensor,
    write_file,
)
from longcat_tools.model import keymap

FORMATS = ("native", "fastvideo", "peft")
# The key flavour of the DiT names each format uses (PEFT: what we write by default).
FLAVOUR_OF_FORMAT = {"native": "native", "fastvideo": "fastvideo", "peft": "native"}

NATIVE_PREFIX = "lora___lorahyphen___"
NATIVE_HYPHEN = "___lorahyphen___"
NATIVE_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha_scale")
_NATIVE_UP_BLOCK = re.compile(r"^(.*)\.lora_up\.blocks\.(\d+)\.weight$")
FASTVIDEO_SUFFIXES = (".lora_A", ".lora_B", ".lora_alpha")

# PEFT / diffusers: what we write, what we strip when reading, where the config lives.
PEFT_PREFIX = "transformer."
PEFT_STRIP_PREFIXES = ("base_model.model.", "transformer.", "diffusion_model.", "model.", "dit.")
PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata key
PEFT_CONFIG_NAME = "adapter_config.json"
_PEFT_WEIGHT = re.compile(r"^(?P<mod>.+)\.(?P<role>lora_A|lora_B)(?:\.default)?\.weight$")
_PEFT_ALPHA = re.compile(r"^(?P<mod>.+)\.alpha$")

# Native modules (inside blocks.{i}, or global) whose hub adapters split the up-projection into
# blocks although FastVideo sees one target: the adaLN modulations (6 and 2 chunks). FastVideo
# writes their lora_B block-diagonal; reading such a file back, this count is the default.
BLOCK_DIAGONAL_BLOCKS: dict[str, int] = {"blocks.*.adaLN_modulation.1": 6,
                                         "final_layer.adaLN_modulation.1": 2}

# safetensors metadata key (JSON) of a fastvideo-format file: per native module, what the
# native form needs beyond the defaults ({"n": blocks, "alpha_scale": {...}}).
EXACT_METADATA_KEY = "longcat_tools.native_lora"
FORMAT_METADATA_KEY = "longcat_tools.lora_format"

# Where the hub's adapters go in the model_index.json layout, as FastVideo names them.
NATIVE_FILE_TO_ADAPTER = {"cfg_step_lora.safetensors": "distilled",
                          "refinement_lora.safetensors": "refinement"}
ADAPTER_TO_NATIVE_FILE = {v: k for k, v in NATIVE_FILE_TO_ADAPTER.items()}

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


@dataclass
class ModuleLora:
    """One native module's adapter, as tensors."""

    module: str  # native module path, e.g. blocks.0.attn.qkv
    down: torch.Tensor  # [n*r, in]
    ups: list[torch.Tensor]  # n tensors [out/n, r]
    alpha_scale: torch.Tensor  # as stored natively (normally a 0-d float32)

    @property
    def n(self) -> int:
        return len(self.ups)

    @property
    def rank(self) -> int:
        return self.down.shape[0] // self.n

    def delta(self, scale: float = 1.0, dtype: torch.dtype = torch.float64,
              rows: tuple[int, int] | None = None) -> torch.Tensor:
        """``scale * alpha_scale * blockdiag(ups) @ down`` as an [out, in] matrix, or only its
        output rows ``[start, stop)`` (a split target of a fused module)."""
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


# ---------------------------------------------------------------------------------------------
# module names


def native_key_module(module: str) -> str:
    """``blocks.0.attn.qkv`` -> ``lora___lorahyphen___blocks___lorahyphen___0...``."""
    return NATIVE_PREFIX + module.replace(".", NATIVE_HYPHEN)


def split_targets(module: str, flavour: str) -> tuple[str, ...]:
    """The module(s) of a flavour that a native module's adapter is written on."""
    if flavour == "native":
        return (module,)
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


def linear_shapes(dims: keymap.DiTDims) -> dict[str, tuple[int, int]]:
    """Native module -> (out, in) of every Linear of the DiT: what a LoRA may target."""
    return {name[: -len(".weight")]: shape for name, shape in keymap.native_tensor_specs(dims)
            if name.endswith(".weight") and len(shape) == 2}


# ---------------------------------------------------------------------------------------------
# parsing


def sniff_format(names: Iterable[str], where: str = "LoRA file") -> str:
    names = list(names)
    if any(n.startswith(NATIVE_PREFIX) for n in names):
        return "native"
    fastvideo = any(n.endswith((".lora_A", ".lora_B")) for n in names)
    peft = any(_PEFT_WEIGHT.match(n) for n in names)
    if fastvideo and peft:
        raise LongcatError(f"{where}: mixes FastVideo keys (….lora_A) and PEFT keys "
                           "(….lora_A.weight); one file must use one LoRA format")
    if fastvideo:
        return "fastvideo"
    if peft:
        return "peft"
    sample = names[0] if names else "(no tensors)"
    raise LongcatError(f"{where}: not a LongCat LoRA file (first key '{sample}'); expected native "
                       f"'{NATIVE_PREFIX}…lora_down.weight', FastVideo '….lora_A' or PEFT "
                       "'….lora_A.weight' keys")


def read_lora(path: str | Path, shapes: Mapping[str, tuple[int, int]] | None = None, *,
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
    fmt = sniff_format(header.tensors, str(path))
    config, notes = None, []
    if fmt == "native":
        modules = _parse_native(header, shapes)
    elif fmt == "fastvideo":
        modules = _parse_fastvideo(header, shapes, inspect_blocks)
    else:
        config, source = peft_config_of(header, adapter_config)
        modules, notes = _parse_peft(header, shapes, config, source, inspect_blocks)
    return LoraFile(path, fmt, modules, len(header.tensors),
                    sum(t.nbytes for t in header.tensors.values()), config, notes)


def _reader(header: Header) -> Callable[[str], torch.Tensor]:
    def read(name: str) -> torch.Tensor:
        with open(header.path, "rb") as f:
            return read_tensor(f, header.tensors[name])
    return read


def _check_target(where: str, key: str, module: str, out_f: int, in_f: int,
                  shapes: Mapping[str, tuple[int, int]] | None) -> None:
    if keymap.native_module_to_fastvideo(module) is None:
        raise LongcatError(f"{where}: tensor '{key}' targets '{module}', which is not a module of "
                           "the LongCat DiT (exclude this adapter with --lora)")
    if shapes is None:
        return
    if module not in shapes:
        raise LongcatError(f"{where}: tensor '{key}' targets '{module}', which is not a Linear "
                           "layer of this DiT (wrong depth?)")
    if shapes[module] != (out_f, in_f):
        raise LongcatError(f"{where}: adapter of '{module}' is {out_f}x{in_f} but the DiT layer "
                           f"is {shapes[module][0]}x{shapes[module][1]} (adapter for another "
                           "model size?)")


def _parse_native(header: Header,
                  shapes: Mapping[str, tuple[int, int]] | None) -> dict[str, ModuleEntry]:
    where = str(header.path)
    groups: dict[str, dict[str, str]] = {}
    for key in header.tensors:
        if not key.startswith(NATIVE_PREFIX):
            raise LongcatError(f"{where}: unknown key '{key}' in a native-format LoRA file")
        m = _NATIVE_UP_BLOCK.match(key)
        if m:
            stem, role = m.group(1), f"up.{int(m.group(2))}"
        else:
            suffix = next((s for s in NATIVE_SUFFIXES if key.endswith(s)), None)
            if suffix is None:
                raise LongcatError(f"{where}: unknown key '{key}' (expected .lora_down.weight, "
                                   ".lora_up.weight, .lora_up.blocks.N.weight or .alpha_scale)")
            stem, role = key[: -len(suffix)], {".lora_down.weight": "down",
                                               ".lora_up.weight": "up",
                                               ".alpha_scale": "alpha"}[suffix]
        module = stem[len(NATIVE_PREFIX):].replace(NATIVE_HYPHEN, ".")
        groups.setdefault(module, {})[role] = key
    read = _reader(header)
    out: dict[str, ModuleEntry] = {}
    for module, roles in groups.items():
        if "down" not in roles:
            raise LongcatError(f"{where}: module '{module}' has no .lora_down.weight")
        blocks = sorted(int(r[3:]) for r in roles if r.startswith("up."))
        if blocks and "up" in roles:
            raise LongcatError(f"{where}: module '{module}' has both .lora_up.weight and "
                               ".lora_up.blocks.N.weight")
        if blocks and blocks != list(range(len(blocks))):
            raise LongcatError(f"{where}: module '{module}' has up blocks {blocks}, expected "
                               f"0..{len(blocks) - 1}")
        if not blocks and "up" not in roles:
            raise LongcatError(f"{where}: module '{module}' has no .lora_up weight")
        up_keys = [roles[f"up.{j}"] for j in blocks] if blocks else [roles["up"]]
        down = header.tensors[roles["down"]]
        ups = [header.tensors[k] for k in up_keys]
        n = len(ups)
        if len(down.shape) != 2 or any(len(u.shape) != 2 for u in ups):
            raise LongcatError(f"{where}: module '{module}': LoRA weights must be 2-D")
        if down.shape[0] % n:
            raise LongcatError(f"{where}: module '{module}': lora_down has {down.shape[0]} rows, "
                               f"not a multiple of its {n} up blocks")
        rank = down.shape[0] // n
        if any(u.shape != ups[0].shape or u.shape[1] != rank for u in ups):
            raise LongcatError(f"{where}: module '{module}': up blocks "
                               f"{[list(u.shape) for u in ups]} do not match rank {rank}")
        if any(u.dtype != down.dtype for u in ups):
            raise LongcatError(f"{where}: module '{module}': lora_down and lora_up dtypes differ")
        out_f, in_f = ups[0].shape[0] * n, down.shape[1]
        _check_target(where, roles["down"], module, out_f, in_f, shapes)
        if "alpha" in roles:
            alpha = read(roles["alpha"])
            if alpha.numel() == 0 or not alpha.is_floating_point():
                raise LongcatError(f"{where}: '{roles['alpha']}' must be a float scalar")
        else:
            alpha = torch.tensor(1.0)  # FastVideo's default when a file has none
        keys = (roles["down"], *up_keys) + ((roles["alpha"],) if "alpha" in roles else ())

        def load(module=module, dk=roles["down"], uk=tuple(up_keys), alpha=alpha) -> ModuleLora:
            return ModuleLora(module, read(dk), [read(k) for k in uk], alpha.clone())

        out[module] = ModuleEntry(module, n, rank, in_f, out_f, down.torch_dtype, alpha, keys,
                                  load)
    return out


def _exact_metadata(header: Header) -> dict[str, dict]:
    raw = header.metadata.get(EXACT_METADATA_KEY)
    if not raw:
        return {}
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LongcatError(f"{header.path}: metadata '{EXACT_METADATA_KEY}' is not JSON") from e
    if not isinstance(doc, dict):
        raise LongcatError(f"{header.path}: metadata '{EXACT_METADATA_KEY}' is not an object")
    return doc


def _alpha_from_record(rec: Mapping) -> torch.Tensor:
    dtype = DTYPES.get(rec.get("dtype", "F32"), (None,))[0]
    values = rec.get("values")
    shape = rec.get("shape", [])
    if dtype is None or not isinstance(values, list) or not isinstance(shape, list):
        raise ValueError(rec)
    return torch.tensor([float.fromhex(v) for v in values],
                        dtype=torch.float64).to(dtype).reshape(shape)


# native module -> split index -> role -> tensor name (the split formats: FastVideo and PEFT)
_Groups = dict[str, dict[int, dict[str, str]]]
# (native module, split index, split count, target rank) -> scale = alpha / rank of that target
_ScaleOf = Callable[[str, int, dict[str, str], int], float]


def _parse_fastvideo(header: Header, shapes: Mapping[str, tuple[int, int]] | None,
                     inspect_blocks: bool = True) -> dict[str, ModuleEntry]:
    """Group FastVideo targets back into native modules: split targets of a fused module are
    its blocks (down rows concatenated), a single target's block count comes from the file's
    metadata, else the convention (adaLN: 6 or 2) where lora_B is block-diagonal, else 1."""
    where = str(header.path)
    groups: _Groups = {}
    targets_of: dict[str, tuple[str, ...]] = {}
    for key in header.tensors:
        suffix = next((s for s in FASTVIDEO_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise LongcatError(f"{where}: unknown key '{key}' in a FastVideo-format LoRA file "
                               "(expected <module>.lora_A, .lora_B or .lora_alpha)")
        target = key[: -len(suffix)]
        found = keymap.fastvideo_module_to_native(target)
        if found is None:
            raise LongcatError(f"{where}: tensor '{key}' targets '{target}', which is not a "
                               "module of the LongCat DiT (exclude this adapter with --lora)")
        native, j, _ = found
        targets_of[native] = keymap.native_module_to_fastvideo(native) or (target,)
        groups.setdefault(native, {}).setdefault(j, {})[suffix[1:]] = key
    read = _reader(header)

    def scale_of(native: str, j: int, roles: dict[str, str], rank: int) -> float:
        if "lora_alpha" not in roles:
            return 1.0  # FastVideo: no alpha means scale 1
        t = read(roles["lora_alpha"])
        if t.numel() != 1 or not t.is_floating_point():
            raise LongcatError(f"{where}: '{roles['lora_alpha']}' must be a float scalar")
        return float(t.double()) / rank

    return _split_entries(header, shapes, groups, targets_of, scale_of, inspect_blocks)


def _split_entries(header: Header, shapes: Mapping[str, tuple[int, int]] | None,
                   groups: _Groups, targets_of: Mapping[str, tuple[str, ...]],
                   scale_of: _ScaleOf, inspect_blocks: bool = True) -> dict[str, ModuleEntry]:
    """Module entries of a split format (one A/B pair per target, a fused native module's
    targets stacked back), exact with the file's ``EXACT_METADATA_KEY`` records."""
    where = str(header.path)
    exact = _exact_metadata(header)
    read = _reader(header)
    out: dict[str, ModuleEntry] = {}
    for native, parts in groups.items():
        targets = targets_of[native]
        count = len(targets)
        if sorted(parts) != list(range(count)):
            have = [targets[j] for j in sorted(parts)]
            raise LongcatError(f"{where}: '{native}' is fused in the native model; its adapter "
                               f"needs all of {', '.join(targets)} (found {', '.join(have)})")
        for j, roles in parts.items():
            for role in ("lora_A", "lora_B"):
                if role not in roles:
                    raise LongcatError(f"{where}: '{targets[j]}' has no .{role}")
        a_info = [header.tensors[parts[j]["lora_A"]] for j in range(count)]
        b_info = [header.tensors[parts[j]["lora_B"]] for j in range(count)]
        if any(len(t.shape) != 2 for t in a_info + b_info):
            raise LongcatError(f"{where}: '{native}': LoRA weights must be 2-D")
        ranks = {t.shape[0] for t in a_info}
        ins = {t.shape[1] for t in a_info}
        if len(ranks) > 1 or len(ins) > 1 or any(b.shape[1] != a.shape[0]
                                                 for a, b in zip(a_info, b_info, strict=True)):
            raise LongcatError(f"{where}: '{native}': lora_A/lora_B shapes "
                               f"{[list(t.shape) for t in a_info + b_info]} disagree (the split "
                               "targets of a fused module need one rank)")
        dtype = a_info[0].dtype
        if any(t.dtype != dtype for t in a_info + b_info):
            raise LongcatError(f"{where}: '{native}': lora_A and lora_B dtypes differ")
        rank_a = a_info[0].shape[0]
        if rank_a == 0:
            raise LongcatError(f"{where}: '{native}': lora_A has rank 0")
        out_f, in_f = sum(b.shape[0] for b in b_info), a_info[0].shape[1]
        if len({b.shape[0] for b in b_info}) > 1:
            raise LongcatError(f"{where}: '{native}': split targets have different widths")
        _check_target(where, parts[0]["lora_A"], native, out_f, in_f, shapes)
        rec = exact.get(native, {})
        n = rec.get("n", default_blocks(native))
        if not isinstance(n, int) or n < 1:
            raise LongcatError(f"{where}: metadata gives '{native}' an invalid block count {n!r}")
        scales = [scale_of(native, j, parts[j], rank_a) for j in range(count)]
        if count > 1:
            # one block per split target, or (n == 1) one down shared by all targets
            if n not in (1, count):
                raise LongcatError(f"{where}: metadata gives fused '{native}' {n} blocks; only 1 "
                                   f"or {count} can be written natively")
            rank = rank_a
        else:
            if rank_a % n or b_info[0].shape[0] % n:
                if "n" in rec:
                    raise LongcatError(f"{where}: metadata gives '{native}' {n} blocks, which do "
                                       f"not divide its rank {rank_a}")
                n = 1  # not the conventional block split: one plain up
            rank = rank_a // n
        if len(set(scales)) > 1:
            raise LongcatError(f"{where}: split targets of '{native}' have different "
                               f"lora_alpha/rank {sorted(set(scales))}; the native format has one "
                               "alpha_scale per module")
        if "alpha_scale" in rec:
            try:
                alpha = _alpha_from_record(rec["alpha_scale"])
            except (ValueError, TypeError, KeyError) as e:
                raise LongcatError(f"{where}: metadata alpha_scale of '{native}' is invalid "
                                   f"({e})") from None
        else:
            alpha = torch.tensor(scales[0], dtype=torch.float32)
        keys = tuple(k for j in range(count) for r, k in sorted(
            parts[j].items(), key=lambda rk: (rk[0] != "lora_A", rk[0] != "lora_B", rk[0])))
        a_keys = tuple(parts[j]["lora_A"] for j in range(count))
        b_keys = tuple(parts[j]["lora_B"] for j in range(count))

        if count == 1 and n > 1 and "n" not in rec and inspect_blocks:
            # Files from other tools carry no metadata: accept the conventional block split only
            # where lora_B really is block-diagonal, else write one plain up.
            if not _is_block_diagonal(read(b_keys[0]), n):
                n, rank = 1, rank_a

        def load(native=native, n=n, rank=rank, count=count, a_keys=a_keys, b_keys=b_keys,
                 alpha=alpha) -> ModuleLora:
            a = [read(k) for k in a_keys]
            b = [read(k) for k in b_keys]
            if count > 1 and n == 1:
                if any(not torch.equal(x, a[0]) for x in a[1:]):
                    raise LongcatError(f"{where}: '{native}': metadata says one shared lora_down "
                                       "but the split targets' lora_A differ")
                return ModuleLora(native, a[0], [torch.cat(b, 0)], alpha.clone())
            if count > 1:
                return ModuleLora(native, torch.cat(a, 0), b, alpha.clone())
            if n == 1:
                return ModuleLora(native, a[0], b, alpha.clone())
            blocks = _diagonal_blocks(b[0], n, where, native)
            return ModuleLora(native, a[0], blocks, alpha.clone())

        out[native] = ModuleEntry(native, n, rank, in_f, out_f, dtype_of(a_info[0].dtype), alpha,
                                  keys, load)
    return out


def _strip_peft(name: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for p in PEFT_STRIP_PREFIXES:
            if name.startswith(p):
                name, stripped = name[len(p):], True
    return name


def resolve_module(module: str) -> tuple[str, int, tuple[str, ...]] | None:
    """(native module, split index, the targets it is split into) for a module path of either
    flavour (native names first: the flavours share some, like ``ffn.w1``), or None."""
    if keymap.native_module_to_fastvideo(module) is not None:
        return module, 0, (module,)
    found = keymap.fastvideo_module_to_native(module)
    if found is None:
        return None
    native, j, _ = found
    return native, j, keymap.native_module_to_fastvideo(native) or (module,)


def _unprefix_config(doc: Mapping) -> dict:
    """diffusers' pipelines store ``transformer.r`` etc.; a model's own save stores ``r``."""
    pre = PEFT_PREFIX
    if any(isinstance(k, str) and k.startswith(pre) for k in doc):
        return {k[len(pre):]: v for k, v in doc.items() if k.startswith(pre)}
    return dict(doc)


def peft_config_of(header: Header, given: Mapping | str | Path | None = None
                   ) -> tuple[dict | None, str]:
    """The adapter config of a PEFT file and where it came from: ``given`` (a dict or a JSON
    file), else the file's ``lora_adapter_metadata``, else ``adapter_config.json`` beside it."""
    where = str(header.path)
    if isinstance(given, Mapping):
        return _unprefix_config(given), "the given adapter config"
    if given is not None:
        path = Path(given)
        return _load_config(path), str(path)
    raw = header.metadata.get(PEFT_METADATA_KEY)
    if raw:
        try:
            doc = json.loads(raw)
        except json.JSONDecodeError as e:
            raise LongcatError(f"{where}: metadata '{PEFT_METADATA_KEY}' is not JSON ({e.msg})"
                               ) from None
        if not isinstance(doc, dict):
            raise LongcatError(f"{where}: metadata '{PEFT_METADATA_KEY}' is not a JSON object")
        return _unprefix_config(doc), f"{where} metadata '{PEFT_METADATA_KEY}'"
    sibling = header.path.parent / PEFT_CONFIG_NAME
    if sibling.is_file():
        return _load_config(sibling), str(sibling)
    return None, ""


def _load_config(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LongcatError(f"{path}: no such adapter config") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LongcatError(f"{path}: not a readable JSON adapter config ({e})") from None
    if not isinstance(doc, dict):
        raise LongcatError(f"{path}: adapter config is not a JSON object")
    return _unprefix_config(doc)


def _config_alpha(config: Mapping, target: str, where: str) -> float | None:
    """PEFT's rule: the first ``alpha_pattern`` key equal to the module name or matching it as
    ``(.*\\.)?(key)$``, else ``lora_alpha``."""
    for key, value in (config.get("alpha_pattern") or {}).items():
        try:
            hit = key == target or re.match(rf"(.*\.)?({key})$", target)
        except re.error as e:
            raise LongcatError(f"{where}: alpha_pattern key '{key}' is not a valid regex ({e})"
                               ) from None
        if hit:
            return _number(value, f"alpha_pattern['{key}']", where)
    if config.get("lora_alpha") is not None:
        return _number(config["lora_alpha"], "lora_alpha", where)
    return None


def _number(v: object, what: str, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise LongcatError(f"{where}: {what} must be a finite number, got {v!r}")
    return float(v)


def _covered(config: Mapping, target: str) -> bool:
    tm = config.get("target_modules")
    if tm is None:
        return True
    if isinstance(tm, str):
        try:
            return re.fullmatch(tm, target) is not None
        except re.error:
            return False
    return any(isinstance(t, str) and (t == target or target.endswith("." + t)) for t in tm)


def _peft_groups(header: Header, config: Mapping | None, source: str
                 ) -> tuple[_Groups, dict[str, tuple[str, ...]], _ScaleOf, list[str]]:
    """Group a PEFT file's tensors by native module; the scale of each target, and the targets
    whose alpha nothing gave (filled as the scales are asked for)."""
    where = str(header.path)
    cfg = dict(config or {})
    src = source or where
    if cfg.get("peft_type") not in (None, "LORA"):
        raise LongcatError(f"{src}: peft_type {cfg['peft_type']!r} is not a LoRA (only LORA "
                           "adapters can be converted)")
    if cfg.get("use_dora"):
        raise LongcatError(f"{src}: DoRA adapters (use_dora) have a magnitude vector that no "
                           "LongCat LoRA format can carry")
    groups: _Groups = {}
    targets_of: dict[str, tuple[str, ...]] = {}
    for key in header.tensors:
        mod_role = _PEFT_WEIGHT.match(_strip_peft(key)) or _PEFT_ALPHA.match(_strip_peft(key))
        if mod_role is None:
            if "lora_magnitude_vector" in key:
                raise LongcatError(f"{where}: '{key}' is a DoRA magnitude vector, which no "
                                   "LongCat LoRA format can carry")
            if re.search(r"\.lora_B(\.default)?\.bias$", key):
                raise LongcatError(f"{where}: '{key}' is a LoRA bias (lora_bias), which no "
                                   "LongCat LoRA format can carry")
            raise LongcatError(f"{where}: unknown key '{key}' in a PEFT-format LoRA file "
                               "(expected <module>.lora_A.weight, .lora_B.weight or .alpha)")
        mod = mod_role["mod"]
        role = mod_role.groupdict().get("role") or "alpha"
        found = resolve_module(mod)
        if found is None:
            raise LongcatError(f"{where}: tensor '{key}' targets '{mod}', which is not a module "
                               "of the LongCat DiT in native or FastVideo names")
        native, j, targets = found
        if targets_of.setdefault(native, targets) != targets:
            raise LongcatError(f"{where}: '{native}' is adapted under both its native and its "
                               "FastVideo names; one file must use one naming")
        roles = groups.setdefault(native, {}).setdefault(j, {})
        if role in roles:
            raise LongcatError(f"{where}: '{key}' and '{roles[role]}' are the same tensor of "
                               f"'{targets[j]}'")
        roles[role] = key
    for native, parts in groups.items():
        for j in parts:
            if not _covered(cfg, targets_of[native][j]):
                raise LongcatError(f"{src}: target_modules does not include "
                                   f"'{targets_of[native][j]}', which the file adapts (is this "
                                   "the config of another adapter? pass the right one)")
    read = _reader(header)
    rslora = bool(cfg.get("use_rslora"))
    defaulted: list[str] = []

    def scale_of(native: str, j: int, roles: dict[str, str], rank: int) -> float:
        target = targets_of[native][j]
        if "alpha" in roles:
            t = read(roles["alpha"])
            if t.numel() != 1 or not t.is_floating_point():
                raise LongcatError(f"{where}: '{roles['alpha']}' must be a float scalar")
            alpha = float(t.double())
        else:
            alpha = _config_alpha(cfg, target, src)
        if alpha is None:
            defaulted.append(target)
            return 1.0  # PEFT/diffusers: no alpha anywhere means alpha = rank
        return alpha / (math.sqrt(rank) if rslora else rank)

    return groups, targets_of, scale_of, defaulted


def _parse_peft(header: Header, shapes: Mapping[str, tuple[int, int]] | None,
                config: Mapping | None, source: str, inspect_blocks: bool = True
                ) -> tuple[dict[str, ModuleEntry], list[str]]:
    groups, targets_of, scale_of, defaulted = _peft_groups(header, config, source)
    entries = _split_entries(header, shapes, groups, targets_of, scale_of, inspect_blocks)
    notes = []
    if defaulted:
        notes.append(f"no lora_alpha for {len(defaulted)} targets (no adapter config, "
                     f"{PEFT_METADATA_KEY} or .alpha tensors): alpha = rank assumed, as diffusers "
                     "does (give the adapter config if that is wrong)")
    return entries, notes


def dtype_of(name: str) -> torch.dtype:
    return DTYPES[name][0]


def _is_block_diagonal(b: torch.Tensor, n: int) -> bool:
    """Whether ``b`` is zero outside its ``n`` diagonal blocks (checked on views, no copies)."""
    rows, cols = b.shape[0] // n, b.shape[1] // n
    for j in range(n):
        band = b[j * rows:(j + 1) * rows]
        if band[:, : j * cols].any() or band[:, (j + 1) * cols:].any():
            return False
    return True


def _diagonal_blocks(b: torch.Tensor, n: int, where: str, module: str) -> list[torch.Tensor]:
    if not _is_block_diagonal(b, n):
        raise LongcatError(f"{where}: lora_B of '{module}' is not block-diagonal with {n} blocks "
                           "as its metadata says")
    rows, cols = b.shape[0] // n, b.shape[1] // n
    return [b[j * rows:(j + 1) * rows, j * cols:(j + 1) * cols].contiguous() for j in range(n)]


# ---------------------------------------------------------------------------------------------
# writing


def _name(module: str, fmt: str, role: str) -> str:
    if fmt == "native":
        return native_key_module(module) + role
    return f"{module}.{role}"


OutSpec = tuple[str, torch.dtype, tuple[int, ...]]  # name, dtype, shape


def _peft_ranks(module: str, n: int, r: int, keys: str) -> list[tuple[str, int]]:
    """(target, rank) of a module's PEFT form: one target holds all ``n*r`` rows (block-diagonal
    B); split targets hold ``r`` each (their own rows of down, or all of a plain up's down)."""
    targets = split_targets(module, keys)
    if len(targets) == 1:
        return [(targets[0], n * r)]
    if n not in (1, len(targets)):
        raise LongcatError(f"LoRA of fused '{module}' has {n} up blocks; split targets need 1 or "
                           f"{len(targets)}")
    return [(t, r) for t in targets]


def _peft_keys(fmt: str, keys: str | None) -> str:
    keys = keys or FLAVOUR_OF_FORMAT.get(fmt, "native")
    if keys not in keymap.FLAVOURS:
        raise LongcatError(f"unknown key flavour '{keys}' (use one of "
                           f"{', '.join(keymap.FLAVOURS)})")
    return keys


def output_specs(entry: ModuleEntry, fmt: str, dtype: torch.dtype | None = None,
                 keys: str | None = None) -> list[OutSpec]:
    """(name, dtype, shape) of the tensors ``entry`` becomes in ``fmt``, in write order; ``dtype``
    casts the weights (alphas keep theirs); ``keys`` names PEFT modules (default native)."""
    wd = dtype or entry.dtype
    n, r, in_f, out_f = entry.n, entry.rank, entry.in_features, entry.out_features
    if fmt == "peft":
        parts = _peft_ranks(entry.module, n, r, _peft_keys(fmt, keys))
        rows = out_f // len(parts)
        return [spec for t, rank in parts for spec in (
            (f"{PEFT_PREFIX}{t}.lora_A.weight", wd, (rank, in_f)),
            (f"{PEFT_PREFIX}{t}.lora_B.weight", wd, (rows, rank)))]
    if fmt == "native":
        specs = [(_name(entry.module, fmt, ".lora_down.weight"), wd, (n * r, in_f))]
        if n == 1:
            specs.append((_name(entry.module, fmt, ".lora_up.weight"), wd, (out_f, r)))
        else:
            specs += [(_name(entry.module, fmt, f".lora_up.blocks.{j}.weight"), wd, (out_f // n, r))
                      for j in range(n)]
        specs.append((_name(entry.module, fmt, ".alpha_scale"), entry.alpha_scale.dtype,
                      tuple(entry.alpha_scale.shape)))
        return specs
    if fmt != "fastvideo":
        raise LongcatError(f"unknown LoRA format '{fmt}' (use one of {', '.join(FORMATS)})")
    targets = split_targets(entry.module, "fastvideo")
    specs = []
    if len(targets) == 1:
        specs += [(f"{targets[0]}.lora_A", wd, (n * r, in_f)),
                  (f"{targets[0]}.lora_alpha", torch.float32, ()),
                  (f"{targets[0]}.lora_B", wd, (out_f, n * r))]
        return specs
    k = len(targets)
    a_rows = r if n == k else n * r  # n == 1: every target shares the whole down
    for t in targets:
        specs += [(f"{t}.lora_A", wd, (a_rows, in_f)), (f"{t}.lora_alpha", torch.float32, ())]
    for t in targets:
        specs.append((f"{t}.lora_B", wd, (out_f // k, a_rows)))
    return specs


def _fastvideo_alpha(alpha_scale: torch.Tensor, rank: int) -> torch.Tensor:
    # exactly FastVideo's arithmetic: python float of alpha_scale (its mean if not a scalar)
    a = alpha_scale.item() if alpha_scale.numel() == 1 else float(alpha_scale.mean())
    return torch.tensor(a * rank, dtype=torch.float32)


def _block_diagonal(ups: list[torch.Tensor]) -> torch.Tensor:
    if len(ups) == 1:
        return ups[0]
    rows, r = ups[0].shape
    b = torch.zeros(rows * len(ups), r * len(ups), dtype=ups[0].dtype)
    for j, up in enumerate(ups):
        b[j * rows:(j + 1) * rows, j * r:(j + 1) * r] = up
    return b


def _peft_tensors(m: ModuleLora, keys: str) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(target, A, B) of a module's PEFT form (see :func:`_peft_ranks`)."""
    parts = _peft_ranks(m.module, m.n, m.rank, keys)
    if len(parts) == 1:
        return [(parts[0][0], m.down, _block_diagonal(m.ups))]
    k, r = len(parts), m.rank
    if m.n == k:
        return [(t, m.down[j * r:(j + 1) * r], m.ups[j]) for j, (t, _) in enumerate(parts)]
    return [(t, m.down, b) for (t, _), b in zip(parts, torch.chunk(m.ups[0], k, 0), strict=True)]


def output_tensors(m: ModuleLora, fmt: str, dtype: torch.dtype | None = None,
                   keys: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of ``m`` in ``fmt`` (same names and order as :func:`output_specs`)."""
    def cast(t: torch.Tensor) -> torch.Tensor:
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    n, r = m.n, m.rank
    if fmt == "peft":
        out = {}
        for t, a, b in _peft_tensors(m, _peft_keys(fmt, keys)):
            out[f"{PEFT_PREFIX}{t}.lora_A.weight"] = cast(a.contiguous())
            out[f"{PEFT_PREFIX}{t}.lora_B.weight"] = cast(b.contiguous())
        return out
    if fmt == "native":
        out = {_name(m.module, fmt, ".lora_down.weight"): cast(m.down)}
        if n == 1:
            out[_name(m.module, fmt, ".lora_up.weight")] = cast(m.ups[0])
        else:
            for j, up in enumerate(m.ups):
                out[_name(m.module, fmt, f".lora_up.blocks.{j}.weight")] = cast(up)
        out[_name(m.module, fmt, ".alpha_scale")] = m.alpha_scale
        return out
    targets = split_targets(m.module, "fastvideo")
    out = {}
    if len(targets) == 1:
        t = targets[0]
        if n == 1:
            b = m.ups[0]
        else:  # FastVideo's block-diagonal B
            rows = m.ups[0].shape[0]
            b = torch.zeros(rows * n, r * n, dtype=m.ups[0].dtype)
            for j, up in enumerate(m.ups):
                b[j * rows:(j + 1) * rows, j * r:(j + 1) * r] = up
        out[f"{t}.lora_A"] = cast(m.down)
        out[f"{t}.lora_alpha"] = _fastvideo_alpha(m.alpha_scale, m.down.shape[0])
        out[f"{t}.lora_B"] = cast(b)
        return out
    k = len(targets)
    if n == k:
        a_parts = [m.down[j * r:(j + 1) * r] for j in range(k)]
        b_parts = m.ups
        rank = r
    elif n == 1:
        a_parts = [m.down] * k
        b_parts = list(torch.chunk(m.ups[0], k, 0))
        rank = m.down.shape[0]
    else:
        raise LongcatError(f"LoRA of fused '{m.module}' has {n} up blocks; FastVideo's split "
                           f"targets need 1 or {k}")
    for t, a in zip(targets, a_parts, strict=True):
        out[f"{t}.lora_A"] = cast(a.contiguous())
        out[f"{t}.lora_alpha"] = _fastvideo_alpha(m.alpha_scale, rank)
    for t, b in zip(targets, b_parts, strict=True):
        out[f"{t}.lora_B"] = cast(b.contiguous())
    return out


def _fastvideo_rank(entry: ModuleEntry) -> int:
    targets = split_targets(entry.module, "fastvideo")
    if len(targets) > 1 and entry.n == len(targets):
        return entry.rank
    return entry.n * entry.rank


def exact_record(entry: ModuleEntry, fmt: str = "fastvideo") -> dict | None:
    """What the FastVideo (or PEFT) form of ``entry`` needs in its metadata to come back bit for
    bit. PEFT's alpha is a JSON double ``alpha_scale * rank``, exact for any float32 scalar."""
    rec: dict = {}
    if entry.n != default_blocks(entry.module):
        rec["n"] = entry.n
    a = entry.alpha_scale
    if fmt == "peft":
        back = a.to(torch.float32).reshape(())
    else:
        back = torch.tensor(float(_fastvideo_alpha(a, _fastvideo_rank(entry)))
                            / _fastvideo_rank(entry), dtype=torch.float32)
    if a.dtype != torch.float32 or a.shape != () or not torch.equal(a, back):
        rec["alpha_scale"] = {"dtype": DTYPE_NAMES[a.dtype], "shape": list(a.shape),
                              "values": [float(v).hex() for v in a.double().reshape(-1).tolist()]}
    return rec or None


def _alpha_value(alpha_scale: torch.Tensor) -> float:
    return alpha_scale.item() if alpha_scale.numel() == 1 else float(alpha_scale.double().mean())


def peft_config(entries: Iterable[ModuleEntry], keys: str = "native") -> dict:
    """The PEFT ``LoraConfig`` of ``entries`` written with ``keys`` module names: the most common
    rank and alpha as ``r``/``lora_alpha``, the others in ``rank_pattern``/``alpha_pattern``
    (full module names, as diffusers writes them), every target in ``target_modules``."""
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for e in entries:
        a = _alpha_value(e.alpha_scale)
        for t, rank in _peft_ranks(e.module, e.n, e.rank, keys):
            ranks[t], alphas[t] = rank, a * rank
    if not ranks:
        raise LongcatError("a LoRA with no targets has no PEFT config")
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {"peft_type": "LORA", "r": r, "lora_alpha": alpha,
            "target_modules": sorted(ranks),
            "rank_pattern": {t: v for t, v in ranks.items() if v != r},
            "alpha_pattern": {t: v for t, v in alphas.items() if v != alpha},
            "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False,
            "fan_in_fan_out": False, "init_lora_weights": True, "lora_bias": False,
            "task_type": None, "base_model_name_or_path": None}


def file_metadata(entries: Iterable[ModuleEntry], fmt: str,
                  base: Mapping[str, str] | None = None, keys: str | None = None
                  ) -> dict[str, str]:
    """safetensors metadata of an adapter file in ``fmt``: ``base`` plus the format and, for the
    FastVideo and PEFT forms, the records that make it reversible exactly (PEFT: also its
    config as diffusers stores it, under ``lora_adapter_metadata`` with ``transformer.`` keys)."""
    entries = list(entries)
    meta = dict(base or {})
    meta[FORMAT_METADATA_KEY] = fmt
    if fmt in ("fastvideo", "peft"):
        recs = {e.module: r for e in entries if (r := exact_record(e, fmt))}
        if recs:
            meta[EXACT_METADATA_KEY] = json.dumps(recs, sort_keys=True, separators=(",", ":"))
    if fmt == "peft":
        cfg = peft_config(entries, _peft_keys(fmt, keys))
        meta[PEFT_METADATA_KEY] = json.dumps({PEFT_PREFIX + k: v for k, v in cfg.items()},
                                             indent=2, sort_keys=True)
    return meta


# ---------------------------------------------------------------------------------------------
# the effective update, straight from the stored tensors (for tests and the runner)


def effective_deltas(path: str | Path, scale: float = 1.0, *,
                     adapter_config: Mapping | str | Path | None = None
                     ) -> dict[str, torch.Tensor]:
    """Native module -> ``scale * alpha/rank * B @ A`` (float64, [out, in]) computed directly
    from the file's own tensors, whatever its format: the number every conversion must keep."""
    path = Path(path)
    header = read_header(path)
    fmt = sniff_format(header.tensors, str(path))
    read = _reader(header)
    if fmt == "native":
        return {m: lora.delta(scale) for m, lora in
                {m: e.load() for m, e in _parse_native(header, None).items()}.items()}
    if fmt == "peft":
        config, source = peft_config_of(header, adapter_config)
        groups, _, scale_of, _ = _peft_groups(header, config, source)
        deltas = {}
        for native, parts in groups.items():
            rows = []
            for j in sorted(parts):
                a, b = read(parts[j]["lora_A"]).double(), read(parts[j]["lora_B"]).double()
                rows.append(scale * scale_of(native, j, parts[j], a.shape[0]) * (b @ a))
            deltas[native] = torch.cat(rows, 0)
        return deltas
    per_target: dict[str, torch.Tensor] = {}
    for key in header.tensors:
        if key.endswith(".lora_A"):
            t = key[: -len(".lora_A")]
            a = read(key).double()
            b = read(f"{t}.lora_B").double()
            alpha_key = f"{t}.lora_alpha"
            alpha = float(read(alpha_key).double()) if alpha_key in header.tensors else a.shape[0]
            per_target[t] = scale * alpha / a.shape[0] * (b @ a)
    out: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for t, d in per_target.items():
        native, j, _ = keymap.fastvideo_module_to_native(t) or (t, 0, 1)
        out.setdefault(native, []).append((j, d))
    return {m: torch.cat([d for _, d in sorted(parts, key=lambda p: p[0])], 0)
            for m, parts in out.items()}


def convert_bytes(entries: Iterable[ModuleEntry], fmt: str,
                  dtype: torch.dtype | None = None, keys: str | None = None) -> int:
    """Tensor bytes of ``entries`` written in ``fmt``."""
    return sum(math.prod(s) * d.itemsize
               for e in entries for _, d, s in output_specs(e, fmt, dtype, keys))


# ---------------------------------------------------------------------------------------------
# streaming a whole file


def tensor_specs(lora: LoraFile, fmt: str, dtype: torch.dtype | None = None,
                 keys: str | None = None) -> list[TensorSpec]:
    """Every output tensor of ``lora`` in ``fmt`` as a lazy :class:`TensorSpec`: a module's
    tensors are read and converted when its first output is written, so memory holds one
    module at a time."""
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def produce(module: str, name: str) -> torch.Tensor:
        if module not in cache:
            cache.clear()
            cache[module] = output_tensors(lora.modules[module].load(), fmt, dtype, keys)
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
