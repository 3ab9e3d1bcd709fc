"""LoRA adapter files -> per-module ``LoraDelta`` on the native DiT, applied at run time.

Formats (SPEC §4): native (``lora___lorahyphen___<path>.lora_down.weight`` /
``.lora_up.weight`` | ``.lora_up.blocks.{j}.weight`` / ``.alpha_scale``), FastVideo
(``<path>.lora_A`` / ``.lora_B`` / ``.lora_alpha`` on split projections) and PEFT/diffusers
(``<path>.lora_A.weight`` / ``.lora_B.weight``, alpha from ``adapter_config.json``). All become
the native structure: split targets (``to_q/to_k/to_v``) are stacked back into the fused
module's down-projection with one up block each, and a block-diagonal up matrix is split into its
blocks, so the arithmetic is the original's (``lora_utils``) exactly. Rank is read from the
tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from longcat_tools import keymap
from longcat_tools.errors import LongcatError
from longcat_tools.safetensors_io import read_header, read_tensor
from runner.dit import Linear, LongCatDiT, LoraDelta

NATIVE_PREFIX = "lora___lorahyphen___"
NATIVE_HYPHEN = "___lorahyphen___"
STRIP_PREFIXES = ("diffusion_model.", "transformer.", "base_model.model.")


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise LongcatError(f"{path}: LoRA files are read as safetensors only (never unpickled)")
    if not path.is_file():
        raise LongcatError(f"{path}: no such LoRA file")
    header = read_header(path)
    with open(path, "rb") as f:
        return {name: read_tensor(f, info) for name, info in header.tensors.items()}


def read_lora(path: str | Path, model: LongCatDiT, multiplier: float = 1.0
              ) -> dict[str, LoraDelta]:
    """Native module path -> delta for every module the adapter at ``path`` targets."""
    tensors = read_tensors(path)
    if any(k.startswith(NATIVE_PREFIX) for k in tensors):
        deltas = _from_native(tensors, path, multiplier)
    else:
        deltas = _from_split(tensors, path, multiplier)
    modules = dict(model.named_modules())
    for module, d in deltas.items():
        m = modules.get(module)
        if not isinstance(m, Linear):
            raise LongcatError(f"{path}: LoRA targets '{module}', which is not a linear layer of "
                               "this DiT")
        rank = d.down.shape[0] // len(d.ups)
        shapes_ok = (d.down.shape[1] == m.in_features and d.down.shape[0] % len(d.ups) == 0
                     and sum(u.shape[0] for u in d.ups) == m.out_features
                     and all(u.shape[1] == rank for u in d.ups))
        if not shapes_ok:
            raise LongcatError(f"{path}: LoRA for '{module}' has down {list(d.down.shape)} and ups "
                               f"{[list(u.shape) for u in d.ups]}, which do not fit the layer "
                               f"[{m.out_features}, {m.in_features}]")
    if not deltas:
        raise LongcatError(f"{path}: no LoRA tensors found (expected native lora_down/lora_up or "
                           "lora_A/lora_B keys)")
    return deltas


def _from_native(tensors: dict[str, torch.Tensor], path, multiplier: float
                 ) -> dict[str, LoraDelta]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if not key.startswith(NATIVE_PREFIX):
            raise LongcatError(f"{path}: unexpected key '{key}' in a native-format LoRA")
        name, _, rest = key.partition(".")
        groups.setdefault(name, {})[rest] = t
    out = {}
    for name, parts in groups.items():
        module = name[len(NATIVE_PREFIX):].replace(NATIVE_HYPHEN, ".")
        down = parts.get("lora_down.weight")
        alpha = parts.get("alpha_scale")
        if down is None or alpha is None:
            raise LongcatError(f"{path}: LoRA for '{module}' lacks "
                               f"{'lora_down.weight' if down is None else 'alpha_scale'}")
        if "lora_up.weight" in parts:
            ups = [parts["lora_up.weight"]]
        else:
            n = sum(1 for k in parts if k.startswith("lora_up.blocks."))
            try:
                ups = [parts[f"lora_up.blocks.{j}.weight"] for j in range(n)]
            except KeyError:
                raise LongcatError(f"{path}: LoRA for '{module}' has non-consecutive up "
                                   "blocks") from None
            if not ups:
                raise LongcatError(f"{path}: LoRA for '{module}' has no lora_up weights")
        out[module] = LoraDelta(down, ups, alpha.reshape(()).float(), multiplier)
    return out


def _peft_alpha(path: Path) -> float | None:
    cfg = path.parent / "adapter_config.json"
    if cfg.is_file():
        doc = json.loads(cfg.read_text())
        if isinstance(doc, dict) and "lora_alpha" in doc:
            return float(doc["lora_alpha"])
    return None


def _from_split(tensors: dict[str, torch.Tensor], path, multiplier: float
                ) -> dict[str, LoraDelta]:
    """FastVideo / PEFT names: per (possibly split) target A, B, alpha."""
    targets: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        k = key
        for p in STRIP_PREFIXES:
            k = k.removeprefix(p)
        k = k.removesuffix(".weight")
        module, _, kind = k.rpartition(".")
        if kind not in ("lora_A", "lora_B", "lora_alpha", "alpha"):
            raise LongcatError(f"{path}: unexpected LoRA key '{key}'")
        targets.setdefault(module, {})[kind] = t
    file_alpha = _peft_alpha(Path(path))
    native: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor, float]]] = {}
    for module, parts in targets.items():
        if "lora_A" not in parts or "lora_B" not in parts:
            raise LongcatError(f"{path}: LoRA for '{module}' needs both lora_A and lora_B")
        a, b = parts["lora_A"], parts["lora_B"]
        rank = a.shape[0]
        alpha_t = parts.get("lora_alpha", parts.get("alpha"))
        alpha = float(alpha_t.float().mean()) if alpha_t is not None else (file_alpha or rank)
        found = keymap.fastvideo_module_to_native(module)
        if found is None:
            if keymap.native_module_to_fastvideo(module) is None:
                raise LongcatError(f"{path}: LoRA target '{module}' is not a DiT module")
            found = (module, 0, 1)
        nat, j, n = found
        native.setdefault(nat, {})[j] = (a, b, alpha / rank)
        if len(keymap.native_module_to_fastvideo(nat) or ()) != n:
            raise LongcatError(f"{path}: inconsistent LoRA target '{module}'")
    out = {}
    for nat, parts in native.items():
        n = len(keymap.native_module_to_fastvideo(nat) or (nat,))
        if sorted(parts) != list(range(n)):
            raise LongcatError(f"{path}: LoRA for '{nat}' covers only some of its split "
                               f"projections ({len(parts)} of {n})")
        scales = [parts[j][2] for j in range(n)]
        if n > 1:
            down = torch.cat([parts[j][0] for j in range(n)])
            ups = [parts[j][1] * (scales[j] / scales[0]) if scales[j] != scales[0]
                   else parts[j][1] for j in range(n)]
        else:
            down, b, _ = parts[0]
            ups = _split_block_diagonal(b, down.shape[0])
        out[nat] = LoraDelta(down, ups, torch.tensor(scales[0]), multiplier)
    return out


def _split_block_diagonal(b: torch.Tensor, rank: int, max_blocks: int = 16) -> list[torch.Tensor]:
    """Split an up matrix into its diagonal blocks when it is exactly block-diagonal (FastVideo
    stores the native ``lora_up.blocks`` that way); otherwise keep it whole."""
    out_dim = b.shape[0]
    for n in range(max_blocks, 1, -1):
        if out_dim % n or rank % n:
            continue
        ro, rr = out_dim // n, rank // n
        mask = torch.ones_like(b, dtype=torch.bool)
        for j in range(n):
            mask[j * ro:(j + 1) * ro, j * rr:(j + 1) * rr] = False
        if not b[mask].any():
            return [b[j * ro:(j + 1) * ro, j * rr:(j + 1) * rr].contiguous() for j in range(n)]
    return [b]


def lora_path(ckpt_root: str | Path, kind: str) -> Path:
    """The hub adapter ``kind`` ('distilled' or 'refinement') in any layout: native
    ``lora/cfg_step_lora.safetensors``, converted ``lora/distilled/*.safetensors``."""
    from longcat_tools.layouts import NATIVE_LORAS

    root = Path(ckpt_root) / "lora"
    for fname, name in NATIVE_LORAS.items():
        if name == kind and (root / fname).is_file():
            return root / fname
    sub = sorted((root / kind).glob("*.safetensors")) if (root / kind).is_dir() else []
    if len(sub) == 1:
        return sub[0]
    if len(sub) > 1:
        raise LongcatError(f"{root / kind}: several LoRA files; pass the one to use")
    raise LongcatError(f"{root}: no '{kind}' LoRA (expected lora/"
                       f"{'cfg_step_lora' if kind == 'distilled' else 'refinement_lora'}"
                       f".safetensors or lora/{kind}/<file>.safetensors)")
