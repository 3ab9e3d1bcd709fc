"""``lora fuse``: a new checkpoint with adapters merged into the DiT, so none is needed at run time.

Streamed tensor by tensor like ``convert``: only the shards that hold an adapted weight are
rewritten (``W + scale * alpha/rank * B @ A`` in fp32, cast back to the weight's dtype), every
other file is hard-linked (or copied). Everything is staged in ``DST.partial``, fsynced with its
folders and renamed to ``DST`` at the end; the source's ``checksums.sha256`` is carried over,
true for the fused copy.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from longcat_tools import schemas
from longcat_tools.checkpoint import layouts
from longcat_tools.errors import LongcatError, UsageError
from longcat_tools.io import jsonio
from longcat_tools.io.atomic import atomic_folder, check_replaceable, fsync_tree, try_link
from longcat_tools.io.checksums import MANIFEST, format_manifest, read_manifest, sha256_file
from longcat_tools.io.safetensors import TensorSpec, read_header, read_tensor, write_file
from longcat_tools.lora import formats as lf
from longcat_tools.lora.registry import (
    LOCK_SUFFIX,
    REGISTRY,
    SCHEMA,
    checkpoint_of,
    dit_shapes,
    find_adapter,
    is_owned,
    load_registry,
    registry_path,
    summarize,
)
from longcat_tools.model import keymap

FUSE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
FUSED_CONFIG_KEY = "_fused_loras"  # transformer config note ('_' keys: ignored by loaders)
FUSED_METADATA_KEY = "longcat_tools.fused_loras"

@dataclass
class FusedAdapter:
    name: str
    scale: float
    lora: lf.LoraFile
    sha256: str | None = None

    def note(self) -> dict[str, Any]:
        rank, alpha = summarize(self.lora)
        return {"name": self.name, "scale": self.scale, "format": self.lora.format,
                "rank": rank, "alpha": alpha, "modules": len(self.lora.modules),
                "file": self.lora.path.name, "sha256": self.sha256}


@dataclass
class FusePlan:
    ckpt: layouts.Checkpoint
    dst: Path
    adapters: list[FusedAdapter]
    rewrite: dict[Path, list[str]]  # shard (its path in the checkpoint) -> tensors that change
    link: bool
    force: bool
    weights: int  # adapted DiT tensors
    bytes_to_write: int
    listed: dict[str, str]  # the source's checksums.sha256, read before anything is written

    def describe(self) -> dict[str, Any]:
        return {"source": str(self.ckpt.root), "dst": str(self.dst),
                "layout": self.ckpt.layout, "flavour": self.ckpt.flavour,
                "adapters": [{"name": a.name, "scale": a.scale,
                              "modules": len(a.lora.modules)} for a in self.adapters],
                "adapted_tensors": self.weights,
                "shards_rewritten": sorted(p.name for p in self.rewrite),
                "bytes_to_write": self.bytes_to_write}


@dataclass
class FuseResult:
    plan: FusePlan
    seconds: float
    tensors_written: int
    files_linked: int
    files_copied: int


def parse_fuse_names(spec: str) -> list[tuple[str, float | None]]:
    """``NAME[:SCALE][,NAME[:SCALE]...]``."""
    out = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, _, s = part.partition(":")
        try:
            value = float(s) if s else None
        except ValueError:
            raise UsageError(f"'{part}': the scale after ':' must be a number") from None
        out.append((name, value))
    if not out:
        raise UsageError("name at least one adapter to fuse (NAME[:SCALE][,NAME...])")
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise UsageError(f"adapter names repeat in '{spec}'")
    return out


def _target_rows(ckpt: layouts.Checkpoint, tensor: str,
                 shapes: Mapping[str, tuple[int, int]]) -> tuple[str, tuple[int, int]] | None:
    """(native module, output rows of its delta) that a DiT weight of this flavour receives."""
    if not tensor.endswith(".weight"):
        return None
    if ckpt.flavour == "native":
        module = tensor[: -len(".weight")]
        return (module, (0, shapes[module][0])) if module in shapes else None
    try:
        part = keymap.fastvideo_to_native(tensor)
    except LongcatError:
        return None
    module = part.native[: -len(".weight")]
    if module not in shapes:
        return None
    rows = shapes[module][0] // part.count
    return module, (part.index * rows, (part.index + 1) * rows)


def plan_fuse(model: str | Path | layouts.Checkpoint | None,
              names: list[tuple[str, float | None]], dst: str | Path, *,
              scale: float | None = None, link: bool = True, force: bool = False) -> FusePlan:
    """Check the adapters and the checkpoint, and find which shards change (headers only)."""
    ckpt = checkpoint_of(model)
    if ckpt.avatar is not None:
        raise LongcatError(f"{ckpt.root}: lora fuse does not handle avatar checkpoints yet (all "
                           "of its DiT folders, the INT8 copy too, would need the merge); apply "
                           "the adapter at run time instead")
    dst = Path(dst)
    check_replaceable(dst, "checkpoint", source=ckpt.root, force=force)
    for entry in ckpt.root.iterdir():  # what the copy will place: no link loop among it
        try:
            entry.resolve()
        except (OSError, RuntimeError) as e:
            raise LongcatError(f"{entry}: cannot be resolved ({e}); remove the broken "
                               "link") from None
    reg = load_registry(ckpt)
    shapes = dit_shapes(ckpt)
    adapters = []
    for name, own in names:
        path, rec = find_adapter(ckpt, reg, name)
        if not path.is_file():
            raise LongcatError(f"{path}: adapter '{name}' is registered but its file is missing")
        k = own if own is not None else scale if scale is not None else (
            rec.default_scale if rec else 1.0)
        adapters.append(FusedAdapter(name, float(k), lf.read_lora(path, shapes)))
    shards = layouts.transformer_shards(ckpt)
    wanted = {m for a in adapters for m in a.lora.modules}
    rewrite: dict[Path, list[str]] = {}
    covered: set[str] = set()
    # by their names in the checkpoint (a cache snapshot's resolve to blob hashes)
    headers = {p: read_header(p) for p in sorted(set(shards.values()))}
    for path, header in headers.items():
        for tname, info in header.tensors.items():
            hit = _target_rows(ckpt, tname, shapes)
            if hit is None or hit[0] not in wanted:
                continue
            module, (lo, hi) = hit
            expect = (hi - lo, shapes[module][1])  # a Conv3d's over its flattened patch
            if (info.shape[0], math.prod(info.shape[1:])) != expect:
                raise LongcatError(f"{path}: tensor '{tname}' is {list(info.shape)}, expected "
                                   f"{list(expect)} from the transformer config (run verify)")
            if info.torch_dtype not in FUSE_DTYPES:
                raise LongcatError(f"{path}: tensor '{tname}' is {info.dtype}; an adapter can be "
                                   "fused into float32, float16 or bfloat16 weights only (convert "
                                   "the checkpoint with --dtype bf16 first)")
            rewrite.setdefault(path, []).append(tname)
            covered.add(module)
    missing = sorted(wanted - covered)
    if missing:
        raise LongcatError(f"{ckpt.transformer_dir}: has no weight for adapted module "
                           f"'{missing[0]}' ({len(missing)} in all); is the checkpoint complete?")
    weights = sum(len(v) for v in rewrite.values())
    nbytes = sum(p.stat().st_size for p in rewrite)
    return FusePlan(ckpt, dst, adapters, rewrite, link, force, weights, nbytes,
                    _source_checksums(ckpt))


def _fused_tensor(w: torch.Tensor, parts: list[tuple[lf.ModuleLora, float, tuple[int, int]]]
                  ) -> torch.Tensor:
    acc = w.to(torch.float32, copy=True)
    for m, k, rows in parts:
        acc += m.delta(k, torch.float32, rows).view(acc.shape)
    return acc.to(w.dtype)


def execute_fuse(p: FusePlan, progress: Callable[[int], None] | None = None) -> FuseResult:
    """Write the fused checkpoint into ``DST.partial`` and rename it at the end."""
    t0 = time.perf_counter()
    ckpt = p.ckpt
    progress = progress or (lambda n: None)
    for a in p.adapters:
        a.sha256 = sha256_file(a.lora.path)
    notes = [a.note() for a in p.adapters]
    fused_files = {a.lora.path.resolve() for a in p.adapters}
    shapes = dit_shapes(ckpt)
    by_module: dict[str, list[tuple[FusedAdapter, lf.ModuleEntry]]] = {}
    for a in p.adapters:
        for m, e in a.lora.modules.items():
            by_module.setdefault(m, []).append((a, e))
    cache: dict[str, list[tuple[lf.ModuleLora, float]]] = {}
    counts = {"tensors": 0, "linked": 0, "copied": 0}
    hashes: dict[str, str] = {}
    skip = {ckpt.transformer_dir.resolve(), ckpt.lora_dir.resolve(),
            (ckpt.root / MANIFEST).resolve()}

    def loras(module: str) -> list[tuple[lf.ModuleLora, float]]:
        if module not in cache:
            cache.clear()  # the split targets of one module come together
            cache[module] = [(e.load(), a.scale) for a, e in by_module[module]]
        return cache[module]

    def rewritten(path: Path, header, changed: set[str]) -> list[TensorSpec]:
        def produce(name: str) -> torch.Tensor:
            info = header.tensors[name]
            with open(path, "rb") as f:
                w = read_tensor(f, info)
            if name in changed:
                module, rows = _target_rows(ckpt, name, shapes)
                w = _fused_tensor(w, [(m, k, rows) for m, k in loras(module)])
                if not bool(torch.isfinite(w).all()):
                    raise LongcatError(f"{path}: fusing gives non-finite values in '{name}' "
                                       "(scale too large for the dtype?); nothing was written")
            counts["tensors"] += 1
            return w
        return [TensorSpec(n, i.torch_dtype, i.shape, lambda n=n: produce(n))
                for n, i in header.tensors.items()]

    def place(src: Path, dst: Path) -> None:
        layouts.check_contained(src, ckpt.containment)
        linked = p.link and try_link(src, dst)
        if not linked:
            shutil.copy2(src, dst)
        counts["linked" if linked else "copied"] += 1

    def write_text(rel: str, text: str) -> None:
        (tmp / rel).write_text(text)
        hashes[rel] = hashlib.sha256(text.encode()).hexdigest()

    with atomic_folder(p.dst, force=p.force, what="checkpoint") as tmp:
        for entry in sorted(ckpt.root.iterdir()):
            if entry.resolve() in skip or entry.name.endswith(".partial"):
                continue
            _copy_tree(entry, tmp / entry.name, place)
        tdir = tmp / ckpt.transformer_dir.name
        tdir.mkdir()
        names = {path.name for path in p.rewrite}
        for f in sorted(ckpt.transformer_dir.iterdir()):
            if f.name == "config.json" or f.name in names:
                continue
            _copy_tree(f, tdir / f.name, place)
        for path, changed in p.rewrite.items():
            if (tdir / path.name).exists():  # never write through a hard link into the source
                raise LongcatError(f"internal: {tdir / path.name} exists before it is written")
            header = read_header(path)
            meta = dict(header.metadata)
            meta[FUSED_METADATA_KEY] = jsonio.dumps(notes, indent=None, newline=False,
                                                    sort_keys=True)
            h = hashlib.sha256()
            write_file(tdir / path.name, rewritten(path, header, set(changed)), meta,
                       on_bytes=h.update, progress=progress)
            hashes[f"{ckpt.transformer_dir.name}/{path.name}"] = h.hexdigest()
        cfg = ckpt.config()
        cfg[FUSED_CONFIG_KEY] = list(cfg.get(FUSED_CONFIG_KEY) or []) + notes
        write_text(f"{ckpt.transformer_dir.name}/config.json", jsonio.dumps(cfg))
        _fuse_lora_dir(ckpt, tmp, fused_files, {a.name for a in p.adapters}, place, write_text)
        (tmp / MANIFEST).write_text(_checksums(p.listed, tmp, hashes))
        fsync_tree(tmp)  # then atomic_folder renames it and syncs the parent folder
    return FuseResult(p, time.perf_counter() - t0, counts["tensors"], counts["linked"],
                      counts["copied"])


def _copy_tree(src: Path, dst: Path, place: Callable[[Path, Path], None]) -> None:
    if src.is_dir():
        dst.mkdir()
        for child in sorted(src.iterdir()):
            _copy_tree(child, dst / child.name, place)
    elif src.is_file():
        place(src, dst)


def _fuse_lora_dir(ckpt: layouts.Checkpoint, tmp: Path, fused_files: set[Path],
                   fused_names: set[str], place: Callable[[Path, Path], None],
                   write_text: Callable[[str, str], None]) -> None:
    """``lora/`` minus the fused adapters' files, with their registry entries dropped."""
    src = ckpt.lora_dir
    if not src.is_dir():
        return
    dst = tmp / "lora"
    dst.mkdir()
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        if (not is_owned(ckpt, p)  # a link leading out of lora/ (or a loop) is not copied along
                or p.is_dir() or p.resolve() in fused_files or rel.as_posix() == REGISTRY
                or p.name.endswith(LOCK_SUFFIX) or any(
                    part.startswith(".") or part.endswith(".partial") for part in rel.parts)):
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        place(p, dst / rel)
    reg = load_registry(ckpt)
    if registry_path(ckpt).exists():
        reg.adapters = [a for a in reg.adapters if a.name not in fused_names]
        doc = reg.to_json()
        schemas.validate(doc, SCHEMA, str(dst / REGISTRY))
        write_text(f"lora/{REGISTRY}", jsonio.dumps(doc))
    for d in sorted((q for q in dst.rglob("*") if q.is_dir()), reverse=True):
        if not any(d.iterdir()):
            d.rmdir()


