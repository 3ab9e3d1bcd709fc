"""Regenerate the golden outputs of the ORIGINAL LongCat-Video code (run by hand, never in CI).

    python tests/golden/generate.py --original /path/to/LongCat-Video --out tests/golden/original

``--original`` is a checkout of https://github.com/meituan-longcat/LongCat-Video at the pinned
commit (``ORIGINAL_COMMIT``); without it the script clones that commit into a temporary folder.
The original's code is imported from there at run time and never copied into this repository:
only numbers (safetensors) and JSON are written to ``--out``.

Run it in a Python environment with the original's dependencies (torch CPU, diffusers,
transformers, einops, ftfy, loguru, regex, triton importable) and with this repository on
``sys.path`` (the fixtures come from OUR ``longcat_tools.synth``); README.md in this folder gives
the exact environment used for the committed files.

Fixtures: ``synth(path, "tiny", seed=0)`` (a tiny native-layout checkpoint: dit/, lora/,
text_encoder/, tokenizer/, vae/, scheduler/), reproducible byte for byte; the sha256 of every
file it writes goes to ``manifest.json`` so the tests can tell synth drift from a runner regression.

Everything runs in fp32 on the CPU. The original needs flash-attn (or xformers) and Triton on a
GPU; the CPU patches below are the only changes, all made at run time in this process:

1. ``flash_attn`` is a stand-in module whose ``flash_attn_func`` / ``flash_attn_varlen_func``
   compute exact fp32 softmax attention (``softmax(q k^T * scale) v``, scale ``D**-0.5`` unless
   given; varlen: one block per sequence pair, as flash-attn's cu_seqlens define). The original's
   config has ``enable_flashattn2: true``, so its own code calls these.
2. BSA "through the CPU reference": the original's ``flash_attn_bsa_3d`` runs as is (its 3D block
   permutation, ``mean_pooling_compression``, ``cal_score``, ``get_select_indices*``); only
   ``attn_fwd_bsa_varlen_triton`` (the Triton kernel over the selected kv chunks) is replaced by
   an exact dense masked attention over the same selected chunks (a query chunk that selected
   nothing outputs zeros, as the kernel does). ``torch.compile`` is off (``TORCHDYNAMO_DISABLE=1``)
   so the selection code runs eagerly.
3. ``pipeline_longcat_video.torch_gc`` (``torch.cuda.empty_cache/ipc_collect``) is a no-op.
4. ``LongCatVideoPipeline.get_condition_shape`` (the resolution-bucket lookup of i2v, vc, refine)
   returns the case's fixed tiny size; the tests pass the same ``height``/``width`` to our runner.
   The buckets themselves are data (tested elsewhere); every bucket is >= 320 px, too big here.

Components are loaded as the demos do (``from_pretrained(ckpt, subfolder=...)``, the DiT with
``cp_split_hw=[1, 1]``), in fp32 instead of bf16. LoRAs go through the original's
``dit.load_lora(path, key, multiplier, lora_network_dim=RANK)`` (the tiny files have rank 4; the
demos' default 128 is the hub rank; ``alpha_scale`` is read from the file by the strict load) and
``dit.enable_loras([...])``. Seeds: a CPU ``torch.Generator`` seeded with the case's seed is the
pipelines' ``generator``; refinement also draws from the global RNG (stage-1 posterior sample, then
the mixing noise), which is seeded with ``torch.manual_seed(seed)`` right before
``generate_refine``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import types
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # before torch is imported anywhere

import numpy as np  # noqa: E402
import torch  # noqa: E402

ORIGINAL_URL = "https://github.com/meituan-longcat/LongCat-Video"
ORIGINAL_COMMIT = "6b3f4b8582a8bc3f20f795735f5383716c4ba794"
SYNTH = {"preset": "tiny", "seed": 0}
LORA_RANK = 4  # the tiny preset's LoRA rank
LORA_FILES = {"cfg_step": "lora/cfg_step_lora.safetensors",
              "refinement": "lora/refinement_lora.safetensors"}
NEGATIVE = ("Bright tones, overexposed, static, blurred details, subtitles, style, works, "
            "paintings, images, static, overall gray, worst quality, low quality, JPEG "
            "compression residue, ugly, incomplete, extra fingers, poorly drawn hands, poorly "
            "drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, "
            "messy background, three legs, many people in the background, walking backwards")


# ---- CPU stand-ins ---------------------------------------------------------------------------
def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """Exact fp32 softmax attention on [..., S, D]; rows whose mask is all False give zeros."""
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    if mask is not None:
        p = torch.nan_to_num(p, nan=0.0)
    return torch.matmul(p, v.float()).to(q.dtype)


def make_flash_attn_module() -> types.ModuleType:
    mod = types.ModuleType("flash_attn")

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **_):
        assert dropout_p == 0.0 and not causal
        scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
        out = dense_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale)
        return out.transpose(1, 2)  # [B, S, H, D] like flash-attn

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None,
                               max_seqlen_k=None, dropout_p=0.0, softmax_scale=None,
                               causal=False, **_):
        assert dropout_p == 0.0 and not causal
        scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        outs = []
        for i in range(len(cq) - 1):
            qi = q[cq[i]:cq[i + 1]].transpose(0, 1)  # [H, S, D]
            ki = k[ck[i]:ck[i + 1]].transpose(0, 1)
            vi = v[ck[i]:ck[i + 1]].transpose(0, 1)
            outs.append(dense_attention(qi, ki, vi, scale).transpose(0, 1))
        return torch.cat(outs, dim=0)

    mod.flash_attn_func = flash_attn_func
    mod.flash_attn_varlen_func = flash_attn_varlen_func
    return mod


SELECTIONS: list[dict] = []  # every BSA call's selection (kept per case for the manifest)


def bsa_selected_attention(q, k, v, sm_scale, block_indices, block_indices_lens, chunk_size_q,
                           chunk_size_k, sparsity):
    """Drop-in for the original's ``attn_fwd_bsa_varlen_triton``: q/k/v are already in the 3D
    block layout [B, H, S, D]; query chunk i attends to the kv chunks
    ``block_indices[b, h, i, :block_indices_lens[b, h, i]]``. Returns (o, lse) like the kernel."""
    B, H, Sq, D = q.shape
    Mq, Mk = Sq // chunk_size_q, k.shape[2] // chunk_size_k
    idx = block_indices.long()
    lens = block_indices_lens.long()
    if lens.dim() == 4:  # cdf modes keep a trailing singleton on some versions
        lens = lens.squeeze(-1)
    keep = torch.arange(idx.shape[-1])[None, None, None] < lens[..., None]
    chunk_mask = torch.zeros(B, H, Mq, Mk + 1, dtype=torch.bool)
    chunk_mask.scatter_(-1, torch.where(keep, idx, Mk), True)
    chunk_mask = chunk_mask[..., :Mk]
    SELECTIONS.append({"Mq": Mq, "Mk": Mk, "kept_min": int(lens.min()),
                       "kept_max": int(lens.max()), "kept_total": int(chunk_mask.sum())})
    tok_mask = chunk_mask.repeat_interleave(chunk_size_q, 2).repeat_interleave(chunk_size_k, 3)
    o = dense_attention(q, k, v, sm_scale, tok_mask)
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * sm_scale
    lse = torch.logsumexp(s.masked_fill(~tok_mask, float("-inf")), dim=-1)
    return o, lse


def install_cpu_patches(original: Path):
    import diffusers.models.modeling_utils  # noqa: F401  (they probe for flash_attn on import:
    import transformers.modeling_utils  # noqa: F401  let them see none before the stand-in)

    sys.modules["flash_attn"] = make_flash_attn_module()
    sys.path.insert(0, str(original))
    from longcat_video import pipeline_longcat_video as plv
    from longcat_video.block_sparse_attention import bsa_interface

    bsa_interface.attn_fwd_bsa_varlen_triton = bsa_selected_attention
    plv.torch_gc = lambda: None
    return plv


# ---- helpers ---------------------------------------------------------------------------------
def fixture_hashes(ckpt: Path) -> dict[str, str]:
    """sha256 of every file of the synth'd checkpoint."""
    files = sorted(f for f in ckpt.rglob("*") if f.is_file())
    from longcat_tools.io.checksums import sha256_file

    return {f.relative_to(ckpt).as_posix(): sha256_file(f) for f in files}


