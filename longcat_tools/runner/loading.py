"""Any checkpoint layout -> a ready ``LongCatTransformer3DModel``, one tensor at a time.

The model is built on the meta device (no memory), materialised empty on the target device, then
filled tensor by tensor from the shards named by the index: a FastVideo tensor (``to_q``, ``to_k``,
``to_v``, ...) is copied into its row slice of the native parameter (``qkv``, ...) through the
shared key map, so peak memory is the model plus one tensor. Every parameter must be written
exactly once with the right shape; unknown or duplicate tensors are errors.
"""

from __future__ import annotations

from pathlib import Path

import torch

from longcat_tools.checkpoint import layouts
from longcat_tools.errors import LongcatError
from longcat_tools.io.safetensors import read_header, read_tensor
from longcat_tools.model import dtypes, flavours, keymap
from longcat_tools.runner.dit import LongCatTransformer3DModel


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    return dtypes.parse(dtype, error=LongcatError)


def resolve_checkpoint(path: str | Path) -> layouts.Checkpoint:
    """The checkpoint at ``path``, which may also be its ``dit/`` or ``transformer/`` folder."""
    path = Path(path)
    if path.name in ("dit", "transformer") and (path / "config.json").is_file() \
            and not layouts.looks_like_checkpoint(path):
        return layouts.detect(path.parent)
    return layouts.detect(path)


def find_transformer(name_or_path: str | Path, subfolder: str | None = None) -> Path | None:
    """What ``LongCatTransformer3DModel.from_pretrained`` was given: a checkpoint (its root, or
    ``subfolder`` naming its ``dit/`` or ``transformer/``) -> that path; a ``save_pretrained``
    folder (a config.json that is no checkpoint's DiT) -> None. A Hugging Face repo id is looked
    up in the local cache, never downloaded (``longcat-tools download`` fetches one)."""
    from longcat_tools.checkpoint.hub import resolve_source

    root = resolve_source(name_or_path)
    if not root.is_dir():
        raise LongcatError(f"{root}: no such folder")
    if subfolder:
        folder = layouts.inside(root, subfolder, "subfolder")
        if not folder.is_dir():
            raise LongcatError(f"{root}: no subfolder '{subfolder}' (a checkpoint's DiT is in "
                               "dit/ or transformer/)")
    else:
        folder = root
    if layouts.looks_like_checkpoint(folder) or (
            folder.name in ("dit", "transformer") and layouts.looks_like_checkpoint(folder.parent)):
        return folder
    if (folder / "config.json").is_file():
        from longcat_tools.io import jsonio

        cfg = jsonio.read(folder / "config.json", what="model config")
        cls = cfg.get("_class_name") if isinstance(cfg, dict) else None
        if cls not in keymap.CLASS_BY_FLAVOUR.values():
            raise LongcatError(f"{folder}: config.json describes {cls or 'no model class'}, not "
                               "the LongCat-Video DiT (pass its dit/ or transformer/ folder)")
        return None
    raise LongcatError(f"{folder}: not a LongCat-Video checkpoint or DiT folder (expected dit/, "
                       "transformer/ or a config.json from save_pretrained)")


def load_transformer(path: str | Path, device: str | torch.device = "cpu",
                     dtype: str | torch.dtype = torch.float32,
                     progress=None) -> LongCatTransformer3DModel:
    """Build the DiT of the checkpoint at ``path`` (any layout) on ``device`` in ``dtype``."""
    ckpt = resolve_checkpoint(path)
    dtype = parse_dtype(dtype)
    config = ckpt.config()
    keymap.dit_dims(config, str(ckpt.config_path))  # absurd sizes: one line, nothing built
    with torch.device("meta"):
        model = LongCatTransformer3DModel.from_config(config)
    # never materialise fp32 first; nn.Module.to, as ModelMixin.to warns on every dtype cast
    model = torch.nn.Module.to(model, dtype).to_empty(device=device)
    params = dict(model.named_parameters())
    filled: dict[str, set[int]] = {name: set() for name in params}
    shards = layouts.transformer_shards(ckpt)
    by_file: dict[Path, list[str]] = {}
    for name, file in shards.items():
        by_file.setdefault(file, []).append(name)
    scratch = torch.empty(0, dtype=torch.uint8)  # one read buffer, grown to the largest tensor
    for file, names in by_file.items():
        header = read_header(file)
        with open(file, "rb") as f:
            for name in names:
                info = header.tensors.get(name)
                if info is None:
                    raise LongcatError(f"{file}: the index names tensor '{name}' but the shard "
                                       "does not hold it")
                part = flavours.to_native(name, ckpt.flavour)
                target = params.get(part.native)
                if target is None:
                    raise LongcatError(f"{file}: tensor '{name}' is not a parameter of the DiT")
                rows = target.shape[0] // part.count
                expect = (rows, *target.shape[1:]) if part.count > 1 else tuple(target.shape)
                if tuple(info.shape) != expect:
                    raise LongcatError(f"{file}: tensor '{name}' has shape {list(info.shape)}, "
                                       f"expected {list(expect)} from the config")
                if part.index in filled[part.native]:
                    raise LongcatError(f"{file}: tensor '{name}' appears twice")
                if scratch.numel() < info.nbytes:
                    scratch = torch.empty(info.nbytes, dtype=torch.uint8)
                tensor = read_tensor(f, info, scratch)
                with torch.no_grad():
                    dst = target[part.index * rows:(part.index + 1) * rows] if part.count > 1 \
                        else target
                    dst.copy_(tensor)  # casts on the way, in one pass
                filled[part.native].add(part.index)
                if progress is not None:
                    progress(info.nbytes)
    for name, got in filled.items():
        count = len(flavours.parts_of(name, ckpt.flavour))
        if len(got) != count:
            raise LongcatError(f"{ckpt.transformer_dir}: no weights for DiT parameter '{name}' "
                               "(incomplete checkpoint)")
    model.eval().requires_grad_(False)
    model.layout = ckpt.describe()
    return model
