"""Video size to latent grid, token grid and BSA chunks, and what attention over them costs.

One copy of this arithmetic serves ``bsa check`` (which reports it), the kernels (whose chunk
layout extends :class:`ChunkGrid`) and the runner's refinement stage (which pads its latent frames
with :func:`refine_latent_frames`). No torch here: ``bsa check`` runs without it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Shape3 = tuple[int, int, int]

VAE_STRIDE: Shape3 = (4, 8, 8)  # Wan 2.1 VAE: 4x in time (the first frame alone), 8x8 in space
REFINE_LATENT_MULTIPLE = 4  # the refinement stage pads latent frames to whole 4-frame BSA chunks
MAX_FRAMES = 4097  # video frames in one segment: the model is trained on 93
MAX_SIDE = 16_384  # pixels a side: 720p refinement is 1280; more is arithmetic on nothing real
AXES = ("T", "H", "W")
# The largest BSA chunk in tokens: the kernels are tested up to 4x4x8 (a 128-row tile of
# queries); the release uses 4x4x4.
MAX_CHUNK_TOKENS = 128


def chunk_error(chunk: list[int] | tuple[int, ...], name: str) -> str | None:
    """Why ``chunk`` (t, h, w positive integers) cannot be a BSA chunk; None if it can."""
    tokens = math.prod(chunk)
    if tokens > MAX_CHUNK_TOKENS:
        return (f"{name} {','.join(map(str, chunk))}: {tokens} tokens a chunk; at most "
                f"{MAX_CHUNK_TOKENS} (the release uses 4,4,4)")
    return None


def refine_latent_frames(latents: int) -> int:
    """Latent frames the refinement stage encodes for ``latents`` (padded up to a multiple of
    4 by repeating the edge frames, as the original's ``bsa_latent_granularity``)."""
    return math.ceil(latents / REFINE_LATENT_MULTIPLE) * REFINE_LATENT_MULTIPLE


def frames_problem(frames: int) -> str | None:
    """Why a generated video cannot have ``frames`` frames (None: it can); ``run`` and
    ``bsa check`` both apply it."""
    if frames < 1 or frames % VAE_STRIDE[0] != 1:
        return (f"must be {VAE_STRIDE[0]}k+1 (e.g. 93, 45, 9): the VAE packs {VAE_STRIDE[0]} "
                "frames per latent after the first")
    return None


def latent_frames(frames: int, refine: bool = False) -> tuple[int, int, str | None]:
    """(video frames used, latent frames, note). Generation rounds to 4k+1 frames (the first
    frame is a latent of its own); ``refine``: ``frames`` is the refinement stage's output, of
    ceil(F/4) latent frames padded by :func:`refine_latent_frames`."""
    step = VAE_STRIDE[0]
    if refine:
        raw = math.ceil(frames / step)
        t = refine_latent_frames(raw)
        note = (f"refine: {frames} frames give {raw} latent frames, padded to {t} (a multiple of "
                f"{REFINE_LATENT_MULTIPLE}) by repeating the last frame" if t != raw else None)
        return frames, t, note
    if frames % step == 1:
        return frames, (frames - 1) // step + 1, None
    used = frames // step * step + 1
    return used, (used - 1) // step + 1, (f"{frames} frames is not 4k+1: the pipeline rounds it "
                                          f"to {used}")


def latent_grid(latent_t: int, height: int, width: int) -> Shape3:
    """The VAE latent of a ``height`` x ``width`` video with ``latent_t`` latent frames."""
    return latent_t, height // VAE_STRIDE[1], width // VAE_STRIDE[2]


def token_grid(latent: Shape3, patch: Shape3) -> Shape3:
    """The DiT's token grid: the latent after the patch embedding."""
    return latent[0] // patch[0], latent[1] // patch[1], latent[2] // patch[2]


def pixel_multiple(patch: Shape3) -> tuple[int, int]:
    """(height, width) a video size must be a multiple of: the VAE stride times the patch."""
    return VAE_STRIDE[1] * patch[1], VAE_STRIDE[2] * patch[2]


def optimal_split(n: int) -> tuple[int, int]:
    """The factor pair of ``n`` closest to square, smaller first (the original's
    ``get_optimal_split`` for its H x W context-parallel tiles: 1 -> 1x1, 2 -> 1x2, 4 -> 2x2,
    8 -> 2x4)."""
    a = max(i for i in range(1, math.isqrt(n) + 1) if n % i == 0)
    return a, n // a


@dataclass(frozen=True)
class ChunkGrid:
    """How a ``(T, H, W)`` token grid splits into ``(t, h, w)`` chunks. Where an axis does not
    divide, the grid rounds up and the chunks on its far edge hold fewer tokens."""

    latent: Shape3
    chunk: Shape3

    @property
    def grid(self) -> Shape3:
        """Chunks along each axis."""
        return tuple(-(-n // c) for n, c in zip(self.latent, self.chunk, strict=True))  # type: ignore[return-value]

    @property
    def num_chunks(self) -> int:
        return math.prod(self.grid)

    @property
    def chunk_size(self) -> int:
        return math.prod(self.chunk)

    @property
    def num_tokens(self) -> int:
        return math.prod(self.latent)

    @property
    def edge(self) -> Shape3:
        """Tokens in the edge chunk of each axis; 0 where the axis divides."""
        return tuple(n % c for n, c in zip(self.latent, self.chunk, strict=True))  # type: ignore[return-value]

    @property
    def divisible(self) -> bool:
        return not any(self.edge)


def kept_per_query(sparsity: float | None, key_chunks: int) -> int | None:
    """Key chunks each query chunk keeps by top-k, ``int((1 - sparsity) * M_k)``; None without a
    sparsity (cdf-only selection varies with content)."""
    return None if sparsity is None else int((1 - sparsity) * key_chunks)


def attention_flops(q_tokens: int, k_tokens: int, heads: int, head_dim: int) -> int:
    """Dense attention of one block: ``Q K^T`` and ``P V``, 2 FLOPs per multiply-add."""
    return 4 * q_tokens * k_tokens * head_dim * heads


def gating_flops(q_chunks: int, k_chunks: int, heads: int, head_dim: int) -> int:
    """BSA's chunk selection of one block: pooled queries times pooled keys."""
    return 2 * q_chunks * k_chunks * head_dim * heads
