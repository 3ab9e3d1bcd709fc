"""Checkpoints for the verify tests, built from the tiny native one with our own code.

``to_converted`` writes the layouts ``convert`` and FastVideo's converter produce:
the DiT renamed and split with ``keymap`` (``torch.chunk`` along dim 0, as FastVideo does),
LoRAs rewritten in FastVideo's ``lora_A/lora_B/lora_alpha`` format (fused targets split,
block-diagonal B for multi-block single targets, alpha = alpha_scale x rank), other components
copied. Plus helpers that rewrite safetensors headers for the hostile cases.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import torch

from longcat_tools.checkpoint import layouts
from longcat_tools.io.safetensors import (
    TensorSpec,
    read_header,
    read_tensor,
    write_file,
    write_json,
    write_sharded,
)
from longcat_tools.model import keymap

FASTVIDEO_INDEX = {
    "_class_name": "LongCatPipeline", "_diffusers_version": "0.32.0",
    "workload_type": "video-generation", "tokenizer": ["transformers", "AutoTokenizer"],
    "text_encoder": ["transformers", "UMT5EncoderModel"], "vae": ["diffusers", "AutoencoderKLWan"],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
}
LORA_DIRS = {"cfg_step_lora.safetensors": "distilled", "refinement_lora.safetensors": "refinement"}


def load_all(files: list[Path]) -> dict[str, torch.Tensor]:
    out = {}
    for f in files:
        h = read_header(f)
        with open(f, "rb") as fh:
            out.update({n: read_tensor(fh, t) for n, t in h.tensors.items()})
    return out


def dit_fastvideo(native: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in native.items():
        parts = keymap.native_to_fastvideo(name)
        for part, piece in zip(parts, torch.chunk(t, len(parts), dim=0), strict=True):
            out[part.fastvideo] = piece.contiguous()
    return out


def lora_fastvideo(native: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Native LoRA tensors -> FastVideo format (what longcat_to_fastvideo.py writes)."""
    mods: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in native.items():
        body = key.removeprefix("lora___lorahyphen___").replace("___lorahyphen___", ".")
        mod, _, part = body.partition(".")
        while part.split(".")[0] not in ("lora_down", "lora_up", "alpha_scale"):
            head, _, part = part.partition(".")
            mod = f"{mod}.{head}"
        mods.setdefault(mod, {})[part] = t
    out: dict[str, torch.Tensor] = {}
    for mod, p in mods.items():
        targets = keymap.native_module_to_fastvideo(mod)
        ups = ([p["lora_up.weight"]] if "lora_up.weight" in p else
               [p[f"lora_up.blocks.{j}.weight"] for j in range(
                   sum(k.startswith("lora_up.blocks.") for k in p))])
        down, scale = p["lora_down.weight"], float(p["alpha_scale"])
        if len(targets) == len(ups):  # split fused q/k/v or k/v, or one-to-one
            r = down.shape[0] // len(ups)
            for i, (tgt, up) in enumerate(zip(targets, ups, strict=True)):
                out[f"{tgt}.lora_A"] = down[i * r:(i + 1) * r].contiguous()
                out[f"{tgt}.lora_B"] = up.contiguous()
                out[f"{tgt}.lora_alpha"] = torch.tensor(scale * r, dtype=torch.float32)
        else:  # one target, several up blocks: block-diagonal B
            (tgt,) = targets
            out[f"{tgt}.lora_A"] = down.contiguous()
            out[f"{tgt}.lora_B"] = torch.block_diag(*ups).contiguous()
            out[f"{tgt}.lora_alpha"] = torch.tensor(scale * down.shape[0], dtype=torch.float32)
    return out


def _specs(tensors: dict[str, torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec(n, t.dtype, tuple(t.shape), (lambda t=t: t)) for n, t in tensors.items()]


def write_checksums(root: Path) -> None:
    lines = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "checksums.sha256":
            lines.append(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  "
                         f"{p.relative_to(root).as_posix()}")
    (root / "checksums.sha256").write_text("\n".join(lines) + "\n")


def to_converted(src: Path, dst: Path, layout: str = "converted",
                 flavour: str = "fastvideo") -> Path:
    """``converted`` (sharded + index + checksums) or ``fastvideo-single`` from a native copy."""
    ck = layouts.detect(src)
    native = load_all(sorted(set(layouts.transformer_shards(ck).values())))
    tensors = dit_fastvideo(native) if flavour == "fastvideo" else native
    dst.mkdir(parents=True)
    for comp in layouts.COMPONENTS:
        shutil.copytree(src / comp, dst / comp)
    (dst / "transformer").mkdir()
    cfg = dict(ck.config())
    cfg["_class_name"] = keymap.CLASS_BY_FLAVOUR[flavour]
    if flavour == "fastvideo":
        cfg["num_attention_heads"] = cfg.pop("num_heads")
    write_json(dst / "transformer" / "config.json", cfg)
    if layout == "fastvideo-single":
        write_file(dst / "transformer" / layouts.FASTVIDEO_SINGLE, _specs(tensors))
    else:
        write_sharded(dst / "transformer", layouts.DIT_STEM, _specs(tensors), 250_000,
                      {"format": "pt"})
    write_json(dst / "model_index.json",
               {**FASTVIDEO_INDEX, "transformer": ["diffusers", cfg["_class_name"]]})
    for fname, sub in LORA_DIRS.items():
        lora = load_all([src / "lora" / fname])
        (dst / "lora" / sub).mkdir(parents=True)
        out = lora_fastvideo(lora) if flavour == "fastvideo" else lora
        write_file(dst / "lora" / sub / fname, _specs(out))
    if layout == "converted":
        write_checksums(dst)
    return dst


# --- raw safetensors surgery for hostile cases ---------------------------------------------

def split_file(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join_file(path: Path, header: dict | bytes, data: bytes) -> None:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def first_shard(root: Path) -> Path:
    return sorted((root / "dit").glob("*-00001-of-*.safetensors"))[0]
