"""``bsa check``: what the BSA kernel does for one video size (grid, chunks, chunks kept, FLOPs).

The arithmetic is :mod:`longcat_tools.model.chunks`; this module applies it to one request,
checks the request and says in notes and warnings what the numbers mean.
"""

from __future__ import annotations

from typing import Any

from longcat_tools.bsa.status import mode_of
from longcat_tools.errors import UsageError
from longcat_tools.model import chunks
from longcat_tools.model.keymap import RELEASE_DIMS, DiTDims


def _chunking(grid: chunks.Shape3, chunk: list[int]) -> dict[str, Any]:
    c = chunks.ChunkGrid(grid, tuple(chunk))  # type: ignore[arg-type]
    return {"chunk": list(chunk), "tokens_per_chunk": c.chunk_size, "counts": list(c.grid),
            "chunks": c.num_chunks, "divides": [e == 0 for e in c.edge], "edge": list(c.edge)}


def _check_request(height: int, width: int, frames: int, cp: int, dims: DiTDims,
                   refine: bool) -> None:
    multiple = chunks.pixel_multiple(dims.patch_size)
    stride = chunks.VAE_STRIDE[1]
    for name, v, m in (("--height", height, multiple[0]), ("--width", width, multiple[1])):
        if v < 1 or v % m:
            raise UsageError(f"{name} {v}: must be a positive multiple of {m} (VAE {stride}x "
                             f"times patch {m // stride}x)")
        if v > chunks.MAX_SIDE:  # a 10**38-token grid was printed
            raise UsageError(f"{name} {v}: at most {chunks.MAX_SIDE} px")
    most = chunks.MAX_FRAMES * (2 if refine else 1)  # refine: the stage's doubled output
    if not 1 <= frames <= most:
        raise UsageError(f"--frames {frames}: must be 1 to {most}")
    if not refine and (why := chunks.frames_problem(frames)):
        raise UsageError(f"--frames {frames}: {why}")
    if cp < 1:
        raise UsageError(f"--cp {cp}: must be at least 1")
    if dims.num_heads % cp:
        raise UsageError(f"--cp {cp}: the {dims.num_heads} attention heads do not split over "
                         f"{cp} ranks (context parallel scatters heads across ranks)")


def check(height: int, width: int, frames: int, params: dict[str, Any], *, cp: int = 1,
          refine: bool = False, dims: DiTDims = RELEASE_DIMS) -> dict[str, Any]:
    """Token grid, chunking, chunks kept and attention FLOPs of one video size under ``params``
    (self-attention with queries and keys over the same tokens, as in text-to-video and refine).
    ``refine``: ``frames`` is the refinement stage's output (twice the stage-1 video)."""
    _check_request(height, width, frames, cp, dims, refine)
    used, t_lat, note = chunks.latent_frames(frames, refine)
    notes = [note] if note else []
    latent = chunks.latent_grid(t_lat, height, width)
    grid = chunks.token_grid(latent, dims.patch_size)
    tokens = grid[0] * grid[1] * grid[2]
    split = chunks.optimal_split(cp)
    for axis, g, s in (("H", grid[1], split[0]), ("W", grid[2], split[1])):
        if g % s:
            px = chunks.pixel_multiple(dims.patch_size)[0] * max(split)
            raise UsageError(f"token grid {axis} {g} does not split over cp_split_hw "
                             f"{list(split)} for --cp {cp}; pick a size that is a multiple of "
                             f"{px} px")
    rank = (grid[0], grid[1] // split[0], grid[2] // split[1])
    # Ulysses gathers the sequence as rank tiles one after another: the kernel sees T*cp frames.
    seen = (grid[0] * cp, rank[1], rank[2])
    q = _chunking(seen, params["chunk_3d_shape_q"])
    k = _chunking(seen, params["chunk_3d_shape_k"])
    s, cdf = params.get("sparsity"), params.get("cdf_threshold")
    mode = mode_of(params)
    applies = grid[0] > 1
    # one latent frame runs dense: every key chunk is kept and nothing is selected
    topk = chunks.kept_per_query(s, k["chunks"]) if applies else k["chunks"]
    dense = chunks.attention_flops(tokens, tokens, dims.num_heads, dims.head_dim)
    gating = (chunks.gating_flops(q["chunks"], k["chunks"], dims.num_heads, dims.head_dim)
              if applies else 0)
    kept_fraction = topk / k["chunks"] if topk is not None else None
    kept = round(dense * kept_fraction) if kept_fraction is not None else None
    if not applies:
        notes.append("one latent frame: the runner uses dense attention (BSA needs more than "
                     "one), so every key chunk is kept")
    elif mode == "cdf":
        notes.append(f"cdf mode: chunks kept per query vary with content (until the softmax mass "
                     f"reaches {cdf}); FLOPs kept cannot be known in advance")
    elif mode == "max":
        notes.append(f"max mode: at least {topk} chunks per query, more where the CDF "
                     f"{cdf} needs them")
    warnings: list[str] = []
    if topk == 0:
        warnings.append(f"sparsity {s} keeps int({1 - s:.3g} x {k['chunks']}) = 0 key chunks per "
                        "query: attention output would be zero; lower the sparsity")
    fits = all(q["divides"]) and all(k["divides"])
    if applies and not fits:
        bad = [f"{a} {g} % {c} = {e}" for side in (q, k) for a, g, c, e
               in zip(chunks.AXES, seen, side["chunk"], side["edge"], strict=True) if e]
        notes.append(f"{', '.join(dict.fromkeys(bad))}: the original kernel asserts divisibility "
                     "and stops; ours makes edge chunks with fewer tokens (pooled over their real "
                     "tokens, masked in the kernel)")
    return {
        "height": height, "width": width, "frames": frames, "frames_used": used, "cp": cp,
        "refine": refine,
        "latent": list(latent), "patch": list(dims.patch_size), "token_grid": list(grid),
        "tokens": tokens, "cp_split_hw": list(split), "rank_grid": list(rank),
        "kernel_grid": list(seen), "bsa_applies": applies,
        "params": params, "mode": mode, "q": q, "k": k,
        "kept_per_query": topk, "kept_fraction": kept_fraction,
        "original_kernel_ok": fits if applies else None,  # None: not called (dense)
        "heads": dims.num_heads, "head_dim": dims.head_dim, "depth": dims.depth,
        "flops": {"dense_per_block": dense, "kept_per_block": kept, "gating_per_block": gating,
                  "dense_per_forward": dense * dims.depth,
                  "kept_per_forward": kept * dims.depth if kept is not None else None,
                  "per_rank_divisor": cp},
        "notes": notes, "warnings": warnings,
    }
