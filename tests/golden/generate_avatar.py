"""Regenerate the avatar DiT goldens of the ORIGINAL LongCat-Video code (by hand, never in CI).

    PYTHONPATH=. venv-orig/bin/python tests/golden/generate_avatar.py \\
        --original /path/to/LongCat-Video --out tests/golden/original_avatar/dit

The original (``--original``, at ``generate.ORIGINAL_COMMIT``; cloned when left out) is imported
at run time; only numbers (safetensors) and JSON are written. Its
``LongCatVideoAvatarTransformer3DModel`` runs one forward per case, fp32 on the CPU, on tiny
avatar checkpoints made by OUR ``synth`` (``--model avatar-1.0``, fp32; ``--model avatar-1.5``,
bf16, so that the INT8 loader's cast of the kept tensors to bf16 changes nothing).

CPU patches, all at run time in this process (original_avatar/dit/README.md):

1. ``flash_attn`` is ``generate.py``'s exact fp32 stand-in; the synthesized configs have
   ``enable_flashattn2: true``, which the original's audio cross-attention needs (with no
   attention flag set it silently returns its input).
2. BSA: ``generate.py``'s dense stand-in for the Triton kernel over the selected chunks.
3. ``audio_process.torch_utils.torch_gc`` (``torch.cuda.ipc_collect``, which raises on a CPU-only
   torch; the speaker map calls it) is a no-op; ``TORCHDYNAMO_DISABLE=1`` (from ``generate.py``)
   runs the ``@torch.compile`` speaker-map function eagerly.
4. ``torchvision`` (imported by the original's audio utilities, never called by the DiT) is an
   empty module when it is not installed.

INT8: ``load_quantized_dit`` (the original's loader: int8 weights, float32 scales, everything
else cast to bf16), then ``.to(float32)``: float activations, so each ``QuantizedLinear``
computes with ``q * s`` in float32, as it does in the original's fp32 regions. bf16 activations
are not reproducible across CPUs, so they are not a golden.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import tempfile
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import generate as base  # noqa: E402  (sets TORCHDYNAMO_DISABLE before torch is imported)
import numpy as np  # noqa: E402
import torch  # noqa: E402

SYNTH = {"avatar-1.0": {"preset": "tiny", "seed": 0, "dtype": "fp32"},
         "avatar-1.5": {"preset": "tiny", "seed": 0, "dtype": "bf16"}}
# the DiT folder of each case's model, relative to the synth output
FOLDERS = {"v10_single": "avatar-1.0/LongCat-Video-Avatar/avatar_single",
           "v10_multi": "avatar-1.0/LongCat-Video-Avatar/avatar_multi",
           "v15": "avatar-1.5/LongCat-Video-Avatar-1.5/base_model",
           "v15_int8": "avatar-1.5/LongCat-Video-Avatar-1.5/base_model_int8"}
TEXT_LEN = 16
BSA = {"sparsity": 0.5, "chunk_3d_shape_q": [1, 4, 4], "chunk_3d_shape_k": [1, 4, 4]}

# batch, latent frames (reference + condition + noise), latent size, condition latents (the
# reference counts as one), reference (ref_img_index, mask_frame_range) or None, speakers and
# masks (several speakers), KV cache, BSA.
CASES: dict[str, dict] = {
    "v10_single_ref": dict(model="v10_single", batch=2, frames=8, size=8, ncl=3,
                           ref=[4, 1]),  # noise frames 1..3 of 5 skip the reference
    "v10_multi_ref": dict(model="v10_multi", batch=1, frames=6, size=8, ncl=2, ref=[5, 0],
                          speakers=2, masks=3),
    "v10_multi_kv": dict(model="v10_multi", batch=1, frames=6, size=8, ncl=2, ref=[3, 1],
                         speakers=2, masks=3, kv=True),
    "v15_single_ref": dict(model="v15", batch=1, frames=6, size=8, ncl=2, ref=[-3, None]),
    "v15_at2v": dict(model="v15", batch=2, frames=3, size=8, ncl=0),
    "v15_ai2v_3speakers": dict(model="v15", batch=1, frames=4, size=8, ncl=1, speakers=3,
                               masks=4),
    "v15_kv": dict(model="v15", batch=2, frames=7, size=8, ncl=3, ref=[4, 1], kv=True),
    "v15_bsa_ref_masked": dict(model="v15", batch=1, frames=8, size=16, ncl=3, ref=[4, 1],
                               bsa=BSA),
    "v15_bsa": dict(model="v15", batch=1, frames=8, size=16, ncl=3, ref=[9, 1], bsa=BSA),
    "v15_int8_ref": dict(model="v15_int8", batch=1, frames=6, size=8, ncl=2, ref=[2, 1]),
}


def pixel_masks(count: int, px: int) -> torch.Tensor:
    """[count, px, px] 0/1: speaker 1 left, speaker 2 right, the background the rest, then
    small "others" boxes."""
    m = torch.zeros(count, px, px)
    m[0, px // 8:, : px // 2 - px // 8] = 1
    m[1, px // 4:, px // 2 + px // 16:] = 1
    m[2] = 1 - (m[0] + m[1]).clamp(max=1)
    for k in range(3, count):
        m[k, : px // 8, (k - 3) * px // 8:(k - 2) * px // 8] = 1
    return m


def case_inputs(name: str, c: dict, dims: dict) -> dict[str, torch.Tensor]:
    """The inputs of one case, from a generator seeded by the case's position."""
    g = torch.Generator().manual_seed(1000 + list(CASES).index(name))
    B, T, S, ncl = c["batch"], c["frames"], c["size"], c["ncl"]
    video = T - (1 if c.get("ref") else 0)  # latent frames the audio covers
    speakers = c.get("speakers") or B
    t = {"x": torch.randn(B, 16, T, S, S, generator=g),
         "text": torch.randn(B, 1, TEXT_LEN, dims["caption_channels"], generator=g),
         "audio": torch.randn(speakers, 1 + dims["vae_scale"] * (video - 1),
                              dims["audio_window"], dims["audio_block"], dims["audio_channel"],
                              generator=g)}
    mask = torch.zeros(B, TEXT_LEN, dtype=torch.int64)
    for b in range(B):
        mask[b, : 5 + 6 * b] = 1
    t["mask"] = mask
    noise_t = torch.tensor([700.0, 251.5][:B])
    t["t"] = noise_t[:, None].repeat(1, T)
    t["t"][:, :ncl] = 0.0
    if c.get("masks"):
        t["masks"] = pixel_masks(c["masks"], S * 8)
    return t


