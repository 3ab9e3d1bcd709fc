"""``lora fuse``: a new checkpoint with adapters merged into the DiT, so none is needed at run time.

Streamed tensor by tensor like ``convert``: only the shards that hold an adapted weight are
rewritten (``W + scale * alpha/rank * B @ A`` in fp32, cast back to the weight's dtype), every
other file is hard-linked (or copied). Everything is staged in ``DST.partial``, fsynced with its
folders and renamed to ``DST`` at the end; the source's ``checksums.sha256`` is carried over,
true for the fused copy.

An avatar folder has several DiT folders: the adapters go into each float one (1.0's
``avatar_single`` and ``avatar_multi``, 1.5's ``base_model``), and 1.5's INT8 copy is
re-quantized from the fused ``base_model`` by the original's rule (``model.int8``), tensor by
tensor in its own shards (the original's writer gives the same layout for the same shapes), or
left out (``--int8 drop``).
"""

from __future__ import annotations

import hashlib
import math
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from longcat_tools import schemas
from longcat_tools.bsa.config import backup_path
from longcat_tools.checkpoint import layouts
from longcat_tools.errors import LongcatError, UsageError
from longcat_tools.io import jsonio
from longcat_tools.io.atomic import atomic_folder, check_replaceable, fsync_tree, try_link
from longcat_tools.io.checksums import (
    MANIFEST,
    check_carried,
    format_manifest,
    read_manifest,
    sha256_file,
)
from longcat_tools.io.safetensors import Header, TensorSpec, read_header, read_tensor, write_file
from longcat_tools.lora import formats as lf
from longcat_tools.lora.registry import (
    ADAPTER_SEP,
    LOCK_SUFFIX,
    REGISTRY,
    SCALE_SEP,
    SCHEMA,
    check_scale,
    checkpoint_of,
    dit_shapes,
    find_adapter,
    is_owned,
    is_scratch,
    load_registry,
    registry_path,
    scaled_adapters,
    summarize,
)
from longcat_tools.model import avatar, int8, keymap
from longcat_tools.model.bounds import plain_number

FUSE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
FUSED_CONFIG_KEY = layouts.FUSED_CONFIG_KEY
FUSED_METADATA_KEY = "longcat_tools.fused_loras"
# --int8 (avatar 1.5): re-quantize the INT8 copy from the fused DiT, or leave it out.
INT8_MODES = ("quantize", "drop")
# What an INT8 folder stores for a module, by tensor suffix: its int8 weight and float32 scales
# (a quantized Linear), or its float weight (a module the quantization skips).
INT8_ROLES = {f".{int8.WEIGHT}": "int8", f".{int8.SCALE}": "scale", ".weight": "weight"}


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
class FusedFolder:
    """One DiT folder the fuse rewrites: the tensors that change in each shard (by the shard's
    path in the checkpoint) and, for an INT8 copy, the float folder it is quantized from."""

    view: layouts.Checkpoint
    rewrite: dict[Path, list[str]]
    quantized_from: layouts.Checkpoint | None = None

    @property
    def name(self) -> str:
        return self.view.transformer_dir.name


@dataclass
class FusePlan:
    ckpt: layouts.Checkpoint
    dst: Path
    adapters: list[FusedAdapter]
    folders: list[FusedFolder]
    link: bool
    force: bool
    weights: int  # adapted DiT tensors, in every folder
    bytes_to_write: int
    listed: dict[str, str]  # the source's checksums.sha256, read before anything is written
    dropped: list[str] = field(default_factory=list)  # DiT folders left out (--int8 drop)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def shards(self) -> list[str]:
        """The rewritten shards: their names (one DiT folder), else ``folder/name``."""
        many = self.ckpt.avatar is not None
        return sorted(f"{f.name}/{p.name}" if many else p.name
                      for f in self.folders for p in f.rewrite)

    def describe(self) -> dict[str, Any]:
        return {"source": str(self.ckpt.root), "dst": str(self.dst),
                "layout": self.ckpt.layout, "flavour": self.ckpt.flavour,
                "adapters": [{"name": a.name, "scale": a.scale,
                              "modules": len(a.lora.modules)} for a in self.adapters],
                "adapted_tensors": self.weights,
                "dit_folders": [f.name for f in self.folders],
                "requantized": [f.name for f in self.folders if f.quantized_from is not None],
                "dropped": self.dropped,
                "shards_rewritten": self.shards,
                "bytes_to_write": self.bytes_to_write,
                "notes": self.notes, "warnings": self.warnings}


