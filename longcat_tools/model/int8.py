"""The weight-only INT8 format of LongCat-Video-Avatar 1.5 (``base_model_int8/``).

Every ``nn.Linear`` except ``final_layer.linear`` is stored as ``<module>.weight_int8`` (int8
[out, in]) and ``<module>.weight_scale`` (float32 [out]), with its bias as bfloat16; there is no
``<module>.weight``. Scales are per output row, symmetric: ``max|row| / 127``. Other tensors keep
their names. Shards are ``quantized_model-0000k-of-0000n.safetensors`` (always numbered, always
with an index), split greedily in state_dict order at 4 GiB.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from longcat_tools.model import fp8

if TYPE_CHECKING:
    import torch

METHOD = "int8_per_channel_symmetric"
SKIP_PATTERNS = ("final_layer.linear",)  # matched as substrings of module names
QUANTIZATION_CONFIG = {
    "quantization_method": METHOD,
    "skip_patterns": list(SKIP_PATTERNS),
    "description": "Weight-only INT8 quantization with per-channel symmetric scaling",
}
CONFIG_NAME = fp8.CONFIG_FILE  # the file name both quantized formats use
SHARD_STEM = "quantized_model"
INDEX_NAME = f"{SHARD_STEM}.safetensors.index.json"
MAX_SHARD_BYTES = 4 * 1024**3
WEIGHT = "weight_int8"  # a quantized Linear's tensors: int8 rows and their float32 scales
SCALE = "weight_scale"
MIN_SCALE = 1e-8  # an all-zero row still gets a positive scale
QMAX = 127.0


def shard_names(count: int) -> list[str]:
    """Shard file names: numbered even when there is only one."""
    return [f"{SHARD_STEM}-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]


def is_quantized(module: str, weight_shape: tuple[int, ...]) -> bool:
    """Whether a module with this weight is stored as INT8: every Linear (the DiT's only 2-D
    weights) except the skipped ones."""
    return len(weight_shape) == 2 and not any(p in module for p in SKIP_PATTERNS)


def quantized_specs(specs: list[tuple[str, tuple[int, ...]]],
                    ) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, role) of the INT8 state dict made from a model's (name, shape) list, in the
    same order; role is ``int8``, ``scale``, ``bias`` (bf16 bias of a quantized module) or
    ``keep`` (stored as the source tensor)."""
    shapes = dict(specs)
    out: list[tuple[str, tuple[int, ...], str]] = []
    for name, shape in specs:
        module, _, param = name.rpartition(".")
        weight = shapes.get(f"{module}.weight", ())
        if not is_quantized(module, weight):
            out.append((name, shape, "keep"))
        elif param == "weight":
            out += [(f"{module}.{WEIGHT}", shape, "int8"),
                    (f"{module}.{SCALE}", (shape[0],), "scale")]
        else:
            out.append((name, shape, "bias"))
    return out


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, float32 scale) of a Linear weight: per-row symmetric, computed in float32,
    divided (not multiplied by the reciprocal) and rounded half to even."""
    import torch

    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=MIN_SCALE) / QMAX
    q = (w / scale.unsqueeze(1)).round().clamp(-128, 127).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight an INT8 Linear computes with for activations of ``dtype``: both factors cast
    to ``dtype`` first, then one product."""
    return q.to(dtype) * scale.to(dtype).unsqueeze(1)