def run_case(dit, c: dict, t: dict[str, torch.Tensor], caption: int, tensors: dict, name: str):
    ref = c.get("ref")
    kw = dict(num_ref_latents=1 if ref else None, ref_img_index=ref[0] if ref else None)
    masks = t.get("masks")
    if c.get("kv"):
        ncl = c["ncl"]
        cond_audio = t["audio"] if masks is not None else t["audio"][:1]
        _, cache = dit(hidden_states=t["x"][:1, :, :ncl], timestep=torch.zeros(1, ncl),
                       encoder_hidden_states=torch.zeros(1, 1, TEXT_LEN, caption),
                       num_cond_latents=ncl, return_kv=True, skip_crs_attn=True,
                       audio_embs=cond_audio, **kw)
        for i, (k, v) in cache.items():
            tensors[f"{name}/k{i}"], tensors[f"{name}/v{i}"] = k, v
        return dit(hidden_states=t["x"][:, :, ncl:], timestep=t["t"][:, ncl:],
                   encoder_hidden_states=t["text"], encoder_attention_mask=t["mask"],
                   num_cond_latents=ncl, kv_cache_dict=cache, audio_embs=t["audio"],
                   mask_frame_range=ref[1] if ref else None, ref_target_masks=masks, **kw)
    return dit(hidden_states=t["x"], timestep=t["t"], encoder_hidden_states=t["text"],
               encoder_attention_mask=t["mask"], num_cond_latents=c["ncl"],
               audio_embs=t["audio"], mask_frame_range=ref[1] if ref else None,
               ref_target_masks=masks, **kw)


