"""The FastVideo format: its converter's output, on FastVideo module names.

Keys ``<module>.lora_A``, ``.lora_B``, ``.lora_alpha``: a fused qkv/kv module becomes one LoRA
per split target (rows of ``down`` and one up block each), a single target with several up
blocks (the adaLN modulations) gets a block-diagonal ``lora_B``, and ``lora_alpha = alpha_scale *
rank`` is a 0-d float32.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from longcat_tools.errors import LongcatError
from longcat_tools.io.safetensors import Header
from longcat_tools.lora.formats.base import (
    NOT_OURS,
    Cast,
    LoraFormat,
    ModuleEntry,
    ModuleLora,
    OutSpec,
    Parsed,
    Shapes,
    block_diagonal,
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

_ROLE_OF_SUFFIX = {".lora_A": "down", ".lora_B": "up", ".lora_alpha": "alpha"}


def _alpha(alpha_scale: torch.Tensor, rank: int) -> torch.Tensor:
    import torch

    # exactly FastVideo's arithmetic: the python float of alpha_scale (one value: the readers
    # refuse more)
    return torch.tensor(alpha_scale.item() * rank, dtype=torch.float32)


def _rank(entry: ModuleEntry) -> int:
    """The rank of each FastVideo target of ``entry``."""
    targets = split_targets(entry.module, "fastvideo")
    if len(targets) > 1 and entry.n == len(targets):
        return entry.rank
    return entry.n * entry.rank


class FastVideo(LoraFormat):
    name = "fastvideo"
    label = "FastVideo"
    example = "….lora_A"
    flavour = "fastvideo"

    def owns(self, key: str) -> bool:
        return key.endswith((".lora_A", ".lora_B"))

    def key_part(self, key: str) -> tuple[str, str] | None:
        suffix = next((s for s in _ROLE_OF_SUFFIX if key.endswith(s)), None)
        return (key[: -len(suffix)], _ROLE_OF_SUFFIX[suffix]) if suffix else None

    def _groups(self, header: Header) -> tuple[Groups, dict[str, tuple[str, ...]], ScaleOf]:
        """Targets grouped back into native modules, and each target's scale."""
        where = str(header.path)
        groups: Groups = {}
        targets_of: dict[str, tuple[str, ...]] = {}
        for key in header.tensors:
            part = self.key_part(key)
            if part is None:
                raise LongcatError(f"{where}: unknown key '{key}' in a FastVideo-format LoRA file "
                                   "(expected <module>.lora_A, .lora_B or .lora_alpha)")
            target = part[0]
            found = keymap.fastvideo_module_to_native(target)
            if found is None:
                raise LongcatError(f"{where}: tensor '{key}' targets '{target}', which is not a "
                                   f"module of the LongCat DiT {NOT_OURS}")
            native, j, _ = found
            targets_of[native] = keymap.native_module_to_fastvideo(native) or (target,)
            groups.setdefault(native, {}).setdefault(j, {})[key[len(target) + 1:]] = key
        read = reader(header)

        def scale_of(native: str, j: int, roles: dict[str, str], rank: int) -> float:
            if "lora_alpha" not in roles:
                return 1.0  # FastVideo: no alpha means scale 1
            t = read(roles["lora_alpha"])
            if t.numel() != 1 or not t.is_floating_point():
                raise LongcatError(f"{where}: '{roles['lora_alpha']}' must be a float scalar")
            return float(t.double()) / rank

        return groups, targets_of, scale_of

    def parse(self, header: Header, shapes: Shapes | None, *,
              adapter_config: Mapping | str | Path | None = None,
              inspect_blocks: bool = True) -> Parsed:
        """Split targets of a fused module are its blocks (down rows concatenated), a single
        target's block count comes from the file's metadata, else the convention (adaLN: 6 or
        2) where lora_B is block-diagonal, else 1."""
        groups, targets_of, scale_of = self._groups(header)
        return Parsed(split_entries(header, shapes, groups, targets_of, scale_of,
                                    inspect_blocks))

    def effective_deltas(self, header: Header, scale: float,
                         adapter_config: Mapping | str | Path | None = None
                         ) -> dict[str, torch.Tensor]:
        groups, _, scale_of = self._groups(header)
        return split_deltas(groups, reader(header), scale, scale_of)

    def output_specs(self, entry: ModuleEntry, dtype: torch.dtype, keys: str | None = None
                     ) -> list[OutSpec]:
        import torch

        n, r, in_f, out_f = entry.n, entry.rank, entry.in_features, entry.out_features
        targets = split_targets(entry.module, "fastvideo")
        if len(targets) == 1:
            return [(f"{targets[0]}.lora_A", dtype, (n * r, in_f)),
                    (f"{targets[0]}.lora_alpha", torch.float32, ()),
                    (f"{targets[0]}.lora_B", dtype, (out_f, n * r))]
        k = len(targets)
        a_rows = r if n == k else n * r  # n == 1: every target shares the whole down
        specs: list[OutSpec] = []
        for t in targets:
            specs += [(f"{t}.lora_A", dtype, (a_rows, in_f)),
                      (f"{t}.lora_alpha", torch.float32, ())]
        for t in targets:
            specs.append((f"{t}.lora_B", dtype, (out_f // k, a_rows)))
        return specs

    def output_tensors(self, m: ModuleLora, cast: Cast, keys: str | None = None
                       ) -> dict[str, torch.Tensor]:
        import torch

        targets = split_targets(m.module, "fastvideo")
        n, r = m.n, m.rank
        out = {}
        if len(targets) == 1:
            t = targets[0]
            out[f"{t}.lora_A"] = cast(m.down)
            out[f"{t}.lora_alpha"] = _alpha(m.alpha_scale, m.down.shape[0])
            out[f"{t}.lora_B"] = cast(block_diagonal(m.ups))  # FastVideo's block-diagonal B
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
            out[f"{t}.lora_alpha"] = _alpha(m.alpha_scale, rank)
        for t, b in zip(targets, b_parts, strict=True):
            out[f"{t}.lora_B"] = cast(b.contiguous())
        return out

    def metadata(self, entries: list[ModuleEntry], keys: str | None = None) -> dict[str, str]:
        import torch

        def back(e: ModuleEntry) -> torch.Tensor:
            rank = _rank(e)
            return torch.tensor(float(_alpha(e.alpha_scale, rank)) / rank, dtype=torch.float32)

        return exact_records(entries, back)
