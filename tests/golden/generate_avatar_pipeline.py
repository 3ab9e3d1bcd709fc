"""Regenerate the avatar pipeline goldens of the ORIGINAL LongCat-Video code (by hand, never in CI).

    PYTHONPATH=. venv-orig/bin/python tests/golden/generate_avatar_pipeline.py \\
        --original /path/to/LongCat-Video --out tests/golden/original_avatar/pipelines

The original's ``LongCatVideoAvatarPipeline.generate_at2v`` / ``generate_ai2v`` /
``generate_avc`` run with ``output_type="latent"``, fp32 on the CPU, on tiny fp32 trees made by
OUR ``synth --model avatar-1.0 | avatar-1.5``, with the CPU patches of ``generate_avatar.py``
(flash-attn stand-in, ``torch_gc`` no-ops, eager speaker map) plus the avatar pipeline's own
``torch_gc`` and a fixed ``get_condition_shape`` (the tiny size). The audio embeddings are fixed
random tensors (the audio front-end has its own goldens), the noise comes from a CPU generator
seeded per case. Only numbers (safetensors) and JSON are written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import generate as base  # noqa: E402  (sets TORCHDYNAMO_DISABLE before torch is imported)
import generate_avatar  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

SYNTH = {"avatar-1.0": {"preset": "tiny", "seed": 0, "dtype": "fp32"},
         "avatar-1.5": {"preset": "tiny", "seed": 0, "dtype": "fp32"}}
ROOTS = {"avatar-1.0": "avatar-1.0/LongCat-Video-Avatar",
         "avatar-1.5": "avatar-1.5/LongCat-Video-Avatar-1.5"}
NEGATIVE = "Close-up, blurred details, worst quality"
# task, release, DiT folder, size, frames, steps, guidance (text, audio), speakers, extras
CASES: dict[str, dict] = {
    "v10_at2v": dict(task="at2v", model="avatar-1.0", folder="avatar_single", size=[32, 32],
                     frames=9, steps=2, tg=4.0, ag=3.0, speakers=1, seed=42),
    "v10_ai2v_two_speakers": dict(task="ai2v", model="avatar-1.0", folder="avatar_multi",
                                  size=[64, 64], frames=9, steps=2, tg=4.0, ag=2.5, speakers=2,
                                  seed=3),
    "v10_avc_kv": dict(task="avc", model="avatar-1.0", folder="avatar_single", size=[32, 32],
                       frames=17, cond=5, steps=2, tg=3.0, ag=4.0, speakers=1, kv=True,
                       ref=[3, 1], seed=11),
    "v15_at2v": dict(task="at2v", model="avatar-1.5", folder="base_model", size=[32, 48],
                     frames=9, steps=2, tg=4.0, ag=4.0, speakers=1, seed=7),
    "v15_ai2v": dict(task="ai2v", model="avatar-1.5", folder="base_model", size=[32, 32],
                     frames=9, steps=2, tg=1.0, ag=4.0, speakers=1, seed=5),
    "v15_avc_nokv": dict(task="avc", model="avatar-1.5", folder="base_model", size=[32, 32],
                         frames=17, cond=5, steps=2, tg=4.0, ag=4.0, speakers=1, kv=False,
                         ref=[3, 1], seed=13),
    "v15_avc_two_speakers_kv": dict(task="avc", model="avatar-1.5", folder="base_model",
                                    size=[64, 64], frames=13, cond=5, steps=2, tg=4.0, ag=4.0,
                                    speakers=2, kv=True, ref=[-2, 0], seed=17),
    "v15_distill_at2v": dict(task="at2v", model="avatar-1.5", folder="base_model", size=[32, 32],
                             frames=9, steps=8, tg=1.0, ag=1.0, speakers=1, distill=True,
                             seed=19),
    "v15_distill_avc": dict(task="avc", model="avatar-1.5", folder="base_model", size=[32, 32],
                            frames=13, cond=5, steps=8, tg=1.0, ag=1.0, speakers=1, kv=True,
                            distill=True, ref=[10, 3], seed=23),
}
PROMPT = "A woman talks to the camera in a quiet room."


def two_speaker_masks(h: int, w: int) -> torch.Tensor:
    """[3, h, w]: left box, right box, background (the multi demo's layout, drawn here)."""
    m = torch.zeros(3, h, w)
    m[0, h // 8: h - h // 8, w // 16: w // 2 - w // 16] = 1
    m[1, h // 8: h - h // 8, w // 2 + w // 16: w - w // 16] = 1
    m[2] = 1 - m[0] - m[1]
    return m


def case_inputs(name: str, c: dict, cfg: dict) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2000 + list(CASES).index(name))
    h, w = c["size"]
    t = {"audio": torch.randn(c["speakers"], c["frames"], cfg.get("audio_window", 5),
                              cfg.get("audio_block", 12), cfg.get("audio_channel", 768),
                              generator=g)}
    if c["task"] == "ai2v":
        t["image"] = torch.from_numpy(base.frames_uint8(1, h + 8, w + 24, 1)[0])
    if c["task"] == "avc":
        t["video"] = torch.from_numpy(base.frames_uint8(c["cond"] + 4, h, w, 2))
        t["ref_latent"] = torch.randn(1, 16, 1, h // 8, w // 8, generator=g)
        t["video_latent"] = torch.randn(1, 16, 3, h // 8, w // 8, generator=g)
    if c["speakers"] > 1:
        src = t["image"].shape[:2] if "image" in t else (h, w)
        t["masks"] = two_speaker_masks(*src)
    return t


def run_case(orig, root: Path, c: dict, t: dict) -> torch.Tensor:
    from longcat_video.modules.autoencoder_kl_wan import AutoencoderKLWan
    from longcat_video.modules.scheduling_flow_match_euler_discrete import (
        FlowMatchEulerDiscreteScheduler,
    )
    from PIL import Image
    from transformers import AutoTokenizer, UMT5EncoderModel

    avatar = root / ROOTS[c["model"]]
    basef = avatar.parent / "LongCat-Video"
    tok = AutoTokenizer.from_pretrained(basef, subfolder="tokenizer")
    te = UMT5EncoderModel.from_pretrained(basef, subfolder="text_encoder",
                                          torch_dtype=torch.float32).eval()
    vae = AutoencoderKLWan.from_pretrained(basef, subfolder="vae",
                                           torch_dtype=torch.float32).eval()
    sched_home = avatar if c["model"] == "avatar-1.5" else basef
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(sched_home, subfolder="scheduler")
    dit = orig.cls.from_pretrained(str(avatar), subfolder=c["folder"], cp_split_hw=[1, 1],
                                   torch_dtype=torch.float32).eval().requires_grad_(False)
    if c.get("distill"):
        dit.load_lora(str(avatar / "lora" / "dmd_lora.safetensors"), "dmd", multiplier=1.0,
                      lora_network_dim=base.LORA_RANK, lora_network_alpha=base.LORA_RANK / 2)
        dit.enable_loras(["dmd"])
    version = "avatar-v1.5" if c["model"] == "avatar-1.5" else "avatar-v1.0"
    pipe = orig.pipeline(tokenizer=tok, text_encoder=te, vae=vae, scheduler=sched, dit=dit,
                         model_type=version)
    pipe.to("cpu")
    size = tuple(c["size"])
    pipe.get_condition_shape = lambda *a, _s=size, **k: _s
    gen = torch.Generator("cpu").manual_seed(c["seed"])
    common = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_frames=c["frames"],
                  num_inference_steps=c["steps"], use_distill=c.get("distill", False),
                  text_guidance_scale=c["tg"], audio_guidance_scale=c["ag"], generator=gen,
                  output_type="latent", audio_emb=t["audio"])
    masks = t.get("masks")
    with torch.no_grad():
        if c["task"] == "at2v":
            return pipe.generate_at2v(height=size[0], width=size[1], **common)
        if c["task"] == "ai2v":
            return pipe.generate_ai2v(image=Image.fromarray(t["image"].numpy()),
                                      ref_target_masks=masks, **common)
        video = [Image.fromarray(f) for f in t["video"].numpy()]
        return pipe.generate_avc(video=video, video_latent=t["video_latent"], height=size[0],
                                 width=size[1], num_cond_frames=c["cond"],
                                 use_kv_cache=c["kv"], enhance_hf=not c.get("distill", False),
                                 ref_latent=t["ref_latent"], ref_img_index=c["ref"][0],
                                 mask_frame_range=c["ref"][1], ref_target_masks=masks, **common)


class Original:
    def __init__(self, original: Path) -> None:
        self.cls, _ = generate_avatar.install_cpu_patches(original)
        from longcat_video import pipeline_longcat_video_avatar as pla

        pla.torch_gc = lambda: None
        self.pipeline = pla.LongCatVideoAvatarPipeline


def tree_hashes(root: Path) -> dict[str, str]:
    out = {}
    for model in SYNTH:
        for f in sorted((root / model).rglob("*")):
            if f.is_file() and f.suffix in (".safetensors", ".json"):
                out[str(f.relative_to(root))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--original", help="checkout of the original at the pinned commit")
    ap.add_argument("--out", default=str(Path(__file__).parent / "original_avatar" / "pipelines"))
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
        orig = Original(original)
        root = tmp / "weights"
        root.mkdir()
        for model, s in SYNTH.items():
            synth(root / model, s["preset"], model=model, seed=s["seed"], dtype=s["dtype"])
        for name, c in CASES.items():
            cfg = json.loads((root / ROOTS[c["model"]] / c["folder"] / "config.json")
                             .read_text())
            t = case_inputs(name, c, cfg)
            tensors.update({f"{name}/input/{k}": v.contiguous() for k, v in t.items()})
            res = run_case(orig, root, c, t)
            tensors[f"{name}/latents"] = res.contiguous()
            meta[name] = dict(c, negative_prompt=NEGATIVE, prompt=PROMPT,
                              latents_shape=list(res.shape),
                              latents_absmax=float(res.abs().max()))
            print(f"{name}: latents {tuple(res.shape)} absmax {float(res.abs().max()):.4g}")
        hashes = tree_hashes(root)
    save_file(tensors, str(out / "pipelines.safetensors"))
    import diffusers
    import transformers

    manifest = {
        "original": {"url": base.ORIGINAL_URL, "commit": base.ORIGINAL_COMMIT},
        "command": "PYTHONPATH=. python tests/golden/generate_avatar_pipeline.py --original PATH",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "numpy": np.__version__},
        "fixture": {"synth": SYNTH, "sha256": hashes},
        "cases": meta,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}/pipelines.safetensors, manifest.json")


if __name__ == "__main__":
    main()
