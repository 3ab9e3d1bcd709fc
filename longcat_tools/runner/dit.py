"""The LongCat-Video DiT (``LongCatVideoTransformer3DModel``), readable in one file.

A single-stream video DiT: 3D patch embedding, per-frame adaLN modulation, self-attention with
interleaved 3D RoPE and q/k RMSNorm, ungated cross-attention to the text, a gated SwiGLU FFN and
an adaLN final layer. Module and parameter names are the native checkpoint's, so a native state
dict loads as is (``runner.loading`` maps the other layouts onto these names).

Precision follows the original so that bf16 runs behave like it: inputs are cast to the weight
dtype (so timesteps are rounded to it), the timestep MLP, adaLN modulation and final layer run in
fp32 (the original's ``autocast(float32)`` regions), norms compute in fp32 and cast back, RoPE is
applied in fp32, and the output is fp32. In fp32 all of this is the identity.

Frame conditioning (i2v, vc, refine): the first ``num_cond_latents`` latent frames are clean
condition frames. Their tokens attend only to each other, noise tokens attend to everything, and
condition tokens get no cross-attention. The KV cache (video continuation) holds the condition
tokens' per-block K (after q/k-norm, before RoPE) and V, so the noise frames can be denoised
without recomputing the condition frames at every step.
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from longcat_tools.errors import LongcatError, UsageError
from longcat_tools.kernels import fp8 as fp8_ops
from longcat_tools.kernels import fp8_attention
from longcat_tools.model import fp8 as fp8_format
from longcat_tools.runner import attention as attn_ops
from longcat_tools.runner import fast_ops, lora_merge
from longcat_tools.runner.attention import AttnSettings, BSAParams
from longcat_tools.runner.context_parallel import ContextParallel, FrameSplit
from longcat_tools.runner.lora import LoraDelta, read_lora
from longcat_tools.runner.lora import apply as lora_apply
from longcat_tools.runner.settings import LOAD_RENAMES, resolve_device, spelled

KVCache = dict[int, tuple[torch.Tensor, torch.Tensor]]


class Prepared(NamedTuple):
    """A forward's inputs as the blocks take them (``LongCatTransformer3DModel._prepare``)."""

    x: torch.Tensor  # [B, N, C] patch tokens (this rank's frames under context parallel)
    t: torch.Tensor  # fp32 [B, T, Ct] per-frame timestep embeddings
    y: torch.Tensor  # [sum(y_lens), C] the packed text tokens
    y_lens: list[int]
    grid: tuple[int, int, int]
    split: FrameSplit
    attn: AttnSettings


class ModelSetting:
    """The type of ``MODEL_SETTING``: a forward argument left out, so the model's own setting
    applies (None is a value: dense attention)."""


MODEL_SETTING = ModelSetting()
# diffusers loading options with no meaning for this model (quantization has its own issue),
# with what to do instead.
_LOW_MEMORY = "load in a dtype with torch_dtype, then use enable_layerwise_casting or " \
    "enable_group_offload"
_HUB_LOCAL = ("a repo id is read from the local Hugging Face cache as org/name[@revision]; "
              "`longcat-tools download` fetches one")
_UNSUPPORTED_LOAD = {"quantization_config": _LOW_MEMORY, "variant": _LOW_MEMORY,
                     "dduf_entries": _LOW_MEMORY, "use_flashpack": _LOW_MEMORY,
                     "parallel_config": "use enable_context_parallel",
                     **dict.fromkeys(("cache_dir", "token", "force_download", "proxies"),
                                     _HUB_LOCAL)}


# what a checkpoint's DiT load takes besides device/dtype/revision: its own fp8 and device_map,
# and diffusers' switches that change nothing here (it streams safetensors, local files only)
_CHECKPOINT_LOAD = {"fp8", "device_map", "use_safetensors", "low_cpu_mem_usage",
                    "local_files_only", "output_loading_info"}


def _one_device(device_map: Any) -> str | torch.device:
    """A checkpoint's DiT loads whole onto one device: ``device_map`` may name it, no more."""
    if device_map is None:
        return "cpu"
    try:
        return torch.device(device_map)
    except (TypeError, RuntimeError):
        raise LongcatError(f"LongCatTransformer3DModel.from_pretrained: device_map "
                           f"{device_map!r}: only one device (e.g. \"cuda\") is supported; "
                           "for less GPU memory use enable_group_offload") from None