def _source_checksums(ckpt: layouts.Checkpoint) -> dict[str, str]:
    """The source's ``checksums.sha256`` (empty without one), every entry inside the checkpoint;
    a bad list stops the plan, before any shard is written."""
    src = ckpt.root / MANIFEST
    listed = read_manifest(src) if src.is_file() else {}
    for rel in listed:
        layouts.inside(ckpt.root, rel, f"{MANIFEST} entry")
    return listed


def _checksums(listed: Mapping[str, str], tmp: Path, hashes: Mapping[str, str]) -> str:
    """The fused copy's ``checksums.sha256``: the source's lines for the files the copy has
    (new digests for those rewritten) and the files this run wrote."""
    kept = {rel: d for rel, d in listed.items() if (tmp / rel).is_file()}
    return format_manifest(kept | dict(hashes))


def fuse(model: str | Path | layouts.Checkpoint | None, names: list[tuple[str, float | None]],
         dst: str | Path, *, scale: float | None = None, link: bool = True, force: bool = False,
         dry_run: bool = False, progress: Callable[[int], None] | None = None
         ) -> FusePlan | FuseResult:
    """Plan, and unless ``dry_run`` write, a checkpoint with the adapters merged into the DiT."""
    p = plan_fuse(model, names, dst, scale=scale, link=link, force=force)
    if dry_run:
        return p
    return execute_fuse(p, progress)



