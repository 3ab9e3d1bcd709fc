"""The LoRA adapters of a checkpoint: registry, attach, detach, export and fuse.

Adapters live in ``lora/`` in the checkpoint's own key flavour (native hub layout:
``lora/cfg_step_lora.safetensors`` and ``lora/refinement_lora.safetensors``; attached ones and
those ``convert`` writes: ``lora/<name>/<file>.safetensors``) and are listed in
``lora/adapters.json`` (:class:`Registry`, schema ``lora_manifest``). Files found there without
an entry (a fresh hub download, a converted checkpoint) are *discovered*: ``list`` shows them and
the first command that writes the registry records them (:func:`register_existing`).

Every write is all-or-nothing and serialized: an exclusive ``flock`` on
``lora/adapters.json.lock``, the adapter folder built as ``lora/NAME.partial`` and renamed, the
registry validated against its schema and replaced atomically. ``fuse`` writes a new checkpoint,
streamed tensor by tensor like ``convert``: only the shards that hold an adapted weight are
rewritten (``W + scale * alpha/rank * B @ A`` in fp32, cast back to the weight's dtype), every
other file is hard-linked (or copied).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from longcat_tools import __version__, schemas
from longcat_tools.checkpoint import layouts
from longcat_tools.errors import LongcatError, UsageError
from longcat_tools.io.atomic import (
    atomic_folder,
    atomic_write_text,
    file_lock,
    fsync_dir,
    partial_path,
)
from longcat_tools.io.checksums import refresh_manifest
from longcat_tools.io.safetensors import (
    TensorSpec,
    read_header,
    read_tensor,
    write_file,
)
from longcat_tools.lora import formats as lf
from longcat_tools.model import dtypes, keymap

REGISTRY = "adapters.json"
LOCK_SUFFIX = ".lock"
SCHEMA = "lora_manifest"
REGISTRY_VERSION = 1
LOCK_TIMEOUT_S = 600.0
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
SOURCE_FORMATS = ("auto", *lf.FORMATS)
FUSE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
CHECKSUMS = "checksums.sha256"  # convert's sha256sum manifest, kept true in a fused copy
FUSED_CONFIG_KEY = "_fused_loras"  # transformer config note ('_' keys: ignored by loaders)
FUSED_METADATA_KEY = "longcat_tools.fused_loras"
_HASH_CHUNK = 16 << 20
_BLOCK_RE = re.compile(r"^blocks\.\d+\.")

# What the hub's two adapters are for (LongCat-Video's demos: distillation and 720p refinement).
HUB_ADAPTERS: dict[str, dict[str, Any]] = {
    "distilled": {"description": "cfg_step_lora: CFG and step distillation (16 steps, "
                                 "guidance 1.0)",
                  "tasks": ["t2v", "i2v", "vc", "long", "refine"]},
    "refinement": {"description": "refinement_lora: the 480p -> 720p refinement expert, used "
                                   "with block sparse attention",
                   "tasks": ["refine"]},
}


# ---------------------------------------------------------------------------------------------
# the registry


@dataclass
class AdapterRecord:
    """One entry of ``lora/adapters.json``.

    ``file`` is relative to ``lora/``; ``format`` is the stored file's; ``rank`` the rank of most
    modules (read from the tensors) and ``alpha`` the value with ``alpha / rank`` = the native
    ``alpha_scale``; ``targets`` the adapted modules in the file's own names with the block index
    written ``*``; ``default_scale`` the multiplier used unless one is asked for; ``source`` the
    file it was made from, with its format and sha256 (the file itself for one found in place).
    """

    name: str
    file: str
    format: str
    rank: int
    alpha: float
    targets: list[str]
    default_scale: float = 1.0
    description: str | None = None
    tasks: list[str] | None = None
    source: dict[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"name": self.name, "file": self.file, "format": self.format,
                               "rank": self.rank, "alpha": self.alpha, "targets": self.targets,
                               "default_scale": self.default_scale}
        if self.description is not None:
            doc["description"] = self.description
        if self.tasks is not None:
            doc["tasks"] = self.tasks
        doc["source"] = self.source
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> AdapterRecord:
        return cls(doc["name"], doc["file"], doc["format"], doc["rank"], doc["alpha"],
                   list(doc["targets"]), doc["default_scale"], doc.get("description"),
                   doc.get("tasks"), doc.get("source"))


@dataclass
class Registry:
    """``lora/adapters.json``: ``{"version": 1, "adapters": [AdapterRecord, ...]}``."""

    adapters: list[AdapterRecord] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"version": REGISTRY_VERSION, "adapters": [a.to_json() for a in self.adapters]}

    def get(self, name: str) -> AdapterRecord | None:
        return next((a for a in self.adapters if a.name == name), None)

    def files(self) -> set[str]:
        return {a.file for a in self.adapters}


def registry_path(ckpt: layouts.Checkpoint) -> Path:
    return ckpt.lora_dir / REGISTRY


def load_registry(ckpt: layouts.Checkpoint) -> Registry:
    """The registry (empty when there is none), checked: schema, unique names, files in lora/."""
    path = registry_path(ckpt)
    if not path.exists():
        return Registry()
    doc = layouts.load_json(path, "LoRA registry")
    schemas.validate(doc, SCHEMA, str(path))
    reg = Registry([AdapterRecord.from_json(a) for a in doc["adapters"]])
    dupes = [n for n, k in Counter(a.name for a in reg.adapters).items() if k > 1]
    if dupes:
        raise LongcatError(f"{path}: adapter '{dupes[0]}' is listed twice (remove one entry)")
    for a in reg.adapters:
        layouts.inside(ckpt.lora_dir, a.file, f"file of adapter '{a.name}'", ckpt.containment)
    return reg


def save_registry(ckpt: layouts.Checkpoint, reg: Registry) -> None:
    """Validate against the schema, then replace ``adapters.json`` atomically."""
    path = registry_path(ckpt)
    doc = reg.to_json()
    schemas.validate(doc, SCHEMA, str(path))
    new = not path.exists()
    atomic_write_text(path, json.dumps(doc, indent=2) + "\n")
    if new:  # a temp file's 0600, not what the rest of the checkpoint has
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(path, 0o666 & ~umask)
    refresh_manifest(ckpt.root, [path])


@contextmanager
def registry_lock(ckpt: layouts.Checkpoint, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """An exclusive lock on ``lora/adapters.json.lock`` (created with ``lora/``) around every
    change of the registry or of ``lora/``."""
    check_writable(ckpt)
    ckpt.lora_dir.mkdir(exist_ok=True)
    with file_lock(ckpt.lora_dir / (REGISTRY + LOCK_SUFFIX), timeout,
                   "another longcat-tools lora command"):
        yield


# ---------------------------------------------------------------------------------------------
# finding adapters


def check_writable(ckpt: layouts.Checkpoint) -> None:
    """Adapters are never written into a Hugging Face cache snapshot (its files are the hub's)."""
    if ckpt.in_hf_cache:
        raise LongcatError(f"{ckpt.root}: is a snapshot in the Hugging Face cache, which lora "
                           "never writes into; download it with `longcat-tools download REPO "
                           "--dst DIR` (real files) or convert it, and attach to that")


def _model(model: str | Path | layouts.Checkpoint | None) -> layouts.Checkpoint:
    if isinstance(model, layouts.Checkpoint):
        return model
    return layouts.detect(layouts.resolve_model(model))


def dit_shapes(ckpt: layouts.Checkpoint) -> dict[str, tuple[int, int]]:
    """Native module -> (out, in) of every Linear of this checkpoint's DiT (from its config)."""
    return lf.linear_shapes(keymap.dit_dims(ckpt.config(), str(ckpt.config_path)))


def check_name(name: str) -> None:
    if not NAME_RE.match(name) or name.endswith(".partial") or name == REGISTRY:
        raise UsageError(f"adapter name '{name}' is not allowed: use letters, digits, '.', '_' "
                         "and '-', starting with a letter or digit (at most 100 characters)")


def discover(ckpt: layouts.Checkpoint) -> dict[str, Path]:
    """Adapter files present in ``lora/``, by name: the hub's ``lora/<file>.safetensors`` (named
    like FastVideo's folders: distilled, refinement; others by their stem) and
    ``lora/<name>/<file>.safetensors``. Half-written (``*.partial``) and hidden entries are
    skipped; a folder with several safetensors files names each ``<folder>/<stem>``."""
    root = ckpt.lora_dir
    if not root.is_dir():
        return {}
    allowed = ckpt.containment
    found: dict[str, Path] = {}
    for p in sorted(root.iterdir()):
        if p.name.startswith(".") or p.name.endswith(".partial"):
            continue
        if p.is_file() and p.name.endswith(".safetensors"):
            layouts.check_contained(p, allowed)
            found.setdefault(lf.NATIVE_FILE_TO_ADAPTER.get(p.name, p.name[:-12]), p)
        elif p.is_dir():
            files = sorted(q for q in p.iterdir()
                           if q.is_file() and q.name.endswith(".safetensors"))
            for q in files:
                layouts.check_contained(q, allowed)
                found.setdefault(p.name if len(files) == 1 else f"{p.name}/{q.name[:-12]}", q)
    return found


def file_targets(lora: lf.LoraFile) -> list[str]:
    """The adapted modules in the file's own names (split targets of FastVideo/PEFT files)."""
    names: set[str] = set()
    for e in lora.modules.values():
        if lora.format == "native":
            names.add(e.module)
            continue
        for k in e.source_keys:
            m = lf._PEFT_WEIGHT.match(lf._strip_peft(k)) if lora.format == "peft" else None
            if m and m["role"] == "lora_A":
                names.add(m["mod"])
            elif lora.format == "fastvideo" and k.endswith(".lora_A"):
                names.add(k[: -len(".lora_A")])
    return sorted(names)


def target_patterns(modules: list[str] | set[str]) -> list[str]:
    """Module paths with the block index written ``*`` (the registry's ``targets``)."""
    return sorted({_BLOCK_RE.sub("blocks.*.", m) for m in modules})


def _alpha_scale(e: lf.ModuleEntry) -> float:
    return float(e.alpha_scale.double().mean())


def summarize(lora: lf.LoraFile) -> tuple[int, float]:
    """(rank of most modules, alpha with alpha/rank = the most common alpha_scale)."""
    rank = Counter(e.rank for e in lora.modules.values()).most_common(1)[0][0]
    scale = Counter(_alpha_scale(e) for e in lora.modules.values()).most_common(1)[0][0]
    return rank, scale * rank


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
            if progress:
                progress(len(chunk))
    return h.hexdigest()


def make_record(name: str, rel: str, lora: lf.LoraFile, *, default_scale: float = 1.0,
                source: dict[str, str] | None = None, hub: bool = False) -> AdapterRecord:
    """The registry entry of adapter file ``lora/<rel>`` (rank and alpha from its tensors;
    ``hub``: the description of the hub adapter of that name)."""
    if not lora.modules:
        raise LongcatError(f"{lora.path}: holds no LoRA modules")
    rank, alpha = summarize(lora)
    if not alpha > 0:
        raise LongcatError(f"{lora.path}: alpha_scale {alpha / rank:g} is not positive; an "
                           "adapter with a zero or negative scale cannot be registered")
    about = HUB_ADAPTERS.get(name, {}) if hub else {}
    return AdapterRecord(name, rel, lora.format, rank, alpha,
                         target_patterns(file_targets(lora)), default_scale,
                         about.get("description"), about.get("tasks"), source)


def _register_found(ckpt: layouts.Checkpoint, reg: Registry,
                    sources: Mapping[str, str | Path] | None = None,
                    progress: Callable[[int], None] | None = None,
                    converted: Mapping[str, str] | None = None) -> list[AdapterRecord]:
    """Add discovered, unregistered adapters to ``reg`` (caller holds the lock and saves)."""
    shapes = dit_shapes(ckpt)
    known = reg.files()
    added = []
    converted = converted or {}
    for name, path in discover(ckpt).items():
        rel = path.relative_to(ckpt.lora_dir).as_posix()
        if rel in known or reg.get(name) is not None or not NAME_RE.match(name):
            continue  # an unnamable file (several in one folder) stays discovered only
        # a file convert has just written has its own block split: its header is enough
        lora = lf.read_lora(path, shapes, inspect_blocks=name not in converted)
        src_path = Path(sources[name]) if sources and name in sources else path
        src_fmt = lora.format if src_path == path else lf.read_lora(src_path).format
        digest = converted.get(name) or sha256_file(src_path, progress)
        source = {"file": str(rel if src_path == path else src_path), "format": src_fmt,
                  "sha256": digest}
        rec = make_record(name, rel, lora, source=source, hub=True)
        reg.adapters.append(rec)
        added.append(rec)
    return added


def register_existing(model: str | Path | layouts.Checkpoint | None,
                      sources: Mapping[str, str | Path] | None = None,
                      progress: Callable[[int], None] | None = None,
                      converted: Mapping[str, str] | None = None) -> list[AdapterRecord]:
    """Record every adapter file of ``lora/`` that the registry lacks (``convert`` calls this on
    its output; ``sources`` maps an adapter name to the file it was converted from, whose sha256
    and format then go in the entry; ``converted`` maps the names convert wrote to that sha256,
    hashed while converting). Returns the new entries."""
    ckpt = _model(model)
    if not ckpt.lora_dir.is_dir():
        return []
    with registry_lock(ckpt):
        reg = load_registry(ckpt)
        added = _register_found(ckpt, reg, sources, progress, converted)
        if added:
            save_registry(ckpt, reg)
    return added


@dataclass
class AdapterInfo:
    """What ``list`` shows of one adapter."""

    name: str
    path: Path
    registered: bool
    status: str  # "ok", "missing" or the problem
    format: str | None = None
    rank: int | None = None
    alpha: float | None = None
    default_scale: float | None = None
    modules: int | None = None
    nbytes: int | None = None
    record: AdapterRecord | None = None

    def to_json(self, lora_dir: Path) -> dict[str, Any]:
        return {"name": self.name, "file": self.path.relative_to(lora_dir).as_posix(),
                "registered": self.registered, "status": self.status, "format": self.format,
                "rank": self.rank, "alpha": self.alpha, "default_scale": self.default_scale,
                "modules": self.modules, "bytes": self.nbytes,
                "description": self.record.description if self.record else None,
                "source": self.record.source if self.record else None}


def list_adapters(model: str | Path | layouts.Checkpoint | None
                  ) -> tuple[layouts.Checkpoint, list[AdapterInfo]]:
    """Registered and discovered adapters, each checked against this DiT from its header (a
    broken one is listed with its problem, not raised). Reads only; writes nothing."""
    ckpt = _model(model)
    reg = load_registry(ckpt)
    shapes = dit_shapes(ckpt)
    items: list[tuple[str, Path, AdapterRecord | None]] = [
        (a.name, ckpt.lora_dir / a.file, a) for a in reg.adapters]
    files = reg.files()
    for name, path in discover(ckpt).items():
        if path.relative_to(ckpt.lora_dir).as_posix() not in files and reg.get(name) is None:
            items.append((name, path, None))
    out = []
    for name, path, rec in items:
        info = AdapterInfo(name, path, rec is not None, "ok", record=rec,
                           default_scale=rec.default_scale if rec else 1.0)
        if not path.is_file():
            info.status = "missing"
        else:
            try:
                lora = lf.read_lora(path, shapes, inspect_blocks=False)
                info.format, info.modules, info.nbytes = lora.format, len(lora.modules), lora.nbytes
                info.rank, info.alpha = summarize(lora) if lora.modules else (None, None)
                if rec is not None and rec.format != lora.format:
                    info.status = f"registry says {rec.format}, the file is {lora.format}"
            except LongcatError as e:
                info.status = str(e)
        out.append(info)
    return ckpt, out


def _find(ckpt: layouts.Checkpoint, reg: Registry, name: str) -> tuple[Path, AdapterRecord | None]:
    rec = reg.get(name)
    if rec is not None:
        return ckpt.lora_dir / rec.file, rec
    found = discover(ckpt)
    if name in found:
        return found[name], None
    names = sorted({a.name for a in reg.adapters} | set(found))
    raise UsageError(f"{ckpt.lora_dir}: no adapter named '{name}' (have: "
                     f"{', '.join(names) or 'none'}; see `longcat-tools lora list`)")


# ---------------------------------------------------------------------------------------------
# attach


@dataclass
class AttachResult:
    name: str
    path: Path  # the adapter file written (or that would be)
    source: Path
    source_format: str
    format: str
    modules: int
    nbytes: int
    record: AdapterRecord | None
    registered_also: list[str]
    notes: list[str]
    seconds: float
    dry_run: bool


def _checked_specs(lora: lf.LoraFile, fmt: str, src: Path) -> list[TensorSpec]:
    """The output tensors of ``lora`` in ``fmt``, streamed module by module, refusing a module
    whose tensors hold NaN or Inf (the name of the source tensor in the message)."""
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def produce(module: str, name: str) -> torch.Tensor:
        if module not in cache:
            cache.clear()
            entry = lora.modules[module]
            m = entry.load()
            if not all(bool(torch.isfinite(t).all()) for t in (m.down, *m.ups, m.alpha_scale)):
                raise LongcatError(f"{src}: tensor '{_non_finite_key(lora, entry)}' (adapter of "
                                   f"'{module}') holds NaN or Inf values; nothing was written")
            cache[module] = lf.output_tensors(m, fmt)
        return cache[module][name]

    return [TensorSpec(name, d, shape, lambda m=m, name=name: produce(m, name))
            for m, e in lora.modules.items() for name, d, shape in lf.output_specs(e, fmt)]


def _non_finite_key(lora: lf.LoraFile, entry: lf.ModuleEntry) -> str:
    """The first of a module's stored tensors that is not finite (error path only)."""
    header = read_header(lora.path)
    with open(lora.path, "rb") as f:
        for key in entry.source_keys:
            t = read_tensor(f, header.tensors[key])
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return key
    return entry.source_keys[0]


def _check_source(src: Path) -> None:
    if not src.exists():
        raise LongcatError(f"{src}: no such LoRA file")
    if not src.is_file():
        raise LongcatError(f"{src}: not a file (give the adapter's .safetensors file)")
    if src.name.endswith(layouts.PICKLE_SUFFIXES):
        raise LongcatError(f"{src}: pickle files are never loaded; convert the LoRA to "
                           "safetensors first")


def attach(model: str | Path | layouts.Checkpoint | None, lora_file: str | Path, name: str, *,
           scale: float = 1.0, fmt: str = "auto",
           adapter_config: Mapping | str | Path | None = None, force: bool = False,
           dry_run: bool = False, progress: Callable[[int], None] | None = None) -> AttachResult:
    """Check ``lora_file`` against this checkpoint's DiT (every target exists, every shape fits,
    every value finite), convert it to the checkpoint's key flavour and store it as
    ``lora/NAME/<file>``, recorded in the registry. Nothing is written on any failure."""
    t0 = time.perf_counter()
    ckpt = _model(model)
    check_writable(ckpt)
    check_name(name)
    if fmt not in SOURCE_FORMATS:
        raise UsageError(f"--format must be one of {', '.join(SOURCE_FORMATS)}, got '{fmt}'")
    if not math.isfinite(scale):
        raise UsageError(f"--scale must be a finite number, got {scale}")
    src = Path(lora_file)
    _check_source(src)
    dst_dir = ckpt.lora_dir / name
    if dst_dir.resolve() in src.resolve().parents:
        raise UsageError(f"{src}: is inside lora/{name}/, which attaching as '{name}' would "
                         "replace; copy it elsewhere first or choose another name")
    lora = lf.read_lora(src, dit_shapes(ckpt), adapter_config=adapter_config)
    if fmt != "auto" and fmt != lora.format:
        raise LongcatError(f"{src}: --format {fmt} was given but the file is in the "
                           f"{lora.format} format (its keys say so); drop --format or fix it")
    if not lora.modules:
        raise LongcatError(f"{src}: holds no LoRA modules")
    target_fmt = ckpt.flavour
    dst_file = dst_dir / (src.name if src.name.endswith(".safetensors")
                          else f"{name}.safetensors")
    nbytes = lf.convert_bytes(lora.modules.values(), target_fmt)
    if dry_run:
        reg = load_registry(ckpt)
        _check_free(ckpt, reg, name, force)
        for spec in _checked_specs(lora, target_fmt, src):  # every value checked, none written
            spec.produce()
        return AttachResult(name, dst_file, src, lora.format, target_fmt, len(lora.modules),
                            nbytes, None, [], lora.notes, time.perf_counter() - t0, True)
    with registry_lock(ckpt):
        reg = load_registry(ckpt)
        _check_free(ckpt, reg, name, force)
        also = [r.name for r in _register_found(ckpt, reg, progress=progress)
                if r.name != name]
        digest = sha256_file(src, progress)
        meta = {"format": "pt", "longcat_tools.version": __version__,
                "longcat_tools.source_format": lora.format,
                "longcat_tools.source_sha256": digest, "longcat_tools.source_name": src.name}
        meta = lf.file_metadata(lora.modules.values(), target_fmt, meta)
        with atomic_folder(dst_dir, force=force) as tmp:
            write_file(tmp / dst_file.name, _checked_specs(lora, target_fmt, src), meta,
                       progress=progress)
            stored = lf.read_lora(tmp / dst_file.name, inspect_blocks=False)
            rec = make_record(name, dst_file.relative_to(ckpt.lora_dir).as_posix(), stored,
                              default_scale=scale,
                              source={"file": str(src.resolve()), "format": lora.format,
                                      "sha256": digest})
            schemas.validate(Registry([rec]).to_json(), SCHEMA, str(registry_path(ckpt)))
        reg.adapters = [a for a in reg.adapters if a.name != name] + [rec]
        save_registry(ckpt, reg)
        refresh_manifest(ckpt.root, [dst_dir])
    return AttachResult(name, dst_file, src, lora.format, target_fmt, len(lora.modules), nbytes,
                        rec, also, lora.notes, time.perf_counter() - t0, False)


def _check_free(ckpt: layouts.Checkpoint, reg: Registry, name: str, force: bool) -> None:
    """The name is free, or (with ``force``) taken by an adapter stored in ``lora/NAME/``."""
    found = discover(ckpt)
    rec = reg.get(name)
    where = (ckpt.lora_dir / rec.file) if rec else found.get(name)
    folder = ckpt.lora_dir / name
    if where is None and not folder.exists():
        return
    if not force:
        raise LongcatError(f"{ckpt.lora_dir}: an adapter named '{name}' exists "
                           f"({where or folder}); choose another name, detach it first, or pass "
                           "--force to replace it")
    if where is not None and where.parent != folder:
        raise LongcatError(f"{where}: adapter '{name}' is not stored in lora/{name}/, so --force "
                           "cannot replace it; detach it first")


# ---------------------------------------------------------------------------------------------
# detach


@dataclass
class DetachResult:
    name: str
    removed: list[Path]
    was_registered: bool
    dry_run: bool


def detach(model: str | Path | layouts.Checkpoint | None, name: str, *, force: bool = False,
           dry_run: bool = False) -> DetachResult:
    """Remove an adapter: its registry entry and its files (``lora/NAME/``). A hub file at the
    top of ``lora/`` is part of the release: it is deleted only with ``force``."""
    ckpt = _model(model)
    check_writable(ckpt)
    with registry_lock(ckpt) if not dry_run else _nolock():
        reg = load_registry(ckpt)
        path, rec = _find(ckpt, reg, name)
        top_level = path.parent == ckpt.lora_dir
        if top_level and path.exists() and not force:
            raise LongcatError(f"{path}: adapter '{name}' is a file of the release at the top of "
                               "lora/, not an attached folder; pass --force to delete it")
        others = [q for q in path.parent.iterdir() if q != path] if (
            not top_level and path.parent.is_dir()) else []
        remove_folder = not top_level and not others
        target = path.parent if remove_folder else path
        removed = [target] if target.exists() else []
        if dry_run:
            return DetachResult(name, removed, rec is not None, True)
        trash = None
        if removed:
            trash = target.with_name(f".{target.name}.detached-{os.getpid()}")
            os.rename(target, trash)
        if rec is not None:
            reg.adapters = [a for a in reg.adapters if a.name != name]
            save_registry(ckpt, reg)
        if trash is not None:
            shutil.rmtree(trash) if trash.is_dir() else trash.unlink()
            fsync_dir(ckpt.lora_dir)
            refresh_manifest(ckpt.root, [target])
    return DetachResult(name, removed, rec is not None, False)


@contextmanager
def _nolock() -> Iterator[None]:
    yield


# ---------------------------------------------------------------------------------------------
# export


@dataclass
class ExportResult:
    name: str
    path: Path
    format: str
    keys: str | None
    modules: int
    nbytes: int
    config_path: Path | None
    seconds: float




def export(model: str | Path | layouts.Checkpoint | None, name: str, fmt: str,
           out: str | Path, *, keys: str | None = None, dtype: str = "keep",
           force: bool = False, progress: Callable[[int], None] | None = None) -> ExportResult:
    """Write adapter ``name`` as a ``fmt`` file at ``out`` (atomically). PEFT: the config goes
    into the file's metadata and into ``adapter_config.json`` beside it; ``keys`` picks native
    (default) or FastVideo module names."""
    t0 = time.perf_counter()
    ckpt = _model(model)
    if fmt not in lf.FORMATS:
        raise UsageError(f"--format must be one of {', '.join(lf.FORMATS)}, got '{fmt}'")
    if keys is not None and fmt != "peft":
        raise UsageError("--keys applies to --format peft only (the other formats have fixed "
                         "names)")
    if keys is not None and keys not in keymap.FLAVOURS:
        raise UsageError(f"--keys must be one of {', '.join(keymap.FLAVOURS)}, got '{keys}'")
    want = dtypes.parse(dtype, keep=True)
    out = Path(out)
    if not out.name.endswith(".safetensors"):
        raise UsageError(f"{out}: the output file name must end in .safetensors")
    if out.exists() and not force:
        raise LongcatError(f"{out}: already exists (pass --force to replace it)")
    if not out.parent.is_dir():
        raise LongcatError(f"{out.parent}: output folder does not exist")
    reg = load_registry(ckpt)
    path, _ = _find(ckpt, reg, name)
    if not path.is_file():
        raise LongcatError(f"{path}: adapter '{name}' is registered but its file is missing")
    if out.resolve() == path.resolve():
        raise UsageError(f"{out}: is the adapter's own file; export to another path")
    lora = lf.read_lora(path, dit_shapes(ckpt))
    meta = {"longcat_tools.version": __version__, "longcat_tools.exported_from": name}
    cfg_path, cfg_text = None, None
    if fmt == "peft":
        cfg_path = out.parent / lf.PEFT_CONFIG_NAME
        cfg_text = json.dumps(lf.peft_config(lora.modules.values(), keys or "native"),
                              indent=2) + "\n"
        if cfg_path.exists() and cfg_path.read_text() != cfg_text and not force:
            raise LongcatError(f"{cfg_path}: exists and describes another adapter; export into "
                               "another folder or pass --force to replace it")
    tmp = partial_path(out)
    try:
        n = write_file(tmp, lf.tensor_specs(lora, fmt, want, keys),
                       lf.file_metadata(lora.modules.values(), fmt, {"format": "pt", **meta},
                                        keys), progress=progress)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
        if cfg_path is not None and cfg_text is not None:
            atomic_write_text(cfg_path, cfg_text)
        fsync_dir(out.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ExportResult(name, out, fmt, keys or ("native" if fmt == "peft" else None),
                        len(lora.modules), n, cfg_path, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# fuse


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
    ckpt = _model(model)
    dst = Path(dst)
    s, d = ckpt.root.resolve(), dst.resolve()
    if s == d or s in d.parents or d in s.parents:
        raise UsageError(f"{dst}: the fused checkpoint must be outside the source {ckpt.root} "
                         "(and not contain it)")
    if dst.exists() and not force:
        raise LongcatError(f"{dst}: already exists (pass --force to replace it)")
    reg = load_registry(ckpt)
    shapes = dit_shapes(ckpt)
    adapters = []
    for name, own in names:
        path, rec = _find(ckpt, reg, name)
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
            expect = (hi - lo, shapes[module][1])
            if info.shape != expect:
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
    return FusePlan(ckpt, dst, adapters, rewrite, link, force, weights, nbytes)


def _fused_tensor(w: torch.Tensor, parts: list[tuple[lf.ModuleLora, float, tuple[int, int]]]
                  ) -> torch.Tensor:
    acc = w.to(torch.float32, copy=True)
    for m, k, rows in parts:
        acc += m.delta(k, torch.float32, rows)
    return acc.to(w.dtype)


def _link_or_copy(src: Path, dst: Path, link: bool) -> bool:
    """Hard-link (True) or copy (False) one file; symlinks are followed to the real file (a
    hard link to a symlink would copy the link, dangling in its new place)."""
    if link:
        try:
            os.link(src.resolve(), dst)
            return True
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
    shutil.copy2(src, dst)
    return False


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
            (ckpt.root / CHECKSUMS).resolve()}

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
        linked = _link_or_copy(src, dst, p.link)
        counts["linked" if linked else "copied"] += 1

    with atomic_folder(p.dst, force=p.force) as tmp:
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
            meta[FUSED_METADATA_KEY] = json.dumps(notes, sort_keys=True)
            h = hashlib.sha256()
            write_file(tdir / path.name, rewritten(path, header, set(changed)), meta,
                       on_bytes=h.update, progress=progress)
            hashes[f"{ckpt.transformer_dir.name}/{path.name}"] = h.hexdigest()
        cfg = ckpt.config()
        cfg[FUSED_CONFIG_KEY] = list(cfg.get(FUSED_CONFIG_KEY) or []) + notes
        text = json.dumps(cfg, indent=2) + "\n"
        (tdir / "config.json").write_text(text)
        hashes[f"{ckpt.transformer_dir.name}/config.json"] = hashlib.sha256(
            text.encode()).hexdigest()
        _fuse_lora_dir(ckpt, tmp, fused_files, {a.name for a in p.adapters}, place, hashes)
        _carry_checksums(ckpt, tmp, hashes)
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
                   hashes: dict[str, str]) -> None:
    """``lora/`` minus the fused adapters' files, with their registry entries dropped."""
    src = ckpt.lora_dir
    if not src.is_dir():
        return
    dst = tmp / "lora"
    dst.mkdir()
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        if (p.is_dir() or p.resolve() in fused_files or rel.as_posix() == REGISTRY
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
        text = json.dumps(doc, indent=2) + "\n"
        (dst / REGISTRY).write_text(text)
        hashes[f"lora/{REGISTRY}"] = hashlib.sha256(text.encode()).hexdigest()
    for d in sorted((q for q in dst.rglob("*") if q.is_dir()), reverse=True):
        if not any(d.iterdir()):
            d.rmdir()


def _carry_checksums(ckpt: layouts.Checkpoint, tmp: Path, hashes: dict[str, str]) -> None:
    """A source ``checksums.sha256`` stays true: new digests for rewritten files, lines of files
    the fused copy does not have dropped."""
    src = ckpt.root / CHECKSUMS
    if not src.is_file():
        return
    lines = []
    seen = set()
    for line in src.read_text().splitlines():
        digest, sep, rel = line.partition("  ")
        if not sep:
            continue
        rel = rel.lstrip("*")
        if not (tmp / rel).is_file():
            continue
        lines.append(f"{hashes.get(rel, digest)}  {rel}")
        seen.add(rel)
    lines += [f"{d}  {rel}" for rel, d in sorted(hashes.items()) if rel not in seen]
    (tmp / CHECKSUMS).write_text("\n".join(lines) + "\n")


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
    src, dst = _model(source), _model(fused)
    reg = load_registry(src)
    shapes = dit_shapes(src)
    loras = [(lf.read_lora(_find(src, reg, n)[0], shapes), k) for n, k in names]
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
        want = w.double() + sum(e.load().delta(k, torch.float64, hit[1]) for e, k in parts)
        err = float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30))
        worst, adapted = max(worst, err), adapted + 1
    return worst, adapted
