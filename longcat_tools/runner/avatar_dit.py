"""The LongCat-Video-Avatar DiT (1.0 and 1.5): the base DiT driven by speech.

Built from ``runner.dit``'s pieces, with the native checkpoint's parameter names. On top of the
base it adds, per block, an audio cross-attention after the text cross-attention: the video
tokens of each latent frame (LayerNorm ``pre_video_crs_attn_norm``) attend to that frame's audio
tokens only (optionally LayerNorm ``pre_audio_crs_attn_norm``, config ``audio_prenorm``); the
output is layer-normed, modulated and gated per frame by ``audio_adaLN_modulation`` of the
timestep, and added to the noise frames (condition frames get exactly nothing). The audio tokens
come from ``audio_proj``: each latent frame's window of audio-encoder features (the first frame
its own ``audio_window`` frames, later ones the overlapping windows of their ``vae_scale`` video
frames) is projected to ``context_tokens`` tokens of ``output_dim``.

Reference latent (video continuation): a clean latent at tensor index 0 whose RoPE time is
``ref_img_index`` (the others shift down by one). It attends only to itself, the condition
frames only among themselves, and the noise frames within ``mask_frame_range`` of
``ref_img_index`` do not see it; those masked attentions always run dense (BSA off), as in the
original.

Several speakers (``ref_target_masks``, batch 1): one audio track per speaker, their tokens side
by side; every block derives from its own self-attention how much each noise token looks at each
speaker's region of the first latent frame, and a 1-D RoPE over "speaker slots" places each
query near its speaker's audio tokens (speaker 1 at 0..4, speaker 2 at 20..24, background 12).

The original computes the audio cross-attention only with flash-attn or xformers enabled; with
none of its attention flags set it silently returns its input. This model always computes the
attention (what the released configurations run); the flags are kept in the config, unused.

Precision mirrors the original as ``runner.dit`` does: fp32 modulations, norms and RoPE, casts
at the same points. Context parallel is not supported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config
from torch import nn

from longcat_tools.checkpoint import layouts
from longcat_tools.errors import LongcatError
from longcat_tools.io import jsonio
from longcat_tools.model import avatar, int8, keymap
from longcat_tools.runner import attention as attn_ops
from longcat_tools.runner.attention import AttnSettings, BSAParams
from longcat_tools.runner.context_parallel import ContextParallel, FrameSplit
from longcat_tools.runner.dit import (
    MODEL_SETTING,
    Block,
    KVCache,
    LayerNorm,
    Linear,
    LongCatTransformer3DModel,
    ModelSetting,
    RMSNorm,
    SelfAttention,
    _local_cond,
    apply_rope,
    modulate,
    rope_table_cached,
)
from longcat_tools.runner.int8_linear import quantize_linears
from longcat_tools.runner.loading import fill_parameters, parse_dtype, remember_origin

ROPE_BASE = 10000.0
MAP_HEAD_GROUPS = 2  # the speaker map is averaged over this many groups of heads
BACKGROUND_FAR = 100.0  # the background's slot when there are "others" masks (more than 3)


@dataclass(frozen=True)
class Reference:
    """The reference latent of a forward: present (``num_ref_latents`` 1) or not, its RoPE time
    ``ref_img_index``, and the half-width of the noise frames around it that may not see it."""

    num_ref_latents: int | None = None
    ref_img_index: int | None = None
    mask_frame_range: int | None = None

    def t_positions(self, frames: int) -> tuple[float, ...] | None:
        """RoPE time of each latent frame: the reference at ``ref_img_index``, then 0, 1, ..."""
        if self.ref_img_index is None or self.num_ref_latents is None:
            return None
        return (float(self.ref_img_index), *map(float, range(frames - self.num_ref_latents)))

    def masked_frames(self, num_cond_latents: int, num_noisy: int) -> tuple[int, int] | None:
        """The noise frames [start, end) that must not attend to the reference, or None."""
        if not self.mask_frame_range or self.mask_frame_range <= 0:
            return None
        if self.ref_img_index is None or not self.num_ref_latents:
            raise LongcatError("mask_frame_range needs a reference latent (num_ref_latents=1 "
                               "and ref_img_index)")
        base = self.ref_img_index - num_cond_latents + self.num_ref_latents
        start, end = base - self.mask_frame_range, base + self.mask_frame_range + 1
        return (start, end) if 0 <= start < end <= num_noisy else None


@dataclass(frozen=True)
class AudioInputs:
    """What every block needs beyond the base's: the audio tokens ``[B*T, M, Do]`` (one
    speaker) or ``[T, speakers*M, Do]`` (several; None when cross-attention is skipped), the
    speaker count, the reference latent and the speaker masks ``[K, N_h*N_w]``."""

    tokens: torch.Tensor | None
    speakers: int | None
    ref: Reference
    token_masks: torch.Tensor | None


def rope_1d_table(pos: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[len(pos), head_dim]`` of a 1-D RoPE at positions ``pos`` (interleaved pairs)."""
    freqs = 1.0 / (ROPE_BASE ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float()
                                 / head_dim))
    angles = (pos.float()[:, None] * freqs.to(pos.device)[None]).repeat_interleave(2, dim=-1)
    return angles.cos(), angles.sin()