def install_cpu_patches(original: Path):
    import diffusers.models.modeling_utils  # noqa: F401  (they probe for flash_attn on import:
    import transformers.modeling_utils  # noqa: F401  let them see none before the stand-in)
    from transformers import Wav2Vec2Model, WhisperModel  # noqa: F401

    try:
        import torchvision  # noqa: F401
    except ImportError:
        sys.modules["torchvision"] = types.ModuleType("torchvision")
    sys.modules["flash_attn"] = base.make_flash_attn_module()
    sys.path.insert(0, str(original))
    from longcat_video.audio_process import torch_utils
    from longcat_video.block_sparse_attention import bsa_interface
    from longcat_video.modules.avatar import longcat_video_dit_avatar as dit_avatar
    from longcat_video.modules.quantization import load_quantized_dit

    bsa_interface.attn_fwd_bsa_varlen_triton = base.bsa_selected_attention
    torch_utils.torch_gc = lambda: None
    return dit_avatar.LongCatVideoAvatarTransformer3DModel, load_quantized_dit


def load_original(cls, load_int8, root: Path, model: str, bsa):
    folder = root / FOLDERS[model]
    if model == "v15_int8":
        dit = load_int8(str(folder.parent), subfolder=folder.name, cp_split_hw=[1, 1])
        dit = dit.to(torch.float32)
    else:
        kw = {"cp_split_hw": [1, 1], "torch_dtype": torch.float32}
        if bsa is not None:
            kw["bsa_params"] = bsa
        dit = cls.from_pretrained(str(folder.parent), subfolder=folder.name, **kw)
    if bsa is not None:
        dit.enable_bsa()
    return dit.eval().requires_grad_(False)


def folder_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file of the DiT folders the cases read."""
    out = {}
    for rel in sorted(set(FOLDERS.values())):
        for f in sorted((root / rel).iterdir()):
            out[f"{rel}/{f.name}"] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--original", help="checkout of the original at the pinned commit")
    ap.add_argument("--out", default=str(Path(__file__).parent / "original_avatar" / "dit"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    from safetensors.torch import save_file

    from longcat_tools.synth import synth

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        original = base.get_original(args.original, tmp)
        cls, load_int8 = install_cpu_patches(original)
        root = tmp / "weights"
        root.mkdir()
        for model, s in SYNTH.items():
            synth(root / model, s["preset"], model=model, seed=s["seed"], dtype=s["dtype"])
        for name, c in CASES.items():
            base.SELECTIONS.clear()
            cfg = json.loads((root / FOLDERS[c["model"]] / "config.json").read_text())
            dims = {k: cfg.get(k, d) for k, d in (("caption_channels", None), ("vae_scale", 4),
                                                  ("audio_window", 5), ("audio_block", 12),
                                                  ("audio_channel", 768))}
            inputs = case_inputs(name, c, dims)
            tensors.update({f"{name}/input/{k}": v for k, v in inputs.items()})
            dit = load_original(cls, load_int8, root, c["model"], c.get("bsa"))
            with torch.no_grad():
                res = run_case(dit, c, inputs, dims["caption_channels"], tensors, name)
            tensors[f"{name}/out"] = res.contiguous()
            meta[name] = dict(c, folder=FOLDERS[c["model"]], text_len=TEXT_LEN,
                              out_absmax=float(res.abs().max()))
            if base.SELECTIONS:
                meta[name]["bsa_selection"] = list(base.SELECTIONS)
            print(f"{name}: out {tuple(res.shape)} absmax {float(res.abs().max()):.4g}"
                  + (f" bsa calls {len(base.SELECTIONS)}" if base.SELECTIONS else ""))
        hashes = folder_hashes(root)
    for a, b in [("v15_bsa", "v15_bsa_ref_masked")]:
        err = base.rel_err(tensors[f"{a}/out"], tensors[f"{b}/out"])
        print(f"  {a} vs {b}: max rel diff {err:.3g}")
        assert err > 1e-3
    save_file(tensors, str(out / "dit.safetensors"))
    import diffusers
    import transformers

    manifest = {
        "original": {"url": base.ORIGINAL_URL, "commit": base.ORIGINAL_COMMIT},
        "command": "PYTHONPATH=. python tests/golden/generate_avatar.py --original PATH",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "numpy": np.__version__},
        "fixture": {"synth": SYNTH, "sha256": hashes},
        "cases": meta,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}/dit.safetensors, manifest.json")


if __name__ == "__main__":
    main()
