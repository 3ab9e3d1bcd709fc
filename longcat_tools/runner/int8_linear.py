"""Linear layers kept in the avatar's weight-only INT8 format, dequantized in every forward.

``base_model_int8/`` (``model.int8``) stores each Linear as int8 rows and a float32 scale per
row. The original computes ``F.linear(x, q.to(cd) * s.to(cd), bias.to(cd))`` with ``cd`` the
activation's dtype: bf16 for the blocks, but float32 in its fp32 regions (the timestep MLP and the
adaLN modulations). Dequantizing once on load to one dtype cannot give both, so the weights stay
int8 (half the memory of bf16, as the format intends) and each call dequantizes for its own
activation dtype, which is the original's arithmetic in both regions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from longcat_tools.errors import LongcatError
from longcat_tools.model import int8
from longcat_tools.runner.lora import LoraDelta
from longcat_tools.runner.lora import apply as lora_apply


class Int8Linear(nn.Module):
    """``weight_int8`` int8 [out, in], ``weight_scale`` float32 [out], ``bias`` bfloat16 [out]:
    the names and dtypes of the format, so its tensors load as they are stored."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_int8 = nn.Parameter(
            torch.empty(out_features, in_features, dtype=torch.int8, device=device),
            requires_grad=False)
        self.register_buffer("weight_scale",
                             torch.empty(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=torch.bfloat16, device=device),
                                 requires_grad=False) if bias else None
        self.loras: list[LoraDelta] = []  # run-time adapters, as on ``dit.Linear``

    def forward(self, x: torch.Tensor, fp32: bool = False) -> torch.Tensor:
        """``fp32``: one of the original's float32 regions (the input is upcast as there).
        Adapters add their update to the output, as the original's LoRA network does around
        its ``QuantizedLinear``; they never merge into int8 weights."""
        if self.weight_scale.dtype != torch.float32:
            raise LongcatError("an INT8 layer's scales were cast to another dtype (move an INT8 "
                               "model with .to(device) only)")
        h = x.float() if fp32 else x
        weight = int8.dequantize(self.weight_int8, self.weight_scale, h.dtype)
        bias = None if self.bias is None else self.bias.to(h.dtype)
        return lora_apply(F.linear(h, weight, bias), self.loras, x, fp32)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_linears(model: nn.Module) -> list[str]:
    """Swap every Linear the format stores as INT8 (``model.int8.is_quantized``) for an
    ``Int8Linear`` on the same device: empty on the meta device (a loader fills it), else
    quantized from the Linear's weight as the format's writer does. Returns their names."""
    swapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and int8.is_quantized(name, tuple(module.weight.shape)):
            parent, _, child = name.rpartition(".")
            layer = Int8Linear(module.in_features, module.out_features, module.bias is not None,
                               device=module.weight.device)
            if not module.weight.is_meta:
                with torch.no_grad():
                    q, scale = int8.quantize(module.weight)
                    layer.weight_int8.copy_(q)
                    layer.weight_scale.copy_(scale)
                    if module.bias is not None:
                        layer.bias.copy_(module.bias)
            setattr(model.get_submodule(parent), child, layer)
            swapped.append(name)
    return swapped