@dataclass
class FuseResult:
    plan: FusePlan
    seconds: float
    tensors_written: int
    files_linked: int
    files_copied: int


def _top_names(ckpt: layouts.Checkpoint) -> set[str]:
    """The names at the top of a fused copy of ``ckpt``: its own and the checksums list (an
    old output holding anything else is not replaced, even with ``--force``)."""
    return {e.name for e in ckpt.root.iterdir() if not e.name.endswith(".partial")} | {MANIFEST}


def parse_adapter_list(spec: str, flag: str = "") -> list[tuple[str, float | None]]:
    """``NAME[:SCALE][,NAME[:SCALE]...]`` (``lora fuse``'s names, ``run --lora``): each name
    with its scale, None where none is given. ``flag`` prefixes the messages."""
    said = f"{flag} {spec}" if flag else f"'{spec}'"
    out = []
    for part in spec.split(ADAPTER_SEP):
        part = part.strip()
        name, colon, s = part.partition(SCALE_SEP)
        name, s = name.strip(), s.strip()  # 'style :0.5' as 'style , detail' already was
        if not name or (colon and not s):  # 'a,,b' and 'a:' were read as if well formed
            raise UsageError(f"{said}: an empty adapter name or scale (NAME[:SCALE][,NAME...], "
                             "e.g. style:0.5,detail)")
        try:
            value = plain_number(s) if s else None
        except ValueError:
            raise UsageError(f"{said}: the scale after ':' in '{part}' must be a number"
                             ) from None
        if value is not None:
            check_scale(value, f"{said}: scale")
        out.append((name, value))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise UsageError(f"{said}: adapter names repeat")
    return out


parse_fuse_names = parse_adapter_list  # its name before run --lora took the same list


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


def _int8_role(tensor: str) -> tuple[str, str] | None:
    """(module, role) of a tensor of an INT8 folder (roles: :data:`INT8_ROLES`)."""
    for suffix, role in INT8_ROLES.items():
        if tensor.endswith(suffix):
            return tensor[: -len(suffix)], role
    return None


def plan_fuse(model: str | Path | layouts.Checkpoint | None,
              names: list[tuple[str, float | None]], dst: str | Path, *,
              scale: float | None = None, link: bool = True, force: bool = False,
              int8_mode: str | None = None) -> FusePlan:
    """Check the adapters and the checkpoint, and find which shards change (headers only)."""
    if int8_mode is not None and int8_mode not in INT8_MODES:
        raise UsageError(f"--int8 {int8_mode}: choose {' or '.join(INT8_MODES)}")
    ckpt = checkpoint_of(model)
    if int8_mode is not None and (ckpt.avatar is None or ckpt.avatar.int8 is None):
        what = ckpt.avatar.describe() if ckpt.avatar else ckpt.describe()
        raise UsageError(f"--int8 {int8_mode}: {ckpt.root} ({what}) has no INT8 DiT folder "
                         f"(only LongCat-Video-Avatar 1.5 has one, "
                         f"{avatar.VERSIONS['avatar-1.5'].int8_folder}/)")
    if int8_mode == "drop" and ckpt.avatar is not None and ckpt.avatar.converted:
        raise UsageError("--int8 drop: the model_index.json layout lists its INT8 folder; drop it "
                         "with `convert --to native --int8 drop` first, then fuse")
    dst = Path(dst)
    check_replaceable(dst, "checkpoint", source=ckpt.root, force=force, writes=_top_names(ckpt))
    if ckpt.avatar is not None and ckpt.avatar.base != ckpt.root:
        # the sibling base model the avatar reads: never replaced by the output (as convert)
        check_replaceable(dst, "checkpoint", source=ckpt.avatar.base, force=force)
    for entry in ckpt.root.iterdir():  # what the copy will place: no link loop among it
        try:
            entry.resolve()
        except (OSError, RuntimeError) as e:
            raise LongcatError(f"{entry}: cannot be resolved ({e}); remove the broken "
                               "link") from None
    shapes = dit_shapes(ckpt)
    fused_cfg = ckpt.config() if ckpt.avatar is None else {}
    adapters = [FusedAdapter(name, k, lf.read_lora(path, shapes))
                for name, path, k in scaled_adapters(ckpt, names, scale)]
    wanted = {m for a in adapters for m in a.lora.modules}
    plan = FusePlan(ckpt, dst, adapters, [], link, force, 0, 0, _source_checksums(ckpt))
    hub = {a.name for a in adapters}
    hub |= {n for n in (layouts.LORA_DISTILL, layouts.LORA_REFINE)
            if layouts.fused_scale(fused_cfg, "name", n) is not None}
    # both in: a merged export for other tools, made but warned of
    if {layouts.LORA_DISTILL, layouts.LORA_REFINE} <= hub:
        plan.warnings.append("distilled and refinement are both fused in: `run` refuses this "
                             "checkpoint (the original never runs one stage with the other's "
                             "LoRA); it is an export for other tools")
    if ckpt.avatar is None:
        plan.folders.append(FusedFolder(ckpt, _float_rewrite(ckpt, wanted, shapes)))
    else:
        _plan_avatar(plan, ckpt.avatar, wanted, shapes, int8_mode)
    plan.weights = sum(len(v) for f in plan.folders for v in f.rewrite.values())
    plan.bytes_to_write = sum(p.stat().st_size for f in plan.folders for p in f.rewrite)
    _check_carried(ckpt, {p.resolve() for f in plan.folders for p in f.rewrite})
    return plan