def git_head(path: Path) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def get_original(path: str | None, tmp: Path) -> Path:
    """The original's checkout at ``path`` (refused when git says it is at another commit), or
    ``ORIGINAL_COMMIT`` cloned into ``tmp``."""
    if path:
        original = Path(path).resolve()
        head = git_head(original)
        if head is not None and head != ORIGINAL_COMMIT:
            sys.exit(f"{original} is at {head}, not the pinned {ORIGINAL_COMMIT}")
        return original
    dst = tmp / "LongCat-Video"
    subprocess.run(["git", "init", "-q", str(dst)], check=True)
    subprocess.run(["git", "-C", str(dst), "fetch", "-q", "--depth", "1", ORIGINAL_URL,
                    ORIGINAL_COMMIT], check=True)
    subprocess.run(["git", "-C", str(dst), "checkout", "-q", "FETCH_HEAD", "--", "longcat_video"],
                   check=True)
    return dst


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# ---- the DiT cases ---------------------------------------------------------------------------
def dit_inputs(caption: int, L: int = 16):
    """Inputs shared by the DiT cases (drawn from one fixed generator)."""
    g = torch.Generator().manual_seed(1234)
    t = {}
    t["x_small"] = torch.randn(2, 16, 3, 8, 8, generator=g)
    t["text_small"] = torch.randn(2, 1, L, caption, generator=g)
    mask = torch.zeros(2, L, dtype=torch.int64)
    mask[0, :5], mask[1, :11] = 1, 1
    t["mask_small"] = mask
    t["t_small"] = torch.tensor([700.0, 251.5])
    t["t_cond"] = torch.tensor([[0.0, 640.0, 640.0], [0.0, 120.25, 120.25]])
    # KV cache (vc): 2 cached condition frames, then 2 noise frames with CFG (batch 2)
    t["x_kv_cond"] = torch.randn(1, 16, 2, 8, 8, generator=g)
    t["x_kv_noise"] = torch.randn(2, 16, 2, 8, 8, generator=g)
    t["t_kv_noise"] = torch.full((2, 2), 830.0)
    # BSA: 8 x 8 x 8 tokens (latent 8 x 16 x 16)
    t["x_bsa"] = torch.randn(1, 16, 8, 16, 16, generator=g)
    t["text_bsa"] = torch.randn(1, 1, L, caption, generator=g)
    t["mask_bsa"] = (torch.arange(L) < 9).to(torch.int64)[None]
    t["t_bsa"] = torch.tensor([480.0])
    t["t_bsa_cond"] = torch.tensor([[0.0] * 4 + [480.0] * 4])
    return t


