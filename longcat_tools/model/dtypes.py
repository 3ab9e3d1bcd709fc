"""The dtype names users type (``--dtype``), once for every command.

Safetensors' own names (``F32``, ``BF16``...) are the file format's and live in
``longcat_tools.io.safetensors``; these are the names on the command line and in the Python API.
Checking a name needs no torch, so commands validate it before anything heavy is imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from longcat_tools.errors import LongcatError, UsageError

if TYPE_CHECKING:
    import torch

NAMES = ("fp32", "bf16", "fp16")
FP8 = "fp8"  # convert only: e4m3 block GEMM weights with per-channel scales (``model.fp8``)
TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", FP8: "float8_e4m3fn"}
ALIASES = {v: k for k, v in TORCH_NAMES.items()}  # float32 -> fp32 ...
KEEP = "keep"  # convert / export: leave each tensor's dtype as it is


def check(name: object, *, option: str = "--dtype", choices: tuple[str, ...] = NAMES,
          keep: bool = False, error: type[LongcatError] = UsageError) -> str | None:
    """The canonical name of ``name`` (``None`` for ``keep`` where allowed); one line naming the
    choices otherwise. A torch dtype is accepted as its name."""
    if keep and name == KEEP:
        return None
    key = str(name).removeprefix("torch.")
    key = ALIASES.get(key, key)
    if key not in choices:
        allowed = ", ".join(((KEEP,) if keep else ()) + choices)
        raise error(f"{option} {name}: unknown dtype (use one of {allowed})")
    return key


def parse(name: object, *, option: str = "--dtype", choices: tuple[str, ...] = NAMES,
          keep: bool = False, error: type[LongcatError] = UsageError) -> torch.dtype | None:
    """``name`` as a torch dtype (``None`` for ``keep`` where allowed)."""
    key = check(name, option=option, choices=choices, keep=keep, error=error)
    if key is None:
        return None
    import torch

    return getattr(torch, TORCH_NAMES[key])
