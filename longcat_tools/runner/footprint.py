"""What a run needs in memory, estimated before anything loads, to refuse sizes that cannot fit.

The estimate counts only what the run cannot avoid, so it errs low and refuses only runs that
could never finish here:

* one DiT forward's activations on the run's device: latent tokens x (8 x hidden + 3 x the
  SwiGLU width) values (residual stream, norms, q/k/v/out projections and the FFN's three
  products), x2 under classifier-free guidance (the positive and negative prompt in one batch),
  divided over context-parallel ranks; attention itself runs blockwise (SDPA/BSA) and is not
  counted;
* the output video in CPU memory: every frame as float32 [F, H, W, 3] plus its uint8 copy.

It is compared with the device's total memory (the GPU's, or the machine's RAM for the CPU).
No torch at import: ``settings`` imports this module.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from longcat_tools.errors import LongcatError
from longcat_tools.model.chunks import latent_frames, latent_grid, token_grid
from longcat_tools.model.keymap import DiTDims

BYTES_PER_VALUE = {"fp32": 4, "bf16": 2, "fp16": 2}
FRAME_BYTES_PER_PIXEL = 3 * (4 + 1)  # RGB as float32, plus the uint8 copy that is encoded


@dataclass(frozen=True)
class Stage:
    """One sampling stage's size: what its DiT forward sees and how many frames it outputs."""

    what: str  # the options that set it, for the message
    height: int
    width: int
    latent_t: int
    frames_out: int
    cfg: bool  # the negative prompt doubles the batch


def tokens(dims: DiTDims, stage: Stage) -> int:
    """Latent tokens of one forward: the token grid of the stage's latent video."""
    return math.prod(token_grid(latent_grid(stage.latent_t, stage.height, stage.width),
                                dims.patch_size))


def forward_bytes(dims: DiTDims, stage: Stage, dtype: str, ranks: int = 1) -> int:
    """Activation bytes of one DiT forward of ``stage`` on one of ``ranks`` processes."""
    per_token = 8 * dims.hidden_size + 3 * dims.ffn_hidden
    batch = 2 if stage.cfg else 1
    return batch * tokens(dims, stage) * per_token * BYTES_PER_VALUE[dtype] // ranks


def video_bytes(stage: Stage) -> int:
    return stage.frames_out * stage.height * stage.width * FRAME_BYTES_PER_PIXEL


def cpu_memory() -> int:
    """The machine's physical memory in bytes (0 where the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def device_memory(device: Any) -> int:
    """Total memory of a torch device: the GPU's, or the machine's RAM for the CPU."""
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        return int(torch.cuda.get_device_properties(device).total_memory)
    return cpu_memory()


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} PiB"


def _max_frames(dims: DiTDims, stage: Stage, dtype: str, ranks: int, budget: int) -> int:
    """The most 4k+1 frames at the stage's size whose forward fits ``budget`` (0: none)."""
    one = forward_bytes(dims, Stage(stage.what, stage.height, stage.width, 1, 1, stage.cfg),
                        dtype, ranks)
    latents = budget // one if one else 0
    return 4 * (latents - 1) + 1 if latents >= 1 else 0


def check(dims: DiTDims, stages: list[Stage], dtype: str, device: Any, ranks: int = 1) -> None:
    """Refuse, in one line saying what would fit, a stage whose DiT forward exceeds the device's
    memory or whose output video exceeds the machine's RAM."""
    dev_total, ram = device_memory(device), cpu_memory()
    dev_name = "GPU" if getattr(device, "type", "cpu") == "cuda" else "CPU"
    for st in stages:
        need = forward_bytes(dims, st, dtype, ranks)
        if dev_total and need > dev_total:
            fit = _max_frames(dims, st, dtype, ranks, dev_total)
            hint = (f"at {st.height}x{st.width} at most {fit} frames fit" if fit else
                    f"not even one frame fits at {st.height}x{st.width}: lower the size")
            raise LongcatError(f"{st.what}: one DiT forward needs about {human(need)} of "
                               f"activations, more than the {human(dev_total)} of {dev_name} "
                               f"memory here ({hint})")
        out = video_bytes(st)
        if ram and out > ram:
            raise LongcatError(f"{st.what}: the output video ({st.frames_out} frames at "
                               f"{st.height}x{st.width}) needs about {human(out)} of memory, more "
                               f"than the {human(ram)} here")


def stage(what: str, height: int, width: int, frames: int, cfg: bool, frames_out: int | None = None,
          refine: bool = False) -> Stage:
    """A Stage from a video size (``refine``: the refinement stage's latent padding)."""
    return Stage(what, height, width, latent_frames(frames, refine=refine)[1],
                 frames if frames_out is None else frames_out, cfg)
