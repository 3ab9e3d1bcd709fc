"""LoRA adapter files -> per-module ``LoraDelta`` on the native DiT, applied at run time.

Parsing is the shared ``longcat_tools.lora.formats`` (native and FastVideo formats, exact): every
file becomes the native structure per module (``down`` [n*r, in], ``n`` up blocks, the stored
``alpha_scale``), so the run-time arithmetic is the original's (``lora_utils``) exactly. Rank is
read from the tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch

from longcat_tools.errors import LongcatError
from longcat_tools.io.safetensors import read_header, read_tensor
from longcat_tools.lora import formats as lora_formats
from longcat_tools.runner.dit import LongCatDiT, LoraDelta


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (small adapter files only)."""
    path = Path(path)
    header = read_header(path)
    with open(path, "rb") as f:
        return {name: read_tensor(f, info) for name, info in header.tensors.items()}


def read_lora(path: str | Path, model: LongCatDiT, multiplier: float = 1.0
              ) -> dict[str, LoraDelta]:
    """Native module path -> delta for every module the adapter at ``path`` targets."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise LongcatError(f"{path}: LoRA files are read as safetensors only (never unpickled)")
    if not path.is_file():
        raise LongcatError(f"{path}: no such LoRA file")
    parsed = lora_formats.read_lora(path, lora_formats.linear_shapes(model.dims))
    out = {}
    for module, entry in parsed.modules.items():
        m = entry.load()
        out[module] = LoraDelta(m.down, list(m.ups), m.alpha_scale.reshape(()).float(),
                                multiplier)
    if not out:
        raise LongcatError(f"{path}: the LoRA file targets no module")
    return out


def lora_path(ckpt_root: str | Path, kind: str) -> Path:
    """The hub adapter ``kind`` ('distilled' or 'refinement') in any layout: native
    ``lora/cfg_step_lora.safetensors``, converted ``lora/distilled/*.safetensors``."""
    from longcat_tools.checkpoint.layouts import NATIVE_LORAS

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