# Each case: inputs (keys of dit_inputs), num_cond_latents, LoRAs [(kind, multiplier)], BSA params.
DIT_CASES: dict[str, dict] = {
    "plain": dict(x="x_small", t="t_small", text="text_small", mask="mask_small"),
    "cond": dict(x="x_small", t="t_cond", text="text_small", mask="mask_small",
                 num_cond_latents=1),
    "kv_cache": dict(kv=True),
    "lora_cfg_step": dict(x="x_small", t="t_small", text="text_small", mask="mask_small",
                          loras=[["cfg_step", 1.0]]),
    "lora_refinement": dict(x="x_small", t="t_cond", text="text_small", mask="mask_small",
                            num_cond_latents=1, loras=[["refinement", 0.75]]),
    "lora_both": dict(x="x_small", t="t_small", text="text_small", mask="mask_small",
                      loras=[["cfg_step", 1.0], ["refinement", 0.75]]),
    "bsa_sparsity": dict(x="x_bsa", t="t_bsa", text="text_bsa", mask="mask_bsa",
                         bsa={"sparsity": 0.75, "chunk_3d_shape_q": [4, 4, 4],
                              "chunk_3d_shape_k": [4, 4, 4]}),
    "bsa_cdf": dict(x="x_bsa", t="t_bsa", text="text_bsa", mask="mask_bsa",
                    bsa={"sparsity": None, "cdf_threshold": 0.6,
                         "chunk_3d_shape_q": [4, 4, 4], "chunk_3d_shape_k": [4, 4, 4]}),
    "bsa_cdf_topk": dict(x="x_bsa", t="t_bsa", text="text_bsa", mask="mask_bsa",
                         bsa={"sparsity": 0.75, "cdf_threshold": 0.45,
                              "chunk_3d_shape_q": [4, 4, 4], "chunk_3d_shape_k": [4, 4, 4]}),
    "bsa_asymmetric": dict(x="x_bsa", t="t_bsa", text="text_bsa", mask="mask_bsa",
                           bsa={"sparsity": 0.5, "chunk_3d_shape_q": [2, 4, 4],
                                "chunk_3d_shape_k": [4, 4, 8]}),
    "bsa_cond": dict(x="x_bsa", t="t_bsa_cond", text="text_bsa", mask="mask_bsa",
                     num_cond_latents=4, loras=[["refinement", 1.0]],
                     bsa={"sparsity": 0.75, "chunk_3d_shape_q": [4, 4, 4],
                          "chunk_3d_shape_k": [4, 4, 4]}),
}


