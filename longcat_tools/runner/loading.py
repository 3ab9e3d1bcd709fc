"""Any checkpoint layout -> a ready ``LongCatTransformer3DModel``, one tensor at a time.

The model is built on the meta device (no memory), materialised empty on the target device, then
filled tensor by tensor from the shards named by the index: a FastVideo tensor (``to_q``, ``to_k``,
``to_v``, ...) is copied into its row slice of the native parameter (``qkv``, ...) through the
shared key map, so peak memory is the model plus one tensor. Every parameter must be written
exactly once with the right shape; unknown or duplicate tensors are errors. The same fill reads
some parameters back later (``names``): how merged LoRA weights are restored exactly.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Collection
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from longcat_tools.checkpoint import layouts
from longcat_tools.errors import LongcatError, UsageError
from longcat_tools.io.safetensors import (
    TensorInfo,
    read_header,
    read_tensor,
    read_tensor_at,
    require_float,
)
from longcat_tools.kernels import fp8 as fp8_ops
from longcat_tools.model import dtypes, flavours, keymap
from longcat_tools.model import fp8 as fp8_format
from longcat_tools.runner.dit import LongCatTransformer3DModel

# Reads in flight while loading, each into its own staging buffer of the largest tensor's size
# (pinned on CUDA: 96 MiB each at 13.6B, the qkv weight). The page-cache copies bound the load:
# on an H100 host the whole pipeline loaded in 4.4-4.5 s with 4, 3.2 s with 8 and 3.0-3.1 s
# with 16 (benchmarks/results/load_threads_h100.json).
READ_THREADS = 8


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
    if not root.exists():
        raise UsageError(f"{root}: no such folder (pass a checkpoint folder or a downloaded "
                         "Hugging Face repo id)")
    if not root.is_dir():
        raise LongcatError(f"{root}: not a folder (pass a checkpoint folder)")
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


@dataclass(frozen=True)
class Origin:
    """The checkpoint a model was loaded from, in which dtype, its shards' size and mtime then,
    and each tensor's version counter since it last held the checkpoint's values: enough to
    read some parameters again exactly (``runner.lora_merge`` restores merged weights so), and
    to notice when that is no longer possible (an optimizer step or an in-place edit bumps the
    counter; an edit through ``.data`` does not)."""

    ckpt: layouts.Checkpoint
    dtype: torch.dtype
    stamps: tuple[tuple[Path, int, int], ...]
    versions: dict[str, int]

    @classmethod
    def of(cls, ckpt: layouts.Checkpoint, model: torch.nn.Module) -> Origin:
        files = sorted(set(layouts.transformer_shards(ckpt).values()))
        return cls(ckpt, model.dtype, tuple((f, *_stamp(f)) for f in files), {})

    def unchanged(self) -> bool:
        """Whether every shard is still there with the size and mtime it had at load."""
        try:
            return all(_stamp(f) == (size, mtime) for f, size, mtime in self.stamps)
        except OSError:
            return False

    def holds(self, tensors: dict[str, torch.Tensor]) -> bool:
        """Whether these tensors still hold the checkpoint's values (none edited in place)."""
        return all(self.versions.get(n) == t._version for n, t in tensors.items())

    def refilled(self, tensors: dict[str, torch.Tensor]) -> None:
        """These tensors hold the checkpoint's values again (read back from it)."""
        self.versions.update((n, t._version) for n, t in tensors.items())


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


@dataclass(frozen=True)
class _Item:
    """One checkpoint tensor to read, and the parameter rows it fills."""

    file: Path
    info: TensorInfo
    part: keymap.Part
    target: torch.Tensor
    rows: slice


