"""LoRA adapter files -> per-module ``LoraDelta`` on the native DiT, applied at run time.

Parsing is the shared ``longcat_tools.lora.formats`` (native, FastVideo and PEFT, exact): every
file becomes the native structure per module (``down`` [n*r, in], ``n`` up blocks, the stored
``alpha_scale``), so the run-time products are the original's (``lora_utils``). Rank is read
from the tensors. A model in merge mode (its default ``lora_mode``) adds the same deltas into its
weights instead (``runner.lora_merge``); the run-time path serves ``lora_mode = "runtime"`` and
sets that cannot be merged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from longcat_tools.errors import LongcatError, UsageError
from longcat_tools.io.safetensors import read_header, read_tensor
from longcat_tools.lora import formats as lora_formats

if TYPE_CHECKING:
    from longcat_tools.runner.dit import LongCatTransformer3DModel


@dataclass
class LoraDelta:
    """One LoRA adapter on one Linear: ``y += (up @ down)(x) * multiplier * alpha_scale``.

    ``ups`` has one matrix per output block: the rank dimension of ``down``'s output is split into
    ``len(ups)`` equal chunks and chunk j feeds ``ups[j]`` (a block-diagonal up-projection, the
    native format's ``lora_up.blocks.{j}``). Computed unfused, in the original's order and
    dtypes, so its roundings are the original's; only the passes over the output are fewer
    (scales in place, a scale of 1 skipped, adapters summed in place), since the former form
    made a 480p step 7% slower than PEFT's (benchmarks/results/offload.md). On a Conv3d whose
    kernel equals its stride (``kernel``), ``down`` runs as that conv over the patches and the
    ups per patch, as PEFT's Conv3d LoRA does.
    """

    down: torch.Tensor  # [n * r, in]
    ups: list[torch.Tensor]  # n x [out / n, r]
    alpha_scale: torch.Tensor  # 0-d, on the host (read without a device sync)
    multiplier: float = 1.0
    kernel: tuple[int, ...] = ()  # a Conv3d target's kernel (= stride)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> LoraDelta:
        """On ``device`` in ``dtype``; ``alpha_scale`` is rounded to ``dtype`` as the original
        casts its buffer, but stays on the host."""
        return LoraDelta(self.down.to(device, dtype), [u.to(device, dtype) for u in self.ups],
                         self.alpha_scale.to(dtype), self.multiplier, self.kernel)

    def __call__(self, x: torch.Tensor, fp32: bool) -> torch.Tensor:
        """The update for input ``x``, in ``x``'s dtype (a new tensor the caller may add into)."""
        if self.down.device != x.device:  # enabled while the model sat elsewhere (offloading)
            self.down, self.ups = self.down.to(x.device), [u.to(x.device) for u in self.ups]
        h = x.to(self.down.dtype)
        down, ups = self.down, self.ups
        if fp32:  # inside the original's autocast(float32): matmuls run in fp32
            h, down, ups = h.float(), down.float(), [u.float() for u in ups]
        if self.kernel:  # [B, C, T, H, W] -> per patch [B, T', H', W', n*r]
            k = self.kernel
            h = F.conv3d(h, down.view(down.shape[0], -1, *k), stride=k).movedim(1, -1)
        else:
            h = F.linear(h, down)
        if len(ups) > 1:
            h = torch.cat([F.linear(c, u) for c, u in zip(h.chunk(len(ups), dim=-1), ups,
                                                          strict=True)], dim=-1)
        else:
            h = F.linear(h, ups[0])
        if self.kernel:
            h = h.movedim(-1, 1)
        h = h.to(x.dtype)
        for factor in (self.multiplier, float(self.alpha_scale)):
            if factor != 1.0:  # multiplying by one is exact: skipped
                h = h.mul_(factor) if h.is_contiguous() else h * factor
        return h


def apply(out: torch.Tensor, loras: list[LoraDelta], x: torch.Tensor, fp32: bool
          ) -> torch.Tensor:
    """``out + sum(lora(x))``, summed as the original sums (from the first update, in order)."""
    if not loras:
        return out
    total = loras[0](x, fp32)
    for lora in loras[1:]:
        total += lora(x, fp32)
    return out.add_(total)


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (small adapter files only)."""
    path = Path(path)
    header = read_header(path)
    with open(path, "rb") as f:
        return {name: read_tensor(f, info) for name, info in header.tensors.items()}


def read_lora(path: str | Path, model: LongCatTransformer3DModel, multiplier: float = 1.0
              ) -> dict[str, LoraDelta]:
    """Native module path -> delta for every module the adapter at ``path`` targets."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise LongcatError(f"{path}: LoRA files are read as safetensors only (never unpickled)")
    if not path.is_file():
        raise UsageError(f"{path}: no such LoRA file")
    parsed = lora_formats.read_lora(path, lora_formats.linear_shapes(model.dims))
    out = {}
    for module, entry in parsed.modules.items():
        m = entry.load()
        lora_formats.check_finite(parsed, module, m, "the run would make a NaN video")
        out[module] = LoraDelta(m.down, list(m.ups), m.alpha_scale.reshape(()).float(),
                                multiplier, m.kernel)
    if not out:
        raise LongcatError(f"{path}: the LoRA file targets no module")
    return out


def lora_path(ckpt_root: str | Path, kind: str) -> Path:
    """The hub adapter ``kind`` ('distilled' or 'refinement') in any layout: native
    ``lora/cfg_step_lora.safetensors``, converted ``lora/distilled/*.safetensors``; a link
    leading out of the checkpoint (its cache folder for a hub snapshot) is refused."""
    from longcat_tools.checkpoint.hub import snapshot_roots
    from longcat_tools.checkpoint.layouts import NATIVE_LORAS, check_contained

    allowed = snapshot_roots(ckpt_root) or (Path(ckpt_root).resolve(),)
    root = Path(ckpt_root) / "lora"
    hub_file = next((f for f, name in NATIVE_LORAS.items() if name == kind), None)
    if hub_file is not None and (root / hub_file).is_file():
        check_contained(root / hub_file, allowed)
        return root / hub_file
    sub = sorted((root / kind).glob("*.safetensors")) if (root / kind).is_dir() else []
    if len(sub) == 1:
        check_contained(sub[0], allowed)
        return sub[0]
    if len(sub) > 1:
        raise LongcatError(f"{root / kind}: several LoRA files; pass the one to use")
    if _is_fused(Path(ckpt_root), kind):
        raise LongcatError(f"{root}: the '{kind}' LoRA is fused into this checkpoint's DiT (lora "
                           "fuse): its weights hold it already, so it cannot be loaded again")
    raise LongcatError(f"{root}: no '{kind}' LoRA (expected lora/"
                       f"{hub_file or f'{kind}.safetensors'} or lora/{kind}/<file>.safetensors)")


_FINITE: set[tuple[str, int, int, int]] = set()  # adapter files found sound, this process


def check_finite_file(path: Path, shapes: dict[str, tuple[int, int]]) -> None:
    """An adapter file read from its header against the DiT (``shapes``) and every module's
    tensors checked finite, one module in memory at a time: a run's check before the weights
    load (a NaN was found after them). A file found sound before, at the same size and
    modification time and against the same DiT, is not read again (a matrix checks every
    video, before and while running it)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, hash(frozenset(shapes.items())))
    if key in _FINITE:
        return
    lora = lora_formats.read_lora(path, shapes)
    for module, entry in lora.modules.items():
        lora_formats.check_finite(lora, module, entry.load(), "the run would make a NaN video")
    _FINITE.add(key)


@dataclass(frozen=True)
class RunAdapter:
    """An adapter ``run --lora`` applies: its name, its file (and that file's name inside
    ``lora/``, as a sidecar records it) and the scale it runs at."""

    name: str
    path: Path
    file: str
    scale: float


def run_adapters(ckpt_root: str | Path, spec: str) -> list[RunAdapter]:
    """The adapters of ``--lora NAME[:SCALE][,NAME...]``, found as ``lora fuse`` finds them
    (registered in ``lora/adapters.json``, else a file of ``lora/``) and checked against this DiT
    (``check_finite_file``) before any weights load. A scale left out is the registry's
    ``default_scale`` (1 for an unregistered file), as ``lora fuse`` takes it. The hub adapters
    are refused: ``--distill`` and refinement apply them, at ``--lora-scale``."""
    from longcat_tools.checkpoint import layouts
    from longcat_tools.lora.fusion import parse_adapter_list
    from longcat_tools.lora.registry import checkpoint_of, dit_shapes, scaled_adapters

    wanted = parse_adapter_list(spec, "--lora")
    hub = {layouts.LORA_DISTILL: "--distill", layouts.LORA_REFINE: "--task refine or --refine"}
    for name, _ in wanted:
        if name in hub:
            raise UsageError(f"--lora {spec}: '{name}' is a hub adapter, which {hub[name]} "
                             "applies (at --lora-scale); --lora takes your own adapters")
    ckpt = checkpoint_of(ckpt_root)
    shapes = dit_shapes(ckpt)
    out = []
    for name, path, scale in scaled_adapters(ckpt, wanted):
        check_finite_file(path, shapes)
        out.append(RunAdapter(name, path, path.relative_to(ckpt.lora_dir).as_posix(), scale))
    return out


def enable_run_adapters(model: LongCatTransformer3DModel, adapters: list[RunAdapter]) -> None:
    """Make ``adapters`` the model's own set (a pipeline call adds its hub adapter to it), each
    at its scale; one already loaded at that scale is not read again (a matrix's next video).
    Enabled lazily: a distilled run merges its set and the hub adapter once, at the first step,
    not this set first, then both after restoring the weights."""
    for a in adapters:
        loaded = model.lora_registry.get(a.name)
        if loaded is None or any(d.multiplier != a.scale for d in loaded.values()):
            model.load_lora(str(a.path), a.name, a.scale)
    model.enable_loras([a.name for a in adapters], lazy=True)


def _is_fused(root: Path, kind: str) -> bool:
    """Whether ``lora fuse`` recorded ``kind`` in the DiT config (``layouts.fused_scale``)."""
    from longcat_tools.checkpoint import layouts

    try:
        return layouts.fused_scale(layouts.detect(root).config(), "name", kind) is not None
    except LongcatError:
        return False