def speaker_map(q_noise: torch.Tensor, k: torch.Tensor, hw: int,
                masks: torch.Tensor) -> torch.Tensor:
    """``[K, S_q]``: for each mask, how much each noise query attends to that region of the
    first latent frame's keys (softmax over the frame, per head group, averaged over heads and
    over ``MAP_HEAD_GROUPS`` groups). q_noise [1, heads, S_q, D], k [1, heads, S, D] post-RoPE."""
    heads, D = q_noise.shape[1], q_noise.shape[3]
    size = heads // MAP_HEAD_GROUPS
    total = torch.zeros(masks.shape[0], q_noise.shape[2], dtype=q_noise.dtype,
                        device=q_noise.device)
    for g in range(MAP_HEAD_GROUPS):
        q = q_noise[:, g * size:(g + 1) * size] * (1.0 / D ** 0.5)
        probs = (q @ k[:, g * size:(g + 1) * size, :hw].transpose(-2, -1)).softmax(-1)
        maps = [((probs * m).sum(-1) / m.sum()).permute(0, 2, 1).mean(-1) for m in masks]
        total += torch.cat(maps, dim=0)
    return total / MAP_HEAD_GROUPS


class AvatarSelfAttention(SelfAttention):
    """The base self-attention with the reference latent's RoPE time and attention pattern,
    returning what the speaker map needs."""

    def forward(self, x: torch.Tensor, grid: tuple[int, int, int], num_cond_latents: int,
                attn: AttnSettings, kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                return_kv: bool = False, ref: Reference = Reference(),
                token_masks: torch.Tensor | None = None):
        B, N, C = x.shape
        heads, D = self.num_heads, self.head_dim
        q, k, v = self.qkv(x).view(B, N, 3, heads, D).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        new_kv = (k.clone(), v.clone()) if return_kv else None
        T, H, W = grid
        hw, ncl, bsa = H * W, num_cond_latents, attn.bsa
        if kv_cache is not None:  # x: the noise frames; the cache: the condition frames
            k_c, v_c = (t.to(x.device) for t in kv_cache)
            if k_c.shape[0] == 1 and B > 1:
                k_c, v_c = k_c.expand(B, -1, -1, -1), v_c.expand(B, -1, -1, -1)
            n_c = k_c.shape[2]
            cos, sin = rope_table_cached((T + ncl, H, W), D, x.device, ref.t_positions(T + ncl))
            k = torch.cat([apply_rope(k_c, cos[:n_c], sin[:n_c]),
                           apply_rope(k, cos[n_c:], sin[n_c:])], dim=2)
            v = torch.cat([v_c, v], dim=2)
            q = apply_rope(q, cos[n_c:], sin[n_c:])
            q_noise = q
            out = self._noise(q, k, v, grid, bsa, ref.masked_frames(ncl, T), hw)
        else:
            cos, sin = rope_table_cached(grid, D, x.device, ref.t_positions(T))
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            n_c = ncl * hw
            q_noise = q[:, :, n_c:]
            if ncl == 1:  # the condition frame among itself; noise frames see everything
                out = torch.cat([self._attend(q[:, :, :n_c], k[:, :, :n_c], v[:, :, :n_c], grid,
                                              bsa),
                                 self._noise(q_noise, k, v, grid, bsa, None, hw)], dim=2)
            elif ncl > 1:  # the reference alone, the other condition frames among themselves
                if ref.ref_img_index is None or not ref.num_ref_latents:
                    raise LongcatError(f"num_cond_latents {ncl} (video continuation) needs the "
                                       "reference latent: num_ref_latents=1 and ref_img_index")
                parts = [self._attend(q[:, :, :hw], k[:, :, :hw], v[:, :, :hw], grid, bsa),
                         self._attend(q[:, :, hw:n_c], k[:, :, hw:n_c], v[:, :, hw:n_c], grid,
                                      bsa)]
                if ncl < T:
                    parts.append(self._noise(q_noise, k, v, grid, bsa,
                                             ref.masked_frames(ncl, T - ncl), hw))
                out = torch.cat(parts, dim=2)
            else:
                out = self._attend(q, k, v, grid, bsa)
        out = self.proj(out.transpose(1, 2).reshape(B, N, C))
        spk = None if token_masks is None else speaker_map(q_noise, k, hw, token_masks)
        return out, new_kv, spk

    def _noise(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               grid: tuple[int, int, int], bsa: BSAParams | None,
               masked: tuple[int, int] | None, hw: int) -> torch.Tensor:
        """The noise queries: all keys, except that frames [start, end) skip the reference
        (keys of frame 0); with such a window every part runs dense."""
        if masked is None:
            return self._attend(q, k, v, grid, bsa)
        start, end = masked[0] * hw, masked[1] * hw
        parts = [(q[:, :, :start], k, v), (q[:, :, start:end], k[:, :, hw:], v[:, :, hw:]),
                 (q[:, :, end:], k, v)]
        return torch.cat([self._attend(qp, kp, vp, grid, None) for qp, kp, vp in parts
                          if qp.shape[2]], dim=2)