def _plan(model: LongCatTransformer3DModel, ckpt: layouts.Checkpoint,
          names: Collection[str] | None) -> tuple[list[_Item], dict[str, _Item]]:
    """Every tensor to read (by shard and offset), checked against the model before any data is
    read, and the scale tensors of an fp8 source whose weights go into a plain model."""
    targets = {n: t for n, t in model.named_parameters()}
    targets.update((n, b) for n, b in model.named_buffers() if n.endswith(f".{fp8_format.SCALE}"))
    wanted = set(targets) if names is None else set(names)
    stray = sorted(wanted - set(targets))
    if stray:
        raise LongcatError(f"'{stray[0]}' is not a parameter of the DiT")
    headers: dict[Path, Any] = {}
    items: list[_Item] = []
    scales: dict[str, _Item] = {}
    seen: set[tuple[str, int]] = set()
    src_fp8 = ckpt.is_fp8
    for name, file in layouts.transformer_shards(ckpt).items():
        part = flavours.to_native(name, ckpt.flavour)
        scale_only = src_fp8 and part.native not in targets and fp8_format.is_scale(part.native)
        if part.native not in targets and not scale_only:
            raise LongcatError(f"{file}: tensor '{name}' is not a parameter of the DiT")
        weight = part.native.rpartition(".")[0] + ".weight" if scale_only else part.native
        if weight not in wanted:  # a scale is read only for a weight that is
            continue
        if file not in headers:
            headers[file] = read_header(file)
        info = headers[file].tensors.get(name)
        if info is None:
            raise LongcatError(f"{file}: the index names tensor '{name}' but the shard does not "
                               "hold it")
        if info.dtype == fp8_format.STORED_DTYPE and not src_fp8:
            raise LongcatError(f"{file}: tensor '{name}' is e4m3 but {ckpt.transformer_dir} has "
                               f"no {fp8_format.CONFIG_FILE} saying how to scale it (write fp8 "
                               "checkpoints with convert --dtype fp8)")
        if scale_only:  # an fp8 source into a plain model: checked against its weight
            scales[name] = _Item(file, info, part, torch.empty(0), slice(0, 0))
            continue
        if targets[part.native].is_floating_point():  # the avatar's Int8Linear rows are not
            require_float(file, info)
        shape = tuple(targets[part.native].shape)
        rows = shape[0] // part.count if shape else 1
        expect = (rows, *shape[1:]) if part.count > 1 else shape
        if tuple(info.shape) != expect:
            raise LongcatError(f"{file}: tensor '{name}' has shape {list(info.shape)}, expected "
                               f"{list(expect)} from the config")
        if (part.native, part.index) in seen:
            raise LongcatError(f"{file}: tensor '{name}' appears twice")
        seen.add((part.native, part.index))
        items.append(_Item(file, info, part, targets[part.native],
                           slice(part.index * rows, (part.index + 1) * rows)))
    for item in items:  # e4m3 rows dequantized into a plain model need their scales
        if item.info.dtype == fp8_format.STORED_DTYPE and item.target.dtype != fp8_ops.E4M3:
            scale = scales.get(_scale_name(item.info.name))
            if scale is None or tuple(scale.info.shape) != (item.info.shape[0],):
                raise LongcatError(f"{item.file}: e4m3 tensor '{item.info.name}' needs a "
                                   f"'{_scale_name(item.info.name)}' of shape "
                                   f"[{item.info.shape[0]}] beside it")
    got = Counter(n for n, _ in seen)
    for name in wanted:
        weight = targets.get(name.rpartition(".")[0] + ".weight")
        if fp8_format.is_scale(name) and not src_fp8 and weight is not None \
                and weight.dtype == fp8_ops.E4M3:
            continue  # a plain source: quantized on load along with its weight
        if got[name] != len(flavours.parts_of(name, ckpt.flavour)):
            raise LongcatError(f"{ckpt.transformer_dir}: no weights for DiT parameter '{name}' "
                               "(incomplete checkpoint)")
    return items, scales


def _scale_name(weight: str) -> str:
    return weight.rpartition(".")[0] + f".{fp8_format.SCALE}"