def load_original_dit(plv, ckpt: Path, bsa_params=None):
    kw = {"cp_split_hw": [1, 1], "torch_dtype": torch.float32}
    if bsa_params is not None:
        kw["bsa_params"] = bsa_params
    dit = plv.LongCatVideoTransformer3DModel.from_pretrained(ckpt, subfolder="dit", **kw)
    return dit.eval().requires_grad_(False)


def set_loras(dit, ckpt: Path, loras):
    keys = []
    for kind, mult in loras or []:
        key = f"{kind}_lora"
        dit.load_lora(str(ckpt / LORA_FILES[kind]), key, multiplier=mult,
                      lora_network_dim=LORA_RANK, lora_network_alpha=LORA_RANK / 2)
        keys.append(key)
    dit.enable_loras(keys) if keys else dit.disable_all_loras()
    dit.lora_dict.clear()  # a later case loads its own


def run_dit_cases(plv, ckpt: Path, caption: int):
    inputs = dit_inputs(caption)
    tensors = {f"input/{k}": v for k, v in inputs.items()}
    meta = {}
    for name, case in DIT_CASES.items():
        SELECTIONS.clear()
        dit = load_original_dit(plv, ckpt, case.get("bsa"))
        set_loras(dit, ckpt, case.get("loras"))
        if case.get("bsa"):
            dit.enable_bsa()
        with torch.no_grad():
            if case.get("kv"):
                xc = inputs["x_kv_cond"]
                n_c = xc.shape[2]
                empty = torch.zeros(1, 1, 512, caption)
                _, cache = dit(hidden_states=xc, timestep=torch.zeros(1, n_c),
                               encoder_hidden_states=empty, return_kv=True, skip_crs_attn=True)
                out = dit(hidden_states=inputs["x_kv_noise"], timestep=inputs["t_kv_noise"],
                          encoder_hidden_states=inputs["text_small"],
                          encoder_attention_mask=inputs["mask_small"], num_cond_latents=n_c,
                          kv_cache_dict=cache)
                for i, (k, v) in cache.items():
                    tensors[f"{name}/k{i}"], tensors[f"{name}/v{i}"] = k, v
                case = dict(case, num_cond_latents=n_c, empty_text_len=512)
            else:
                out = dit(hidden_states=inputs[case["x"]], timestep=inputs[case["t"]],
                          encoder_hidden_states=inputs[case["text"]],
                          encoder_attention_mask=inputs[case["mask"]],
                          num_cond_latents=case.get("num_cond_latents", 0))
        tensors[f"{name}/out"] = out.contiguous()
        meta[name] = dict(case, out_absmax=float(out.abs().max()))
        if SELECTIONS:
            meta[name]["bsa_selection"] = list(SELECTIONS)
        print(f"dit {name}: out {tuple(out.shape)} absmax {float(out.abs().max()):.4g}"
              + (f" bsa {SELECTIONS}" if SELECTIONS else ""))
    # sanity: the cases differ from each other where they should
    for a, b in [("cond", "plain"), ("lora_cfg_step", "plain"), ("lora_both", "lora_cfg_step"),
                 ("bsa_cdf", "bsa_sparsity"), ("bsa_cdf_topk", "bsa_sparsity"),
                 ("bsa_asymmetric", "bsa_sparsity")]:
        print(f"  {a} vs {b}: max rel diff {rel_err(tensors[a + '/out'], tensors[b + '/out']):.3g}")
    assert rel_err(tensors["lora_cfg_step/out"], tensors["plain/out"]) > 1e-3
    assert rel_err(tensors["bsa_cdf/out"], tensors["bsa_sparsity/out"]) > 1e-3
    assert rel_err(tensors["bsa_cdf_topk/out"], tensors["bsa_sparsity/out"]) > 1e-3
    return tensors, meta


