"""``convert``: native hub layout <-> ``model_index.json`` layout, streamed, exact, crash-safe.

The conversion is planned from headers alone (every output file, tensor, shape and byte count is
known before a byte is written), then executed into ``DST.partial`` and renamed to ``DST`` at
the end. Tensor data moves in bounded chunks of rows: a row slice of a contiguous tensor is a
contiguous byte range, so the qkv/kv split is a ranged read, the fuse a concatenation of reads,
and memory stays at a few chunks whatever the checkpoint size. Every written byte is hashed on
the way (``checksums.sha256``); the ``checksums`` module writes with O_DIRECT and ``sources``
reads bytes that are not in the page cache with it. Unchanged components are hard-linked.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import resource
import shutil
import signal
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from longcat_tools import __version__
from longcat_tools.checkpoint import comfy_single, hub, layouts
from longcat_tools.errors import LongcatError, UsageError
from longcat_tools.io import jsonio
from longcat_tools.io.atomic import (
    atomic_folder,
    check_replaceable,
    fsync_dir,
    fsync_tree,
    try_link,
)
from longcat_tools.io.checksums import (
    MANIFEST,
    BufferRing,
    HashingFile,
    Writers,
    check_carried,
    copy_hashed,
    format_manifest,
    sha256_file,
)
from longcat_tools.io.safetensors import (
    TensorInfo,
    TensorSpec,
    build_header,
    plan_shards,
    read_header,
    read_tensor,
    require_float,
    shard_names,
    tensor_bytes,
)
from longcat_tools.io.sources import Sources
from longcat_tools.kernels import fp8 as fp8_ops
from longcat_tools.lora import formats as lf
from longcat_tools.model import comfy_keys, dtypes, flavours, keymap
from longcat_tools.model import fp8 as fp8_format
from longcat_tools.verify.components import check_components, check_transformer_config
from longcat_tools.verify.quantized import check_scales

TARGETS = ("converted", "native", "comfy")
# What --to comfy writes in DST: the DiT alone, in ComfyUI's (WanVideoWrapper's) key flavour.
COMFY_FILE = comfy_single.FILE_NAME
FUSED_METADATA = "longcat_tools.fused_loras"  # a ComfyUI file's record of fused LoRAs
DEFAULT_MAX_SHARD = "5GB"

# What FastVideo's converter (longcat_to_fastvideo.py) writes as model_index.json.
MODEL_INDEX: dict[str, Any] = {
    "_class_name": "LongCatPipeline",
    "_diffusers_version": "0.32.0",
    "workload_type": "video-generation",
    "tokenizer": ["transformers", "AutoTokenizer"],
    "text_encoder": ["transformers", "UMT5EncoderModel"],
    "vae": ["diffusers", "AutoencoderKLWan"],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "transformer": ["diffusers", keymap.FASTVIDEO_CLASS],
}
# The hub's root files (both are this stub).
NATIVE_ROOT_STUB = {"model_name": "LongCat-Video"}
NATIVE_ROOT_FILES = ("model_index.json", "config.json")
# Folder of the DiT per target layout.
DIT_FOLDER = {"native": "dit", "converted": "transformer"}
TEXT_ENCODER_INDEX = "model.safetensors.index.json"

# Test hooks (documented in README): fake the free disk space; SIGKILL the run at step k.
ENV_FREE_BYTES = "LONGCAT_TOOLS_FREE_BYTES"
ENV_KILL_AT = "LONGCAT_TOOLS_TEST_KILL_AT"

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
          "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(text: str | int) -> int:
    """``5GB`` -> 5e9 and ``5GiB`` -> 5*2**30 (the Hugging Face convention); plain bytes too."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m or m.group(2).upper() not in _UNITS:
        raise UsageError(f"--max-shard-size: cannot read '{text}' (examples: 5GB, 500MB, 2GiB)")
    n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n <= 0:
        raise UsageError(f"--max-shard-size must be positive, got '{text}'")
    return n


# ---------------------------------------------------------------------------------------------
# the plan


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, stop)`` of one source tensor: a contiguous byte range of its file."""

    path: Path
    info: TensorInfo
    start: int
    stop: int

    @property
    def row_bytes(self) -> int:
        rows = self.info.shape[0] if self.info.shape else 1
        return self.info.nbytes // rows if rows else 0

    @property
    def nbytes(self) -> int:
        return (self.stop - self.start) * self.row_bytes


@dataclass
class OutTensor:
    """One tensor of an output file: the concatenation of ``pieces`` (rows of source tensors)
    cast to ``dtype``, or what ``produce`` returns."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    pieces: list[Piece] = field(default_factory=list)
    produce: Callable[[], torch.Tensor] | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def bytes_in(self) -> int:
        return sum(p.nbytes for p in self.pieces)


@dataclass
class FileJob:
    """One file of the output: ``kind`` is tensors, link, copy or text."""

    rel: str
    kind: str
    group: str
    tensors: list[OutTensor] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    src: Path | None = None
    text: str = ""
    bytes_in: int = 0
    adapter: tuple[str, Path] | None = None  # a LoRA file rewritten: its name and source

    @classmethod
    def unchanged(cls, src: Path, rel: str, group: str, link: bool) -> FileJob:
        """A file carried over as it is: hard-linked, or copied. A safetensors file's header and
        size are checked first: a truncated VAE was carried into a checkpoint verify fails
        (``check_carried`` for the rest)."""
        check_carried(src, rel)
        if src.name.endswith(".safetensors"):
            read_header(src)
        return cls(rel, "link" if link else "copy", group, src=src, bytes_in=src.stat().st_size)

    @property
    def bytes_out(self) -> int:
        if self.kind == "tensors":
            specs = [TensorSpec(t.name, t.dtype, t.shape) for t in self.tensors]
            return len(build_header(specs, self.metadata)) + sum(t.nbytes for t in self.tensors)
        if self.kind == "text":
            return len(self.text.encode())
        assert self.src is not None
        return self.src.stat().st_size

    @property
    def writes(self) -> bool:
        return self.kind != "link"