def _check_carried(ckpt: layouts.Checkpoint, rewritten: set[Path]) -> None:
    """The files the fused checkpoint carries over as they are (the VAE, the text encoder,
    other adapters), before anything is written: ``checksums.check_carried``, and a
    truncated safetensors file is refused."""
    for path in sorted(ckpt.root.rglob("*")):
        rel = path.relative_to(ckpt.root)
        if (any(is_scratch(part) for part in rel.parts)
                or path.is_dir()):
            continue  # scratch and hidden entries are not carried
        try:
            layouts.check_contained(path, ckpt.containment)
        except LongcatError:
            continue  # a link out of the checkpoint (or a loop): never read or carried
        if path.resolve() in rewritten:
            continue
        check_carried(path, rel.as_posix())
        if path.name.endswith(".safetensors"):
            read_header(path)


def _plan_avatar(plan: FusePlan, av: layouts.AvatarCheckpoint, wanted: set[str],
                 shapes: Mapping[str, tuple[int, int]], int8_mode: str | None) -> None:
    """Every float DiT folder of an avatar checkpoint, and its INT8 copy re-quantized from the
    fused first one (or left out)."""
    source = av.version.dit_folders[0] if av.int8 and int8_mode != "drop" else None
    if source is not None and source not in av.dits:
        raise LongcatError(f"{av.root}: {av.int8}/ is re-quantized from the fused {source}/, "
                           "which is missing (pass --int8 drop to leave the INT8 copy out)")
    if not av.dits:
        raise LongcatError(f"{av.root}: no float DiT folder to fuse into (expected "
                           f"{' and '.join(f + '/' for f in av.version.dit_folders)})")
    for name in av.dits:
        view = av.dit(name)
        own = dit_shapes(view)
        odd = sorted(m for m in wanted if own.get(m) != shapes[m])
        if odd:
            raise LongcatError(f"{view.config_path}: the adapter does not fit {name}/ (module "
                               f"'{odd[0]}' is {own.get(odd[0])} there, {shapes[odd[0]]} in "
                               f"{plan.ckpt.transformer_dir.name}/)")
        plan.folders.append(FusedFolder(view, _float_rewrite(view, wanted, own)))
    if source is not None:
        view = av.dit(av.int8)
        plan.folders.append(FusedFolder(view, _int8_rewrite(view, wanted, shapes),
                                        av.dit(source)))
        plan.notes.append(
            f"{av.int8}/ re-quantized from the fused {source}/ (int8 per output row, as the "
            f"original's quantization writes it): its INT8 forward differs from {source}/ with "
            "the adapters applied only by that quantization")
    elif av.int8:
        plan.dropped.append(av.int8)
        plan.notes.append(f"{av.int8}/ left out (--int8 drop)")
    if not av.converted and not (plan.dst.parent / avatar.BASE_FOLDER).is_dir():
        plan.warnings.append(
            f"{plan.dst.parent / avatar.BASE_FOLDER} is missing: the fused avatar reads the base "
            f"model's {', '.join(av.base_parts)} from ../{avatar.BASE_FOLDER} beside it, as the "
            "source does (put one there before running or verifying it)")


def _headers(view: layouts.Checkpoint) -> dict[Path, Header]:
    """The DiT folder's shard headers, by the shards' names in the checkpoint (a cache
    snapshot's resolve to blob hashes), its index and shards agreeing (the index is copied)."""
    return layouts.shard_headers(view)[1]


