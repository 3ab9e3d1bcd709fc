"""DiT forwards for the context-parallel tests: ``CASES`` run in one process (the reference) and,
under ``torchrun --nproc-per-node N tests/cp_worker.py CKPT OUT``, split over N gloo ranks; rank 0
saves the split results to OUT (safetensors) for the test to compare."""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from longcat_tools.runner.dit import LongCatTransformer3DModel


def _inputs(dit: LongCatTransformer3DModel, seed: int, T: int, H: int = 4, W: int = 4, B: int = 2,
            per_frame: bool = False):
    g = torch.Generator().manual_seed(seed)
    c, d = dit.dims.in_channels, dit.dims.caption_channels
    x = torch.randn(B, c, T, H, W, generator=g)
    t = torch.rand((B, T) if per_frame else (B,), generator=g) * 1000
    y = torch.randn(B, 1, 16, d, generator=g)
    mask = torch.ones(B, 16, dtype=torch.int64)
    mask[0, 11:] = 0  # a padded prompt, as under CFG
    return x, t, y, mask


def uneven_split(dit: LongCatTransformer3DModel) -> torch.Tensor:
    """3 latent frames over 2 ranks: shares of 2 and 1 frames."""
    return dit(*_inputs(dit, 1, T=3))


def condition_frames(dit: LongCatTransformer3DModel) -> torch.Tensor:
    """i2v-style: the first 2 frames are clean condition frames (timestep 0, no text)."""
    x, t, y, mask = _inputs(dit, 2, T=5, per_frame=True)
    t[:, :2] = 0
    return dit(x, t, y, mask, num_cond_latents=2)


def block_sparse(dit: LongCatTransformer3DModel) -> torch.Tensor:
    """BSA over 6 frames of 8x8 tokens with 4x4x4 chunks: the 3/3 frame split cuts through
    time chunks, which must not change the chunks BSA sees."""
    dit.enable_bsa({"sparsity": 0.5, "chunk_3d_shape_q": [4, 4, 4],
                    "chunk_3d_shape_k": [4, 4, 4]})
    try:
        x, t, y, mask = _inputs(dit, 3, T=6, H=16, W=16, per_frame=True)
        t[:, :1] = 0
        return dit(x, t, y, mask, num_cond_latents=1)
    finally:
        dit.disable_bsa()


def kv_cache(dit: LongCatTransformer3DModel) -> torch.Tensor:
    """vc-style: cache 2 condition frames' K/V, then denoise 3 noise frames against it."""
    x, t, y, mask = _inputs(dit, 4, T=5, B=1)
    cond, noise = x[:, :, :2], x[:, :, 2:]
    empty = torch.zeros_like(y)
    _, cache = dit(cond, torch.zeros(1, 2), empty, return_kv=True, skip_crs_attn=True)
    return dit(noise, t, y, mask, num_cond_latents=2, kv_cache=cache)


CASES: dict[str, Callable[[LongCatTransformer3DModel], torch.Tensor]] = {
    f.__name__: f for f in (uneven_split, condition_frames, block_sparse, kv_cache)}


def main(ckpt: str, out: str) -> None:
    from safetensors.torch import save_file

    from longcat_tools.runner import context_parallel
    from longcat_tools.runner.loading import load_transformer

    torch.set_num_threads(1)
    cp, _ = context_parallel.init(int(__import__("os").environ["WORLD_SIZE"]),
                                  torch.device("cpu"))
    dit = load_transformer(ckpt, device="cpu", dtype="fp32")
    dit.enable_context_parallel(cp)
    with torch.no_grad():
        results = {name: case(dit).contiguous() for name, case in CASES.items()}
    if cp.rank == 0:
        save_file(results, out)
    context_parallel.finish(cp)


if __name__ == "__main__":
    main(*sys.argv[1:3])
