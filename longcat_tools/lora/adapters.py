"""Adding, removing and exporting a checkpoint's LoRA adapters: ``attach``, ``detach``, ``export``.

Every write is all-or-nothing and serialized: the registry lock is held, an adapter folder is
built as ``lora/NAME.partial`` and renamed, an exported file is written as ``FILE.partial``,
fsynced and renamed, and the registry is replaced atomically.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from longcat_tools import __version__, schemas
from longcat_tools.checkpoint import layouts
from longcat_tools.errors import LongcatError, UsageError
from longcat_tools.io import jsonio
from longcat_tools.io.atomic import (
    atomic_folder,
    atomic_write_text,
    check_outside_checkpoints,
    check_replaceable,
    fsync_dir,
    partial_path,
    writer_lock,
)
from longcat_tools.io.checksums import refresh_manifest, sha256_file
from longcat_tools.io.safetensors import write_file
from longcat_tools.lora import formats as lf
from longcat_tools.lora.registry import (
    DETACHED,
    SCHEMA,
    AdapterRecord,
    Registry,
    check_name,
    check_scale,
    check_writable,
    checkpoint_of,
    discover,
    dit_shapes,
    find_adapter,
    load_registry,
    make_record,
    register_found,
    registry_lock,
    registry_path,
    save_registry,
)
from longcat_tools.model import dtypes, keymap

SOURCE_FORMATS = ("auto", *lf.FORMATS)


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


def _check_source(src: Path) -> None:
    if not src.exists():
        raise UsageError(f"{src}: no such LoRA file")
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
    ckpt = checkpoint_of(model)
    check_writable(ckpt)
    check_name(name)
    if fmt not in SOURCE_FORMATS:
        raise UsageError(f"--format must be one of {', '.join(SOURCE_FORMATS)}, got '{fmt}'")
    check_scale(scale, "--scale")
    src = Path(lora_file)
    _check_source(src)
    dst_dir = ckpt.lora_dir / name
    layouts.check_plain(ckpt.lora_dir, "the adapters' folder", folder=True)
    layouts.check_plain(dst_dir, f"the folder of adapter '{name}'", folder=True)
    if dst_dir.resolve() in src.resolve().parents:
        raise UsageError(f"{src}: is inside lora/{name}/, which attaching as '{name}' would "
                         "replace; copy it elsewhere first or choose another name")
    if isinstance(adapter_config, str | Path) and not (Path(adapter_config).exists()
                                                       or Path(adapter_config).is_symlink()):
        raise UsageError(f"--adapter-config {adapter_config}: no such file")
    lora = lf.read_lora(src, dit_shapes(ckpt), adapter_config=adapter_config)
    if fmt != "auto" and fmt != lora.format:
        raise LongcatError(f"{src}: --format {fmt} was given but the file is in the "
                           f"{lora.format} format (its keys say so); drop --format or fix it")
    if adapter_config is not None and lora.format != "peft":
        raise UsageError(f"--adapter-config: {src} is in the {lora.format} format, which "
                         "carries its own alphas; only a PEFT file takes an adapter config")
    if not lora.modules:
        raise LongcatError(f"{src}: holds no LoRA modules")
    _check_ranks(src, lora)
    # a Conv3d adapter (the patch embedding) is kept in the one format that holds it
    target_fmt = "peft" if any(e.kernel for e in lora.modules.values()) else ckpt.flavour
    # a hidden name (".safetensors") would be skipped by whatever walks lora/ (fuse did)
    dst_file = dst_dir / (src.name if src.name.endswith(".safetensors")
                          and not src.name.startswith(".") else f"{name}.safetensors")
    nbytes = lf.convert_bytes(lora.modules.values(), target_fmt)
    if dry_run:
        reg = load_registry(ckpt)
        _check_free(ckpt, reg, name, force)
        # every value checked, none written
        for spec in lf.tensor_specs(lora, target_fmt, finite=True):
            spec.produce()
        return AttachResult(name, dst_file, src, lora.format, target_fmt, len(lora.modules),
                            nbytes, None, [], lora.notes, time.perf_counter() - t0, True)
    with registry_lock(ckpt):
        reg = load_registry(ckpt)
        _check_free(ckpt, reg, name, force)
        also = [r.name for r in register_found(ckpt, reg, progress=progress)
                if r.name != name]
        digest = sha256_file(src, progress)
        meta = {"format": "pt", "longcat_tools.version": __version__,
                "longcat_tools.source_format": lora.format,
                "longcat_tools.source_sha256": digest, "longcat_tools.source_name": src.name}
        meta = lf.file_metadata(lora.modules.values(), target_fmt, meta)
        with atomic_folder(dst_dir, force=force) as tmp:
            write_file(tmp / dst_file.name, lf.tensor_specs(lora, target_fmt, finite=True), meta,
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


def _check_ranks(src: Path, lora: lf.LoraFile) -> None:
    """A LoRA of rank r spans at most min(out, in) directions of its weight: a larger rank is a
    file made for another model (or a broken one), refused before anything is written."""
    for e in lora.modules.values():
        rows = e.out_features // e.n
        if e.rank > min(rows, e.in_features):
            part = f"each of its {e.n} {rows}x{e.in_features} blocks" if e.n > 1 else \
                f"its {rows}x{e.in_features} weight"
            raise LongcatError(f"{src}: adapter of '{e.module}' has rank {e.rank}, more than the "
                               f"smaller side of {part} (a LoRA's rank is at most min(out, in); "
                               "an adapter for another model?)")


def _check_free(ckpt: layouts.Checkpoint, reg: Registry, name: str, force: bool) -> None:
    """The name is free, or (with ``force``) taken by an adapter stored alone in
    ``lora/NAME/``: replacing the folder must not take other adapters or files with it."""
    found = discover(ckpt)
    rec = reg.get(name)
    where = (ckpt.lora_dir / rec.file) if rec else found.get(name)
    folder = ckpt.lora_dir / name
    if where is None and not folder.exists():
        return
    if where is not None and where.parent != folder and force:
        raise LongcatError(f"{where}: adapter '{name}' is not stored in lora/{name}/, so --force "
                           "cannot replace it; detach it first")
    others = sorted(p.name for p in folder.iterdir() if p != where) if folder.is_dir() else []
    if where is None:
        held = f"holding {', '.join(others[:3])}" + (" ..." if len(others) > 3 else "") \
            if others else "empty"
        if not (force and not others):
            raise LongcatError(f"{folder}: the folder exists ({held}) but is no adapter named "
                               f"'{name}'; choose another name, or move it away"
                               + ("" if others else " (or pass --force to use it)"))
    elif not force:
        raise LongcatError(f"{ckpt.lora_dir}: an adapter named '{name}' exists ({where}); choose "
                           "another name, detach it first, or pass --force to replace it")
    elif others:
        raise LongcatError(f"{folder}: also holds {', '.join(others[:3])}"
                           + (" ..." if len(others) > 3 else "") + f", which --force would "
                           f"delete with adapter '{name}'; move them out first")


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
    ckpt = checkpoint_of(model)
    check_writable(ckpt)
    with registry_lock(ckpt) if not dry_run else _nolock():
        reg = load_registry(ckpt)
        path, rec = find_adapter(ckpt, reg, name)
        top_level = path.parent == ckpt.lora_dir
        if top_level and path.exists() and not force:
            raise LongcatError(f"{path}: adapter '{name}' is a file of the release at the top of "
                               "lora/, not an attached folder; pass --force to delete it")
        others = [q for q in path.parent.iterdir() if q != path] if (
            not top_level and path.parent.is_dir()) else []
        remove_folder = not top_level and not others
        target = path.parent if remove_folder else path
        _check_no_link_above(ckpt, target, name)
        _check_not_shared(ckpt, reg, name, target)
        removed = [target] if target.exists() or target.is_symlink() else []
        if dry_run:
            return DetachResult(name, removed, rec is not None, True)
        trash = None
        if removed:
            trash = target.with_name(f".{target.name}{DETACHED}{os.getpid()}")
            os.rename(target, trash)
        if rec is not None:
            reg.adapters = [a for a in reg.adapters if a.name != name]
            save_registry(ckpt, reg)
        if trash is not None:  # a link is removed itself, never followed
            trash.unlink() if trash.is_symlink() or not trash.is_dir() else shutil.rmtree(trash)
            fsync_dir(ckpt.lora_dir)
            refresh_manifest(ckpt.root, [target])
    return DetachResult(name, removed, rec is not None, False)


def _check_not_shared(ckpt: layouts.Checkpoint, reg: Registry, name: str, target: Path) -> None:
    """Detach deletes only what is ``name``'s alone: a registry whose other entry names a file
    at or under ``target`` (an edited adapters.json) would lose that adapter's weights."""
    for other in reg.adapters:
        if other.name == name:
            continue
        file = (ckpt.lora_dir / other.file).absolute()
        if file == target.absolute() or target.absolute() in file.parents:
            raise LongcatError(f"{target}: also holds adapter '{other.name}' ({other.file}); "
                               f"detach deletes only what is '{name}''s alone; nothing deleted "
                               "(fix lora/adapters.json)")


