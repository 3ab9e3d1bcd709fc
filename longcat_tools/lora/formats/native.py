"""The native format: the hub's files, on native module names.

Keys: ``lora___lorahyphen___<module with . as ___lorahyphen___>`` + ``.lora_down.weight``,
``.lora_up.weight`` or ``.lora_up.blocks.{j}.weight``, and ``.alpha_scale``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from longcat_tools.errors import LongcatError
from longcat_tools.io.safetensors import Header
from longcat_tools.lora.formats.base import (
    Cast,
    LoraFormat,
    ModuleEntry,
    ModuleLora,
    OutSpec,
    Parsed,
    Shapes,
    check_target,
    reader,
)

if TYPE_CHECKING:
    import torch

NATIVE_PREFIX = "lora___lorahyphen___"
NATIVE_HYPHEN = "___lorahyphen___"
_ROLE_OF_SUFFIX = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha_scale": "alpha"}
_UP_BLOCK = re.compile(r"^(.*)\.lora_up\.blocks\.(\d+)\.weight$")


def native_key_module(module: str) -> str:
    """``blocks.0.attn.qkv`` -> ``lora___lorahyphen___blocks___lorahyphen___0...``."""
    return NATIVE_PREFIX + module.replace(".", NATIVE_HYPHEN)


class Native(LoraFormat):
    name = "native"
    label = "native"
    example = f"{NATIVE_PREFIX}…lora_down.weight"
    flavour = "native"

    def owns(self, key: str) -> bool:
        return key.startswith(NATIVE_PREFIX)

    def key_part(self, key: str) -> tuple[str, str] | None:
        if not key.startswith(NATIVE_PREFIX):
            return None
        m = _UP_BLOCK.match(key)
        if m:
            stem, role = m.group(1), f"up.{int(m.group(2))}"
        else:
            suffix = next((s for s in _ROLE_OF_SUFFIX if key.endswith(s)), None)
            if suffix is None:
                return None
            stem, role = key[: -len(suffix)], _ROLE_OF_SUFFIX[suffix]
        return stem[len(NATIVE_PREFIX):].replace(NATIVE_HYPHEN, "."), role

    def parse(self, header: Header, shapes: Shapes | None, *,
              adapter_config: Mapping | str | Path | None = None,
              inspect_blocks: bool = True) -> Parsed:
        import torch

        where = str(header.path)
        groups: dict[str, dict[str, str]] = {}
        for key in header.tensors:
            part = self.key_part(key)
            if part is None:
                if not key.startswith(NATIVE_PREFIX):
                    raise LongcatError(f"{where}: unknown key '{key}' in a native-format LoRA file")
                raise LongcatError(f"{where}: unknown key '{key}' (expected .lora_down.weight, "
                                   ".lora_up.weight, .lora_up.blocks.N.weight or .alpha_scale)")
            module, role = part
            groups.setdefault(module, {})[role] = key
        read = reader(header)
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
                raise LongcatError(f"{where}: module '{module}': lora_down has {down.shape[0]} "
                                   f"rows, not a multiple of its {n} up blocks")
            rank = down.shape[0] // n
            if any(u.shape != ups[0].shape or u.shape[1] != rank for u in ups):
                raise LongcatError(f"{where}: module '{module}': up blocks "
                                   f"{[list(u.shape) for u in ups]} do not match rank {rank}")
            if any(u.dtype != down.dtype for u in ups):
                raise LongcatError(f"{where}: module '{module}': lora_down and lora_up dtypes "
                                   "differ")
            out_f, in_f = ups[0].shape[0] * n, down.shape[1]
            check_target(where, roles["down"], module, out_f, in_f, shapes)
            if "alpha" in roles:
                alpha = read(roles["alpha"])
                if alpha.numel() != 1 or not alpha.is_floating_point():  # as the others
                    raise LongcatError(f"{where}: '{roles['alpha']}' must be a float scalar")
            else:
                alpha = torch.tensor(1.0)  # FastVideo's default when a file has none
            keys = (roles["down"], *up_keys) + ((roles["alpha"],) if "alpha" in roles else ())

            def load(module=module, dk=roles["down"], uk=tuple(up_keys), alpha=alpha
                     ) -> ModuleLora:
                return ModuleLora(module, read(dk), [read(k) for k in uk], alpha.clone())

            out[module] = ModuleEntry(module, n, rank, in_f, out_f, down.torch_dtype, alpha,
                                      keys, load)
        return Parsed(out)

    def effective_deltas(self, header: Header, scale: float,
                         adapter_config: Mapping | str | Path | None = None
                         ) -> dict[str, torch.Tensor]:
        return {m: e.load().delta(scale) for m, e in self.parse(header, None).modules.items()}

    def output_specs(self, entry: ModuleEntry, dtype: torch.dtype, keys: str | None = None
                     ) -> list[OutSpec]:
        n, r, in_f, out_f = entry.n, entry.rank, entry.in_features, entry.out_features
        base = native_key_module(entry.module)
        specs = [(base + ".lora_down.weight", dtype, (n * r, in_f))]
        if n == 1:
            specs.append((base + ".lora_up.weight", dtype, (out_f, r)))
        else:
            specs += [(base + f".lora_up.blocks.{j}.weight", dtype, (out_f // n, r))
                      for j in range(n)]
        specs.append((base + ".alpha_scale", entry.alpha_scale.dtype,
                      tuple(entry.alpha_scale.shape)))
        return specs

    def output_tensors(self, m: ModuleLora, cast: Cast, keys: str | None = None
                       ) -> dict[str, torch.Tensor]:
        base = native_key_module(m.module)
        out = {base + ".lora_down.weight": cast(m.down)}
        if m.n == 1:
            out[base + ".lora_up.weight"] = cast(m.ups[0])
        else:
            for j, up in enumerate(m.ups):
                out[base + f".lora_up.blocks.{j}.weight"] = cast(up)
        out[base + ".alpha_scale"] = m.alpha_scale
        return out