class AudioCrossAttention(nn.Module):
    """Per latent frame, the frame's video tokens attend to its audio tokens (q/k RMSNorm;
    with a speaker map, 1-D RoPE over speaker slots on q and k)."""

    def __init__(self, dim: int, audio_dim: int, num_heads: int, class_range: int,
                 class_interval: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_linear = Linear(dim, dim)
        self.q_norm = RMSNorm(self.head_dim)
        self.proj = Linear(dim, dim)
        self.kv_linear = Linear(audio_dim, 2 * dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.slot1 = (0.0, float(class_interval))  # speaker 1's query positions
        self.slot2 = (float(class_range - class_interval), float(class_range))
        self.background = float(class_range // 2)

    def forward(self, x: torch.Tensor, audio: torch.Tensor, frames: int,
                speaker_map: torch.Tensor | None = None,
                speakers: int | None = None) -> torch.Tensor:
        """x [B, frames*S, C], audio [B*frames, N_a, Do]; speaker_map [K, frames*S] (B 1)."""
        B, N, C = x.shape
        heads, D = self.num_heads, self.head_dim
        xf = x.reshape(B * frames, N // frames, C)
        q = self.q_norm(self.q_linear(xf).view(*xf.shape[:2], heads, D)).transpose(1, 2)
        n_a = audio.shape[1]
        k, v = self.kv_linear(audio).view(B * frames, n_a, 2, heads, D).unbind(2)
        k, v = self.k_norm(k).transpose(1, 2), v.transpose(1, 2)
        if speaker_map is not None:
            cos, sin = rope_1d_table(self._query_slots(speaker_map), D)
            shape = (frames, 1, N // frames, D)
            q = apply_rope(q, cos.view(shape), sin.view(shape))
            cos, sin = rope_1d_table(self._key_slots(n_a, speakers, speaker_map.shape[0],
                                                     k.dtype, k.device), D)
            k = apply_rope(k, cos, sin)
        out = attn_ops.dense(q, k, v).transpose(1, 2).reshape(B * frames, N // frames, C)
        return self.proj(out).reshape(B, N, C).to(x.dtype)

    def _query_slots(self, smap: torch.Tensor) -> torch.Tensor:
        """Each query's slot: its speaker's range scaled by the map, where that speaker's mask
        wins the argmax; the background (and any "others" mask) a fixed slot."""
        def scaled(row: torch.Tensor, lo_hi: tuple[float, float]) -> torch.Tensor:
            lo, hi = row.min(), row.max()
            return (row - lo) / (hi - lo + 1e-8) * (lo_hi[1] - lo_hi[0]) + lo_hi[0]

        back = torch.full((smap.shape[1],), self._background(smap.shape[0]), dtype=smap.dtype,
                          device=smap.device)
        table = torch.stack([scaled(smap[0], self.slot1), scaled(smap[1], self.slot2), back], 1)
        winner = smap.argmax(dim=0).clamp(max=2)
        return table[torch.arange(smap.shape[1], device=smap.device), winner]

    def _key_slots(self, n_a: int, speakers: int | None, masks: int, dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor:
        """Each audio token's slot: the middle of its speaker's range (a third track: the
        background's)."""
        pos = torch.zeros(n_a, dtype=dtype, device=device)
        mid1, mid2 = sum(self.slot1) / 2, sum(self.slot2) / 2
        if speakers is not None and speakers > 2:
            per = n_a // speakers
            pos[:per], pos[per:2 * per], pos[2 * per:] = mid1, mid2, self._background(masks)
        else:
            pos[:n_a // 2], pos[n_a // 2:] = mid1, mid2
        return pos

    def _background(self, masks: int) -> float:
        return self.background if masks <= 3 else BACKGROUND_FAR


class AvatarBlock(Block):
    """The base block with the audio cross-attention between the text cross-attention and the
    FFN."""

    def __init__(self, dim: int, num_heads: int, ffn_hidden: int, t_dim: int,
                 audio: avatar.AudioDims) -> None:
        super().__init__(dim, num_heads, ffn_hidden, t_dim)
        self.audio_adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(t_dim, 3 * dim))
        self.pre_video_crs_attn_norm = LayerNorm(dim, eps=1e-6, elementwise_affine=True)
        self.pre_audio_crs_attn_norm = LayerNorm(audio.output_dim, eps=1e-6,
                                                 elementwise_affine=True) \
            if audio.audio_prenorm else nn.Identity()
        self.attn = AvatarSelfAttention(dim, num_heads)
        self.audio_cross_attn = AudioCrossAttention(dim, audio.output_dim, num_heads,
                                                    audio.class_range, audio.class_interval)

    def forward(self, x: torch.Tensor, y: torch.Tensor, y_lens: list[int], t: torch.Tensor,
                grid: tuple[int, int, int], num_cond_latents: int,
                kv_cache: tuple[torch.Tensor, torch.Tensor] | None, return_kv: bool,
                skip_crs_attn: bool, split: FrameSplit, attn: AttnSettings, *,
                audio: AudioInputs):
        B, N, C = x.shape
        T = grid[0]
        frames = (B, T, N // T, C)
        mod = self.adaLN_modulation[1](F.silu(t), fp32=True).unsqueeze(2).chunk(6, dim=-1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod  # [B, T, 1, C]

        h = modulate(self.mod_norm_attn, x.view(frames), shift_msa, scale_msa)
        h, new_kv, smap = self.attn(h.view(B, N, C), grid, num_cond_latents, attn, kv_cache,
                                    return_kv, audio.ref, audio.token_masks)
        x = (x + (gate_msa * h.view(frames)).view(B, N, C)).to(x.dtype)

        if not skip_crs_attn:
            fast = attn.fast and x.dtype in (torch.bfloat16, torch.float16)
            x = x + self._cross(self.pre_crs_attn_norm(x), y, y_lens, T,
                                _local_cond(num_cond_latents, kv_cache, split), fast)
            x = self._audio_cross(x, t, T, 0 if kv_cache is not None else num_cond_latents,
                                  audio, smap)

        h = modulate(self.mod_norm_ffn, x.view(frames), shift_mlp, scale_mlp).view(B, N, C)
        x = (x + (gate_mlp * self.ffn(h).view(frames)).view(B, N, C)).to(x.dtype)
        return x, new_kv

    def _audio_cross(self, x: torch.Tensor, t: torch.Tensor, T: int, ncl: int,
                     audio: AudioInputs, smap: torch.Tensor | None) -> torch.Tensor:
        """x plus the gated, modulated audio cross-attention on the noise frames."""
        B, N, C = x.shape
        n_c = ncl * (N // T)
        shift, scale, gate = self.audio_adaLN_modulation[1](F.silu(t[:, ncl:]), fp32=True) \
            .unsqueeze(2).chunk(3, dim=-1)
        tokens = self.pre_audio_crs_attn_norm(audio.tokens)
        tokens = tokens.view(-1, T, *tokens.shape[1:])[:, ncl:].flatten(0, 1)
        out = self.audio_cross_attn(self.pre_video_crs_attn_norm(x)[:, n_c:], tokens, T - ncl,
                                    smap, audio.speakers)
        out = modulate(self.mod_norm_attn, out.view(B, T - ncl, -1, C), shift, scale)
        add = (gate * out).view(B, -1, C)
        if n_c:
            add = torch.cat([add.new_zeros(B, n_c, C), add], dim=1)
        return (x + add).to(x.dtype)


class AudioProj(nn.Module):
    """Audio-encoder windows -> ``context_tokens`` tokens of ``output_dim`` per latent frame."""

    def __init__(self, a: avatar.AudioDims) -> None:
        super().__init__()
        width = a.audio_block * a.audio_channel
        self.proj1 = Linear(a.audio_window * width, a.intermediate_dim)
        self.proj1_vf = Linear(a.window_vf * width, a.intermediate_dim)
        self.proj2 = Linear(a.intermediate_dim, a.intermediate_dim)
        self.proj3 = Linear(a.intermediate_dim, a.context_tokens * a.output_dim)
        self.norm = nn.LayerNorm(a.output_dim)  # a plain LayerNorm (eps 1e-5), as the original
        self.tokens, self.width = a.context_tokens, a.output_dim

    def forward(self, first: torch.Tensor, later: torch.Tensor) -> torch.Tensor:
        """first [B, 1, W, S, Ca], later [B, n, W+V-1, S, Ca] -> [B, 1+n, M, Do]."""
        B = first.shape[0]
        h = torch.cat([F.relu(self.proj1(first.flatten(2))),
                       F.relu(self.proj1_vf(later.flatten(2)))], dim=1)
        frames = h.shape[1]
        h = self.proj3(F.relu(self.proj2(h.reshape(B * frames, -1))))
        return self.norm(h.reshape(B * frames, self.tokens, self.width)) \
            .view(B, frames, self.tokens, self.width)


class LongCatVideoAvatarTransformer3DModel(LongCatTransformer3DModel):
    """The avatar DiT as a diffusers model (config: the base fields plus ``model.avatar``'s).
    ``runner.avatar_dit.load_avatar_transformer`` loads a native folder or the INT8 one."""

    _no_split_modules = ["AvatarBlock"]

    @register_to_config
    def __init__(self, in_channels: int = 16, out_channels: int = 16, hidden_size: int = 4096,
                 depth: int = 48, num_heads: int = 32, caption_channels: int = 4096,
                 mlp_ratio: float = 4, adaln_tembed_dim: int = 512,
                 frequency_embedding_size: int = 256,
                 patch_size: tuple[int, int, int] = (1, 2, 2), enable_bsa: bool = False,
                 bsa_params: dict[str, Any] | None = None, text_tokens_zero_pad: bool = False,
                 cp_split_hw: list[int] | None = None, enable_flashattn3: bool = False,
                 enable_flashattn2: bool = False, enable_xformers: bool = False,
                 num_attention_heads: int | None = None, audio_window: int = 5,
                 audio_block: int = 12, audio_channel: int = 768, intermediate_dim: int = 512,
                 output_dim: int = 768, context_tokens: int = 32, vae_scale: int = 4,
                 audio_prenorm: bool = False, class_range: int = 24,
                 class_interval: int = 4) -> None:
        self.audio = avatar.audio_dims(dict(self.config))
        super().__init__(in_channels, out_channels, hidden_size, depth, num_heads,
                         caption_channels, mlp_ratio, adaln_tembed_dim, frequency_embedding_size,
                         patch_size, enable_bsa, bsa_params, text_tokens_zero_pad, cp_split_hw,
                         enable_flashattn3, enable_flashattn2, enable_xformers,
                         num_attention_heads)
        self.audio_proj = AudioProj(self.audio)

    def _make_block(self) -> AvatarBlock:
        d = self.dims
        return AvatarBlock(d.hidden_size, d.num_heads, d.ffn_hidden, d.adaln_tembed_dim,
                           self.audio)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path,
                        subfolder: str | None = None, torch_dtype: torch.dtype | None = None,
                        **kwargs: Any) -> LongCatVideoAvatarTransformer3DModel:
        """An avatar DiT folder (``avatar_single``, ``avatar_multi``, ``base_model`` or
        ``base_model_int8``, or their parent with ``subfolder``) on ``device`` (default CPU)."""
        folder = Path(pretrained_model_name_or_path) / (subfolder or "")
        return load_avatar_transformer(folder, kwargs.get("device", "cpu"),
                                       torch_dtype or torch.float32)

    def enable_context_parallel(self, cp: ContextParallel | None) -> None:
        if cp is not None:
            raise LongcatError("context parallel is not supported for the avatar DiT")
        self.cp = None

    def to_int8(self) -> None:
        """Keep the Linears the INT8 format quantizes as ``Int8Linear``: quantized from the
        weights (as the format's writer does), or empty on the meta device for a loader."""
        quantize_linears(self)

    def audio_tokens(self, audio_embs: torch.Tensor, frames: int,
                     num_ref_latents: int | None) -> torch.Tensor:
        """``[Ba, frames, M, Do]``: the audio tokens of the last ``frames`` latent frames, from
        ``audio_embs`` [Ba, F, W, S, Ca] over the F = 1 + V*(n-1) video frames; with a reference
        latent the first frame's tokens are repeated for it."""
        a, V = self.audio, self.audio.vae_scale
        want = (a.audio_window, a.audio_block, a.audio_channel)
        if audio_embs.dim() != 5 or tuple(audio_embs.shape[2:]) != want \
                or (audio_embs.shape[1] - 1) % V:
            raise LongcatError(f"audio_embs {list(audio_embs.shape)}: expected [speakers, "
                               f"1 + {V}*k video frames, {', '.join(map(str, want))}]")
        emb = audio_embs.to(self.x_embedder.proj.weight.device, self.dtype)
        Ba, F_, W = emb.shape[:3]
        mid = W // 2
        later = emb[:, 1:].reshape(Ba, (F_ - 1) // V, V, *emb.shape[2:])
        later = torch.cat([later[:, :, :1, :mid + 1].flatten(2, 3),
                           later[:, :, 1:-1, mid:mid + 1].flatten(2, 3),
                           later[:, :, -1:, mid:].flatten(2, 3)], dim=2)
        tokens = self.audio_proj(emb[:, :1], later)
        if num_ref_latents:
            tokens = torch.cat([tokens[:, :1], tokens], dim=1)
        if tokens.shape[1] < frames:
            raise LongcatError(f"audio_embs cover {tokens.shape[1]} latent frames "
                               f"({F_} video frames), the latents have {frames}")
        return tokens[:, -frames:]

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: torch.Tensor | None = None, num_cond_latents: int = 0,
                return_kv: bool = False, kv_cache: KVCache | None = None,
                skip_crs_attn: bool = False, offload_kv_cache: bool = False,
                audio_embs: torch.Tensor | None = None, num_ref_latents: int | None = None,
                ref_img_index: int | None = None, mask_frame_range: int | None = None,
                ref_target_masks: torch.Tensor | None = None,
                bsa: BSAParams | None | ModelSetting = MODEL_SETTING):
        """The base forward plus audio. ``audio_embs`` [B, F, W, S, Ca] (one speaker) or, with
        ``ref_target_masks`` [K, H_px, W_px] (batch 1), [speakers, F, W, S, Ca]; required unless
        ``skip_crs_attn`` (the KV pre-pass). ``num_ref_latents`` 1 / ``ref_img_index``: a
        reference latent at index 0 with that RoPE time; ``mask_frame_range``: the noise frames
        within it of ``ref_img_index`` do not attend to the reference. With ``kv_cache``,
        hidden_states are the noise frames and ``audio_embs`` still covers the whole clip.
        Returns fp32 [B, C_out, T, H, W], and the new cache when ``return_kv``."""
        if num_ref_latents not in (None, 0, 1):
            raise LongcatError(f"num_ref_latents {num_ref_latents}: at most one reference latent")
        if ref_img_index is not None and num_ref_latents == 0:
            raise LongcatError("ref_img_index needs num_ref_latents=1")
        if kv_cache and not num_cond_latents:
            raise LongcatError("a KV cache needs num_cond_latents (the cached frames)")
        p = self._prepare(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                          bsa)
        B, T = p.x.shape[0], p.grid[0]
        tokens = speakers = token_masks = None
        if ref_target_masks is not None:
            if B != 1 or not num_cond_latents:
                raise LongcatError("ref_target_masks (several speakers) need batch 1 and a "
                                   "condition latent (num_cond_latents >= 1)")
            if ref_target_masks.dim() != 3 or ref_target_masks.shape[0] < 2:
                raise LongcatError(f"ref_target_masks {list(ref_target_masks.shape)}: expected "
                                   "[masks >= 2, height, width]")
            token_masks = F.interpolate(ref_target_masks[None].float(), size=p.grid[1:],
                                        mode="nearest")[0]
            token_masks = (token_masks > 0).flatten(1).to(self.dtype)
        if skip_crs_attn:
            pass  # no cross-attention: the audio, if given, would go unused
        elif audio_embs is None:
            raise LongcatError("the avatar DiT needs audio_embs (zeros for an unconditional "
                               "pass); only skip_crs_attn forwards may leave them out")
        else:
            per_frame = self.audio_tokens(audio_embs, T, num_ref_latents)
            if ref_target_masks is not None:  # [T, speakers*M, Do], speaker-major
                speakers = per_frame.shape[0]
                tokens = torch.cat(per_frame.split(1), dim=2)[0]
            else:
                if per_frame.shape[0] != B:
                    raise LongcatError(f"audio_embs has batch {per_frame.shape[0]}, the latents "
                                       f"{B}")
                tokens = per_frame.flatten(0, 1)
        ref = Reference(num_ref_latents, ref_img_index, mask_frame_range)
        x, new_cache = self._run_blocks(p, num_cond_latents, kv_cache, return_kv, skip_crs_attn,
                                        offload_kv_cache,
                                        audio=AudioInputs(tokens, speakers, ref, token_masks))
        x = self._finish(p, x)
        return (x, new_cache) if return_kv else x


@torch.inference_mode(False)  # as loading.empty_transformer: tensors that track versions
def load_avatar_transformer(folder: str | Path, device: str | torch.device = "cpu",
                            dtype: str | torch.dtype = torch.float32, progress=None,
                            ) -> LongCatVideoAvatarTransformer3DModel:
    """The avatar DiT of a native folder (``avatar_single/``, ``avatar_multi/``,
    ``base_model/``) in ``dtype``, or of the INT8 folder (``base_model_int8/``): its Linears
    stay INT8 (``Int8Linear``), the other tensors load in ``dtype`` (the original runs them in
    bf16). Tensor by tensor, every shape checked first (``runner.loading``)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise LongcatError(f"{folder}: not an avatar DiT folder (no config.json)")
    cfg = jsonio.read(folder / "config.json", what="transformer config")
    if not isinstance(cfg, dict) or not avatar.is_avatar_config(cfg):
        raise LongcatError(f"{folder / 'config.json'}: not the avatar DiT "
                           f"({avatar.AVATAR_CLASS})")
    keymap.dit_dims(cfg, str(folder / "config.json"))  # absurd sizes: one line, nothing built
    avatar.audio_dims(cfg, str(folder / "config.json"))
    dtype = parse_dtype(dtype)
    quantized = (folder / int8.INDEX_NAME).is_file()
    if quantized:
        layouts.check_int8_config(folder)
    ckpt_cls = _Int8Folder if quantized else layouts.Checkpoint
    ckpt = ckpt_cls(root=folder.parent, layout="native", flavour="native", transformer_dir=folder)
    with torch.device("meta"):
        model = LongCatVideoAvatarTransformer3DModel.from_config(cfg)
    model = torch.nn.Module.to(model, dtype)
    if quantized:
        model.to_int8()
    model = model.to_empty(device=device)
    fill_parameters(model, ckpt, progress=progress)
    model.eval().requires_grad_(False)
    model.layout = "avatar INT8" if quantized else "avatar native"
    remember_origin(model, None if quantized else ckpt)
    return model


@dataclass(frozen=True)
class _Int8Folder(layouts.Checkpoint):
    """``base_model_int8/`` as a checkpoint for the loader: its quantization_config.json names
    the INT8 format, not the fp8 one the base loader reads."""

    @property
    def is_fp8(self) -> bool:
        return False

    @property
    def shard_index(self) -> str:
        return int8.INDEX_NAME