def fuse_error(source: str | Path | layouts.Checkpoint, fused: str | Path | layouts.Checkpoint,
               names: list[tuple[str, float]]) -> tuple[float, int]:
    """(worst relative error, adapted tensors) of a fused DiT against ``W + scale * delta``
    recomputed in float64 from the source's weights and adapter files; every other tensor must
    be bit-identical (else the error is infinite). A check for tests, the demo and the doubtful."""
    src, dst = checkpoint_of(source), checkpoint_of(fused)
    reg = load_registry(src)
    shapes = dit_shapes(src)
    loras = [(lf.read_lora(find_adapter(src, reg, n)[0], shapes), k) for n, k in names]
    a_shards, b_shards = layouts.transformer_shards(src), layouts.transformer_shards(dst)
    if set(a_shards) != set(b_shards):
        return float("inf"), 0
    worst, adapted = 0.0, 0
    for name, path in a_shards.items():
        with open(path, "rb") as f:
            w = read_tensor(f, read_header(path).tensors[name])
        with open(b_shards[name], "rb") as f:
            got = read_tensor(f, read_header(b_shards[name]).tensors[name])
        hit = _target_rows(src, name, shapes)
        parts = [(lora.modules[hit[0]], k) for lora, k in loras
                 if hit is not None and hit[0] in lora.modules]
        if not parts:
            if got.dtype != w.dtype or not torch.equal(got, w):
                return float("inf"), adapted
            continue
        want = w.double() + sum(e.load().delta(k, torch.float64, hit[1]).view(w.shape)
                                for e, k in parts)
        err = float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30))
        worst, adapted = max(worst, err), adapted + 1
    return worst, adapted