class Linear(nn.Linear):
    """``nn.Linear`` with run-time (unfused) LoRA adapters and an fp32 mode.

    The run uses these adapters rather than PEFT's (which also work on this model): they keep
    the original's arithmetic (fp32 inside its autocast regions, block-diagonal ups, where PEFT
    needs 3x the rank on qkv), switch between a task's adapters without editing the module
    tree, and stream with block swap. Speed against PEFT: benchmarks/results/offload.md."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.loras: list[LoraDelta] = []
        self.register_buffer("weight_scale", None)  # to_fp8: e4m3 weight, a scale per row

    def to_fp8(self) -> None:
        """Store the weight in e4m3 with a float32 scale per output row (``kernels.fp8``); on
        the meta device only the dtypes change (a loader fills them)."""
        w = self.weight
        if w.is_meta:
            q = torch.empty_like(w, dtype=fp8_ops.E4M3)
            scale = torch.empty(w.shape[0], device=w.device, dtype=torch.float32)
        else:
            q, scale = fp8_ops.quantize_weight(w.detach())
        self.weight = nn.Parameter(q, requires_grad=False)
        self.weight_scale = scale

    def forward(self, x: torch.Tensor | fp8_ops.Rows, fp32: bool = False) -> torch.Tensor:
        """``x`` may come scaled to e4m3 already (``fp8_ops.Rows``) where ``takes_rows``."""
        if self.weight_scale is not None:
            if self.weight.dtype != fp8_ops.E4M3:
                raise LongcatError("an fp8 layer's weight was cast to another dtype (after fp8, "
                                   "move the model with .to(device) only)")
            if isinstance(x, fp8_ops.Rows) and self.loras:
                raise ValueError("run-time LoRAs need the activation, not its e4m3 rows")
            out = fp8_ops.linear(x, self.weight, self.weight_scale, self.bias)
        elif isinstance(x, fp8_ops.Rows):
            raise ValueError("e4m3 rows given to a layer that is not fp8")
        elif fp32:
            bias = None if self.bias is None else self.bias.float()
            out = F.linear(x.float(), self.weight.float(), bias)
        else:
            out = F.linear(x, self.weight, self.bias)
        return lora_apply(out, self.loras, x, fp32)


def takes_rows(*layers: nn.Module) -> bool:
    """Whether these layers can read their shared input as e4m3 ``Rows``, so the kernel that
    computes it may write it so (``fast_ops``'s ``e4m3``): our fp8 ``Linear`` (``to_fp8``: a
    scale beside the e4m3 weight; diffusers' layerwise casting stores e4m3 weights without
    one and computes in bf16) without run-time LoRAs, and not wrapped by PEFT (LoRAs read the
    activation)."""
    return all(isinstance(m, Linear) and m.weight_scale is not None and fp8_ops.is_e4m3(m)
               and not m.loras for m in layers)


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` (the patch embedding) with run-time LoRA adapters, as :class:`Linear`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loras: list[LoraDelta] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return lora_apply(out, self.loras, x, False)


class RMSNorm(nn.Module):
    """Per-head RMSNorm computed in fp32, cast back, then scaled (the weight is not upcast)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 (weights upcast), cast back to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def modulate(norm: nn.Module, x: torch.Tensor, shift: torch.Tensor,
             scale: torch.Tensor) -> torch.Tensor:
    """``norm(x) * (1 + scale) + shift`` in fp32 with per-frame shift/scale, cast back."""
    return (norm(x.float()) * (scale + 1) + shift).to(x.dtype)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of 0..1000-scale timesteps: ``[cos | sin]`` (cos first), fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs.to(t.device)[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def rope_3d_table(grid: tuple[int, int, int], head_dim: int, device: torch.device,
                  base: float = 10000.0, t_positions: tuple[float, ...] | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[T*H*W, head_dim]`` of the 3D RoPE over a (T, H, W) token grid.

    The head dim splits into [t | h | w] parts of ``D - 4*(D//6)``, ``2*(D//6)``, ``2*(D//6)``
    channels; each angle is repeated for an interleaved channel pair; positions start at 0, or
    the time positions are ``t_positions`` (the avatar's reference frame sits elsewhere in time).
    """
    d_hw = 2 * (head_dim // 6)
    parts = []
    for axis, (n, d) in enumerate(zip(grid, (head_dim - 2 * d_hw, d_hw, d_hw), strict=True)):
        freqs = 1.0 / (base ** (torch.arange(0, d, 2)[: d // 2].float() / d))
        pos = torch.arange(n, dtype=torch.float32) if axis or t_positions is None \
            else torch.tensor(t_positions, dtype=torch.float32)
        angles = pos[:, None] * freqs[None]
        parts.append(angles.repeat_interleave(2, dim=-1))
    T, H, W = grid
    table = torch.cat([parts[0][:, None, None].expand(T, H, W, -1),
                       parts[1][None, :, None].expand(T, H, W, -1),
                       parts[2][None, None, :].expand(T, H, W, -1)], dim=-1).reshape(T * H * W, -1)
    table = table.to(device)
    return table.cos(), table.sin()


_ROPE_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def rope_table_cached(grid: tuple[int, int, int], head_dim: int, device: torch.device,
                      t_positions: tuple[float, ...] | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``rope_3d_table``, kept for the last few grids: every block of every step reuses it."""
    key = (tuple(grid), head_dim, torch.device(device), t_positions)
    if key not in _ROPE_CACHE:
        if len(_ROPE_CACHE) >= 4:
            _ROPE_CACHE.pop(next(iter(_ROPE_CACHE)))
        with torch.inference_mode(False), torch.no_grad():  # usable under autograd later too
            _ROPE_CACHE[key] = rope_3d_table(grid, head_dim, device, t_positions=t_positions)
    return _ROPE_CACHE[key]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin), in fp32."""
    xf = x.float()
    pairs = xf.unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return (xf * cos + rotated * sin).type_as(x)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.proj = Linear(dim, dim)

    @staticmethod
    def _sparse(grid: tuple[int, int, int], bsa: BSAParams | None) -> bool:
        """Whether a call attends block-sparsely: BSA asked for and more than one frame."""
        return bsa is not None and grid[0] > 1

    @staticmethod
    def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int, int],
                bsa: BSAParams | None, fast: bool = False,
                fp8: frozenset[str] = frozenset()) -> torch.Tensor:
        """Non-causal attention; BSA when ``bsa`` is given and the clip has more than one frame
        (the query/key frame counts follow from the token counts). ``fast``: BSA with the
        original's precision and a token-major output (``attn_ops.block_sparse``). ``fp8``:
        the kinds (dense, bsa) to quantize where ``kernels.fp8_attention`` has a kernel."""
        if SelfAttention._sparse(grid, bsa):
            hw = grid[1] * grid[2]
            return attn_ops.block_sparse(q, k, v, (q.shape[2] // hw, grid[1], grid[2]),
                                         (k.shape[2] // hw, grid[1], grid[2]), bsa, fast=fast,
                                         fp8="bsa" in fp8)
        return attn_ops.dense(q, k, v, fp8="dense" in fp8)

    def forward(self, x: torch.Tensor | fp8_ops.Rows, grid: tuple[int, int, int],
                num_cond_latents: int, attn: AttnSettings,
                kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                return_kv: bool = False, split: FrameSplit | None = None):
        """x holds this rank's tokens of ``grid`` (all of them without context parallel), as
        ``fp8_ops.Rows`` where the qkv projection ``takes_rows``."""
        B, N, C = x.shape
        qkv, heads, D = self.qkv(x), self.num_heads, self.head_dim
        cp, bsa = attn.cp, attn.bsa
        if cp is not None:  # from here on every token of the grid, for this rank's heads
            heads //= cp.size
            qkv = cp.to_heads(qkv.view(B, N, 3, self.num_heads, D), split)
            qkv = qkv.transpose(0, 1).reshape(B, -1, 3 * heads * D)  # a view when B == 1
        q, k, v = qkv.view(B, -1, 3, heads, D).permute(2, 0, 3, 1, 4)
        T, H, W = grid
        roped = kv_cache is None and not return_kv and fast_ops.use(attn.fast, x)
        if roped:  # norm + RoPE fused (q and k in one pass with the Triton kernels)
            cos, sin = rope_table_cached(grid, self.head_dim, x.device)
            if (cp is None and num_cond_latents == 0 and not self._sparse(grid, bsa)
                    and "dense" in attn.fp8 and takes_rows(self.proj)):
                rows = attn_ops.dense_fp8_rows(qkv, heads, self.q_norm.weight,
                                               self.k_norm.weight, cos, sin, self.q_norm.eps)
                if rows is not None:
                    return self.proj(rows), None
            q, k = fast_ops.qk_norm_rope(qkv, heads, self.q_norm.weight, self.k_norm.weight,
                                         cos, sin, self.q_norm.eps)
        else:
            q, k = self.q_norm(q), self.k_norm(k)
        new_kv = (k.clone(), v.clone()) if return_kv else None
        if kv_cache is not None:
            # cached condition K/V first; RoPE over the (cond + noise) grid, new tokens after them
            k_c, v_c = (t.to(x.device) for t in kv_cache)
            if k_c.shape[0] == 1 and B > 1:
                k_c, v_c = k_c.expand(B, -1, -1, -1), v_c.expand(B, -1, -1, -1)
            n_c = k_c.shape[2]
            cos, sin = rope_table_cached((T + num_cond_latents, H, W), self.head_dim, x.device)
            k = torch.cat([apply_rope(k_c, cos[:n_c], sin[:n_c]),
                           apply_rope(k, cos[n_c:], sin[n_c:])], dim=2)
            v = torch.cat([v_c, v], dim=2)
            q = apply_rope(q, cos[n_c:], sin[n_c:])
            out = self._attend(q, k, v, grid, bsa, fp8=attn.fp8)
        else:
            if not roped:
                cos, sin = rope_table_cached(grid, self.head_dim, x.device)
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            if num_cond_latents > 0:
                n_c = num_cond_latents * H * W
                out = torch.cat([self._attend(q[:, :, :n_c], k[:, :, :n_c], v[:, :, :n_c], grid,
                                              bsa, fp8=attn.fp8),
                                 self._attend(q[:, :, n_c:], k, v, grid, bsa, fp8=attn.fp8)],
                                dim=2)
            else:
                out = self._attend(q, k, v, grid, bsa, fast=roped, fp8=attn.fp8)
        out = out.transpose(1, 2).reshape(B, N, C) if cp is None else cp.to_tokens(out, split)
        return self.proj(out), new_kv


class CrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_linear = Linear(dim, dim)
        self.kv_linear = Linear(dim, 2 * dim)
        self.proj = Linear(dim, dim)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)

    def forward(self, x: torch.Tensor | fp8_ops.Rows, y: torch.Tensor, y_lens: list[int],
                fast: bool = False) -> torch.Tensor:
        """x [B, N, C] (or its e4m3 rows) attends to its own sample's text; y [sum(y_lens), C]
        packs the texts."""
        B, N, C = x.shape
        if fast:
            q = fast_ops.head_rms_norm(self.q_linear(x), self.num_heads, self.q_norm.weight,
                                       self.q_norm.eps)
        else:
            q = self.q_norm(self.q_linear(x).view(B, N, self.num_heads, self.head_dim))
            q = q.transpose(1, 2)
        k, v = self.kv_linear(y).view(-1, 2, self.num_heads, self.head_dim).unbind(1)
        k = self.k_norm(k)
        if len(set(y_lens)) == 1:
            k = k.view(B, y_lens[0], self.num_heads, self.head_dim).transpose(1, 2)
            v = v.view(B, y_lens[0], self.num_heads, self.head_dim).transpose(1, 2)
            out = attn_ops.dense(q, k, v)
        else:
            outs, start = [], 0
            for b, n in enumerate(y_lens):
                kb = k[start:start + n].transpose(0, 1)[None]
                vb = v[start:start + n].transpose(0, 1)[None]
                outs.append(attn_ops.dense(q[b:b + 1], kb, vb))
                start += n
            out = torch.cat(outs)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = Linear(dim, hidden, bias=False)
        self.w2 = Linear(hidden, dim, bias=False)
        self.w3 = Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor | fp8_ops.Rows, fast: bool = False) -> torch.Tensor:
        if not isinstance(x, fp8_ops.Rows) and takes_rows(self.w1, self.w3):
            x = fp8_ops.quantize_input(x)  # w1 and w3 share x's scaling
        a, b = self.w1(x), self.w3(x)
        if fast:
            return self.w2(fast_ops.swiglu(a, b, e4m3=takes_rows(self.w2)))
        return self.w2(F.silu(a) * b)


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, ffn_hidden: int, t_dim: int) -> None:
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(t_dim, 6 * dim))
        self.mod_norm_attn = LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.mod_norm_ffn = LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.pre_crs_attn_norm = LayerNorm(dim, eps=1e-6, elementwise_affine=True)
        self.attn = SelfAttention(dim, num_heads)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.ffn = FeedForward(dim, ffn_hidden)

    def forward(self, x: torch.Tensor, y: torch.Tensor, y_lens: list[int], t: torch.Tensor,
                grid: tuple[int, int, int], num_cond_latents: int,
                kv_cache: tuple[torch.Tensor, torch.Tensor] | None, return_kv: bool,
                skip_crs_attn: bool, split: FrameSplit, attn: AttnSettings):
        """x [B, N, C]: the ``split.count`` latent frames from ``split.start`` of ``grid``."""
        B, N, C = x.shape
        T = split.count
        frames = (B, T, N // T, C)  # modulation is per latent frame
        mod = self.adaLN_modulation[1](F.silu(t), fp32=True).unsqueeze(2).chunk(6, dim=-1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod  # [B, T, 1, C]

        if fast_ops.use(attn.fast, x):
            return self._forward_fast(x, y, y_lens, mod, grid, num_cond_latents, kv_cache,
                                      return_kv, skip_crs_attn, split, attn)
        h = modulate(self.mod_norm_attn, x.view(frames), shift_msa, scale_msa)
        h, new_kv = self.attn(h.view(B, N, C), grid, num_cond_latents, attn, kv_cache,
                              return_kv, split)
        x = (x + (gate_msa * h.view(frames)).view(B, N, C)).to(x.dtype)

        if not skip_crs_attn:
            h = self.pre_crs_attn_norm(x)
            x = x + self._cross(h, y, y_lens, T, _local_cond(num_cond_latents, kv_cache, split),
                                False)

        h = modulate(self.mod_norm_ffn, x.view(frames), shift_mlp, scale_mlp).view(B, N, C)
        x = (x + (gate_mlp * self.ffn(h).view(frames)).view(B, N, C)).to(x.dtype)
        return x, new_kv

    def _cross(self, h: torch.Tensor | fp8_ops.Rows, y: torch.Tensor, y_lens: list[int], T: int,
               cond_frames: int, fast: bool) -> torch.Tensor:
        """Cross-attention output for every token of the T frames here, the first
        ``cond_frames`` of which are condition frames (zeros for them: no text)."""
        B, N, C = h.shape
        if cond_frames > 0:
            n_c = cond_frames * (N // T)
            rest = fp8_ops.Rows(h.q[:, n_c:], h.scale[:, n_c:], h.dtype) \
                if isinstance(h, fp8_ops.Rows) else h[:, n_c:]
            out = self.cross_attn(rest, y, y_lens, fast)
            return torch.cat([out.new_zeros(B, n_c, C), out], dim=1)
        return self.cross_attn(h, y, y_lens, fast)

    def _forward_fast(self, x, y, y_lens, mod, grid, num_cond_latents, kv_cache, return_kv,
                      skip_crs_attn, split: FrameSplit, attn: AttnSettings):
        """The same block with fused glue (runner.fast_ops): each residual is fused with the
        norm that reads its result, so the residual stream is read and written once per step."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        T = split.count
        ffn_rows = takes_rows(self.ffn.w1, self.ffn.w3)  # fp8: GEMM inputs written as e4m3
        _, h = fast_ops.adaln(x, T, shift_msa, scale_msa, self.mod_norm_attn.eps,
                              e4m3=takes_rows(self.attn.qkv))
        h, new_kv = self.attn(h, grid, num_cond_latents, attn, kv_cache, return_kv, split)
        if skip_crs_attn:
            x, h = fast_ops.adaln(x, T, shift_mlp, scale_mlp, self.mod_norm_ffn.eps, res=h,
                                  gate=gate_msa, e4m3=ffn_rows)
        else:
            norm = self.pre_crs_attn_norm
            x, h = fast_ops.residual_layer_norm(x, T, h, gate_msa, norm.weight, norm.bias,
                                                norm.eps,
                                                e4m3=takes_rows(self.cross_attn.q_linear))
            out = self._cross(h, y, y_lens, T, _local_cond(num_cond_latents, kv_cache, split),
                              True)
            x, h = fast_ops.adaln(x, T, shift_mlp, scale_mlp, self.mod_norm_ffn.eps, res=out,
                                  e4m3=ffn_rows)
        return fast_ops.residual(x, T, self.ffn(h, True), gate_mlp), new_kv


def _local_cond(num_cond_latents: int, kv_cache: Any, split: FrameSplit) -> int:
    """Condition frames among this rank's frames (none when they sit in the KV cache)."""
    if kv_cache is not None:
        return 0
    return min(max(num_cond_latents - split.start, 0), split.count)


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int, t_dim: int) -> None:
        super().__init__()
        self.norm_final = LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.linear = Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(t_dim, 2 * dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor, T: int) -> torch.Tensor:
        B, N, C = x.shape
        shift, scale = self.adaLN_modulation[1](F.silu(t), fp32=True).unsqueeze(2).chunk(2, dim=-1)
        x = modulate(self.norm_final, x.view(B, T, N // T, C), shift, scale).view(B, N, C)
        return self.linear(x, fp32=True)


def _apply_pending_loras(model: LongCatTransformer3DModel, *_: Any) -> None:
    """Forward and ``state_dict`` pre-hook: a lazily enabled LoRA set takes effect first."""
    model.sync_loras()


def torch_dtype_of(torch_dtype: Any, dtype: Any) -> Any:
    """``torch_dtype=``, or ``dtype=`` (diffusers' newer name); both given was one of them
    silently."""
    if torch_dtype is not None and dtype is not None and torch_dtype != dtype:
        raise UsageError(f"from_pretrained: torch_dtype={torch_dtype} and dtype={dtype}; "
                         "give one of them")
    return dtype if dtype is not None else torch_dtype


def check_inputs(x: Any, t: Any, y: Any, channels: int) -> None:
    """A forward's inputs as the docstring gives them, one line each (a 0-d timestep or a batch
    mismatch failed in a matmul or a view)."""
    for name, value, dims in (("hidden_states", x, (5,)), ("timestep", t, (1, 2)),
                              ("encoder_hidden_states", y, (4,))):
        if not isinstance(value, torch.Tensor) or value.dim() not in dims:
            shown = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise UsageError(f"forward: {name} {shown}: expected a tensor of "
                             f"{' or '.join(map(str, dims))} dimensions (see forward's docstring)")
    if x.shape[1] != channels:
        raise UsageError(f"forward: hidden_states has {x.shape[1]} channels, the model takes "
                         f"{channels}")
    if t.shape[0] != x.shape[0] or y.shape[0] != x.shape[0] or (
            t.dim() == 2 and t.shape[1] != x.shape[2]):
        raise UsageError(f"forward: timestep {list(t.shape)} and encoder_hidden_states "
                         f"{list(y.shape)} must match hidden_states {list(x.shape)}: [B] or "
                         "[B, T], and [B, 1, L, C]")


class LongCatTransformer3DModel(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """The DiT, as a diffusers model: ``from_pretrained`` (any layout, either key flavour, or a
    ``save_pretrained`` folder), ``torch_dtype``, PEFT adapters (``load_lora_adapter``), group
    offloading and hooks. The config fields are the native ``config.json``'s; FastVideo's
    ``num_attention_heads`` is accepted for ``num_heads``. The attention-backend flags of the
    original (``enable_flashattn3``...) are kept in the config but not used: the runner picks its
    own kernels."""

    _supports_gradient_checkpointing = False
    _no_split_modules = ["Block"]
    # Norm weights are read directly by the fused glue, so their hooks would not run; the patch
    # embedding's dtype is the model's compute dtype.
    _skip_layerwise_casting_patterns = ["x_embedder", "norm"]

    @register_to_config
    def __init__(self, in_channels: int = 16, out_channels: int = 16, hidden_size: int = 4096,
                 depth: int = 48, num_heads: int = 32, caption_channels: int = 4096,
                 mlp_ratio: float = 4, adaln_tembed_dim: int = 512,
                 frequency_embedding_size: int = 256,
                 patch_size: tuple[int, int, int] = (1, 2, 2), enable_bsa: bool = False,
                 bsa_params: dict[str, Any] | None = None, text_tokens_zero_pad: bool = False,
                 cp_split_hw: list[int] | None = None, enable_flashattn3: bool = False,
                 enable_flashattn2: bool = False, enable_xformers: bool = False,
                 num_attention_heads: int | None = None) -> None:
        super().__init__()
        from longcat_tools.model import keymap

        if num_attention_heads is not None:  # FastVideo's name: the config keeps one
            self.register_to_config(num_heads=num_attention_heads, num_attention_heads=None)
        dims = keymap.dit_dims(self.config)
        self.dims = dims
        if dims.patch_size[0] != 1:
            raise ValueError("the DiT does not patch the time axis (patch_size[0] must be 1)")
        C, Ct = dims.hidden_size, dims.adaln_tembed_dim
        self.patch_size = dims.patch_size
        self.out_channels = dims.out_channels
        self.text_tokens_zero_pad = bool(text_tokens_zero_pad)
        self.bsa: BSAParams | None = None  # the default of every forward (config enable_bsa)
        self.fast = False  # fused glue (runner.fast_ops) for bf16/fp16 activations
        self.cp: ContextParallel | None = None  # tokens split over ranks (context parallel)
        self.fp8_attention: frozenset[str] | None = None  # None: fp8_attention.ENABLED's kinds
        self.x_embedder = nn.Module()
        self.x_embedder.proj = Conv3d(dims.in_channels, C, dims.patch_size, dims.patch_size)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(Linear(dims.frequency_embedding_size, Ct), nn.SiLU(),
                                            Linear(Ct, Ct))
        self.y_embedder = nn.Module()
        self.y_embedder.y_proj = nn.Sequential(Linear(dims.caption_channels, C),
                                               nn.GELU(approximate="tanh"), Linear(C, C))
        self.blocks = nn.ModuleList(self._make_block() for _ in range(dims.depth))
        self.final_layer = FinalLayer(C, dims.patch_volume * dims.out_channels, Ct)
        self.lora_registry: dict[str, dict[str, LoraDelta]] = {}
        self.active_loras: list[str] = []
        self._lora_mode = "merge"
        self._lora_merged: lora_merge.Merged | None = None  # the set in the weights
        self._lora_pending: list[str] | None = None  # a lazy enable the weights do not show yet
        self.register_forward_pre_hook(_apply_pending_loras)
        self.register_state_dict_pre_hook(_apply_pending_loras)
        if enable_bsa:
            self.enable_bsa()

    def _make_block(self) -> Block:
        """One transformer block (a subclass builds its own kind)."""
        d = self.dims
        return Block(d.hidden_size, d.num_heads, d.ffn_hidden, d.adaln_tembed_dim)

    @classmethod
    @spelled(LOAD_RENAMES)
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path,
                        subfolder: str | None = None, torch_dtype: torch.dtype | None = None,
                        **kwargs: Any) -> LongCatTransformer3DModel:
        """Load the DiT of a checkpoint (its root, or ``subfolder`` "dit" / "transformer") or of
        a ``save_pretrained`` folder, directly in ``torch_dtype`` (default fp32) and onto
        ``device`` (or a ``device_map`` naming one device; default the CPU). ``fp8`` (a
        checkpoint's DiT; None: as stored) runs the block GEMMs in e4m3 (``to_fp8``).

        A checkpoint's DiT goes through ``runner.loading``, not diffusers' loader: FastVideo's
        flavour splits ``qkv``/``kv_linear`` into several tensors, which a one-name-one-tensor
        loader cannot fill, and ours checks every shape before it copies and streams one tensor
        at a time. A ``save_pretrained`` folder (native names) goes through diffusers'."""
        from longcat_tools.checkpoint.hub import resolve_source
        from longcat_tools.runner.loading import find_transformer, load_transformer, parse_dtype

        device = kwargs.pop("device", None)
        if device is not None:  # torch listed every device type, or asserted (no CUDA)
            device = resolve_device(device)
        torch_dtype = torch_dtype_of(torch_dtype, kwargs.pop("dtype", None))
        unsupported = {k: v for k, v in kwargs.items() if k in _UNSUPPORTED_LOAD and v}
        if unsupported:
            name = next(iter(unsupported))
            raise LongcatError(f"LongCatTransformer3DModel.from_pretrained: '{name}' is not "
                               f"supported ({_UNSUPPORTED_LOAD[name]})")
        revision = kwargs.pop("revision", None)
        if revision and not Path(pretrained_model_name_or_path).exists():
            pretrained_model_name_or_path = f"{pretrained_model_name_or_path}@{revision}"
        if torch_dtype is not None:  # "bf16" too, on both paths (diffusers only warned)
            torch_dtype = parse_dtype(torch_dtype)
        path = find_transformer(pretrained_model_name_or_path, subfolder)
        if path is None:  # a save_pretrained folder
            folder = resolve_source(pretrained_model_name_or_path) / (subfolder or "")
            model = super().from_pretrained(folder, torch_dtype=torch_dtype, **kwargs)
            return model if device is None else model.to(device)
        unknown = sorted(k for k, v in kwargs.items()  # diffusers' loader passes None/False
                         if k not in _CHECKPOINT_LOAD and v is not None and v is not False)
        if unknown:  # a typo (torch_dype) or a config override loaded as if not given
            raise LongcatError(f"LongCatTransformer3DModel.from_pretrained: '{unknown[0]}' is not "
                               f"a keyword it takes from a checkpoint (it takes torch_dtype, "
                               f"device, revision, {', '.join(sorted(_CHECKPOINT_LOAD))})")
        if kwargs.get("output_loading_info"):
            raise LongcatError("LongCatTransformer3DModel.from_pretrained: output_loading_info "
                               "is for save_pretrained folders; a checkpoint's DiT is checked "
                               "whole before it loads (nothing is missing or unexpected)")
        return load_transformer(path, device=device or _one_device(kwargs.get("device_map")),
                                dtype=torch_dtype or torch.float32, fp8=kwargs.get("fp8"))

    # ---- BSA -------------------------------------------------------------------------------
    def enable_bsa(self, params: attn_ops.BSASetting = None) -> None:
        """Make BSA the default of every forward, with ``params`` (config-style dict, BSAParams,
        a preset name) or the config's; a forward's ``bsa`` argument overrides it."""
        self.bsa = self._bsa("on" if params is None else params)

    def _bsa(self, setting: attn_ops.BSASetting) -> BSAParams | None:
        """A BSA setting as ``pipe(bsa=...)`` takes it, checked, on this model's config."""
        return attn_ops.resolve_bsa(setting, self.bsa, self.config.bsa_params)

    def disable_bsa(self) -> None:
        self.bsa = None

    def enable_context_parallel(self, cp: ContextParallel | None) -> None:
        """Split every forward's tokens over ``cp``'s ranks (None: one process)."""
        if cp is not None and self.dims.num_heads % cp.size:
            raise LongcatError(f"context parallel over {cp.size} processes: the DiT's "
                               f"{self.dims.num_heads} heads must divide evenly (use a divisor)")
        self.cp = cp

    def to_fp8(self) -> None:
        """Run the block GEMMs (``model.fp8.BLOCK_LINEARS``) in e4m3: each weight is quantized
        in place, one at a time, with a float32 scale per output row; activations are scaled
        per token on every call. The embedders, adaLN modulations, norms and the final layer
        (the original's fp32 islands) keep their dtype. On the meta device only the dtypes
        change, so a loader can fill e4m3 weights straight from an fp8 checkpoint."""
        for name, module in self.named_modules():
            if isinstance(module, Linear) and module.weight_scale is None \
                    and fp8_format.is_quantized(name):
                module.to_fp8()

    @property
    def is_fp8(self) -> bool:
        return fp8_ops.is_e4m3(self.blocks[0].attn.qkv)

    def quantized_attention(self) -> frozenset[str]:
        """The self-attention kinds (dense, bsa) a forward runs quantized: an fp8 model's
        ``fp8_attention`` (None: ``kernels.fp8_attention.ENABLED``'s); none otherwise."""
        kinds = self.fp8_attention
        if kinds is not None and not set(kinds) <= set(fp8_attention.KINDS):
            raise LongcatError(f"fp8_attention {sorted(kinds)}: the kinds are "
                               f"{', '.join(fp8_attention.KINDS)}")
        if not self.is_fp8:
            return frozenset()
        return fp8_attention.default_kinds() if kinds is None else frozenset(kinds)

    def enable_fast_ops(self, enabled: bool = True) -> None:
        """Fused glue (``runner.fast_ops``) for bf16/fp16 runs; fp32 always takes the plain path."""
        self.fast = enabled

    # ---- LoRA ------------------------------------------------------------------------------
    def load_lora_adapter(self, *args: Any, **kwargs: Any) -> Any:
        """diffusers' PEFT loader, refused on an fp8 model (``to_fp8``): PEFT casts an adapter
        to its base layer's weight dtype, e4m3, and its forward then fails."""
        if self.is_fp8 and getattr(self.blocks[0].attn.qkv, "weight_scale", None) is not None:
            raise LongcatError("an fp8 model takes LoRAs through load_lora and enable_loras "
                               "(merged into its e4m3 weights, or at run time), not PEFT's "
                               "load_lora_adapter, which would cast them to e4m3")
        return super().load_lora_adapter(*args, **kwargs)

    def load_lora(self, path: str, name: str, scale: float = 1.0) -> None:
        """Read an adapter file (native or FastVideo format); it stays off until enabled."""
        from longcat_tools.lora.registry import check_scale

        if not isinstance(name, str) or not name.strip():  # None broke enable_loras' message
            raise UsageError(f"load_lora: name={name!r}: give the adapter a name")
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise UsageError(f"load_lora: scale={scale!r}: expected a number")
        check_scale(float(scale), "load_lora: scale")  # NaN merged NaN into every target
        self.lora_registry[name] = read_lora(path, self, multiplier=float(scale))

    @property
    def lora_mode(self) -> str:
        """How enabled adapters apply. "merge" (the default): a set is added into the weights
        once (``runner.lora_merge``), so steps cost nothing extra, and restored bit for bit when
        it is disabled or another set or scale is enabled; meanwhile ``state_dict`` holds the
        merged weights. "runtime": each forward adds the adapters' updates (``runner.lora``);
        the weights are never touched. A set ``lora fuse`` cannot merge (fp8 weights) or a model
        under diffusers' group offload or layerwise casting runs at run time in either mode.
        Changing the mode applies the set in effect the new way."""
        return self._lora_mode

    @lora_mode.setter
    def lora_mode(self, mode: str) -> None:
        from longcat_tools.runner.settings import LORA_MODES

        if mode not in LORA_MODES:
            raise LongcatError(f"lora_mode {mode!r}: unknown (use {' or '.join(LORA_MODES)})")
        if mode != self._lora_mode:
            self._lora_mode = mode
            self.enable_loras(self.active_loras)

    @property
    def merged_loras(self) -> list[str]:
        """The adapters merged into the weights right now (a lazy enable may not show yet)."""
        return list(self._lora_merged.names) if self._lora_merged is not None else []

    def enable_loras(self, names: list[str], lazy: bool = False) -> None:
        """Activate exactly these adapters (summed, in this order), on the model's device/dtype.

        In merge mode a set already merged at the same scales costs nothing; another set is
        restored first. ``lazy`` (merge mode): the set takes effect at the model's next use (a
        forward, ``state_dict``, ``save_pretrained``, another enable), the weights meanwhile
        keeping what they hold, so a pipeline call that ends by giving back the caller's set
        leaves its own merged for a next call that wants it again; on a model with no adapter
        applied, a set enabled lazily is merged together with what a pipeline call adds to it,
        once."""
        if isinstance(names, str):  # its letters were taken for names: "LoRA 'r' is not loaded"
            raise UsageError(f"enable_loras({names!r}): give a list of names "
                             f"(enable_loras([{names!r}]))")
        names = list(names)
        if len(set(names)) != len(names):  # it was applied twice
            raise UsageError(f"enable_loras({names!r}): an adapter is listed twice (scale it "
                             "with load_lora's scale instead)")
        missing = [n for n in names if n not in self.lora_registry]
        if missing:
            raise UsageError(f"LoRA '{missing[0]}' is not loaded (load_lora first; loaded: "
                             f"{', '.join(self.lora_registry) or 'none'})")
        modules = dict(self.named_modules())
        for name in names:
            for module in self.lora_registry[name]:
                layer = modules[module]
                if not isinstance(getattr(getattr(layer, "base_layer", layer), "loras", None),
                                  list):
                    raise LongcatError(f"LoRA '{name}' targets {module}, a "
                                       f"{type(layer).__name__}, which takes no adapters")
        if lazy and (self._lora_merged is not None or not self.active_loras):
            held = self._lora_merged  # none: nothing applied, so nothing to keep or restore
            self.active_loras = names
            self._lora_pending = None if (held.matches(self.lora_registry, names)
                                          if held is not None else not names) else names
            return
        self._lora_pending = None
        for m in self.modules():
            if isinstance(getattr(m, "loras", None), list):
                m.loras = []
        merge = bool(names) and self._lora_mode == "merge" \
            and lora_merge.mergeable(self, self.lora_registry, names)
        if merge and self._lora_merged is not None \
                and self._lora_merged.matches(self.lora_registry, names):
            self.active_loras = names
            return
        self.active_loras = []
        if self._lora_merged is not None:  # kept if restoring fails: the weights still hold it
            lora_merge.restore(self, self._lora_merged)
            self._lora_merged = None
        if merge:
            self._lora_merged = lora_merge.merge(self, self.lora_registry, names)
            self.active_loras = names
            return
        p = self.x_embedder.proj.weight
        for name in names:
            for module, delta in self.lora_registry[name].items():
                target = modules[module]  # a PEFT adapter wraps it as base_layer
                getattr(target, "base_layer", target).loras.append(delta.to(p.device, p.dtype))
            self.active_loras.append(name)

    def disable_loras(self) -> None:
        """No adapter in effect; merged weights are restored exactly."""
        self.enable_loras([])

    def sync_loras(self) -> None:
        """Make the weights follow a lazy enable now (every forward and ``state_dict`` does)."""
        if self._lora_pending is not None:
            self.enable_loras(self._lora_pending)

    def check_save(self, save_directory: str | Path) -> None:
        """Why ``save_pretrained`` must not write: adapters merged into the weights (it would
        write them in; ``lora fuse`` makes a merged checkpoint on purpose), or a folder inside a
        checkpoint, whose shards diffusers would delete, leaving its index naming them."""
        from longcat_tools.io.atomic import check_outside_checkpoints

        check_outside_checkpoints(Path(save_directory), "save_pretrained's folder")
        self.sync_loras()
        if self._lora_merged is not None:
            raise LongcatError(f"save_pretrained: LoRA {', '.join(self.merged_loras)} is merged "
                               "into the weights; call disable_loras() first")

    def save_pretrained(self, save_directory: str | Path, *args: Any,
                        **kwargs: Any) -> None:
        """diffusers' ``save_pretrained``, after ``check_save``."""
        self.check_save(save_directory)
        return super().save_pretrained(save_directory, *args, **kwargs)

    # ---- forward ---------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.proj.weight.dtype

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: torch.Tensor | None = None, num_cond_latents: int = 0,
                return_kv: bool = False, kv_cache: KVCache | None = None,
                skip_crs_attn: bool = False, offload_kv_cache: bool = False,
                bsa: attn_ops.BSASetting | ModelSetting = MODEL_SETTING):
        """Predict the flow-matching velocity target (``x0 - noise``; the pipeline negates it).

        hidden_states [B, C_in, T, H, W]; timestep [B] or per frame [B, T] on the 0..1000 scale;
        encoder_hidden_states [B, 1, L, caption_channels]; encoder_attention_mask [B, L].
        With ``kv_cache`` (from ``return_kv=True`` on the condition latents alone), hidden_states
        are the noise frames only and ``num_cond_latents`` says how many frames were cached.
        ``bsa``: this forward's BSA (None: dense; else as ``enable_bsa`` takes it); left out, the
        model's (``enable_bsa``).
        Returns fp32 [B, C_out, T, H, W], and the new cache when ``return_kv``.
        """
        p = self._prepare(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                          bsa)
        x, new_cache = self._run_blocks(p, num_cond_latents, kv_cache, return_kv, skip_crs_attn,
                                        offload_kv_cache)
        x = self._finish(p, x)
        return (x, new_cache) if return_kv else x

    def _prepare(self, hidden_states: torch.Tensor, timestep: torch.Tensor,
                 encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor | None,
                 bsa: attn_ops.BSASetting | ModelSetting) -> Prepared:
        """The forward up to the blocks: patch, timestep and text embeddings (a subclass's
        forward adds its own inputs between this and ``_run_blocks``)."""
        check_inputs(hidden_states, timestep, encoder_hidden_states, self.dims.in_channels)
        B, _, T, H, W = hidden_states.shape
        pt, ph, pw = self.patch_size
        if H % ph or W % pw:
            raise ValueError(f"latent height/width {H}x{W} must be divisible by the patch "
                             f"{ph}x{pw}")
        grid = (T // pt, H // ph, W // pw)
        if timestep.dim() == 1:
            timestep = timestep[:, None].expand(-1, grid[0])
        dtype = self.dtype
        x = hidden_states.to(dtype)
        timestep = timestep.to(dtype)
        y = encoder_hidden_states.to(dtype)

        cp = self.cp
        params = self.bsa if bsa is MODEL_SETTING else None if bsa is None else self._bsa(bsa)
        attn = AttnSettings(params, self.fast, cp, fp8=self.quantized_attention())
        if cp is None:
            split = FrameSplit(0, grid[0], (grid[0] * grid[1] * grid[2],))
        else:  # this rank's latent frames only (the time axis is not patched)
            split = cp.split(grid)
            x = x[:, :, split.start:split.start + split.count]
        x = self.x_embedder.proj(x).flatten(2).transpose(1, 2)  # [B, N, C], THW raster order

        t_freq = timestep_embedding(timestep.float().flatten(), self.dims.frequency_embedding_size)
        mlp = self.t_embedder.mlp
        t = mlp[2](F.silu(mlp[0](t_freq, fp32=True)), fp32=True).reshape(B, grid[0], -1)
        t = t[:, split.start:split.start + split.count]

        y = self.y_embedder.y_proj(y)  # [B, 1, L, C]
        mask = encoder_attention_mask
        if self.text_tokens_zero_pad and mask is not None:
            y = y * mask[:, None, :, None]  # padded tokens become exact zeros but stay attended
            mask = None
        C = y.shape[-1]
        if mask is not None:
            mask = mask.reshape(B, -1)
            y = y.squeeze(1)[mask != 0]  # [sum(valid), C]
            y_lens = mask.ne(0).sum(dim=1).tolist()
        else:
            y_lens = [y.shape[2]] * B
            y = y.reshape(-1, C)

        return Prepared(x, t, y, y_lens, grid, split, attn)

    def _run_blocks(self, p: Prepared, num_cond_latents: int, kv_cache: KVCache | None,
                    return_kv: bool, skip_crs_attn: bool, offload_kv_cache: bool,
                    **extra: Any) -> tuple[torch.Tensor, KVCache]:
        """Every block in turn (``extra``: a subclass's blocks' own keyword arguments)."""
        x, new_cache = p.x, {}
        for i, block in enumerate(self.blocks):
            cache_i = kv_cache.get(i) if kv_cache else None
            x, kv = block(x, p.y, p.y_lens, p.t, p.grid, num_cond_latents, cache_i, return_kv,
                          skip_crs_attn, p.split, p.attn, **extra)
            if return_kv:
                new_cache[i] = (kv[0].cpu(), kv[1].cpu()) if offload_kv_cache else \
                    (kv[0].contiguous(), kv[1].contiguous())
        return x, new_cache

    def _finish(self, p: Prepared, x: torch.Tensor) -> torch.Tensor:
        """Final layer and unpatchify: fp32 [B, C_out, T, H, W]."""
        B, grid, split = x.shape[0], p.grid, p.split
        pt, ph, pw = self.patch_size
        x = self.final_layer(x, p.t, split.count)  # fp32 [B, N, pt*ph*pw*C_out]
        if self.cp is not None:
            x = self.cp.gather_tokens(x, split)
        Nt, Nh, Nw = grid
        x = x.view(B, Nt, Nh, Nw, pt, ph, pw, self.out_channels)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(B, self.out_channels, Nt * pt, Nh * ph,
                                                       Nw * pw)
        return x.to(torch.float32)