def _check_no_link_above(ckpt: layouts.Checkpoint, target: Path, name: str) -> None:
    """Detach renames and deletes ``target`` by name: every folder between ``lora/`` and it must
    be real, or the deletion would happen wherever a link leads (``target`` itself may be a
    link: then the link alone goes)."""
    for p in target.parents:
        if p == ckpt.lora_dir:
            return
        if p.is_symlink():
            raise LongcatError(f"{p}: adapter '{name}' is reached through this link, and detach "
                               "never deletes through a link; nothing deleted (remove the link "
                               "yourself)")


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
    ckpt = checkpoint_of(model)
    if fmt not in lf.FORMATS:
        raise UsageError(f"--format must be one of {', '.join(lf.FORMATS)}, got '{fmt}'")
    form = lf.get_format(fmt)
    if keys is not None and not form.takes_keys:
        raise UsageError(f"--keys applies to --format "
                         f"{', '.join(f for f in lf.FORMATS if lf.get_format(f).takes_keys)} "
                         "only (the other formats have fixed names)")
    if keys is not None and keys not in keymap.FLAVOURS:
        raise UsageError(f"--keys must be one of {', '.join(keymap.FLAVOURS)}, got '{keys}'")
    want = dtypes.parse(dtype, keep=True)
    out = Path(out)
    if not out.name.endswith(".safetensors"):
        raise UsageError(f"{out}: the output file name must end in .safetensors")
    if out.name == ".safetensors":  # a hidden file
        raise UsageError(f"{out}: name the file (NAME.safetensors)")
    check_replaceable(out, "safetensors", force=force)  # a link there is named as one
    check_outside_checkpoints(out, "the exported adapter")  # its own checkpoint's too
    reg = load_registry(ckpt)
    path, _ = find_adapter(ckpt, reg, name, present=True)
    if out.resolve() == path.resolve():
        raise UsageError(f"{out}: is the adapter's own file; export to another path")
    lora = lf.read_lora(path, dit_shapes(ckpt))
    meta = {"longcat_tools.version": __version__, "longcat_tools.exported_from": name}
    cfg_path, cfg_text = None, None
    config = form.adapter_config(lora.modules.values(), keys)
    if config is not None:
        cfg_path = out.parent / form.config_file
        cfg_text = jsonio.dumps(config)

    def check_outputs() -> None:
        check_replaceable(out, "safetensors", force=force)
        if cfg_path is None:
            return
        layouts.check_plain(cfg_path, "the adapter config beside --out")
        if (cfg_path.exists() and not force
                and jsonio.read_text(cfg_path, what="adapter config") != cfg_text):
            raise LongcatError(f"{cfg_path}: exists and describes another adapter; export into "
                               "another folder or pass --force to replace it")

    check_outputs()
    tmp = partial_path(out)
    with writer_lock(out) as clear:
        check_outputs()  # again under the lock: an export that finished meanwhile is not replaced
        layouts.check_plain(tmp, "the scratch file of --out")
        clear(tmp)  # left by a killed export
        try:
            n = write_file(tmp, lf.tensor_specs(lora, fmt, want, keys, finite=True),
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
    return ExportResult(name, out, fmt, form.key_names(keys),
                        len(lora.modules), n, cfg_path, time.perf_counter() - t0)