def _missing(view: layouts.Checkpoint, wanted: set[str], covered: set[str]) -> None:
    missing = sorted(wanted - covered)
    if missing:
        raise LongcatError(f"{view.transformer_dir}: has no weight for adapted module "
                           f"'{missing[0]}' ({len(missing)} in all); is the checkpoint complete?")


def _check_float(path: Path, tname: str, info: Any, expect: tuple[int, int]) -> None:
    if (info.shape[0], math.prod(info.shape[1:])) != expect:  # a Conv3d's over its patch
        raise LongcatError(f"{path}: tensor '{tname}' is {list(info.shape)}, expected "
                           f"{list(expect)} from the transformer config (run verify)")
    if info.torch_dtype not in FUSE_DTYPES:
        raise LongcatError(f"{path}: tensor '{tname}' is {info.dtype}; an adapter can be "
                           "fused into float32, float16 or bfloat16 weights only (convert "
                           "the checkpoint with --dtype bf16 first)")


def _float_rewrite(view: layouts.Checkpoint, wanted: set[str],
                   shapes: Mapping[str, tuple[int, int]]) -> dict[Path, list[str]]:
    """The adapted weights of a float DiT folder, by shard, checked (headers only)."""
    rewrite: dict[Path, list[str]] = {}
    covered: set[str] = set()
    for path, header in _headers(view).items():
        for tname, info in header.tensors.items():
            hit = _target_rows(view, tname, shapes)
            if hit is None or hit[0] not in wanted:
                continue
            module, (lo, hi) = hit
            _check_float(path, tname, info, (hi - lo, shapes[module][1]))
            rewrite.setdefault(path, []).append(tname)
            covered.add(module)
    _missing(view, wanted, covered)
    return rewrite


