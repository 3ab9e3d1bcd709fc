"""Sampling schedules of the original pipeline, and the guidance rule.

All schedules go through diffusers' ``FlowMatchEulerDiscreteScheduler`` (shift from
``scheduler/scheduler_config.json``, 12.0 in the release): ``set_timesteps(N, sigmas=...)`` shifts
``s -> shift*s / (1 + (shift-1)*s)``, sets ``timesteps = 1000*sigmas`` and appends a terminal 0.
Video continuation's ``enhance_hf`` and refinement's ``t_thresh`` then replace the timesteps (and
set ``sigmas = timesteps/1000 + [0]``, unshifted), exactly as the original does.
"""

from __future__ import annotations

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000
DISTILL_GRID = 50  # the distilled model was trained on a 50-point grid of 1000 timesteps
ENHANCE_HF_START = 500
ENHANCE_HF_STEPS = 10


def base_sigmas(steps: int) -> torch.Tensor:
    """``linspace(1, 0.001, N)`` before the shift."""
    return torch.linspace(1, 0.001, steps).to(torch.float32)


def distill_sigmas(steps: int) -> torch.Tensor:
    """Every k-th point of the 50-point distillation grid, from the top (``cfg_step`` LoRA)."""
    grid = (torch.arange(1, DISTILL_GRID + 1, dtype=torch.float32)
            * (NUM_TRAIN_TIMESTEPS // DISTILL_GRID)).round().long()
    idx = np.floor(np.linspace(0, DISTILL_GRID, num=steps, endpoint=False)).astype(np.int64)
    return (torch.flip(grid, [0])[idx].float() / NUM_TRAIN_TIMESTEPS).to(torch.float32)


def set_schedule(scheduler, steps: int, distill: bool, device) -> torch.Tensor:
    """Shifted timesteps for ``steps`` steps (distilled grid or the base one)."""
    sigmas = distill_sigmas(steps) if distill else base_sigmas(steps)
    scheduler.set_timesteps(steps, sigmas=sigmas.numpy(), device=device)
    return scheduler.timesteps


def _replace(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    scheduler.timesteps = timesteps
    scheduler.sigmas = torch.cat([timesteps / NUM_TRAIN_TIMESTEPS,
                                  torch.zeros(1, device=timesteps.device)])
    return timesteps


def apply_enhance_hf(scheduler, device) -> torch.Tensor:
    """Keep the timesteps above 500, then 10 uniform steps 500, 450, ..., 50 (unshifted)."""
    tail = np.linspace(ENHANCE_HF_START, 0, ENHANCE_HF_STEPS, dtype=np.float32, endpoint=False)
    kept = [t[None] for t in scheduler.timesteps if t > ENHANCE_HF_START]
    tail_t = [torch.tensor(t, device=device)[None] for t in tail]
    return _replace(scheduler, torch.cat(kept + tail_t))


def apply_t_thresh(scheduler, t_thresh: float) -> torch.Tensor:
    """Refinement: start at ``t_thresh*1000`` and continue with the base steps below it."""
    ts = scheduler.timesteps
    start = torch.tensor(t_thresh * NUM_TRAIN_TIMESTEPS, dtype=ts.dtype, device=ts.device)
    return _replace(scheduler, torch.cat([start[None], ts[ts < start]]))


def cfg_zero_star(cond: torch.Tensor, uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    """CFG-Zero*: scale the unconditional prediction by ``s* = <cond, uncond> / |uncond|^2``
    (per sample) before the usual guidance step."""
    B = cond.shape[0]
    pos, neg = cond.reshape(B, -1), uncond.reshape(B, -1)
    st = (pos * neg).sum(dim=1, keepdim=True) / ((neg ** 2).sum(dim=1, keepdim=True) + 1e-8)
    st = st.view(B, *([1] * (cond.dim() - 1)))
    return uncond * st + guidance * (cond - uncond * st)
