"""``verify --forward``: one small DiT forward through the runner, optionally against a second
checkpoint (e.g. native vs converted), failing when the outputs differ.

The input is deterministic (fixed seed) and exercises every path of a block: per-frame timesteps,
a condition frame (block-causal attention, no cross-attention for it) and padded text. The models
are loaded one after the other, so two real checkpoints need the memory of one.

Library: ``forward_check(path, against=None) -> dict``, behind ``verify --forward``. Command line:
``python -m longcat_tools.runner.compare PATH [--against OTHER] [--device D] [--dtype T] [--json]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from longcat_tools.errors import LongcatError

DEFAULT_TOLERANCE = 1e-5  # relative L2; an exact conversion gives 0


def probe_inputs(dit, seed: int = 0, frames: int = 3, size: int = 8, text_len: int = 16,
                 device: Any = "cpu") -> dict[str, Any]:
    """Small fixed inputs: batch 2, ``frames`` latent frames of ``size`` x ``size``, the first a
    condition frame (timestep 0), and texts of 5 and ``text_len`` valid tokens."""
    g = torch.Generator().manual_seed(seed)
    d = dit.dims
    x = torch.randn(2, d.in_channels, frames, size, size, generator=g)
    t = torch.tensor([[0.0] + [731.0] * (frames - 1), [0.0] + [142.0] * (frames - 1)])
    y = torch.randn(2, 1, text_len, d.caption_channels, generator=g)
    mask = torch.zeros(2, text_len, dtype=torch.long)
    mask[0, :5] = 1
    mask[1, :] = 1
    return {k: v.to(device) for k, v in {"hidden_states": x, "timestep": t,
                                          "encoder_hidden_states": y,
                                          "encoder_attention_mask": mask}.items()}


def _forward(path: str | Path, device: Any, dtype: Any) -> tuple[torch.Tensor, str]:
    from longcat_tools.runner.loading import load_transformer

    dit = load_transformer(path, device=device, dtype=dtype)
    with torch.no_grad():
        # dense whatever the config's enable_bsa: the check compares weights, and two
        # checkpoints of the same weights may differ in their BSA setting
        out = dit(**probe_inputs(dit, device=device), num_cond_latents=1, bsa=None).float().cpu()
    layout = dit.layout
    del dit
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out, layout


def forward_check(path: str | Path, against: str | Path | None = None, device: Any = "cpu",
                  dtype: Any = "fp32", tolerance: float = DEFAULT_TOLERANCE) -> dict[str, Any]:
    """Run the probe forward on ``path`` (and ``against``); ``ok`` is False when an output is not
    finite or the two differ by more than ``tolerance`` (relative L2)."""
    t0 = time.perf_counter()
    out, layout = _forward(path, device, dtype)
    finite = bool(torch.isfinite(out).all())
    report: dict[str, Any] = {
        "path": str(path), "layout": layout, "device": str(device), "dtype": str(dtype),
        "output_shape": list(out.shape), "finite": finite, "output_rms": out.pow(2).mean().sqrt()
        .item(), "tolerance": tolerance}
    ok = finite
    problems = [] if finite else [f"{path}: the DiT output has NaN or Inf values"]
    if against is not None:
        other, other_layout = _forward(against, device, dtype)
        finite_b = bool(torch.isfinite(other).all())
        diff = (out - other).abs()
        rel = ((out - other).norm() / other.norm().clamp_min(1e-30)).item()
        report.update({"against": str(against), "against_layout": other_layout,
                       "max_abs_diff": diff.max().item(), "rel_diff": rel,
                       "identical": bool(torch.equal(out, other))})
        if not finite_b:
            problems.append(f"{against}: the DiT output has NaN or Inf values")
        if rel > tolerance:
            problems.append(f"forward outputs differ: relative error {rel:.3g} > {tolerance:g} "
                            f"(max |diff| {diff.max().item():.3g}) between {path} and {against}; "
                            "the weights are not the same (a dtype change, a wrong key map, or "
                            "corruption)")
        ok = ok and finite_b and rel <= tolerance
    report.update({"ok": ok, "problems": problems,
                   "seconds": round(time.perf_counter() - t0, 3)})
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m longcat_tools.runner.compare",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("path")
    ap.add_argument("--against")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    try:
        r = forward_check(a.path, a.against, a.device, a.dtype, a.tolerance)
    except LongcatError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    if a.json:
        print(json.dumps(r, indent=2))
    else:
        line = f"forward {r['layout']}: output {r['output_shape']}, finite {r['finite']}"
        if "against" in r:
            line += (f"; vs {r['against_layout']}: rel {r['rel_diff']:.3g}, max |diff| "
                     f"{r['max_abs_diff']:.3g}")
        print(("ok: " if r["ok"] else "FAILED: ") + line)
        for p in r["problems"]:
            print(f"error: {p}", file=sys.stderr)
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