class _Reader:
    """Reads tensors into a ring of staging buffers on ``threads`` threads, ahead of the copies.

    On CUDA the buffers are pinned, so each host-to-device copy is one DMA that overlaps the
    next reads; a buffer is refilled only after the copy out of it has finished (its event).
    ``os.preadv`` releases the GIL and keeps no file position, so the threads share the
    files' descriptors."""

    def __init__(self, items: list[_Item], cuda: bool, threads: int) -> None:
        self.items = items
        size = max((i.info.nbytes for i in items), default=0)
        n = min(len(items), threads)
        self.buffers = [torch.empty(size, dtype=torch.uint8, pin_memory=cuda) for _ in range(n)]
        self.events: list[Any] = [None] * n
        self.fds = {f: os.open(f, os.O_RDONLY) for f in {i.file for i in items}}
        self.pool = ThreadPoolExecutor(max(n, 1), thread_name_prefix="longcat-load")
        self.futures = [self._submit(k) for k in range(n)]

    def _submit(self, k: int) -> Future:
        slot = k % len(self.buffers)
        event = self.events[slot]
        item = self.items[k]

        def read() -> torch.Tensor:
            if event is not None:
                event.synchronize()  # the copy out of this buffer is done
            return read_tensor_at(self.fds[item.file], item.info, self.buffers[slot], item.file)

        return self.pool.submit(read)

    def __iter__(self):
        for k, item in enumerate(self.items):
            tensor = self.futures[k].result()
            yield item, tensor
            if k + len(self.buffers) < len(self.items):
                self.futures.append(self._submit(k + len(self.buffers)))

    def copied(self, k: int, event: Any) -> None:
        """The copy out of item ``k``'s buffer was queued; ``event`` completes with it."""
        self.events[k % len(self.buffers)] = event

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        for fd in self.fds.values():
            os.close(fd)


def fill_parameters(model: LongCatTransformer3DModel, ckpt: layouts.Checkpoint,
                    names: Collection[str] | None = None, progress=None) -> None:
    """Copy the checkpoint's tensors into ``model``'s parameters (all, or only ``names``), in
    place and converted to each parameter's form; shards holding none of ``names`` are not
    opened. Each parameter filled must get all its parts once, with the right shapes.

    Forms: a cast to the parameter's dtype; an fp8 layer (``Linear.to_fp8``) from a plain
    source is quantized on load, rows and scales together (per output row, so each FastVideo
    slice on its own gives the same bits); a plain layer from an fp8 source is dequantized
    with the source's scales. On CUDA the bytes cross as they are stored and are converted on
    the GPU, where it is fast."""
    items, scale_items = _plan(model, ckpt, names)
    device = next(model.parameters()).device
    scales = {}
    for name, item in scale_items.items():  # small: one float per output row
        with open(item.file, "rb") as f:
            scales[name] = read_tensor(f, item.info).to(device)
    buffers = dict(model.named_buffers())
    cuda = device.type == "cuda"
    reader = _Reader(items, cuda, READ_THREADS)
    # the copies and the events that free their buffers on the parameters' GPU, not the
    # current one (cuda:1 with cuda:0 current would free a buffer before its DMA is done)
    try:
        with torch.no_grad(), torch.cuda.device(device) if cuda else contextlib.nullcontext():
            for k, (item, tensor) in enumerate(reader):
                src = tensor.to(device, non_blocking=True) \
                    if device.type == "cuda" and tensor.dtype != item.target.dtype else tensor
                dst = item.target[item.rows] if item.part.count > 1 else item.target
                src_name = item.info.name
                if dst.dtype == src.dtype:
                    dst.copy_(tensor, non_blocking=True)  # pinned on CUDA: one DMA
                elif dst.dtype == fp8_ops.E4M3:
                    q, scale = fp8_ops.quantize_weight(src)
                    dst.copy_(q)
                    buffers[_scale_name(item.part.native)][item.rows].copy_(scale)
                elif src.dtype == fp8_ops.E4M3 and dst.dtype != fp8_ops.E4M3:
                    dst.copy_(fp8_ops.dequantize_weight(src, scales[_scale_name(src_name)],
                                                        dst.dtype))
                else:
                    dst.copy_(src)  # casts on the way, in one pass
                if cuda:
                    event = torch.cuda.Event()
                    event.record(torch.cuda.current_stream(device))
                    reader.copied(k, event)
                if progress is not None:
                    progress(item.info.nbytes)
    finally:
        reader.close()


