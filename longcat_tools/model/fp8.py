"""The fp8 DiT checkpoint format, as data (the arithmetic is ``kernels.fp8``).

A DiT folder (native ``dit/`` or converted ``transformer/``) is fp8 when it holds
``quantization_config.json`` with ``quantization_method`` = :data:`METHOD`. Then every
:data:`BLOCK_LINEARS` module of every block stores

* ``<module>.weight``: float8_e4m3fn ``[out, in]``, the weight divided by its row's scale;
* ``<module>.weight_scale``: float32 ``[out]``, ``max|row| / 448`` (1 for a zero row);
* ``<module>.bias``: unchanged (bf16).

Everything else (embedders, adaLN modulations, norms, the final layer: the original's fp32
islands) stays bf16. The names follow the family's own INT8 release (``base_model_int8``:
``weight_int8`` + ``weight_scale`` [out] and a ``quantization_config.json``). Per-channel
scales cannot be read by ComfyUI (whose ``scale_weight`` / ``weight_scale`` is one number per
tensor), so these folders are for this tool; ``convert --to comfy`` writes bf16.
In the FastVideo flavour a fused weight's scale is split row-wise with it (``to_q`` ...).
"""

from __future__ import annotations

import re
from typing import Any

METHOD = "fp8_e4m3_per_channel"
CONFIG_FILE = "quantization_config.json"
SCALE = "weight_scale"
STORED_DTYPE = "F8_E4M3"  # safetensors' name of float8_e4m3fn
E4M3_MAX = 448.0  # largest finite e4m3fn value
# native module names inside ``blocks.{i}``: the GEMMs that run in e4m3
BLOCK_LINEARS = ("attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear",
                 "cross_attn.proj", "ffn.w1", "ffn.w2", "ffn.w3")
# the self-attention an fp8 run may quantize too (``kernels.fp8_attention``), and which it does
# unless told (``run --fp8-attention auto``): both. Dense, through cuDNN's fp8 kernel where
# installed (else ours), made a 480p forward 17% faster on an H100 at no visible cost in
# accuracy; bsa, once its forward's registers were capped, a 720p one 1.4-1.7% faster (3.111
# against 3.156-3.164 s), as far from bf16 as with bsa in bf16
# (benchmarks/results/vs_original.md).
# Here, not in kernels, so the CLI reads it without torch.
ATTENTION_KINDS = ("dense", "bsa")
ATTENTION_DEFAULT: frozenset[str] = frozenset({"dense", "bsa"})
_QUANTIZED = re.compile(r"^blocks\.\d+\.(" + "|".join(map(re.escape, BLOCK_LINEARS)) + r")$")


def config() -> dict[str, Any]:
    """The ``quantization_config.json`` an fp8 folder carries."""
    return {"quantization_method": METHOD, "weight_dtype": "float8_e4m3fn",
            "weight_scale": "float32 per output channel: max|row| / 448",
            "activations": "float8_e4m3fn, scaled per token at run time",
            "modules": [f"blocks.*.{m}" for m in BLOCK_LINEARS]}


def is_config(cfg: Any) -> bool:
    return isinstance(cfg, dict) and cfg.get("quantization_method") == METHOD


def is_quantized(native_module: str) -> bool:
    """Whether a native module path (``blocks.3.attn.qkv``) is stored in e4m3."""
    return _QUANTIZED.match(native_module) is not None


def is_scale(native_key: str) -> bool:
    module, _, param = native_key.rpartition(".")
    return param == SCALE and is_quantized(module)


def with_scales(specs: list[tuple[str, tuple[int, ...]]]) -> list[tuple[str, tuple[int, ...]]]:
    """Native (name, shape) specs plus ``<module>.weight_scale`` after each quantized weight."""
    out = []
    for name, shape in specs:
        out.append((name, shape))
        module, _, param = name.rpartition(".")
        if param == "weight" and is_quantized(module):
            out.append((f"{module}.{SCALE}", (shape[0],)))
    return out
