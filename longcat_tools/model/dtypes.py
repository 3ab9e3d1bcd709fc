"""The dtype names users type (``--dtype``), once for every command.

Safetensors' own names (``F32``, ``BF16``...) are the file format's and live in
``longcat_tools.io.safetensors``; these are the names on the command line and in the Python API.
"""

from __future__ import annotations

import torch

from longcat_tools.errors import LongcatError, UsageError

NAMES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16,
                                 "fp16": torch.float16}
ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
KEEP = "keep"  # convert / export: leave each tensor's dtype as it is


def parse(name: str | torch.dtype | None, *, option: str = "--dtype",
          choices: tuple[str, ...] = tuple(NAMES), keep: bool = False,
          error: type[LongcatError] = UsageError) -> torch.dtype | None:
    """``name`` as a torch dtype (``None`` for ``keep`` where ``keep`` is allowed); one line
    naming the choices otherwise."""
    if isinstance(name, torch.dtype) and name in NAMES.values():
        return name
    if keep and name == KEEP:
        return None
    key = ALIASES.get(name, name) if isinstance(name, str) else name
    if key not in choices:
        allowed = ", ".join(((KEEP,) if keep else ()) + choices)
        raise error(f"{option} {name}: unknown dtype (use one of {allowed})")
    return NAMES[key]


def choices(keep: bool = False) -> tuple[str, ...]:
    return ((KEEP,) if keep else ()) + tuple(NAMES)
