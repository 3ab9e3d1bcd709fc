"""Context parallel inference (Ulysses): one DiT forward split over the processes of a job.

The token grid is split along time: each rank holds a contiguous run of latent frames (shares
differ by at most one frame). Everything per token (projections, norms, adaLN, cross-attention,
FFN) runs on the local frames. Self-attention needs every token, so one all-to-all after the qkv
projection trades "local tokens, all heads" for "all tokens, heads / N" and a second one trades
back after attention. Between the two, attention (dense or BSA, RoPE over the full grid, KV
cache, condition frames) runs exactly as on one GPU for a subset of heads: BSA chunks are the
single-GPU chunks, never cut by the split, so the result equals the single-process one up to
rounding.

Why time and not the original's 2D H x W tiles: rank shares concatenate back into raster order
(no permutation copy), per-frame adaLN stays a view, and no extra size rule (64 px x the split)
is imposed on the video. The cost: a forward needs at least N latent frames.

Everything outside the DiT runs the same on every rank; rank 0 alone encodes text and decodes
video, and ``broadcast`` keeps text states, latents and frames identical everywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from longcat_tools.errors import LongcatError, UsageError


@dataclass(frozen=True)
class FrameSplit:
    """Where this rank's tokens sit in the clip: ``count`` latent frames from ``start``, and
    every rank's token count (rank order) for the all-to-alls."""

    start: int
    count: int
    tokens: tuple[int, ...]


class ContextParallel:
    """The process group of one context-parallel job and its collectives."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self._root = dist.get_global_rank(group, 0) if group is not None else 0

    def split(self, grid: tuple[int, int, int]) -> FrameSplit:
        """This rank's frames of a (T, H, W) token grid."""
        T, H, W = grid
        if T < self.size:
            raise LongcatError(f"context parallel over {self.size} processes needs at least "
                               f"{self.size} latent frames per DiT forward; this one has {T} "
                               "(use fewer GPUs, more frames, or --no-kv-cache for video "
                               "continuation)")
        base, extra = divmod(T, self.size)
        frames = [base + (r < extra) for r in range(self.size)]
        start = sum(frames[: self.rank])
        return FrameSplit(start, frames[self.rank], tuple(f * H * W for f in frames))

    def to_heads(self, qkv: torch.Tensor, split: FrameSplit) -> torch.Tensor:
        """``[B, n_local, P, H, D]`` (local tokens, all heads) -> ``[n_all, B, P, H/N, D]``
        (every token in raster order, this rank's heads)."""
        B, n, P, H, D = qkv.shape
        N, h = self.size, H // self.size
        send = qkv.reshape(B, n, P, N, h, D).permute(3, 1, 0, 2, 4, 5).contiguous()
        recv = send.new_empty((sum(split.tokens), B, P, h, D))
        dist.all_to_all_single(recv, send, output_split_sizes=list(split.tokens),
                               group=self.group)
        return recv

    def to_tokens(self, out: torch.Tensor, split: FrameSplit) -> torch.Tensor:
        """``[B, H/N, n_all, D]`` (attention output of this rank's heads) ->
        ``[B, n_local, H * D]`` (this rank's tokens, all heads)."""
        B, h, _, D = out.shape
        n = split.tokens[self.rank]
        send = out.permute(2, 0, 1, 3).contiguous()
        recv = send.new_empty((self.size, n, B, h, D))
        dist.all_to_all_single(recv, send, input_split_sizes=list(split.tokens),
                               group=self.group)
        return recv.permute(2, 1, 0, 3, 4).reshape(B, n, self.size * h * D)

    def gather_tokens(self, x: torch.Tensor, split: FrameSplit) -> torch.Tensor:
        """``[B, n_local, ...]`` on every rank -> ``[B, n_all, ...]`` on every rank."""
        most = max(split.tokens)
        padded = x.new_zeros((x.shape[0], most, *x.shape[2:]))
        padded[:, : x.shape[1]] = x
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p[:, :n] for p, n in zip(parts, split.tokens, strict=True)], dim=1)

    def broadcast(self, x: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """Rank 0's tensor on every rank, on ``device`` (shape and dtype travel first; the
        other ranks' ``x`` is ignored and may be None)."""
        dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32,
                  torch.uint8, torch.bool, torch.float64]
        meta = torch.zeros(10, dtype=torch.int64, device=device)
        if self.rank == 0:
            meta[0], meta[1] = dtypes.index(x.dtype), x.dim()
            meta[2:2 + x.dim()] = torch.tensor(x.shape)
        dist.broadcast(meta, self._root, group=self.group)
        if self.rank == 0:
            out = x.to(device).contiguous()
        else:
            shape = meta[2:2 + int(meta[1])].tolist()
            out = torch.empty(shape, dtype=dtypes[int(meta[0])], device=device)
        dist.broadcast(out, self._root, group=self.group)
        return out

    def broadcast_frames(self, frames: np.ndarray | None, device: torch.device,
                         per_call: int = 8) -> np.ndarray:
        """Rank 0's decoded frames [F, H, W, 3] on every rank, a few frames per collective so
        a 720p clip never needs a second full copy on the GPU."""
        shape = self.broadcast(None if frames is None else torch.tensor(frames.shape), device)
        out = frames if self.rank == 0 else np.empty(tuple(shape.tolist()), dtype=np.float32)
        for i in range(0, out.shape[0], per_call):
            part = self.broadcast(torch.from_numpy(out[i:i + per_call]) if self.rank == 0
                                  else None, device)
            if self.rank:
                out[i:i + per_call] = part.cpu().numpy()
        return out


def finish(cp: ContextParallel | None) -> None:
    """Leave the job cleanly (every rank reaches this point together)."""
    if cp is not None and dist.is_initialized():
        dist.barrier(group=cp.group)
        dist.destroy_process_group()


def init(cp: int, device: torch.device) -> tuple[ContextParallel | None, torch.device]:
    """Join the job torchrun started (``--cp N`` with N processes); returns the group and this
    rank's device (``cuda:LOCAL_RANK`` on GPUs). ``cp == 1`` without torchrun: no group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cp < 1:
        raise UsageError(f"--cp {cp}: must be at least 1")
    if world != cp:
        raise UsageError(f"--cp {cp} needs {cp} processes, this job has {world}: launch with "
                         f"'torchrun --nproc-per-node {cp} -m longcat_tools run ... --cp {cp}' "
                         f"or use 'longcat-tools run --gpus {cp}'")
    if cp == 1:
        return None, device
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise LongcatError(f"--cp {cp}: local rank {local} has no GPU (this machine has "
                               f"{torch.cuda.device_count()})")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return ContextParallel(), device
