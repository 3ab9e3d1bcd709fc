"""How the DiT attends: the settings of one forward, as values, and the two attention calls.

Dense attention is ``kernels.attention``: FlashAttention-3 where installed (Hopper), else PyTorch
SDPA with the fastest backend available (cuDNN on Hopper), with the softmax scale ``D**-0.5`` of
the original's flash-attention calls. Block
sparse attention is ``kernels.block_sparse_attention`` (Triton on CUDA, its PyTorch reference
elsewhere). Every run-time choice (BSA params, fused glue, context parallel) reaches the blocks as
an ``AttnSettings`` argument of the forward, never as state shared between modules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Union

import torch

from longcat_tools import kernels
from longcat_tools.errors import LongcatError, UsageError
from longcat_tools.kernels import fp8 as fp8_ops
from longcat_tools.model import bsa_presets, chunks
from longcat_tools.runner.context_parallel import ContextParallel
from longcat_tools.runner.settings import BSA_CHOICES, check_bsa

# what an enabled BSA without params of its own uses: `bsa enable`'s default preset
_DEFAULT: dict[str, Any] = bsa_presets.PRESETS[bsa_presets.DEFAULT_ENABLE].params or {}


@dataclass(frozen=True)
class BSAParams:
    """Block sparse attention settings (transformer config ``bsa_params``)."""

    sparsity: float | None = _DEFAULT["sparsity"]
    cdf_threshold: float | None = _DEFAULT["cdf_threshold"]
    chunk_q: tuple[int, int, int] = tuple(_DEFAULT["chunk_3d_shape_q"])
    chunk_k: tuple[int, int, int] = tuple(_DEFAULT["chunk_3d_shape_k"])

    @classmethod
    def from_config(cls, params: dict[str, Any] | None) -> BSAParams:
        """Fields the config leaves out take the default preset's value; the result is checked
        as a config's ``bsa_params`` is (an unknown key was ignored, a sparsity of 1.5 failed
        in the kernel's reference)."""
        p = {**_DEFAULT, **(params or {})}
        _check_config(p)
        return cls(sparsity=p["sparsity"], cdf_threshold=p["cdf_threshold"],
                   chunk_q=tuple(p["chunk_3d_shape_q"]), chunk_k=tuple(p["chunk_3d_shape_k"]))

    def config(self) -> dict[str, Any]:
        return {"sparsity": self.sparsity, "cdf_threshold": self.cdf_threshold,
                "chunk_3d_shape_q": list(self.chunk_q), "chunk_3d_shape_k": list(self.chunk_k)}


def _check_config(params: dict[str, Any]) -> None:
    from longcat_tools.bsa.config import param_errors

    if errors := param_errors({"bsa_params": params}):
        raise UsageError(f"bsa: {errors[0]}")
    for key in ("sparsity", "cdf_threshold"):  # NaN passes the schema's bounds
        if isinstance(params[key], float) and not math.isfinite(params[key]):
            raise UsageError(f"bsa: bsa_params/{key}: {params[key]} is not a number in range")


# What a run asks for: a ``BSA_CHOICES`` name, None (= "config"), True/False (= "on"/"off"),
# config-style params or BSAParams. ``resolve_bsa`` turns it into the one value the kernel gets.
BSASetting = Union[str, bool, dict, BSAParams, None]  # noqa: UP007 - a runtime alias


def resolve_bsa(setting: BSASetting, model_default: BSAParams | None,
                config_params: dict[str, Any] | None,
                refinement: bool = False) -> BSAParams | None:
    """The BSA params of one run (None: dense attention).

    "config"/None keeps the model's setting (the transformer config's ``enable_bsa``), except
    that refinement always runs with BSA; "on"/True uses the config's ``bsa_params``; a preset
    name uses the preset table's."""
    if isinstance(setting, str):
        check_bsa(setting)
    elif not isinstance(setting, (bool, dict, BSAParams, type(None))):
        raise LongcatError(f"bsa {setting!r}: use a name ({', '.join(BSA_CHOICES)}), True/False, "
                           "a bsa_params dict or BSAParams")
    if setting is None or setting == "config":
        if refinement and model_default is None:
            return BSAParams.from_config(config_params)
        return model_default
    if setting is True or setting == "on":
        return BSAParams.from_config(config_params)
    if setting is False or setting == "off":
        return None
    if isinstance(setting, str):
        p = bsa_presets.PRESETS[setting]
        return BSAParams.from_config(p.params) if p.enable_bsa and p.params else None
    # BSAParams too is checked (and its chunks made tuples): about 0.3 ms, once a forward at most
    return BSAParams.from_config(setting.config() if isinstance(setting, BSAParams) else setting)


def kept_chunks(token_grid: tuple[int, int, int], bsa: BSAParams) -> int | None:
    """Key chunks each query chunk keeps by top-k over this token grid (None: chosen by the
    CDF, or one frame, where the blocks attend densely). 0 at small sizes: then the attention
    output is zero, as in the original, and the pipeline warns."""
    if token_grid[0] <= 1 or bsa.cdf_threshold is not None:
        return None
    return chunks.kept_per_query(bsa.sparsity, chunks.ChunkGrid(token_grid, bsa.chunk_k).num_chunks)


@dataclass(frozen=True)
class AttnSettings:
    """How one DiT forward attends; the forward hands it to every block."""

    bsa: BSAParams | None = None
    fast: bool = False  # fused glue (runner.fast_ops) for bf16/fp16 activations
    cp: ContextParallel | None = None  # tokens split over ranks (runner.context_parallel)
    # the self-attention kinds (dense, bsa) this forward runs quantized: an fp8 model's
    # ``fp8_attention`` (kernels.fp8_attention)
    fp8: frozenset[str] = frozenset()


def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fp8: bool = False) -> torch.Tensor:
    """Non-causal softmax attention on ``[B, H, S, D]``."""
    return kernels.attention(q, k, v, fp8=fp8)


def dense_fp8_rows(qkv: torch.Tensor, heads: int, q_weight: torch.Tensor,
                   k_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   eps: float) -> fp8_ops.Rows | None:
    """Dense fp8 self-attention straight from the qkv projection to the e4m3 rows of the
    output projection (``kernels.dense.fp8_self_attention``), None where no kernel does that."""
    return kernels.dense.fp8_self_attention(qkv, heads, q_weight, k_weight, cos, sin, eps)


def block_sparse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 latent_shape_q: tuple[int, int, int], latent_shape_k: tuple[int, int, int],
                 params: BSAParams, fast: bool = False, fp8: bool = False) -> torch.Tensor:
    """3D block sparse attention with ``params``.

    ``fast`` (the fused path of bf16 runs): ``P @ V`` in bf16 as in the original's kernel
    instead of the kernels' float16 default, so V's chunk-major copy is a plain copy of the qkv
    projection's slice (no scaling); the output is written token-major so the projection
    reads it as is.
    ``fp8``: quantized where ``kernels.fp8_attention`` has a kernel for the call.
    """
    return kernels.block_sparse_attention(
        q, k, v, latent_shape_q, latent_shape_k, sparsity=params.sparsity,
        cdf_threshold=params.cdf_threshold, chunk_q=tuple(params.chunk_q),
        chunk_k=tuple(params.chunk_k), pv_fp16=False if fast else None, token_major=fast,
        fp8=fp8)
