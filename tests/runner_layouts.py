"""Test helper: re-express a native tiny checkpoint in the other layouts and its LoRA
in FastVideo's format, independently of the project's converter, to feed the runner's loaders."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from longcat_tools.io.safetensors import TensorSpec, write_file, write_sharded
from longcat_tools.model import keymap

COMPONENTS = ("tokenizer", "text_encoder", "vae", "scheduler")


def native_state(native: Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in sorted((native / "dit").glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


def _specs(sd: dict[str, torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec(k, v.dtype, tuple(v.shape), (lambda v=v: v.contiguous()))
            for k, v in sd.items()]


def make_layout(native: Path, dst: Path, layout: str, flavour: str = "fastvideo") -> Path:
    """``layout`` is 'converted' (sharded, with an index, keys in ``flavour``) or
    'fastvideo-single' (one transformer/model.safetensors in FastVideo names)."""
    sd = native_state(native)
    cfg = json.loads((native / "dit" / "config.json").read_text())
    if layout == "fastvideo-single":
        flavour = "fastvideo"
    if flavour == "fastvideo":
        out = {}
        for name, t in sd.items():
            for part in keymap.native_to_fastvideo(name):
                out[part.fastvideo] = t.chunk(part.count, dim=0)[part.index].clone()
        sd = out
        cfg["_class_name"] = keymap.FASTVIDEO_CLASS
        cfg["num_attention_heads"] = cfg.pop("num_heads")
    dst.mkdir(parents=True)
    tr = dst / "transformer"
    tr.mkdir()
    (tr / "config.json").write_text(json.dumps(cfg, indent=2))
    if layout == "fastvideo-single":
        write_file(tr / "model.safetensors", _specs(sd), {"format": "pt"})
    else:
        write_sharded(tr, "diffusion_pytorch_model", _specs(sd), 150_000, {"format": "pt"},
                      force_index=True)
    for comp in COMPONENTS:
        os.symlink((native / comp).resolve(), dst / comp)
    (dst / "model_index.json").write_text(json.dumps({
        "_class_name": "LongCatPipeline", "_diffusers_version": "0.35.1",
        "transformer": ["diffusers", cfg["_class_name"]]}))
    (dst / "lora").mkdir()
    for fname, sub in (("cfg_step_lora.safetensors", "distilled"),
                       ("refinement_lora.safetensors", "refinement")):
        (dst / "lora" / sub).mkdir()
        shutil.copy(native / "lora" / fname, dst / "lora" / sub / fname)
    return dst


def lora_to_fastvideo(src: Path, dst: Path) -> Path:
    """FastVideo's LoRA format (reference fastvideo_longcat.md §1.6): split targets get their rank
    rows of lora_down and their up block; single targets with up blocks get a block-diagonal B;
    ``lora_alpha = alpha_scale * rank``."""
    prefix, hyphen = "lora___lorahyphen___", "___lorahyphen___"
    sd = load_file(src)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        name, _, rest = k.partition(".")
        groups.setdefault(name[len(prefix):].replace(hyphen, "."), {})[rest] = v
    out: dict[str, torch.Tensor] = {}
    for module, p in groups.items():
        targets = keymap.native_module_to_fastvideo(module)
        down, alpha = p["lora_down.weight"], float(p["alpha_scale"])
        ups = [p["lora_up.weight"]] if "lora_up.weight" in p else \
            [p[f"lora_up.blocks.{j}.weight"] for j in range(sum(k.startswith("lora_up.blocks")
                                                                 for k in p))]
        if len(targets) > 1:
            r = down.shape[0] // len(targets)
            for j, t in enumerate(targets):
                out[f"{t}.lora_A"] = down[j * r:(j + 1) * r].clone()
                out[f"{t}.lora_B"] = ups[j].clone()
                out[f"{t}.lora_alpha"] = torch.tensor(alpha * r)
        else:
            t = targets[0]
            out[f"{t}.lora_A"] = down.clone()
            out[f"{t}.lora_B"] = torch.block_diag(*ups)
            out[f"{t}.lora_alpha"] = torch.tensor(alpha * down.shape[0])
    from safetensors.torch import save_file

    save_file(out, dst)
    return dst
