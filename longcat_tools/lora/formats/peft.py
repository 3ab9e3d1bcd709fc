"""The PEFT / diffusers format: ``<prefix><module>.lora_A.weight``, ``.lora_B.weight``, the alphas
in an adapter config (``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``,
``target_modules``, ``use_rslora``).

Read: the prefixes ``base_model.model.`` (PEFT), ``transformer.`` (diffusers),
``diffusion_model.`` / ``model.`` (ComfyUI) and ``dit.`` are stripped, module names may be native
(SimpleTuner, which trains the native class) or FastVideo (split ``to_q/to_k/to_v``), kohya-style
``<module>.alpha`` tensors override the config, and the config comes from the caller, else the
file's ``lora_adapter_metadata`` (diffusers), else an ``adapter_config.json`` beside the file.
Written: diffusers' layout, ``transformer.`` + native module names (what SimpleTuner's LongCat
LoRAs look like and the native class loads with PEFT), a fused qkv/kv/adaLN target as one LoRA
with a block-diagonal ``lora_B`` (its rank is ``n*r``, listed in ``rank_pattern``), and the config
in the file's metadata; ``keys="fastvideo"`` writes FastVideo module names instead (split
targets, rank ``r``).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from longcat_tools.errors import LongcatError
from longcat_tools.io import jsonio
from longcat_tools.io.safetensors import Header
from longcat_tools.lora.formats.base import (
    Cast,
    LoraFormat,
    ModuleEntry,
    ModuleLora,
    OutSpec,
    Parsed,
    Shapes,
    alpha_value,
    block_diagonal,
    is_dit_module,
    reader,
    split_targets,
)
from longcat_tools.lora.formats.split import (
    Groups,
    ScaleOf,
    exact_records,
    split_deltas,
    split_entries,
)
from longcat_tools.model import keymap

if TYPE_CHECKING:
    import torch

PEFT_PREFIX = "transformer."  # what we write
PEFT_STRIP_PREFIXES = ("base_model.model.", "transformer.", "diffusion_model.", "model.", "dit.")
PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata key
PEFT_CONFIG_NAME = "adapter_config.json"
_WEIGHT = re.compile(r"^(?P<mod>.+)\.(?P<role>lora_A|lora_B)(?:\.default)?\.weight$")
_ALPHA = re.compile(r"^(?P<mod>.+)\.alpha$")
_ROLE = {"lora_A": "down", "lora_B": "up"}


def _strip(name: str) -> str:
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
    if is_dit_module(module):
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
        doc = jsonio.loads(raw, f"{where}: metadata '{PEFT_METADATA_KEY}'")
        if not isinstance(doc, dict):
            raise LongcatError(f"{where}: metadata '{PEFT_METADATA_KEY}' is not a JSON object")
        return _unprefix_config(doc), f"{where} metadata '{PEFT_METADATA_KEY}'"
    sibling = header.path.parent / PEFT_CONFIG_NAME
    if sibling.is_file():
        return _load_config(sibling), str(sibling)
    return None, ""


def _load_config(path: Path) -> dict:
    doc = jsonio.read(path, what="adapter config")
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


def _key_names(keys: str | None) -> str:
    keys = keys or "native"
    if keys not in keymap.FLAVOURS:
        raise LongcatError(f"unknown key flavour '{keys}' (use one of "
                           f"{', '.join(keymap.FLAVOURS)})")
    return keys


def _ranks(module: str, n: int, r: int, keys: str) -> list[tuple[str, int]]:
    """(target, rank) of a module's PEFT form: one target holds all ``n*r`` rows (block-diagonal
    B); split targets hold ``r`` each (their own rows of down, or all of a plain up's down)."""
    targets = split_targets(module, keys)
    if len(targets) == 1:
        return [(targets[0], n * r)]
    if n not in (1, len(targets)):
        raise LongcatError(f"LoRA of fused '{module}' has {n} up blocks; split targets need 1 or "
                           f"{len(targets)}")
    return [(t, r) for t in targets]


def _tensors(m: ModuleLora, keys: str) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(target, A, B) of a module's PEFT form (see :func:`_ranks`)."""
    import torch

    parts = _ranks(m.module, m.n, m.rank, keys)
    if len(parts) == 1:
        return [(parts[0][0], m.down, block_diagonal(m.ups))]
    k, r = len(parts), m.rank
    if m.n == k:
        return [(t, m.down[j * r:(j + 1) * r], m.ups[j]) for j, (t, _) in enumerate(parts)]
    return [(t, m.down, b) for (t, _), b in zip(parts, torch.chunk(m.ups[0], k, 0), strict=True)]


def _conv_form(in_features: int, kernel: tuple[int, ...]
               ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(A's dims after the rank, B's dims after out and rank): PEFT's Conv3d LoRA for a
    ``kernel`` (A ``[r, channels, *kernel]``, B a 1x1x1 conv), else 2-D."""
    if not kernel:
        return (in_features,), ()
    return (in_features // math.prod(kernel), *kernel), (1,) * len(kernel)


def peft_config(entries: Iterable[ModuleEntry], keys: str = "native") -> dict:
    """The PEFT ``LoraConfig`` of ``entries`` written with ``keys`` module names: the most common
    rank and alpha as ``r``/``lora_alpha``, the others in ``rank_pattern``/``alpha_pattern``
    (full module names, as diffusers writes them), every target in ``target_modules``."""
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for e in entries:
        a = alpha_value(e.alpha_scale)
        for t, rank in _ranks(e.module, e.n, e.rank, keys):
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


class Peft(LoraFormat):
    name = "peft"
    label = "PEFT"
    example = "….lora_A.weight"
    flavour = "native"
    takes_keys = True
    config_file = PEFT_CONFIG_NAME
    holds_conv = True

    def owns(self, key: str) -> bool:
        return _WEIGHT.match(key) is not None

    def key_part(self, key: str) -> tuple[str, str] | None:
        name = _strip(key)
        m = _WEIGHT.match(name)
        if m:
            return m["mod"], _ROLE[m["role"]]
        m = _ALPHA.match(name)
        return (m["mod"], "alpha") if m else None

    def _groups(self, header: Header, config: Mapping | None, source: str
                ) -> tuple[Groups, dict[str, tuple[str, ...]], ScaleOf, list[str]]:
        """Group the tensors by native module; the scale of each target, and the targets whose
        alpha nothing gave (filled as the scales are asked for)."""
        import torch

        where = str(header.path)
        cfg = dict(config or {})
        src = source or where
        if cfg.get("peft_type") not in (None, "LORA"):
            raise LongcatError(f"{src}: peft_type {cfg['peft_type']!r} is not a LoRA (only LORA "
                               "adapters can be converted)")
        if cfg.get("use_dora"):
            raise LongcatError(f"{src}: DoRA adapters (use_dora) have a magnitude vector that no "
                               "LongCat LoRA format can carry")
        groups: Groups = {}
        targets_of: dict[str, tuple[str, ...]] = {}
        for key in header.tensors:
            part = self.key_part(key)
            if part is None:
                if "lora_magnitude_vector" in key:
                    raise LongcatError(f"{where}: '{key}' is a DoRA magnitude vector, which no "
                                       "LongCat LoRA format can carry")
                if re.search(r"\.lora_B(\.default)?\.bias$", key):
                    raise LongcatError(f"{where}: '{key}' is a LoRA bias (lora_bias), which no "
                                       "LongCat LoRA format can carry")
                raise LongcatError(f"{where}: unknown key '{key}' in a PEFT-format LoRA file "
                                   "(expected <module>.lora_A.weight, .lora_B.weight or .alpha)")
            mod, role = part
            role = {"down": "lora_A", "up": "lora_B"}.get(role, role)
            found = resolve_module(mod)
            if found is None:
                raise LongcatError(f"{where}: tensor '{key}' targets '{mod}', which is not a "
                                   "module of the LongCat DiT in native or FastVideo names")
            native, j, targets = found
            if targets_of.setdefault(native, targets) != targets:
                raise LongcatError(f"{where}: '{native}' is adapted under both its native and "
                                   "its FastVideo names; one file must use one naming")
            roles = groups.setdefault(native, {}).setdefault(j, {})
            if role in roles:
                raise LongcatError(f"{where}: '{key}' and '{roles[role]}' are the same tensor of "
                                   f"'{targets[j]}'")
            roles[role] = key
        for native, parts in groups.items():
            for j in parts:
                if not _covered(cfg, targets_of[native][j]):
                    raise LongcatError(f"{src}: target_modules does not include "
                                       f"'{targets_of[native][j]}', which the file adapts (is "
                                       "this the config of another adapter? pass the right one)")
        read = reader(header)
        rslora = bool(cfg.get("use_rslora"))
        defaulted: list[str] = []

        def scale_of(native: str, j: int, roles: dict[str, str], rank: int) -> float:
            target = targets_of[native][j]
            if "alpha" in roles:
                t = read(roles["alpha"])  # kohya files may store it as an integer, as comfy's
                if t.numel() != 1 or t.is_complex() or t.dtype == torch.bool:
                    raise LongcatError(f"{where}: '{roles['alpha']}' must be one number, got "
                                       f"{t.dtype} {list(t.shape)}")
                alpha = float(t.double())
            else:
                alpha = _config_alpha(cfg, target, src)
            if alpha is None:
                defaulted.append(target)
                return 1.0  # PEFT/diffusers: no alpha anywhere means alpha = rank
            return alpha / (math.sqrt(rank) if rslora else rank)

        return groups, targets_of, scale_of, defaulted

    def parse(self, header: Header, shapes: Shapes | None, *,
              adapter_config: Mapping | str | Path | None = None,
              inspect_blocks: bool = True) -> Parsed:
        config, source = peft_config_of(header, adapter_config)
        groups, targets_of, scale_of, defaulted = self._groups(header, config, source)
        entries = split_entries(header, shapes, groups, targets_of, scale_of, inspect_blocks)
        notes = []
        if defaulted:
            notes.append(f"no lora_alpha for {len(defaulted)} targets (no adapter config, "
                         f"{PEFT_METADATA_KEY} or .alpha tensors): alpha = rank assumed, as "
                         "diffusers does (give the adapter config if that is wrong)")
        return Parsed(entries, config, notes)

    def effective_deltas(self, header: Header, scale: float,
                         adapter_config: Mapping | str | Path | None = None
                         ) -> dict[str, torch.Tensor]:
        config, source = peft_config_of(header, adapter_config)
        groups, _, scale_of, _ = self._groups(header, config, source)
        return split_deltas(groups, reader(header), scale, scale_of)

    def output_specs(self, entry: ModuleEntry, dtype: torch.dtype, keys: str | None = None
                     ) -> list[OutSpec]:
        parts = _ranks(entry.module, entry.n, entry.rank, _key_names(keys))
        rows = entry.out_features // len(parts)
        a_in, b_tail = _conv_form(entry.in_features, entry.kernel)
        return [spec for t, rank in parts for spec in (
            (f"{PEFT_PREFIX}{t}.lora_A.weight", dtype, (rank, *a_in)),
            (f"{PEFT_PREFIX}{t}.lora_B.weight", dtype, (rows, rank, *b_tail)))]

    def output_tensors(self, m: ModuleLora, cast: Cast, keys: str | None = None
                       ) -> dict[str, torch.Tensor]:
        out = {}
        a_in, b_tail = _conv_form(m.down.shape[1], m.kernel)
        for t, a, b in _tensors(m, _key_names(keys)):
            out[f"{PEFT_PREFIX}{t}.lora_A.weight"] = cast(a.reshape(a.shape[0], *a_in).contiguous())
            out[f"{PEFT_PREFIX}{t}.lora_B.weight"] = cast(b.reshape(*b.shape, *b_tail).contiguous())
        return out

    def metadata(self, entries: list[ModuleEntry], keys: str | None = None) -> dict[str, str]:
        """The exact records (PEFT's alpha is a JSON double ``alpha_scale * rank``, exact for
        any float32 scalar) and the config as diffusers stores it, with ``transformer.`` keys."""
        import torch

        meta = exact_records(entries, lambda e: e.alpha_scale.to(torch.float32).reshape(()))
        cfg = peft_config(entries, _key_names(keys))
        meta[PEFT_METADATA_KEY] = jsonio.dumps({PEFT_PREFIX + k: v for k, v in cfg.items()},
                                               newline=False, sort_keys=True)
        return meta

    def adapter_config(self, entries: Iterable[ModuleEntry], keys: str | None) -> dict | None:
        return peft_config(entries, _key_names(keys))

    def key_names(self, keys: str | None) -> str | None:
        return _key_names(keys)