# ---- the pipeline cases ----------------------------------------------------------------------
def frames_uint8(n: int, h: int, w: int, seed: int) -> np.ndarray:
    """A smooth moving pattern (so the VAE sees structure), uint8 [n, h, w, 3]."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = []
    for i in range(n):
        r = 127 + 100 * np.sin((xx + 3 * i) / 5.0 + seed)
        g = 127 + 100 * np.cos((yy - 2 * i) / 7.0)
        b = 127 + 100 * np.sin((xx + yy + i) / 9.0)
        out.append(np.stack([r, g, b], -1))
    return np.clip(np.stack(out), 0, 255).astype(np.uint8)


PIPELINE_CASES: dict[str, dict] = {
    "t2v": dict(task="t2v", prompt="A cat sits on a sunny windowsill.", negative_prompt=NEGATIVE,
                height=32, width=32, num_frames=9, steps=3, guidance=4.0, seed=42),
    "distill": dict(task="t2v", prompt="A skateboarder glides down a city street at dusk.",
                    height=32, width=48, num_frames=9, steps=4, guidance=1.0, distill=True,
                    seed=7),
    "i2v": dict(task="i2v", prompt="A woman rides a motorcycle along a coastal road.",
                negative_prompt=NEGATIVE, image="image_i2v", height=32, width=32, num_frames=9,
                steps=3, guidance=4.0, seed=3),
    "vc_kv": dict(task="vc", prompt="Close-up of raindrops falling on green leaves.",
                  video="video_vc", height=32, width=32, num_frames=13, num_cond_frames=5,
                  steps=3, guidance=4.0, use_kv_cache=True, seed=11),
    "vc_nokv": dict(task="vc", prompt="Close-up of raindrops falling on green leaves.",
                    video="video_vc", height=32, width=32, num_frames=13, num_cond_frames=5,
                    steps=3, guidance=4.0, use_kv_cache=False, seed=11),
    "vc_distill_kv": dict(task="vc", prompt="A chef chops vegetables in a bright kitchen.",
                          video="video_vc", height=32, width=32, num_frames=13, num_cond_frames=5,
                          steps=3, guidance=1.0, distill=True, use_kv_cache=True, seed=5),
    "refine": dict(task="refine", prompt="A cat sits on a sunny windowsill.",
                   stage1="video_stage1", height=64, width=64, steps=50, t_thresh=0.5, seed=42,
                   bsa={"sparsity": 0.5, "chunk_3d_shape_q": [2, 2, 2],
                        "chunk_3d_shape_k": [2, 2, 2]}),
    "refine_i2v": dict(task="refine", prompt="", stage1="video_stage1", image="image_refine",
                       num_cond_frames=1, height=64, width=64, steps=50, t_thresh=0.5, seed=9,
                       bsa={"sparsity": 0.5, "chunk_3d_shape_q": [2, 2, 2],
                            "chunk_3d_shape_k": [2, 2, 2]}),
}


def pipeline_media() -> dict[str, np.ndarray]:
    return {"image_i2v": frames_uint8(1, 40, 56, 1)[0],
            "video_vc": frames_uint8(9, 36, 36, 2),
            "video_stage1": frames_uint8(5, 32, 32, 3),
            "image_refine": frames_uint8(1, 48, 48, 4)[0]}


def run_pipeline_cases(plv, ckpt: Path):
    from longcat_video.modules.autoencoder_kl_wan import AutoencoderKLWan
    from longcat_video.modules.scheduling_flow_match_euler_discrete import (
        FlowMatchEulerDiscreteScheduler,
    )
    from PIL import Image
    from transformers import AutoTokenizer, UMT5EncoderModel

    media = pipeline_media()
    tensors = {f"input/{k}": torch.from_numpy(v) for k, v in media.items()}
    meta = {}
    tok = AutoTokenizer.from_pretrained(ckpt, subfolder="tokenizer")
    te = UMT5EncoderModel.from_pretrained(ckpt, subfolder="text_encoder",
                                          torch_dtype=torch.float32).eval()
    vae = AutoencoderKLWan.from_pretrained(ckpt, subfolder="vae", torch_dtype=torch.float32).eval()
    for name, c in PIPELINE_CASES.items():
        SELECTIONS.clear()
        sched = FlowMatchEulerDiscreteScheduler.from_pretrained(ckpt, subfolder="scheduler")
        dit = load_original_dit(plv, ckpt, c.get("bsa"))
        pipe = plv.LongCatVideoPipeline(tokenizer=tok, text_encoder=te, vae=vae, scheduler=sched,
                                        dit=dit)
        pipe.to("cpu")
        size = (c["height"], c["width"])
        pipe.get_condition_shape = lambda *a, _s=size, **k: _s  # patch 4: fixed tiny bucket
        gen = torch.Generator("cpu").manual_seed(c["seed"])
        common = dict(num_inference_steps=c["steps"], generator=gen, output_type="latent")
        if c.get("distill"):
            set_loras(dit, ckpt, [["cfg_step", 1.0]])
        if c["task"] == "t2v":
            out = pipe.generate_t2v(prompt=c["prompt"], negative_prompt=c.get("negative_prompt"),
                                    height=c["height"], width=c["width"],
                                    num_frames=c["num_frames"], use_distill=c.get("distill", False),
                                    guidance_scale=c["guidance"], **common)
        elif c["task"] == "i2v":
            out = pipe.generate_i2v(image=Image.fromarray(media[c["image"]]), prompt=c["prompt"],
                                    negative_prompt=c.get("negative_prompt"),
                                    num_frames=c["num_frames"], use_distill=c.get("distill", False),
                                    guidance_scale=c["guidance"], **common)
        elif c["task"] == "vc":
            video = [Image.fromarray(f) for f in media[c["video"]]]
            distill = c.get("distill", False)
            c = dict(c, enhance_hf=not distill)
            out = pipe.generate_vc(video=video, prompt=c["prompt"],
                                   negative_prompt=c.get("negative_prompt"),
                                   num_frames=c["num_frames"],
                                   num_cond_frames=c["num_cond_frames"], use_distill=distill,
                                   guidance_scale=c["guidance"], use_kv_cache=c["use_kv_cache"],
                                   enhance_hf=c["enhance_hf"], **common)
        else:  # refine
            set_loras(dit, ckpt, [["refinement", 1.0]])
            dit.enable_bsa()
            stage1 = [Image.fromarray(f) for f in media[c["stage1"]]]
            image = Image.fromarray(media[c["image"]]) if c.get("image") else None
            torch.manual_seed(c["seed"])  # the original draws these from the global RNG
            out = pipe.generate_refine(image=image, prompt=c["prompt"], stage1_video=stage1,
                                       num_cond_frames=c.get("num_cond_frames", 0),
                                       t_thresh=c["t_thresh"], **common)
        tensors[f"{name}/latents"] = out.contiguous()
        meta[name] = dict(c, latents_shape=list(out.shape), latents_absmax=float(out.abs().max()),
                          timesteps=[float(t) for t in pipe.scheduler.timesteps])
        if SELECTIONS:
            meta[name]["bsa_selection"] = SELECTIONS[:2]
        print(f"pipeline {name}: latents {tuple(out.shape)} absmax "
              f"{float(out.abs().max()):.4g} steps {len(pipe.scheduler.timesteps)}")
    return tensors, meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--original", help="checkout of the original at the pinned commit "
                    "(default: clone it into a temporary folder)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "original"),
                    help="output folder (default: tests/golden/original)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    from safetensors.torch import save_file

    from longcat_tools.synth import synth

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        original = get_original(args.original, tmp)
        plv = install_cpu_patches(original)
        ckpt = tmp / "tiny"
        synth(ckpt, SYNTH["preset"], seed=SYNTH["seed"])
        caption = json.loads((ckpt / "dit" / "config.json").read_text())["caption_channels"]
        dit_t, dit_meta = run_dit_cases(plv, ckpt, caption)
        pipe_t, pipe_meta = run_pipeline_cases(plv, ckpt)
        hashes = fixture_hashes(ckpt)
    save_file(dit_t, str(out / "dit.safetensors"))
    save_file(pipe_t, str(out / "pipelines.safetensors"))
    import diffusers
    import transformers

    manifest = {
        "original": {"url": ORIGINAL_URL, "commit": ORIGINAL_COMMIT},
        "command": "python tests/golden/generate.py --original PATH --out tests/golden/original",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "numpy": np.__version__},
        "fixture": {"synth": SYNTH, "sha256": hashes},
        "lora_files": LORA_FILES,
        "dit_cases": dit_meta,
        "pipeline_cases": pipe_meta,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}/dit.safetensors, pipelines.safetensors, manifest.json")


if __name__ == "__main__":
    main()
