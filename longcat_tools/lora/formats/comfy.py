"""The ComfyUI format: kohya-style keys on the comfy (WanVideoWrapper) module names.

Keys ``lora_unet_<comfy module, . as _>`` (what export writes) or ``diffusion_model.<comfy
module>`` (ComfyUI maps both to the same weight; LightX2V-style Wan LoRAs use the second) +
``.lora_down.weight`` (A), ``.lora_up.weight`` (B) and ``.alpha``; ComfyUI scales ``up @ down`` by
``alpha / rank`` (rank = rows of ``lora_down``; no ``.alpha`` means scale 1). A fused native module
is one LoRA per split target, like FastVideo's. Full-weight payloads (``.diff``, ``.diff_b``,
``.set_weight``) and other adapter kinds are refused: they are no low-rank update.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from longcat_tools.errors import LongcatError
from longcat_tools.io.safetensors import Header
from longcat_tools.lora.formats.base import (
    NOT_OURS,
    Cast,
    ModuleEntry,
    ModuleLora,
    OutSpec,
    reader,
)
from longcat_tools.lora.formats.fastvideo import FastVideo
from longcat_tools.lora.formats.split import Groups, ScaleOf
from longcat_tools.model import comfy_keys

if TYPE_CHECKING:
    import torch

# suffix -> role in the split groups (lora_A = down, lora_B = up)
_ROLE_OF_SUFFIX = {".lora_down.weight": "lora_A", ".lora_up.weight": "lora_B", ".alpha": "alpha"}
_UNSUPPORTED = {".diff": "a full-weight delta", ".diff_b": "a full bias delta",
                ".set_weight": "a replacement weight", ".dora_scale": "DoRA",
                ".lora_mid.weight": "a LoCon mid weight"}
_OWNED_SUFFIXES = (".lora_down.weight", ".lora_up.weight")
_STEM_PREFIXES = (comfy_keys.KOHYA_PREFIX, comfy_keys.LORA_MODULE_PREFIX)
# FastVideo's names of the same suffixes: the split layout is shared, the names are not.
_FASTVIDEO_SUFFIX = {".lora_A": ".lora_down.weight", ".lora_B": ".lora_up.weight",
                     ".lora_alpha": ".alpha"}


def _comfy_name(fastvideo_name: str) -> str:
    """A FastVideo-format output name renamed to this format (same split, other names)."""
    from longcat_tools.model import keymap

    target, suffix = fastvideo_name.rsplit(".", 1)
    native, j, _ = keymap.fastvideo_module_to_native(target) or (None, 0, 1)
    if native is None:
        raise LongcatError(f"LoRA target '{target}' is not a module of the LongCat DiT")
    comfy = (comfy_keys.native_module_to_comfy(native) or (native,))[j]
    return comfy_keys.kohya_module(comfy) + _FASTVIDEO_SUFFIX["." + suffix]


class Comfy(FastVideo):
    """FastVideo's split layout under ComfyUI's names: only the key spelling and the alpha
    rule differ (``_groups``), so reading and writing are FastVideo's."""

    name = "comfy"
    label = "ComfyUI"
    example = "lora_unet_….lora_down.weight"
    flavour = comfy_keys.FLAVOUR

    def owns(self, key: str) -> bool:
        # ``diffusion_model.…lora_A.weight`` is PEFT's (it strips that prefix), so only the
        # kohya suffixes mark the generic spelling as this format.
        return key.startswith(comfy_keys.KOHYA_PREFIX) or (
            key.startswith(comfy_keys.LORA_MODULE_PREFIX) and key.endswith(_OWNED_SUFFIXES))

    def key_part(self, key: str) -> tuple[str, str] | None:
        if not self.owns(key):
            return None
        suffix = next((s for s in _ROLE_OF_SUFFIX if key.endswith(s)), None)
        if suffix is None:
            return None
        module = comfy_keys.module_of_lora_stem(key[: -len(suffix)])
        role = {"lora_A": "down", "lora_B": "up", "alpha": "alpha"}[_ROLE_OF_SUFFIX[suffix]]
        return (module, role) if module else None

    def _groups(self, header: Header) -> tuple[Groups, dict[str, tuple[str, ...]], ScaleOf]:
        where = str(header.path)
        groups: Groups = {}
        targets_of: dict[str, tuple[str, ...]] = {}
        for key in header.tensors:
            bad = next((s for s in _UNSUPPORTED if key.endswith(s)), None)
            if bad is not None:
                raise LongcatError(f"{where}: '{key}' is {_UNSUPPORTED[bad]} ({bad}), which is no "
                                   "low-rank LoRA; only .lora_down.weight/.lora_up.weight/.alpha "
                                   "are supported")
            suffix = next((s for s in _ROLE_OF_SUFFIX if key.endswith(s)), None)
            stem = key[: -len(suffix)] if suffix else key
            if suffix is None or not stem.startswith(_STEM_PREFIXES):
                raise LongcatError(f"{where}: unknown key '{key}' in a ComfyUI-format LoRA file "
                                   "(expected lora_unet_<module> or diffusion_model.<module> + "
                                   ".lora_down.weight, .lora_up.weight or .alpha)")
            module = comfy_keys.module_of_lora_stem(stem)
            found = comfy_keys.comfy_module_to_native(module) if module else None
            if found is None:
                raise LongcatError(f"{where}: tensor '{key}' targets no module of the LongCat DiT "
                                   f"{NOT_OURS}")
            native, j, _ = found
            targets_of[native] = comfy_keys.native_module_to_comfy(native) or (module,)
            roles = groups.setdefault(native, {}).setdefault(j, {})
            role = _ROLE_OF_SUFFIX[suffix]
            if role in roles:
                raise LongcatError(f"{where}: '{key}' and '{roles[role]}' name the same tensor of "
                                   f"'{module}'; keep one spelling")
            roles[role] = key
        read = reader(header)

        def scale_of(native: str, j: int, roles: dict[str, str], rank: int) -> float:
            if "alpha" not in roles:
                return 1.0  # ComfyUI: no alpha means scale 1
            import torch

            t = read(roles["alpha"])  # ComfyUI takes ``.item()``: LightX2V files store I64
            if t.numel() != 1 or t.is_complex() or t.dtype == torch.bool:
                raise LongcatError(f"{where}: '{roles['alpha']}' must be one number, got "
                                   f"{t.dtype} {list(t.shape)}")
            return float(t.double()) / rank

        return groups, targets_of, scale_of

    def output_specs(self, entry: ModuleEntry, dtype: torch.dtype, keys: str | None = None
                     ) -> list[OutSpec]:
        return [(_comfy_name(n), d, s) for n, d, s in super().output_specs(entry, dtype)]

    def output_tensors(self, m: ModuleLora, cast: Cast, keys: str | None = None
                       ) -> dict[str, torch.Tensor]:
        return {_comfy_name(n): t for n, t in super().output_tensors(m, cast).items()}