@dataclass
class Plan:
    src: layouts.Checkpoint | layouts.AvatarCheckpoint
    dst: Path
    to: str
    keys: str
    dtype: str
    link: bool
    force: bool
    jobs: list[FileJob]
    notes: list[str]
    loras: list[str]  # adapter names converted
    registry: dict[str, Any] = field(default_factory=dict)  # for the output's (_lora_jobs)

    @property
    def target_layout(self) -> str:
        if self.to in ("native", "comfy"):
            return "ComfyUI single file" if self.to == "comfy" else "native"
        return f"converted ({self.keys} keys)"

    @property
    def top_names(self) -> set[str]:
        """The names at the top of the output: ``--force`` replaces a folder holding no other."""
        return {j.rel.split("/")[0] for j in self.jobs} | {MANIFEST}

    @property
    def tensors(self) -> int:
        return sum(len(j.tensors) for j in self.jobs)

    @property
    def bytes_in(self) -> int:
        return sum(j.bytes_in for j in self.jobs)

    @property
    def bytes_out(self) -> int:
        return sum(j.bytes_out for j in self.jobs)

    @property
    def bytes_to_write(self) -> int:
        return sum(j.bytes_out for j in self.jobs if j.writes)

    @property
    def steps(self) -> int:
        """Kill-hook steps: one per tensor, one per file, one for the manifest, one before the
        final rename."""
        return self.tensors + len(self.jobs) + 2

    def groups(self) -> list[dict[str, Any]]:
        """Per output folder: files, tensors, bytes in/out and how it is made."""
        out: dict[str, dict[str, Any]] = {}
        for j in self.jobs:
            g = out.setdefault(j.group, {"group": j.group, "files": 0, "tensors": 0,
                                         "bytes_in": 0, "bytes_out": 0, "how": set()})
            g["files"] += 1
            g["tensors"] += len(j.tensors)
            g["bytes_in"] += j.bytes_in
            g["bytes_out"] += j.bytes_out
            g["how"].add({"tensors": "rewrite", "link": "link", "copy": "copy",
                          "text": "write"}[j.kind])
        for g in out.values():
            g["how"] = "+".join(sorted(g["how"]))
        return list(out.values())

    def describe(self) -> dict[str, Any]:
        return {
            "src": str(self.src.root), "dst": str(self.dst),
            "source_layout": self.src.describe(), "target_layout": self.target_layout,
            "keys": self.keys, "dtype": self.dtype, "link": self.link, "loras": self.loras,
            "files": len(self.jobs) + 1, "tensors": self.tensors, "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out, "bytes_to_write": self.bytes_to_write,
            "groups": self.groups(), "notes": self.notes,
        }


def _provenance(ckpt: layouts.Checkpoint, keys: str, dtype: str) -> dict[str, str]:
    return {"format": "pt", "longcat_tools.version": __version__,
            "longcat_tools.source_layout": ckpt.layout,
            "longcat_tools.source_keys": ckpt.flavour,
            "longcat_tools.keys": keys, "longcat_tools.dtype": dtype}


def _same_filesystem(a: Path, b: Path) -> bool:
    return os.stat(a).st_dev == os.stat(b).st_dev


def transformer_config(cfg: dict[str, Any], flavour: str) -> dict[str, Any]:
    """The DiT config for a key flavour: ``_class_name`` and ``num_heads`` <->
    ``num_attention_heads`` as FastVideo's converter does; the rest passes through."""
    out = dict(cfg)
    if flavour == "fastvideo":
        out["_class_name"] = keymap.FASTVIDEO_CLASS
        if "num_heads" in out and "num_attention_heads" not in out:
            out["num_attention_heads"] = out.pop("num_heads")
        return out
    out["_class_name"] = keymap.NATIVE_CLASS
    if "num_attention_heads" in out and "num_heads" not in out:
        rest = [k for k in out if k != "num_attention_heads"]
        out["num_heads"] = out.pop("num_attention_heads")
        if rest == sorted(rest):  # diffusers' save_config sorts keys: keep the file's order
            out = dict(sorted(out.items()))
    return out


def _json_text(obj: Any) -> str:
    return jsonio.dumps(obj)


def _out_dtype(src_dtype: torch.dtype, want: torch.dtype | None) -> torch.dtype:
    if want is None or not src_dtype.is_floating_point:
        return src_dtype
    return want


def _dit_infos(ckpt: layouts.Checkpoint
               ) -> tuple[dict[str, Any], keymap.DiTDims, dict[str, tuple[Path, TensorInfo]]]:
    """The DiT of a checkpoint folder, checked against its config: config, dimensions and
    tensor name -> (shard, header entry)."""
    cfg = ckpt.config()
    dims = keymap.dit_dims(cfg, str(ckpt.config_path))  # the bounds every reader words alike
    check_transformer_config(cfg, str(ckpt.config_path))  # never written out unchecked
    infos = layouts.shard_infos(ckpt)
    for path, info in infos.values():
        require_float(path, info)
    expected = dict(keymap.tensor_specs(dims, ckpt.flavour, ckpt.is_fp8))
    unknown = sorted(set(infos) - set(expected))
    seen = keymap.detect_flavour(list(infos))
    if unknown and seen and seen != ckpt.flavour:
        raise LongcatError(f"{ckpt.transformer_dir}: tensor names are {seen} keys but "
                           f"{ckpt.config_path.name} says {ckpt.flavour} (_class_name "
                           f"{cfg.get('_class_name')!r}); fix _class_name to "
                           f"{keymap.CLASS_BY_FLAVOUR[seen]}")
    check_tensor_set(ckpt.transformer_dir, infos, expected, ckpt.flavour,
                     f"config: depth {dims.depth}, hidden {dims.hidden_size}")
    return cfg, dims, infos


def check_tensor_set(folder: Path, infos: dict[str, tuple[Path, TensorInfo]],
                     expected: dict[str, tuple[int, ...]], keys: str, why: str) -> None:
    """The folder holds exactly the ``expected`` tensors, in their shapes (``why``: what the
    expectation comes from, for the message)."""
    unknown = sorted(set(infos) - set(expected))
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise LongcatError(f"{folder}: unknown DiT tensor '{unknown[0]}'{more} "
                           f"for {keys} keys (not in the LongCat key map)")
    missing = [n for n in expected if n not in infos]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise LongcatError(f"{folder}: DiT tensor '{missing[0]}'{more} is missing ({why})")
    for name, shape in expected.items():
        if infos[name][1].shape != shape:
            raise LongcatError(f"{infos[name][0]}: tensor '{name}' has shape "
                               f"{list(infos[name][1].shape)}, the config implies {list(shape)}")


