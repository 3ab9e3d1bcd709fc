"""The DiT's 3D rotary position embedding, as tables: per axis (``rope_3d_rows``, a
``[T + H + W, D]`` table whose rows each hold one axis's channels) and per token
(``rope_3d_table``, what the DiT reads: a token's row is the sum of its three axis rows)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class RopeRows(NamedTuple):
    """cos/sin ``[T + H + W, D]`` by axis, and the head dim's [t | h | w] channel counts."""

    cos: torch.Tensor
    sin: torch.Tensor
    channels: tuple[int, int, int]


def channels(head_dim: int) -> tuple[int, int, int]:
    """The head dim's [t | h | w] parts: ``D - 4*(D//6)``, ``2*(D//6)``, ``2*(D//6)``."""
    d_hw = 2 * (head_dim // 6)
    return head_dim - 2 * d_hw, d_hw, d_hw


def rope_3d_rows(grid: tuple[int, int, int], head_dim: int, device: torch.device,
                 base: float = 10000.0, t_positions: tuple[float, ...] | None = None,
                 ) -> RopeRows:
    """cos/sin ``[T + H + W, head_dim]``: the 3D RoPE by axis (see ``rope_3d_table``).

    Row t holds the time part's channels, row T + h the height part's, row T + H + w the width
    part's, zeros elsewhere, so a token's row of the table is the sum of its three rows (exact:
    two of the three terms are zero)."""
    parts = channels(head_dim)
    angles = torch.zeros(sum(grid), head_dim)
    own = torch.zeros(sum(grid), head_dim, dtype=torch.bool)
    r0 = c0 = 0
    for axis, (n, d) in enumerate(zip(grid, parts, strict=True)):
        freqs = 1.0 / (base ** (torch.arange(0, d, 2)[: d // 2].float() / d))
        pos = torch.arange(n, dtype=torch.float32) if axis or t_positions is None \
            else torch.tensor(t_positions, dtype=torch.float32)
        angles[r0:r0 + n, c0:c0 + d] = (pos[:, None] * freqs[None]).repeat_interleave(2, dim=-1)
        own[r0:r0 + n, c0:c0 + d] = True
        r0, c0 = r0 + n, c0 + d
    angles, own = angles.to(device), own.to(device)
    return RopeRows(torch.where(own, angles.cos(), 0.0), torch.where(own, angles.sin(), 0.0),
                    parts)


def rope_3d_table(grid: tuple[int, int, int], head_dim: int, device: torch.device,
                  base: float = 10000.0, t_positions: tuple[float, ...] | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[T*H*W, head_dim]`` of the 3D RoPE over a (T, H, W) token grid.

    The head dim splits into [t | h | w] parts (``channels``); each angle is repeated for an
    interleaved channel pair; positions start at 0, or the time positions are ``t_positions``
    (the avatar's reference frame sits elsewhere in time).
    """
    T, H, W = grid

    def table(rows: torch.Tensor) -> torch.Tensor:
        return (rows[:T, None, None] + rows[T:T + H][None, :, None]
                + rows[T + H:][None, None, :]).reshape(T * H * W, -1)

    rows = rope_3d_rows(grid, head_dim, device, base, t_positions)
    return table(rows.cos), table(rows.sin)
