"""The LoRA adapters a checkpoint has: ``lora/adapters.json`` (its records, read, validated and
replaced under a lock) and the adapter files found in ``lora/``.

Adapters live in ``lora/`` in the checkpoint's own key flavour (native hub layout:
``lora/cfg_step_lora.safetensors`` and ``lora/refinement_lora.safetensors``; attached ones and
those ``convert`` writes: ``lora/<name>/<file>.safetensors``) and are listed in
``lora/adapters.json`` (:class:`Registry`, schema ``lora_manifest``). Files found there without
an entry (a fresh hub download, a converted checkpoint) are *discovered*: ``list`` shows them and
the first command that writes the registry records them (:func:`register_existing`). Every
change takes an exclusive ``flock`` on ``lora/adapters.json.lock``, and every adapter path, found
or listed, must stay in ``lora/`` once links are followed (:func:`owned`) before it is read,
written or deleted.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longcat_tools import schemas
from longcat_tools.checkpoint import layouts
from longcat_tools.errors import LongcatError, UsageError
from longcat_tools.io import jsonio
from longcat_tools.io.atomic import atomic_write_text, discard, file_lock
from longcat_tools.io.checksums import check_refreshable, refresh_manifest, sha256_file
from longcat_tools.lora import formats as lf
from longcat_tools.model import avatar, keymap

REGISTRY = "adapters.json"
LOCK_SUFFIX = ".lock"
DETACHED = ".detached-"  # lora detach moves an adapter to .NAME.detached-PID, then deletes it
SCHEMA = "lora_manifest"
REGISTRY_VERSION = 1
LOCK_TIMEOUT_S = 600.0
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# NAME[:SCALE][,NAME...] (run --lora, lora fuse): a discovered file whose name holds a separator
# or spaces at its ends is listed but cannot be named there
ADAPTER_SEP, SCALE_SEP = ",", ":"
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
    """The registry (empty when there is none), checked: schema (plain relative file names) and
    unique names. Where each file really is gets checked when it is used (:func:`owned`), so
    that ``list`` can show a bad entry beside the good ones."""
    path = registry_path(ckpt)
    if not (path.exists() or path.is_symlink()):
        return Registry()
    doc = jsonio.read(owned(ckpt, path, "LoRA registry"), what="LoRA registry")
    schemas.validate(doc, SCHEMA, str(path))
    reg = Registry([AdapterRecord.from_json(a) for a in doc["adapters"]])
    for a in reg.adapters:  # a hand-edited scale would be fused or run as is
        check_scale(a.default_scale, f"{path}: adapter '{a.name}' default_scale", LongcatError)
    dupes = [n for n, k in Counter(a.name for a in reg.adapters).items() if k > 1]
    if dupes:
        raise LongcatError(f"{path}: adapter '{dupes[0]}' is listed twice (remove one entry)")
    return reg


def save_registry(ckpt: layouts.Checkpoint, reg: Registry) -> None:
    """Validate against the schema, then replace ``adapters.json`` atomically."""
    path = registry_path(ckpt)
    doc = reg.to_json()
    schemas.validate(doc, SCHEMA, str(path))
    new = not path.exists()
    atomic_write_text(path, jsonio.dumps(doc))
    if new:  # a temp file's 0600, not what the rest of the checkpoint has
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(path, 0o666 & ~umask)
    refresh_manifest(ckpt.root, [path])


@contextmanager
def registry_lock(ckpt: layouts.Checkpoint, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """An exclusive lock on ``lora/adapters.json.lock`` (created with ``lora/``) around every
    change of the registry or of ``lora/``. Once held, what a killed command left is cleared:
    a detached adapter's trash (``.NAME.detached-PID``) and the registry's temp files."""
    check_writable(ckpt)
    layouts.check_plain(ckpt.lora_dir, "the adapters' folder", folder=True)
    check_refreshable(ckpt.root)
    ckpt.lora_dir.mkdir(exist_ok=True)
    with file_lock(ckpt.lora_dir / (REGISTRY + LOCK_SUFFIX), timeout,
                   "another longcat-tools lora command"):
        for stale in [*ckpt.lora_dir.glob(f".*{DETACHED}*"),
                      *ckpt.lora_dir.glob(f".{REGISTRY}.*.tmp")]:
            discard(stale)
        yield


# ---------------------------------------------------------------------------------------------
# finding adapters


def check_writable(ckpt: layouts.Checkpoint) -> None:
    """Adapters are never written into a Hugging Face cache snapshot (its files are the hub's)."""
    if ckpt.in_hf_cache:
        raise LongcatError(f"{ckpt.root}: is a snapshot in the Hugging Face cache, which lora "
                           "never writes into; download it with `longcat-tools download REPO "
                           "--dst DIR` (real files) or convert it, and work on that copy")


def checkpoint_of(model: str | Path | layouts.Checkpoint | None) -> layouts.Checkpoint:
    """The checkpoint a ``--model`` value names (the default model when None)."""
    if isinstance(model, layouts.Checkpoint):
        return model
    found = layouts.detect_any(layouts.resolve_model(model))
    # an avatar's DiT folders share one architecture: adapters (in its lora/) fit them all
    return found.dit() if isinstance(found, layouts.AvatarCheckpoint) else found


def owned(ckpt: layouts.Checkpoint, path: Path, what: str) -> Path:
    """``path`` checked to lie in ``lora/`` once links are followed (reads of a cache snapshot
    may also reach its repo's blobs, where the hub's files are): the one check every adapter
    path passes before it is read, written or deleted."""
    return layouts.owned(ckpt.lora_dir, path, what, ckpt.allowed)


def is_owned(ckpt: layouts.Checkpoint, path: Path) -> bool:
    try:
        owned(ckpt, path, "adapter")
    except LongcatError:
        return False
    return True


def dit_shapes(ckpt: layouts.Checkpoint) -> dict[str, tuple[int, int]]:
    """Native module -> (out, in) of every Linear of this checkpoint's DiT (from its config; an
    avatar DiT's audio modules too)."""
    cfg, where = ckpt.config(), str(ckpt.config_path)
    audio = avatar.audio_dims(cfg, where) if avatar.is_avatar_config(cfg) else None
    return lf.linear_shapes(keymap.dit_dims(cfg, where), audio)


MAX_SCALE = 10.0  # LoRA scales in use are 0 to ~2; far beyond, fused weights overflow


def check_scale(value: float, what: str, error: type[LongcatError] = UsageError) -> None:
    """A LoRA scale given by the user (``what``: the option or argument it came from): finite,
    at most ``MAX_SCALE`` either way."""
    if not (math.isfinite(value) and abs(value) <= MAX_SCALE):
        shown = str(float(value)).removesuffix(".0")  # 10.0000001 was shown rounded, as 10
        raise error(f"{what} {shown}: a LoRA scale must be a number from -{MAX_SCALE:g} to "
                    f"{MAX_SCALE:g}")


def check_name(name: str) -> None:
    """A name that can be a folder of ``lora/``: none of the registry's own files
    (``adapters.json`` and its lock), a scratch folder (``*.partial``) or a hub adapter's file
    (``*.safetensors``: a folder so named failed verify)."""
    if name.startswith(REGISTRY) or name.endswith((".partial", ".safetensors")):
        raise UsageError(f"adapter name '{name}' is reserved ({REGISTRY}*, *.partial and "
                         "*.safetensors are the registry's, scratch and adapter files in lora/); "
                         "choose another")
    if not NAME_RE.match(name):
        raise UsageError(f"adapter name '{name}' is not allowed: use letters, digits, '.', '_' "
                         "and '-', starting with a letter or digit (at most 100 characters)")


def is_scratch(name: str) -> bool:
    """A name in ``lora/`` that is no adapter: hidden (a detach's trash, a temp file) or
    half-written (``*.partial``)."""
    return name.startswith(".") or name.endswith(".partial")


def discover(ckpt: layouts.Checkpoint) -> dict[str, Path]:
    """Adapter files present in ``lora/``, by name: the hub's ``lora/<file>.safetensors`` (named
    like FastVideo's folders: distilled, refinement; others by their stem) and
    ``lora/<name>/<file>.safetensors``. Half-written (``*.partial``) and hidden entries are
    skipped; a folder with several safetensors files names each ``<folder>/<stem>``. Links are
    listed as found (a folder link leading out of ``lora/`` by its own path, never entered);
    whoever uses a path checks it with :func:`owned`."""
    root = ckpt.lora_dir
    if not root.is_dir() or root.is_symlink():
        return {}
    found: dict[str, Path] = {}
    for p in sorted(root.iterdir()):
        if is_scratch(p.name):
            continue
        if _is_adapter_file(p):
            found.setdefault(place_name(root, p), p)
        elif p.is_dir():
            if not is_owned(ckpt, p):
                found.setdefault(p.name, p)
                continue
            for q in sorted(filter(_is_adapter_file, p.iterdir())):
                found.setdefault(place_name(root, q), q)
    return found


def _is_adapter_file(p: Path) -> bool:
    return p.name.endswith(".safetensors") and (p.is_file() or p.is_symlink())


def place_name(root: Path, path: Path) -> str:
    """The name of an adapter file by its place in ``lora/`` (``root``): in ``lora/`` itself the
    hub's name (distilled, refinement) or the file's stem; in a folder the folder's name, or
    ``folder/stem`` where the folder holds several adapter files."""
    rel = path.relative_to(root)
    if len(rel.parts) == 1:
        return layouts.NATIVE_LORAS.get(path.name, path.stem)
    folder = root / rel.parts[0]
    several = sum(map(_is_adapter_file, folder.iterdir())) > 1
    return f"{rel.parts[0]}/{path.stem}" if several and _is_adapter_file(path) else rel.parts[0]


def file_targets(lora: lf.LoraFile) -> list[str]:
    """The adapted modules in the file's own names (split targets of FastVideo/PEFT files)."""
    return sorted(lf.get_format(lora.format).file_targets(lora))


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


def make_record(name: str, rel: str, lora: lf.LoraFile, *, default_scale: float = 1.0,
                source: dict[str, str] | None = None, hub: bool = False) -> AdapterRecord:
    """The registry entry of adapter file ``lora/<rel>`` (rank and alpha from its tensors;
    ``hub``: the description of the hub adapter of that name)."""
    if not lora.modules:
        raise LongcatError(f"{lora.path}: holds no LoRA modules")
    rank, alpha = summarize(lora)  # read_lora refused a rank 0 or an alpha_scale <= 0
    about = HUB_ADAPTERS.get(name, {}) if hub else {}
    return AdapterRecord(name, rel, lora.format, rank, alpha,
                         target_patterns(file_targets(lora)), default_scale,
                         about.get("description"), about.get("tasks"), source)


def register_found(ckpt: layouts.Checkpoint, reg: Registry,
                    sources: Mapping[str, str | Path] | None = None,
                    progress: Callable[[int], None] | None = None,
                    converted: Mapping[str, str] | None = None,
                    carried: Mapping[str, AdapterRecord] | None = None) -> list[AdapterRecord]:
    """Add discovered, unregistered adapters to ``reg`` (caller holds the lock and saves);
    ``carried``: by file (relative to ``lora/``), the entries of the checkpoint they were
    converted from, whose name, default scale, description and tasks they keep."""
    shapes = dit_shapes(ckpt)
    known = reg.files()
    added = []
    converted = converted or {}
    for name, path in discover(ckpt).items():
        rel = path.relative_to(ckpt.lora_dir).as_posix()
        old = carried.get(rel) if carried else None
        name = old.name if old is not None else name
        if (rel in known or reg.get(name) is not None or not NAME_RE.match(name)
                or not is_owned(ckpt, path)):
            continue  # unnamable (several in one folder) or a link out: stays discovered only
        try:  # a file convert has just written has its own block split: its header is enough
            lora = lf.read_lora(path, shapes, inspect_blocks=name not in converted)
        except LongcatError:
            continue  # a broken file stays discovered only: `lora list` shows its problem
        src_path = Path(sources[name]) if sources and name in sources else path
        src_fmt = lora.format if src_path == path else lf.read_lora(src_path).format
        digest = converted.get(name) or sha256_file(src_path, progress)
        source = {"file": str(rel if src_path == path else src_path), "format": src_fmt,
                  "sha256": digest}
        rec = make_record(name, rel, lora, source=source, hub=True)
        if old is not None:
            rec.default_scale, rec.description, rec.tasks = (old.default_scale, old.description,
                                                             old.tasks)
        reg.adapters.append(rec)
        added.append(rec)
    return added


def register_existing(model: str | Path | layouts.Checkpoint | None,
                      sources: Mapping[str, str | Path] | None = None,
                      progress: Callable[[int], None] | None = None,
                      converted: Mapping[str, str] | None = None,
                      carried: Mapping[str, AdapterRecord] | None = None
                      ) -> list[AdapterRecord]:
    """Record every adapter file of ``lora/`` that the registry lacks (``convert`` calls this on
    its output; ``sources`` maps an adapter name to the file it was converted from, whose sha256
    and format then go in the entry; ``converted`` maps the names convert wrote to that sha256,
    hashed while converting; ``carried`` as in :func:`register_found`). Returns the new
    entries."""
    ckpt = checkpoint_of(model)
    if not ckpt.lora_dir.is_dir():
        return []
    with registry_lock(ckpt):
        reg = load_registry(ckpt)
        added = register_found(ckpt, reg, sources, progress, converted, carried)
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
    ckpt = checkpoint_of(model)
    layouts.check_plain(ckpt.lora_dir, "the adapters' folder", folder=True)
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
        try:
            owned(ckpt, path, f"adapter '{name}'")
        except LongcatError as e:  # listed with its problem, never read
            info.status = str(e)
            out.append(info)
            continue
        if rec is None and (name != name.strip() or ADAPTER_SEP in name or SCALE_SEP in name):
            info.status = (f"its name cannot be given to --lora or lora fuse ('{ADAPTER_SEP}', "
                           f"'{SCALE_SEP}' or spaces at its ends): rename the file")
        elif not path.is_file():
            info.status = "missing"
        else:
            try:
                lora = lf.read_lora(path, shapes, inspect_blocks=False)
                info.format, info.modules, info.nbytes = lora.format, len(lora.modules), lora.nbytes
                info.rank, info.alpha = summarize(lora) if lora.modules else (None, None)
                ranks = sorted({e.rank for e in lora.modules.values()})
                if rec is not None and rec.format != lora.format:
                    info.status = f"registry says {rec.format}, the file is {lora.format}"
                elif rec is not None and ranks and rec.rank not in ranks:  # as verify judges
                    info.status = f"registry says rank {rec.rank}, the file has {ranks}"
            except LongcatError as e:
                info.status = str(e)
        out.append(info)
    return ckpt, out


def scaled_adapters(ckpt: layouts.Checkpoint, wanted: list[tuple[str, float | None]],
                    scale: float | None = None) -> list[tuple[str, Path, float]]:
    """Each wanted adapter's file and the scale it applies at (``lora fuse``, ``run --lora``):
    its own, else ``scale``, else its registered ``default_scale`` (1 for a file found in
    ``lora/``). One already fused into the DiT is refused: applying it again counts it twice."""
    reg = load_registry(ckpt)
    cfg = ckpt.config() if ckpt.avatar is None else {}
    out = []
    for name, own in wanted:
        if layouts.fused_scale(cfg, "name", name) is not None:
            raise UsageError(f"adapter '{name}' is already fused into {ckpt.root} (its DiT "
                             f"config lists it under {layouts.FUSED_CONFIG_KEY}); applying it "
                             "again would count it twice")
        path, rec = find_adapter(ckpt, reg, name, present=True)
        k = own if own is not None else scale if scale is not None else (
            rec.default_scale if rec else 1.0)
        out.append((name, path, float(k)))
    return out


def find_adapter(ckpt: layouts.Checkpoint, reg: Registry, name: str, present: bool = False
                 ) -> tuple[Path, AdapterRecord | None]:
    """The file of adapter ``name`` (registered, else discovered) and its record, if any; a file
    that is not in ``lora/`` once links are followed is refused here, before any use, and with
    ``present`` (every reader; not ``detach``) one that is missing."""
    rec = reg.get(name)
    found = {} if rec is not None else discover(ckpt)
    if rec is not None or name in found:
        path = owned(ckpt, ckpt.lora_dir / rec.file if rec is not None else found[name],
                     f"adapter '{name}'")
        if present and not path.is_file():
            raise LongcatError(f"{path}: adapter '{name}' is registered but its file is missing"
                               if rec is not None else f"{path}: adapter '{name}' is a link to "
                               "a file that is missing")
        return path, rec
    names = sorted({a.name for a in reg.adapters} | set(found))
    raise UsageError(f"{ckpt.lora_dir}: no adapter named '{name}' (have: "
                     f"{', '.join(names) or 'none'}; see `longcat-tools lora list`)")