def _int8_rewrite(view: layouts.Checkpoint, wanted: set[str],
                  shapes: Mapping[str, tuple[int, int]]) -> dict[Path, list[str]]:
    """The tensors of an INT8 folder that hold an adapted module (int8 weight and scales, or
    the float weight of a module left unquantized), by shard, checked (headers only)."""
    rewrite: dict[Path, list[str]] = {}
    roles: dict[str, set[str]] = {}
    want_dtype = {"int8": torch.int8, "scale": torch.float32}
    for path, header in _headers(view).items():
        for tname, info in header.tensors.items():
            hit = _int8_role(tname)
            if hit is None or hit[0] not in wanted:
                continue
            module, role = hit
            out_f, in_f = shapes[module]
            if role == "weight":
                _check_float(path, tname, info, (out_f, in_f))
            else:
                shape = (out_f, in_f) if role == "int8" else (out_f,)
                if tuple(info.shape) != shape or info.torch_dtype != want_dtype[role]:
                    raise LongcatError(f"{path}: INT8 tensor '{tname}' is {info.dtype} "
                                       f"{list(info.shape)}, expected {want_dtype[role]} "
                                       f"{list(shape)} (run verify)")
            rewrite.setdefault(path, []).append(tname)
            roles.setdefault(module, set()).add(role)
    _missing(view, wanted, {m for m, r in roles.items() if "weight" in r or r >= {"int8", "scale"}})
    return rewrite


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
    by_module: dict[str, list[tuple[FusedAdapter, lf.ModuleEntry]]] = {}
    for a in p.adapters:
        for m, e in a.lora.modules.items():
            by_module.setdefault(m, []).append((a, e))
    cache: dict[str, list[tuple[lf.ModuleLora, float]]] = {}
    shapes: dict[Path, dict[str, tuple[int, int]]] = {}
    counts = {"tensors": 0, "linked": 0, "copied": 0}
    hashes: dict[str, str] = {}
    skip = {f.view.transformer_dir.resolve() for f in p.folders} | {
        (ckpt.root / d).resolve() for d in p.dropped} | {
        ckpt.lora_dir.resolve(), (ckpt.root / MANIFEST).resolve()}

    def loras(module: str) -> list[tuple[lf.ModuleLora, float]]:
        if module not in cache:
            cache.clear()  # the split targets of one module come together
            cache[module] = [(e.load(), a.scale) for a, e in by_module[module]]
        return cache[module]

    def fused(view: layouts.Checkpoint, path: Path, name: str, w: torch.Tensor) -> torch.Tensor:
        if view.transformer_dir not in shapes:
            shapes[view.transformer_dir] = dit_shapes(view)
        module, rows = _target_rows(view, name, shapes[view.transformer_dir])
        w = _fused_tensor(w, [(m, k, rows) for m, k in loras(module)])
        if not bool(torch.isfinite(w).all()):
            raise LongcatError(f"{path}: fusing gives non-finite values in '{name}' (scale too "
                               "large for the dtype?); nothing was written")
        return w

    def float_tensors(f: FusedFolder) -> Callable[[Path, str, torch.Tensor], torch.Tensor]:
        return lambda path, name, w: fused(f.view, path, name, w)

    def int8_tensors(f: FusedFolder) -> Callable[[Path, str, torch.Tensor], torch.Tensor]:
        """The INT8 copy's tensors of an adapted module, from the fused float weight."""
        src = f.quantized_from
        assert src is not None
        shards = layouts.transformer_shards(src)
        held: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

        def of_module(module: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            if module not in held:
                held.clear()  # its int8 weight and scales come together
                name = f"{module}.weight"
                path = shards[name]
                with open(path, "rb") as fh:
                    w = fused(src, path, name, read_tensor(fh, read_header(path).tensors[name]))
                # a module the INT8 copy keeps in float needs no quantization
                held[module] = (*int8.quantize(w), w) if int8.is_quantized(module, w.shape) \
                    else (None, None, w)
            return held[module]

        def produce(path: Path, name: str, w: torch.Tensor) -> torch.Tensor:
            module, role = _int8_role(name)
            q, s, fw = of_module(module)
            return q if role == "int8" else s if role == "scale" else fw.to(w.dtype)
        return produce

    def rewritten(path: Path, header: Header, changed: set[str],
                  change: Callable[[Path, str, torch.Tensor], torch.Tensor]) -> list[TensorSpec]:
        def produce(name: str) -> torch.Tensor:
            info = header.tensors[name]
            with open(path, "rb") as f:
                w = read_tensor(f, info)
            if name in changed:
                w = change(path, name, w)
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

    def write_folder(f: FusedFolder) -> None:
        folder = f.view.transformer_dir
        tdir = tmp / f.name
        tdir.mkdir()
        names = {path.name for path in f.rewrite}
        for src in sorted(folder.iterdir()):
            if src.name in ("config.json", backup_path(Path("config.json")).name) \
                    or src.name in names:  # bsa restore would bring back the unfused config
                continue
            _copy_tree(src, tdir / src.name, place)
        change = float_tensors(f) if f.quantized_from is None else int8_tensors(f)
        for path, changed in f.rewrite.items():
            if (tdir / path.name).exists():  # never write through a hard link into the source
                raise LongcatError(f"internal: {tdir / path.name} exists before it is written")
            header = read_header(path)
            meta = dict(header.metadata)
            meta[FUSED_METADATA_KEY] = jsonio.dumps(notes, indent=None, newline=False,
                                                    sort_keys=True)
            h = hashlib.sha256()
            write_file(tdir / path.name, rewritten(path, header, set(changed), change), meta,
                       on_bytes=h.update, progress=progress)
            hashes[f"{f.name}/{path.name}"] = h.hexdigest()
        cfg = f.view.config()
        cfg[FUSED_CONFIG_KEY] = list(cfg.get(FUSED_CONFIG_KEY) or []) + notes
        write_text(f"{f.name}/config.json", jsonio.dumps(cfg))

    with atomic_folder(p.dst, force=p.force, what="checkpoint", writes=_top_names(ckpt)) as tmp:
        for entry in sorted(ckpt.root.iterdir()):
            if entry.resolve() in skip or entry.name.endswith(".partial"):
                continue
            _copy_tree(entry, tmp / entry.name, place)
        for f in p.folders:
            write_folder(f)
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
                    is_scratch(part) for part in rel.parts)):
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
         dry_run: bool = False, progress: Callable[[int], None] | None = None,
         int8_mode: str | None = None) -> FusePlan | FuseResult:
    """Plan, and unless ``dry_run`` write, a checkpoint with the adapters merged into the DiT
    (``int8_mode``: what becomes of an avatar's INT8 copy, :data:`INT8_MODES`; default
    ``quantize``)."""
    if scale is not None:
        check_scale(scale, "--scale")
    p = plan_fuse(model, names, dst, scale=scale, link=link, force=force, int8_mode=int8_mode)
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
    loras = [(lf.read_lora(find_adapter(src, reg, n, present=True)[0], shapes), k)
             for n, k in names]
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
