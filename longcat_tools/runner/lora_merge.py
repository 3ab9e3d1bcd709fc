"""A fixed set of LoRA adapters merged into the DiT's weights, and the exact way back.

Run-time adapters (``runner.lora``) cost two thin matmuls per target on every step (0.56 s per
480p step on an H200 at rank 128: benchmarks/results/offload.md). When a run's adapters and
scales stay fixed (distill, refine, a style LoRA), adding their update into the weights once
makes each step cost what it costs without them. The arithmetic is ``lora fuse``'s
(``ModuleLora.delta``): per target weight, in fp32, ``W + delta_1 + delta_2 ...`` in the
enabling order, cast back once, so a merged model holds the weights of the fused checkpoint.
Each weight is merged where it lives (the GPU, or the host under block swap), one at a time,
with one fp32 copy of it beside.

The way back is exact, bit for bit: a model loaded from a checkpoint (``loading.Origin``), whose
merged parameters still hold the checkpoint's values, reads them again from its shards; any
other model (or one edited in place, a training step) keeps a host copy of each merged
parameter's original (pinned when the parameter is on a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from longcat_tools.errors import LongcatError
from longcat_tools.kernels import fp8 as fp8_ops
from longcat_tools.lora.formats import ModuleLora
from longcat_tools.lora.fusion import FUSE_DTYPES
from longcat_tools.model import fp8 as fp8_format
from longcat_tools.runner.lora import LoraDelta

if TYPE_CHECKING:  # loading imports the model, which imports this module
    from longcat_tools.runner.loading import Origin

Registry = dict[str, dict[str, LoraDelta]]  # adapter name -> native module -> delta
E4M3 = fp8_ops.E4M3


def _scales(deltas: dict[str, LoraDelta]) -> tuple[float, ...]:
    return tuple(d.multiplier for d in deltas.values())


@dataclass
class Merged:
    """The set in the weights: its adapters (the registry's objects, so a reloaded name is a
    new set) at their scales then, the parameters it changed and their originals (None: read
    again from ``origin``)."""

    names: list[str]
    sources: list[dict[str, LoraDelta]]
    scales: list[tuple[float, ...]]
    params: dict[str, torch.Tensor]  # parameters, and the scales of e4m3 weights
    originals: dict[str, torch.Tensor] | None
    origin: Origin | None

    def matches(self, registry: Registry, names: list[str]) -> bool:
        """Whether enabling ``names`` now would merge exactly this set again."""
        return (names == self.names
                and all(registry[n] is s for n, s in zip(names, self.sources, strict=True))
                and [_scales(registry[n]) for n in names] == self.scales)


def _targets(model: torch.nn.Module, registry: Registry, names: list[str]
             ) -> dict[str, tuple[torch.nn.Parameter, list[LoraDelta], torch.Tensor | None]]:
    """Parameter name -> (the weight, its adapters in enabling order, the e4m3 weight's scale
    or None)."""
    modules = dict(model.named_modules())
    param_names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, tuple[torch.nn.Parameter, list[LoraDelta], torch.Tensor | None]] = {}
    for name in names:
        for module, delta in registry[name].items():
            target = modules[module]  # a PEFT adapter wraps it as base_layer
            layer = getattr(target, "base_layer", target)
            scale = layer.weight_scale if fp8_ops.is_e4m3(layer) else None
            entry = out.setdefault(param_names[id(layer.weight)], (layer.weight, [], scale))
            entry[1].append(delta)
    return out


def mergeable(model: torch.nn.Module, registry: Registry, names: list[str]) -> bool:
    """Whether this set can go into the weights: every target a float weight ``lora fuse``
    accepts or an e4m3 weight with its scale (not an INT8 layer), and no diffusers hook (group
    offload keeps weight copies of its own, layerwise casting stores another dtype). Otherwise
    it runs as run-time adapters."""
    if any(getattr(m, "_diffusers_hook", None) is not None for m in model.modules()):
        return False
    modules = dict(model.named_modules())
    if any(not hasattr(getattr(modules[m], "base_layer", modules[m]), "weight")
           for n in names for m in registry[n]):
        return False  # INT8 layers: adapters run beside them, as in the original
    return all((p.dtype in FUSE_DTYPES or scale is not None) and not p.is_meta
               for p, _, scale in _targets(model, registry, names).values())


def _origin(model: torch.nn.Module, params: dict[str, torch.Tensor]) -> Origin | None:
    """The model's checkpoint when reading it again gives these parameters' values exactly:
    loaded by ``load_transformer`` (``load_state_dict`` forgets it), still in the dtype it was
    loaded in (e4m3 layers as loaded: re-quantizing is deterministic), not edited in place
    since (a training step), no PEFT layers (their fuse would edit base weights) and the shards
    unchanged."""
    origin = getattr(model, "origin", None)
    if origin is None or getattr(model, "_hf_peft_config_loaded", False):
        return None
    if any(hasattr(m, "base_layer") for m in model.modules()):
        return None
    weights = [p for name, p in params.items() if not fp8_format.is_scale(name)]
    if (any(p.dtype not in (origin.dtype, E4M3) for p in weights) or not origin.holds(params)
            or not origin.unchanged()):
        return None
    return origin


def _host_copy(p: torch.Tensor) -> torch.Tensor:
    if p.device.type == "cpu":
        return p.detach().clone()
    host = torch.empty(p.shape, dtype=p.dtype, pin_memory=p.device.type == "cuda")
    return host.copy_(p.detach())


@torch.no_grad()
def merge_into(weight: torch.Tensor, deltas: list[LoraDelta],
               scale: torch.Tensor | None = None) -> None:
    """``weight = (W.float() + delta_1 + ...).to(W.dtype)`` in place, where ``weight`` lives:
    each delta one up block at a time, ``multiplier * alpha_scale * up_j @ down_j`` in fp32
    (a Conv3d's delta is over its flattened patch, as its weight viewed [out, -1]). An e4m3
    weight (``scale``: its per-row scales) is dequantized, merged and quantized again, its
    scales updated with it."""
    if scale is not None:
        acc = fp8_ops.dequantize_weight(weight, scale)
    else:
        acc = weight.detach().to(torch.float32, copy=True).view(weight.shape[0], -1)
    dev = weight.device
    for d in deltas:
        m = ModuleLora("", d.down.to(dev), [u.to(dev) for u in d.ups], d.alpha_scale, d.kernel)
        h = acc.shape[0] // m.n
        for j in range(m.n):
            acc[j * h:(j + 1) * h] += m.delta(d.multiplier, torch.float32, (j * h, (j + 1) * h))
    if scale is not None:
        q, new_scale = fp8_ops.quantize_weight(acc)
        weight.copy_(q)
        scale.copy_(new_scale)
    else:
        weight.copy_(acc.view(weight.shape))


def merge(model: torch.nn.Module, registry: Registry, names: list[str]) -> Merged:
    """Merge ``names`` into ``model``'s weights; on any failure the weights merged so far are
    restored before the error goes on."""
    targets = _targets(model, registry, names)
    buffer_names = {id(b): n for n, b in model.named_buffers()}
    params: dict[str, torch.Tensor] = {}
    for name, (p, _, scale) in targets.items():
        params[name] = p
        if scale is not None:
            params[buffer_names[id(scale)]] = scale
    origin = _origin(model, params)
    merged = Merged(list(names), [registry[n] for n in names],
                    [_scales(registry[n]) for n in names], {}, None if origin else {}, origin)
    try:
        for name, (p, deltas, scale) in targets.items():
            changed = [(name, p)] + ([(buffer_names[id(scale)], scale)] if scale is not None
                                     else [])
            for n, t in changed:
                if merged.originals is not None:
                    merged.originals[n] = _host_copy(t)
                merged.params[n] = t
            merge_into(p, deltas, scale)
    except BaseException:
        restore(model, merged)
        raise
    return merged


@torch.no_grad()
def restore(model: torch.nn.Module, merged: Merged) -> None:
    """Put the original values of ``merged``'s parameters back, bit for bit."""
    if merged.originals is not None:
        for name, p in merged.params.items():
            p.copy_(merged.originals[name])
        return
    from longcat_tools.runner import loading

    origin = merged.origin
    if not origin.unchanged():
        raise LongcatError(f"{origin.ckpt.transformer_dir}: changed on disk since the model was "
                           f"loaded, so the weights LoRA {', '.join(merged.names)} was merged "
                           "into cannot be read back; load the model again")
    if merged.params:
        loading.fill_parameters(model, origin.ckpt, names=list(merged.params))
        origin.refilled(merged.params)