# The DiT's tensors are made outside inference mode even when the caller loads under it: an
# inference tensor tracks no version (``Origin``) and takes no in-place LoRA merge later.
@torch.inference_mode(False)
def empty_transformer(path: str | Path, device: str | torch.device = "cpu",
                      dtype: str | torch.dtype = torch.float32, fp8: bool | None = None
                      ) -> tuple[LongCatTransformer3DModel, layouts.Checkpoint]:
    """The DiT of the checkpoint at ``path``, allocated on ``device`` in ``dtype`` but not
    filled (``fill_parameters`` does that), and the checkpoint. Built on the meta device first,
    so nothing is materialised twice; ``fp8`` as ``load_transformer``'s."""
    ckpt = resolve_checkpoint(path)
    dtype = parse_dtype(dtype)
    config = ckpt.config()
    keymap.dit_dims(config, str(ckpt.config_path))  # absurd sizes: one line, nothing built
    with torch.device("meta"):
        model = LongCatTransformer3DModel.from_config(config)
    # never materialise fp32 first; nn.Module.to, as ModelMixin.to warns on every dtype cast
    model = torch.nn.Module.to(model, dtype)
    if ckpt.is_fp8 if fp8 is None else fp8:
        model.to_fp8()
    return model.to_empty(device=device), ckpt


@torch.inference_mode(False)
def finish_loading(model: LongCatTransformer3DModel, ckpt: layouts.Checkpoint,
                   progress=None) -> LongCatTransformer3DModel:
    """Fill an ``empty_transformer`` from its checkpoint; eval mode, no grads, and the
    ``layout`` and ``origin`` records."""
    fill_parameters(model, ckpt, progress=progress)
    model.eval().requires_grad_(False)
    model.layout = ckpt.describe()
    remember_origin(model, ckpt)
    return model


def remember_origin(model: torch.nn.Module, ckpt: layouts.Checkpoint | None) -> None:
    """``model.origin``: the checkpoint its weights can be read back from (None: they cannot),
    forgotten by ``load_state_dict``, after which the weights are no longer the checkpoint's."""
    model.origin = None if ckpt is None else Origin.of(ckpt, model)
    if ckpt is not None:
        model.origin.refilled(dict((*model.named_parameters(), *model.named_buffers())))
    model.register_load_state_dict_post_hook(_forget_origin)


def load_transformer(path: str | Path, device: str | torch.device = "cpu",
                     dtype: str | torch.dtype = torch.float32, progress=None,
                     fp8: bool | None = None) -> LongCatTransformer3DModel:
    """Build the DiT of the checkpoint at ``path`` (any layout) on ``device`` in ``dtype``.

    ``fp8`` (None: as the checkpoint is stored) runs the block GEMMs in e4m3
    (``LongCatTransformer3DModel.to_fp8``): an fp8 checkpoint's weights load as they are, a
    plain one is quantized on load; ``fp8=False`` dequantizes an fp8 checkpoint to ``dtype``.

    ``model.origin`` remembers the checkpoint (``Origin``), so merged LoRA weights can be
    restored by reading them again; ``load_state_dict`` forgets it, since the weights are then
    no longer the checkpoint's."""
    model, ckpt = empty_transformer(path, device, dtype, fp8)
    return finish_loading(model, ckpt, progress)


def _forget_origin(model: torch.nn.Module, _incompatible_keys) -> None:
    model.origin = None