def _out_tensors(dims: keymap.DiTDims, keys: str, source: str,
                 infos: dict[str, tuple[Path, TensorInfo]], want: torch.dtype | None,
                 where: Path, load: Callable[[str], torch.Tensor] | None = None,
                 scaled: frozenset[str] = frozenset(), src_fp8: bool = False
                 ) -> list[OutTensor]:
    """The DiT's tensors in flavour ``keys``, made of ranged reads of the source; a source
    tensor in ``scaled`` (float8 with a scale) is read whole through ``load`` and dequantized.
    ``want`` float8 writes an fp8 checkpoint (``model.fp8``); an fp8 source (``src_fp8``) is
    copied as it is to fp8, and dequantized to any other dtype."""
    def piece(name: str, index: int, count: int) -> Piece:
        path, info = infos[name]
        rows = info.shape[0] if info.shape else 1
        return Piece(path, info, index * rows // count, (index + 1) * rows // count)

    if load is None:
        load = _whole_reader(infos)
    out_fp8 = want == fp8_ops.E4M3 or (want is None and src_fp8)
    rest = torch.bfloat16 if out_fp8 else want
    quantized: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # weight -> (q, scale) once
    out: list[OutTensor] = []

    def rows_of(srcs: list[tuple[str, int, int]]) -> torch.Tensor:
        parts = []
        for s, j, n in srcs:
            t = load(s)
            h = t.shape[0] // n
            parts.append(t[j * h:(j + 1) * h])
        return torch.cat(parts, 0)

    for name, shape in flavours.tensor_specs(dims, keys, out_fp8):
        srcs = flavours.sources_of(name, keys, source)
        native = flavours.to_native(name, keys).native
        weight_of_fp8 = fp8_format.is_quantized(native.rpartition(".")[0]) \
            and native.endswith((".weight", f".{fp8_format.SCALE}"))
        if weight_of_fp8 and out_fp8 and not src_fp8:
            weight = name.rpartition(".")[0] + ".weight"

            def produce(srcs=srcs, name=name, weight=weight) -> torch.Tensor:
                if weight not in quantized:
                    w_srcs = flavours.sources_of(weight, keys, source)
                    quantized.clear()  # one weight held at a time
                    w = rows_of(w_srcs)
                    if not bool(torch.isfinite(w).all()):  # an inf scale zeroes its row
                        names = "', '".join(dict.fromkeys(s for s, _, _ in w_srcs))
                        raise LongcatError(f"{where}: tensor '{names}' holds NaN or Inf, which "
                                           "no e4m3 scale can carry (verify --deep names such "
                                           "weights); fix the source first")
                    quantized[weight] = fp8_ops.quantize_weight(w)
                q, scale = quantized[weight]
                return scale if name != weight else q

            dtype = torch.float32 if name != weight else fp8_ops.E4M3
            out.append(OutTensor(name, dtype, shape, produce=produce))
            continue
        if weight_of_fp8 and src_fp8 and not out_fp8 and native.endswith(".weight"):
            scale_srcs = flavours.sources_of(f"{name.removesuffix('.weight')}."
                                             f"{fp8_format.SCALE}", keys, source)

            def produce(srcs=srcs, scale_srcs=scale_srcs, name=name) -> torch.Tensor:
                return _fits(fp8_ops.dequantize_weight(rows_of(srcs), rows_of(scale_srcs),
                                                       rest or torch.bfloat16), where, name)

            out.append(OutTensor(name, rest or torch.bfloat16, shape, produce=produce))
            continue
        if any(s in scaled for s, _, _ in srcs):
            dtype = rest or torch.bfloat16

            def produce(srcs=srcs, dtype=dtype, name=name) -> torch.Tensor:
                return _fits(rows_of(srcs).to(dtype), where, name)

            out.append(OutTensor(name, dtype, shape, produce=produce))
            continue
        pieces = [piece(s, j, n) for s, j, n in srcs]
        found = {p.info.torch_dtype for p in pieces}
        if len(found) > 1:
            raise LongcatError(f"{where}: the parts of '{name}' have different "
                               f"dtypes {sorted(map(str, found))}; pass --dtype to unify them")
        kept = found.pop()
        if out_fp8 and src_fp8 and weight_of_fp8:
            out.append(OutTensor(name, kept, shape, pieces))  # e4m3 weight or its scale as is
        else:
            out.append(OutTensor(name, _out_dtype(kept, rest), shape, pieces))
    return out


def _fits(y: torch.Tensor, where: Path, name: str) -> torch.Tensor:
    """A dequantized tensor, refused where float16 overflowed (a finite e4m3 weight times its
    finite scale is finite: any inf is the cast's)."""
    if y.dtype == torch.float16 and bool(torch.isinf(y).any()):
        raise LongcatError(f"{where}: tensor '{name}' dequantized overflows float16 "
                           "(|x| > 65504); use --dtype bf16")
    return y


def _whole_reader(infos: dict[str, tuple[Path, TensorInfo]]) -> Callable[[str], torch.Tensor]:
    """Source tensor name -> the whole tensor, read from its shard (fp8 rewrites read a weight
    whole: its scales need every element of a row)."""
    def load(name: str) -> torch.Tensor:
        path, info = infos[name]
        with open(path, "rb") as f:
            return read_tensor(f, info)
    return load


def _dit_jobs(ckpt: layouts.Checkpoint, folder: str, keys: str, want: torch.dtype | None,
              max_shard: int, meta: dict[str, str]) -> tuple[list[FileJob], keymap.DiTDims]:
    cfg, dims, infos = _dit_infos(ckpt)
    if ckpt.is_fp8:
        check_scales(infos, fp8_format.SCALE, fp8_format.E4M3_MAX, ckpt.transformer_dir)
    out = _out_tensors(dims, keys, ckpt.flavour, infos, want, ckpt.transformer_dir,
                       src_fp8=ckpt.is_fp8)
    return _folder_jobs(out, folder, max_shard, meta, transformer_config(cfg, keys)), dims


def _folder_jobs(out: list[OutTensor], folder: str, max_shard: int, meta: dict[str, str],
                 cfg: dict[str, Any]) -> list[FileJob]:
    """A DiT folder: shards, their index, config.json and, for fp8 weights, the
    ``quantization_config.json`` that says so."""
    shards = plan_shards(out, max_shard)
    names = shard_names(layouts.DIT_STEM, len(shards))
    jobs = [FileJob(f"{folder}/{n}", "tensors", folder, s, dict(meta),
                    bytes_in=sum(t.bytes_in for t in s))
            for n, s in zip(names, shards, strict=True)]
    weight_map = {t.name: n for n, s in zip(names, shards, strict=True) for t in s}
    index = {"metadata": {"total_size": sum(t.nbytes for t in out)},
             "weight_map": dict(sorted(weight_map.items()))}
    jobs.append(FileJob(f"{folder}/{layouts.INDEX_NAME}", "text", folder, text=_json_text(index)))
    jobs.append(FileJob(f"{folder}/config.json", "text", folder, text=_json_text(cfg)))
    if any(t.dtype == fp8_ops.E4M3 for t in out):
        jobs.append(FileJob(f"{folder}/{fp8_format.CONFIG_FILE}", "text", folder,
                            text=_json_text(fp8_format.config())))
    return jobs


def _source_registry(ckpt: layouts.Checkpoint) -> dict[str, Any]:
    """The source's ``lora/adapters.json`` entries by file (relative to ``lora/``): their names
    and default scales go with the files. One that does not load is refused, not skipped: the
    adapters would come out renamed, at scale 1."""
    from longcat_tools.lora import load_registry

    try:
        return {a.file: a for a in load_registry(ckpt).adapters}
    except LongcatError as e:
        raise LongcatError(f"{e}; convert carries each adapter's name and default scale from "
                           "it: fix it, or move it away to name the adapters by their files "
                           "(scale 1), or leave the adapters out with --lora none") from None


def _source_loras(ckpt: layouts.Checkpoint,
                  registered: dict[str, Any]) -> list[tuple[str, Path]]:
    """(adapter name, file) of every LoRA file in the source, in a stable order: the name the
    registry gives it, else the one its place gives (``lora list``'s)."""
    root = ckpt.lora_dir
    if not root.is_dir():
        return []
    from longcat_tools.lora import REGISTRY
    from longcat_tools.lora.registry import is_scratch, place_name

    allowed = ckpt.containment
    found: list[tuple[str, Path]] = []
    for p in sorted(root.iterdir()):
        if p.name.startswith(REGISTRY) or is_scratch(p.name):
            continue  # the `lora` command's registry (rebuilt from the files) and its scratch
        files = sorted(q for q in p.iterdir() if not q.is_dir()) if p.is_dir() else [p]
        for q in files:  # a broken link or a FIFO too: refused if chosen (FileJob), never dropped
            layouts.check_contained(q, allowed)
            rec = registered.get(q.relative_to(root).as_posix())
            found.append((rec.name if rec is not None else place_name(root, q), q))
    return found


def _lora_jobs(ckpt: layouts.Checkpoint, to: str, keys: str, want: torch.dtype | None,
               select: str, shapes: dict[str, tuple[int, int]], link: bool,
               meta: dict[str, str]) -> tuple[list[FileJob], list[str], list[str], dict]:
    """The adapters' file jobs, the names chosen, notes, and what the output's registry takes
    from the source: each adapter's file by name, and its registry entry by output file."""
    avatar = isinstance(ckpt, layouts.AvatarCheckpoint)
    registered = {} if select == "none" else _source_registry(ckpt.dit() if avatar else ckpt)
    release = layouts.release_loras(ckpt)
    found = _source_loras(ckpt, registered)
    names = sorted({n for n, _ in found})
    if select == "all":
        chosen = set(names)
    elif select == "none":
        chosen = set()
    else:
        listed = [s.strip() for s in select.split(",")]
        if not all(listed):  # ',' chose nothing, 'distilled,' as if 'distilled'
            raise UsageError(f"--lora {select}: an empty adapter name (all, none, or names "
                             "comma-separated)")
        chosen = set(listed)
        unknown = sorted(chosen - set(names))
        if unknown:
            raise UsageError(f"--lora: no adapter named '{unknown[0]}' in {ckpt.lora_dir} "
                             f"(available: {', '.join(names) or 'none'})")
    jobs: list[FileJob] = []
    notes: list[str] = []
    taken: dict[str, Path] = {}
    carried: dict[str, Any] = {}  # the source's registry entries, by output file
    fmt = keys
    for name, path in found:
        if name not in chosen:
            notes.append(f"skipped LoRA {path.relative_to(ckpt.root)} (--lora)")
            continue
        if not path.name.endswith(".safetensors"):
            if path.name.endswith(layouts.PICKLE_SUFFIXES):
                raise LongcatError(f"{path}: pickle LoRA files are never loaded (convert it to "
                                   f"safetensors, or leave it out with --lora)")
            notes.append(f"skipped {path.relative_to(ckpt.root)} (not a safetensors file)")
            continue
        lora = lf.read_lora(path, shapes)
        # the hub layout keeps the release's files in lora/ itself, under their own names;
        # any other file keeps its folder, or gets its own, as `lora attach` writes it (a
        # flat one would read as the release's to `lora detach`)
        place = path.relative_to(ckpt.lora_dir).parts
        flat = to == "native" and release.get(path.name) == name
        group = "lora" if flat else f"lora/{place[0] if len(place) > 1 else name}"
        rel = f"{group}/{path.name}"
        rec = registered.get("/".join(place))
        if rec is not None:
            carried[rel.removeprefix("lora/")] = rec
        if rel in taken:
            raise LongcatError(f"{path}: would be written as {rel}, like {taken[rel]}; rename one "
                               "of them or leave one out with --lora")
        taken[rel] = path
        unchanged = lora.format == fmt and all(
            want is None or e.dtype == want for e in lora.modules.values())
        if unchanged:
            jobs.append(FileJob.unchanged(path, rel, group, link))
            continue
        specs = lf.tensor_specs(lora, fmt, want, finite=True)
        tensors = [OutTensor(s.name, s.dtype, s.shape, produce=s.produce) for s in specs]
        jobs.append(FileJob(rel, "tensors", group, tensors,
                            lf.file_metadata(lora.modules.values(), fmt, meta),
                            bytes_in=lora.nbytes, adapter=(name, path)))
    return jobs, sorted(chosen), notes, {"sources": dict(found), "carried": carried}


def component_jobs(ckpt: layouts.Checkpoint, comp: str, want: torch.dtype | None, link: bool,
                   meta: dict[str, str], notes: list[str], keep_pickle: str | None = None
                   ) -> list[FileJob]:
    """A component folder carried over (the text encoder cast to ``want`` when that changes
    it), or a note that the source has none. ``keep_pickle`` names the one pickle that is
    copied as it is (the avatar wav2vec2 folder's, which verify checks without loading)."""
    if not (ckpt.root / comp).is_dir():
        notes.append(f"{comp}/ not in the source: not written (verify fails the output until "
                     "it is added)")
        return []
    files = _component_files(ckpt, comp, notes, keep_pickle)
    indexed = {p: layouts.index_shards(p, ckpt.containment)  # carried as it is, it must hold
               for p in files if p.name.endswith(".safetensors.index.json")}
    if comp == "text_encoder" and want is not None:
        te = _text_encoder_jobs(ckpt, files, want, link, meta, indexed)
        if te is not None:
            return te
    return [FileJob.unchanged(p, p.relative_to(ckpt.root).as_posix(), comp, link)
            for p in files]


def _component_files(ckpt: layouts.Checkpoint, comp: str, notes: list[str],
                     keep_pickle: str | None = None) -> list[Path]:
    """The files to carry over. A pickle weight file is left behind (verify rejects it and
    nothing loads it) when safetensors weights lie beside it, and refused when it is the only
    copy of the weights."""
    folder = ckpt.root / comp
    allowed = ckpt.containment
    files, pickles = [], []
    for p in sorted(folder.rglob("*")):
        if p.is_dir():
            continue
        layouts.check_contained(p, allowed)
        name = p.name.removesuffix(".index.json")  # a pickle's shard index goes with it
        if name.endswith(layouts.PICKLE_SUFFIXES) and p.relative_to(folder).as_posix() \
                != keep_pickle:
            pickles.append(p)
        else:
            files.append(p)
    if pickles and not any(p.name.endswith(".safetensors") for p in files):
        pickles.sort(key=lambda p: p.name.endswith(".index.json"))  # name a weight file
        raise LongcatError(f"{pickles[0]}: pickle weight file, and {comp}/ has no safetensors "
                           "weights beside it; pickles are never loaded or copied (save the "
                           "weights as safetensors first)")
    notes += [f"skipped {p.relative_to(ckpt.root)} (a pickle: never loaded; the safetensors "
              "beside it are carried over)" for p in pickles]
    return files


def _text_encoder_jobs(ckpt: layouts.Checkpoint, files: list[Path], want: torch.dtype,
                       link: bool, prov: dict[str, str],
                       indexed: dict[Path, set[Path]]) -> list[FileJob] | None:
    """The text encoder's ``files`` rewritten with their floats cast to ``want`` (same shards,
    index and config, dtype fields updated), or None when nothing would change. ``indexed``:
    each checked shard index and the shards it names."""
    folder = ckpt.root / "text_encoder"
    index_path = folder / TEXT_ENCODER_INDEX
    weights = [p for p in files if p.name.endswith(".safetensors")]
    index = None
    if index_path in indexed:
        index = jsonio.read(index_path, what="text encoder index")
        stray = sorted(set(weights) - indexed[index_path])
        if stray:
            raise LongcatError(f"{stray[0]}: shard on disk that {TEXT_ENCODER_INDEX} does not "
                               "name")
    headers = {p: read_header(p) for p in weights}
    if all(_out_dtype(i.torch_dtype, want) == i.torch_dtype
           for h in headers.values() for i in h.tensors.values()):
        return None
    jobs: list[FileJob] = []
    total = 0
    for p in files:
        rel = p.relative_to(ckpt.root).as_posix()
        if p in headers:
            h = headers[p]
            tensors = [OutTensor(i.name, _out_dtype(i.torch_dtype, want), i.shape,
                                 [Piece(p, i, 0, i.shape[0] if i.shape else 1)])
                       for i in h.tensors.values()]
            total += sum(t.nbytes for t in tensors)
            jobs.append(FileJob(rel, "tensors", "text_encoder", tensors,
                                {**h.metadata, **prov}, bytes_in=h.file_size))
    for p in files:
        rel = p.relative_to(ckpt.root).as_posix()
        if p in headers:
            continue
        if p == index_path and index is not None:
            doc = dict(index)
            doc["metadata"] = {**(doc.get("metadata") or {}), "total_size": total}
            jobs.append(FileJob(rel, "text", "text_encoder", text=_json_text(doc),
                                bytes_in=p.stat().st_size))
        elif p.name == "config.json":
            cfg = jsonio.read(p, what="text encoder config")
            if isinstance(cfg, dict):
                for k in ("torch_dtype", "dtype"):
                    if k in cfg:
                        cfg[k] = str(want).removeprefix("torch.")
            jobs.append(FileJob(rel, "text", "text_encoder", text=_json_text(cfg),
                                bytes_in=p.stat().st_size))
        else:
            jobs.append(FileJob.unchanged(p, rel, "text_encoder", link))
    return jobs


def _replacing_only_ours(make_plan: Callable[..., Plan]) -> Callable[..., Plan]:
    """A plan whose ``--force`` would empty a folder holding more than the output's names (your
    samples/ beside the weights) is refused, as ``synth --force`` refuses one."""
    @functools.wraps(make_plan)
    def planned(*args: Any, **kwargs: Any) -> Plan:
        p = make_plan(*args, **kwargs)
        check_replaceable(p.dst, "checkpoint", force=p.force, writes=p.top_names)
        return p
    return planned


@_replacing_only_ours
def plan(src: str | Path, dst: str | Path, *, to: str = "converted", keys: str | None = None,
         dtype: str = "keep", max_shard_size: str | int | None = None,
         link: bool | None = None, lora: str = "all", force: bool = False,
         int8: str = "keep") -> Plan:
    """Everything a conversion will write, from headers only; any problem with the source or
    the destination is raised here, before anything is written. ``max_shard_size`` None is
    5GB (an avatar's INT8 folder: the original's 4 GiB); ``link`` None is hard-linking;
    ``int8`` is for avatar 1.5 folders (:data:`convert_avatar.INT8_MODES`)."""
    from longcat_tools import convert_avatar

    if to not in TARGETS:
        raise UsageError(f"--to: unknown target '{to}' (use one of {', '.join(TARGETS)})")
    if int8 not in convert_avatar.INT8_MODES:
        raise UsageError(f"--int8: unknown mode '{int8}' (use one of "
                         f"{', '.join(convert_avatar.INT8_MODES)})")
    want = dtypes.parse(dtype, keep=True, choices=(*dtypes.NAMES, dtypes.FP8))
    keys_given = keys
    if want == fp8_ops.E4M3 and to == "comfy":
        raise UsageError("--dtype fp8 --to comfy: ComfyUI reads one fp8 scale per tensor, this "
                         "tool writes one per output channel; write --to comfy in bf16, or "
                         "--dtype fp8 to a converted or native folder")
    if to == "comfy":  # one file, the DiT alone, in ComfyUI's names
        for given, opt in ((keys, "--keys"), (max_shard_size, "--max-shard-size"),
                           (None if lora == "all" else lora, "--lora"),
                           (link, "--link/--copy")):
            if given is not None:
                raise UsageError(f"{opt} cannot be combined with --to comfy (one file holding "
                                 "the DiT alone, in ComfyUI's names)")
    if to in ("native", "comfy"):
        if keys not in (None, "native"):
            raise UsageError(f"--keys {keys} cannot be combined with --to {to} (the target "
                             "names its own keys)")
        keys = "native" if to == "native" else comfy_keys.FLAVOUR
    keys = keys or "fastvideo"
    given_link, link = link, link is not False
    if keys not in keymap.FLAVOURS and to != "comfy":
        raise UsageError(f"--keys: unknown '{keys}' (use one of {', '.join(keymap.FLAVOURS)})")
    given_size = max_shard_size is not None  # "" is unreadable, not the default
    max_shard = parse_size(max_shard_size if given_size else DEFAULT_MAX_SHARD)
    src_file = Path(src).is_file()
    found = None if src_file else layouts.detect_any(hub.resolve_source(src))
    if isinstance(found, layouts.AvatarCheckpoint):
        convert_avatar.refuse(to, keys_given, want)
        return convert_avatar.plan_avatar(
            found, Path(dst), to=to, dtype=dtype, want=want,
            max_shard=max_shard if given_size else None, link=link,
            lora=lora, force=force, int8_mode=int8)
    if int8 != "keep":
        raise UsageError(f"--int8 {int8}: only for LongCat-Video-Avatar 1.5 folders (their "
                         "base_model_int8/); this source is a base LongCat-Video checkpoint")
    if src_file:
        for given, opt in ((None if lora in ("all", "none") else lora, "--lora"),
                           (given_link, "--link/--copy")):
            if given is not None:  # nothing to choose from, nothing carried over
                raise UsageError(f"{opt}: the source {src} is a single-file DiT, with no "
                                 "adapters or other files beside it; drop the option")
        return _plan_single_file(Path(src), Path(dst), to, keys, dtype, want, max_shard, force)
    assert found is not None
    ckpt, src, dst = found, found.root, Path(dst)
    if to == "comfy":
        return _plan_to_comfy(ckpt, dst, dtype, want, force)
    check_replaceable(dst, "checkpoint", source=src, force=force)
    meta = _provenance(ckpt, keys, dtype)
    notes: list[str] = []
    if link and not _same_filesystem(src, dst.parent):
        link = False
        notes.append("source and destination are on different file systems: copying unchanged "
                     "files instead of hard-linking them")

    dit_jobs, dims = _dit_jobs(ckpt, DIT_FOLDER[to], keys, want, max_shard, meta)
    jobs = list(dit_jobs)
    other = torch.bfloat16 if want == fp8_ops.E4M3 else want  # fp8 is the DiT's GEMMs only
    lora_jobs, loras, lora_notes, registry = _lora_jobs(ckpt, to, keys, other, lora,
                                                        lf.linear_shapes(dims), link, meta)
    jobs += lora_jobs
    notes += lora_notes
    for comp in layouts.COMPONENTS:
        jobs += component_jobs(ckpt, comp, other, link, meta, notes)
    check_components(ckpt, present_only=True)  # carried as they are: verify failed the output
    known = {"dit", "transformer", "lora", MANIFEST, *layouts.COMPONENTS, *NATIVE_ROOT_FILES}
    for entry in sorted(ckpt.root.iterdir()):
        if entry.name not in known:
            notes.append(f"{entry.name} (top level of the source) is not carried over")
    jobs += _root_jobs(to, keys)
    return Plan(ckpt, dst, to, keys, dtype, link, force, jobs, notes, loras, registry)


def _root_jobs(to: str, keys: str) -> list[FileJob]:
    """The files at the top of the output: the hub's stubs, or model_index.json."""
    if to == "native":
        return [FileJob(name, "text", "root", text=_json_text(NATIVE_ROOT_STUB))
                for name in NATIVE_ROOT_FILES]
    index = {**MODEL_INDEX, "transformer": ["diffusers", keymap.CLASS_BY_FLAVOUR[keys]]}
    return [FileJob("model_index.json", "text", "root", text=_json_text(index))]


def _missing_parts_notes() -> list[str]:
    return [f"{comp}/ not in a single-file DiT: not written (take it from the hub release, "
            "meituan-longcat/LongCat-Video, for a full checkpoint)" for comp in layouts.COMPONENTS]


def _plan_to_comfy(ckpt: layouts.Checkpoint, dst: Path, dtype: str, want: torch.dtype | None,
                   force: bool) -> Plan:
    """``--to comfy``: the DiT alone as one ComfyUI file, ``DST/diffusion_model.safetensors``."""
    if ckpt.is_fp8 and (want is None or want == fp8_ops.E4M3):  # its scales were dropped
        raise UsageError(f"--to comfy: {ckpt.root} is an fp8 checkpoint, whose scales (one per "
                         "output channel) ComfyUI does not read; add --dtype bf16")
    check_replaceable(dst, "checkpoint", source=ckpt.root, force=force)
    keys = comfy_keys.FLAVOUR
    cfg, dims, infos = _dit_infos(ckpt)
    if ckpt.is_fp8:
        check_scales(infos, fp8_format.SCALE, fp8_format.E4M3_MAX, ckpt.transformer_dir)
    out = _out_tensors(dims, keys, ckpt.flavour, infos, want, ckpt.transformer_dir,
                       src_fp8=ckpt.is_fp8)  # dequantized: the e4m3 codes were cast as weights
    meta = _provenance(ckpt, keys, dtype)
    notes = ["only the DiT is written (ComfyUI loads the VAE, text encoder and LoRAs from "
             "their own files)"]
    fused = cfg.get(layouts.FUSED_CONFIG_KEY)
    if fused:  # the file has no config: the record travels in its metadata, and back
        meta[FUSED_METADATA] = json.dumps(fused)
        names = ", ".join(str(f.get("name")) for f in fused if isinstance(f, dict))
        notes.append(f"its weights have LoRAs fused in ({names}): recorded in the file's "
                     f"metadata ({FUSED_METADATA}); converting it back restores the record")
    job = FileJob(COMFY_FILE, "tensors", "comfy", out, meta,
                  bytes_in=sum(t.bytes_in for t in out))
    return Plan(ckpt, dst, "comfy", keys, dtype, False, force, [job], notes, [])


def _plan_single_file(path: Path, dst: Path, to: str, keys: str, dtype: str,
                      want: torch.dtype | None, max_shard: int, force: bool) -> Plan:
    """A ComfyUI single-file DiT as the source: its DiT in dit/ or transformer/ (config from
    its shapes), and notes for everything a full checkpoint has beside it."""
    if path.suffix != ".safetensors":
        raise LongcatError(f"{path}: a single-file source must be a .safetensors DiT (or pass a "
                           "checkpoint folder)")
    check_replaceable(dst, "checkpoint", source=path, force=force)
    cf = comfy_single.read(path)
    ckpt = layouts.Checkpoint(path, layouts.COMFY_SINGLE, comfy_keys.FLAVOUR, path.parent)
    infos = {n: (path, i) for n, i in cf.tensors.items()}
    out = _out_tensors(cf.dims, keys, comfy_keys.FLAVOUR, infos, want, path, cf.load,
                       frozenset(cf.scales))
    meta = _provenance(ckpt, keys, dtype)
    notes = ["config.json: dimensions read from the tensor shapes, other fields those of the hub "
             "release"]
    if cf.scaled:
        notes.append(f"{len(cf.scales)} float8 weights dequantized: (fp8 -> float32) * "
                     f"scale_weight in float32, then cast to {want or torch.bfloat16}")
    if cf.input_scales:
        notes.append(f"{cf.input_scales} scale_input tensors left out (activation scales of "
                     "ComfyUI's fp8 matmul; no weight depends on them)")
    if to == "comfy":
        job = FileJob(COMFY_FILE, "tensors", "comfy", out, meta,
                      bytes_in=path.stat().st_size)
        return Plan(ckpt, dst, to, keys, dtype, False, force, [job], notes, [])
    from longcat_tools.synth import dit_config

    cfg = dit_config("real", cf.dims.depth)
    cfg.update(hidden_size=cf.dims.hidden_size, num_heads=cf.dims.num_heads,
               caption_channels=cf.dims.caption_channels,
               adaln_tembed_dim=cf.dims.adaln_tembed_dim, in_channels=cf.dims.in_channels,
               out_channels=cf.dims.out_channels,
               frequency_embedding_size=cf.dims.frequency_embedding_size,
               patch_size=list(cf.dims.patch_size))
    fused = cf.header.metadata.get(FUSED_METADATA)
    if fused is not None:
        try:
            cfg[layouts.FUSED_CONFIG_KEY] = json.loads(fused)
        except ValueError:
            raise LongcatError(f"{path}: metadata {FUSED_METADATA} is not JSON") from None
        notes.append(f"its fused LoRAs ({FUSED_METADATA}) restored to the config's "
                     f"{layouts.FUSED_CONFIG_KEY}")
    jobs = _folder_jobs(out, DIT_FOLDER[to], max_shard, meta, transformer_config(cfg, keys))
    jobs[0].bytes_in = path.stat().st_size
    notes += _missing_parts_notes()
    jobs += _root_jobs(to, keys)
    return Plan(ckpt, dst, to, keys, dtype, False, force, jobs, notes, [])


# ---------------------------------------------------------------------------------------------
# execution


@dataclass
class Result:
    plan: Plan
    seconds: float
    tensors: int
    bytes_read: int
    bytes_written: int
    files_written: int
    files_linked: int
    files_copied: int
    peak_rss: int
    manifest_entries: int

    @property
    def gb_per_s(self) -> float:
        return self.bytes_written / self.seconds / 1e9 if self.seconds else 0.0

    def describe(self) -> dict[str, Any]:
        return {**self.plan.describe(), "dry_run": False, "seconds": round(self.seconds, 3),
                "tensors_written": self.tensors, "bytes_read": self.bytes_read,
                "bytes_written": self.bytes_written, "files_written": self.files_written,
                "files_linked": self.files_linked, "files_copied": self.files_copied,
                "write_gb_per_s": round(self.gb_per_s, 3),
                "read_gb_per_s": round(self.bytes_read / self.seconds / 1e9, 3)
                if self.seconds else 0.0,
                "peak_rss_bytes": self.peak_rss, "checksums": MANIFEST,
                "checksummed_files": self.manifest_entries}


def free_bytes(folder: Path) -> int:
    """Free space where the output goes (``$LONGCAT_TOOLS_FREE_BYTES`` fakes it for tests)."""
    fake = os.environ.get(ENV_FREE_BYTES)
    if fake:
        if not fake.isdigit():
            raise UsageError(f"${ENV_FREE_BYTES}={fake!r}: a whole number of bytes (or unset "
                             "it)")
        return int(fake)
    return shutil.disk_usage(folder).free


def check_room(p: Plan) -> tuple[int, int]:
    """(needed, free) bytes; raises when the output would not fit."""
    need = p.bytes_to_write + (64 << 20)  # headroom for metadata and the manifest
    free = free_bytes(p.dst.parent)
    if need > free:
        raise LongcatError(f"{p.dst.parent}: not enough free disk for the output: needs "
                           f"{need / 1e9:.2f} GB, {free / 1e9:.2f} GB free (free some space, "
                           "pick another --dst, or write less: --dtype bf16, --link)")
    return need, free


class _Killer:
    """The documented test hook: ``$LONGCAT_TOOLS_TEST_KILL_AT=k`` SIGKILLs the run at step k."""

    def __init__(self) -> None:
        v = os.environ.get(ENV_KILL_AT)
        self.at = int(v) if v else 0
        self.step_no = 0

    def step(self) -> None:
        self.step_no += 1
        if self.at and self.step_no == self.at:
            os.kill(os.getpid(), signal.SIGKILL)


def _write_tensor(out: HashingFile, t: OutTensor, sources: Sources, ring: BufferRing,
                  progress: Callable[[int], None]) -> None:
    """Stream one tensor into ``out``: byte ranges of its sources, cast chunk by chunk, or what
    its producer returns."""
    if t.produce is not None:
        data = TensorSpec(t.name, t.dtype, t.shape, t.produce).data()
        out.write(data)
        progress(len(data))
        return
    for p in t.pieces:
        src_dtype = p.info.torch_dtype
        row = p.row_bytes
        if row == 0:
            continue
        if src_dtype == t.dtype:
            out.copy_from(sources, p.path, p.info.begin + p.start * row, p.nbytes, progress)
            continue
        step = max(1, ring.size // row)
        for r0 in range(p.start, p.stop, step):
            n = (min(p.stop, r0 + step) - r0) * row
            buf = ring.get() if n <= ring.size else bytearray(n)
            try:
                view = memoryview(buf)[:n]
                sources.read_into(p.path, p.info.begin + r0 * row, view)
                x = torch.frombuffer(view, dtype=src_dtype)
                y = x.to(t.dtype)
                if t.dtype == torch.float16 and bool((torch.isinf(y) & torch.isfinite(x)).any()):
                    raise LongcatError(f"{p.path}: tensor '{p.info.name}' overflows float16 "
                                       "(|x| > 65504); use --dtype bf16")
                del x, view
            finally:
                if len(buf) == ring.size:
                    ring.put(buf)
            data = tensor_bytes(y)
            out.write(data)
            progress(len(data))


def execute(p: Plan, progress: Callable[[int], None] | None = None) -> Result:
    """Write the plan into ``DST.partial``, then rename it to ``DST``."""
    # Chunks are small and a hash thread runs beside: torch's intra-op threads only add
    # OpenMP spin-waiting (measured: a 1 MiB cast 90x slower with 2 threads on a busy 2-core
    # machine than with 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _execute(p, progress)
    finally:
        torch.set_num_threads(threads)


def _check_lora_values(p: Plan) -> None:
    """Cast every adapter rewritten to float16 before anything is written, so a LoRA value it
    cannot hold stops the run with no output (adapters are small next to the DiT; the DiT's own
    values are checked as they stream)."""
    for job in p.jobs:
        if job.adapter is not None and any(t.dtype == torch.float16 for t in job.tensors):
            for t in job.tensors:
                if t.produce is not None:
                    t.produce()


def _execute(p: Plan, progress: Callable[[int], None] | None) -> Result:
    check_room(p)
    _check_lora_values(p)
    progress = progress or (lambda n: None)
    killer = _Killer()
    sources = Sources()
    ring = BufferRing()  # source chunks being cast
    t0 = time.perf_counter()
    digests: dict[str, Future] = {}
    written = linked = copied = tensors = bytes_written = 0

    def wrote(n: int) -> None:
        nonlocal bytes_written
        bytes_written += n
        progress(n)

    # The registry records each rewritten adapter's source sha256: hashed beside the copy.
    rewritten = dict(j.adapter for j in p.jobs if j.adapter is not None)
    try:
        with Writers() as w, atomic_folder(p.dst, force=p.force, what="checkpoint",
                                           writes=p.top_names) as tmp, \
                ThreadPoolExecutor(1, thread_name_prefix="source-sha256") as side:
            source_sha = {n: side.submit(sha256_file, path) for n, path in rewritten.items()}
            for job in p.jobs:
                path = tmp / job.rel
                path.parent.mkdir(parents=True, exist_ok=True)
                if job.kind == "tensors":
                    specs = [TensorSpec(t.name, t.dtype, t.shape) for t in job.tensors]
                    out = w.file(path)
                    try:
                        header = build_header(specs, job.metadata)
                        out.write(header)
                        wrote(len(header))
                        for t in job.tensors:
                            _write_tensor(out, t, sources, ring, wrote)
                            tensors += 1
                            killer.step()
                        digests[job.rel] = out.close_later()
                    except BaseException:
                        out.abort()
                        raise
                    written += 1
                    if any(t.produce is not None for t in job.tensors):
                        sources.bytes_read += job.bytes_in  # read through lora_formats
                elif job.kind == "text":
                    out = w.file(path)
                    data = job.text.encode()
                    out.write(data)
                    wrote(len(data))
                    digests[job.rel] = out.close_later()
                    written += 1
                else:
                    assert job.src is not None
                    if job.kind == "link" and try_link(job.src, path):
                        linked += 1
                    else:
                        digests[job.rel] = copy_hashed(job.src, path, w, sources, wrote)
                        copied += 1
                killer.step()
            extra: dict[str, str] = {}
            if p.loras and p.registry:
                # the lora command's registry, with each adapter's source and its sha256
                from longcat_tools import lora as lora_registry
                from longcat_tools.lora.registry import checkpoint_of

                out_ckpt = checkpoint_of(tmp)
                lora_registry.register_existing(
                    out_ckpt, sources=p.registry["sources"],
                    converted={n: f.result() for n, f in source_sha.items()},
                    carried=p.registry["carried"])
                reg = lora_registry.registry_path(out_ckpt)
                digest = hashlib.sha256(reg.read_bytes()).hexdigest()
                extra[reg.relative_to(tmp).as_posix()] = digest
                written += 1
            fsync_tree(tmp)  # the disk flushes while the hash thread catches up
            killer.step()
            out = w.file(tmp / MANIFEST)
            hashes = {rel: f.result() for rel, f in digests.items()} | extra
            out.write(format_manifest(hashes).encode())
            out.close(fsync=True)
            fsync_dir(tmp)
            killer.step()
    finally:
        sources.close()
    peak = peak_rss()
    return Result(p, time.perf_counter() - t0, tensors, sources.bytes_read, bytes_written,
                  written, linked, copied, peak, len(digests) + len(extra))


def peak_rss() -> int:
    """Peak resident memory of this process image in bytes: ``VmHWM`` where Linux has it
    (``ru_maxrss`` keeps the parent's peak across fork and exec, so a small command started
    by a big one would report the big one's), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def convert(src: str | Path, dst: str | Path, *, dry_run: bool = False,
            progress: Callable[[int], None] | None = None, **options: Any) -> Plan | Result:
    """Plan, and unless ``dry_run`` execute, a conversion (options as :func:`plan`)."""
    p = plan(src, dst, **options)
    if dry_run:
        return p
    return execute(p, progress)

