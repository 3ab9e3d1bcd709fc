"""Change the block-sparse-attention settings in a checkpoint's transformer config.

The settings live in the transformer config (``dit/config.json`` or ``transformer/config.json``):
``enable_bsa`` and ``bsa_params``. Every change is a pure function on the config dict; ``update``
applies one under an exclusive lock next to the config (read, change, validate against the schema,
back up, write a temp file and rename it), so concurrent writers queue up and readers only ever see
a whole file.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longcat_tools import schemas
from longcat_tools.checkpoint import hub, layouts
from longcat_tools.errors import LongcatError, UsageError
from longcat_tools.io import jsonio
from longcat_tools.io.atomic import atomic_write_text, exchange, file_lock, fsync_dir
from longcat_tools.io.checksums import check_refreshable, refresh_manifest
from longcat_tools.model import bsa_presets, chunks, keymap

SCHEMA = "transformer_config"
BACKUP_SUFFIX = ".bak"
LOCK_SUFFIX = ".lock"
LOCK_TIMEOUT_S = 60.0
PARAM_KEYS = ("sparsity", "cdf_threshold", "chunk_3d_shape_q", "chunk_3d_shape_k")
KEEP: Any = object()  # "option not given"; None means an explicit null


# --------------------------------------------------------------------------- JSON style


@dataclass(frozen=True)
class JsonStyle:
    """How a config file is written, detected from its text so a change keeps the file's look:
    indent, trailing newline, ASCII escapes, whether its keys are sorted (diffusers saves
    configs with ``indent=2, sort_keys=True``) and Windows line ends."""

    indent: int | str | None = 2
    trailing_newline: bool = True
    ensure_ascii: bool = True
    sorted_keys: bool = True
    crlf: bool = False

    @classmethod
    def of(cls, text: str, cfg: dict[str, Any]) -> JsonStyle:
        lines = text.strip("\n").splitlines()
        indent: int | str | None = None
        if len(lines) > 1:
            second = lines[1]
            ws = second[: len(second) - len(second.lstrip())]
            indent = len(ws) if set(ws) <= {" "} else ws
        return cls(indent, text.endswith("\n"), text.isascii(), list(cfg) == sorted(cfg),
                   "\r\n" in text)

    def dumps(self, obj: Any) -> str:
        text = jsonio.dumps(obj, indent=self.indent, newline=self.trailing_newline,
                            ensure_ascii=self.ensure_ascii)
        return text.replace("\n", "\r\n") if self.crlf else text


def parse_config(text: str, where: Path | str, backup: bool = False) -> dict[str, Any]:
    """A config's JSON object, read strictly (``jsonio.loads``); ``backup``: it is the backup
    itself, which ``bsa restore`` cannot help with."""
    try:
        cfg = jsonio.loads(text, where)
    except jsonio.JsonError as e:
        fix = ("not restored (the backup is damaged; fix or delete it)" if backup else
               "`longcat-tools bsa restore` brings back the backup if bsa wrote one")
        raise LongcatError(f"{e}; {fix}") from None
    if not isinstance(cfg, dict):
        raise LongcatError(f"{where}: not a JSON object")
    return cfg


# --------------------------------------------------------------------------- pure changes


def _put(cfg: dict[str, Any], key: str, value: Any, style: JsonStyle) -> None:
    """Set a top-level key in place: an existing key keeps its position, a new one goes where the
    file's order puts it (sorted files stay sorted)."""
    if key in cfg or not style.sorted_keys:
        cfg[key] = value
        return
    items = sorted([*cfg.items(), (key, value)])
    cfg.clear()
    cfg.update(items)


def _ordered_params(new: dict[str, Any], old: Any, style: JsonStyle) -> dict[str, Any]:
    if style.sorted_keys:
        return dict(sorted(new.items()))
    kept = [k for k in old if k in new] if isinstance(old, dict) else []
    return {k: new[k] for k in [*kept, *(k for k in PARAM_KEYS if k in new and k not in kept)]}


def param_errors(cfg: dict[str, Any]) -> list[str]:
    """Schema violations inside ``bsa_params``, then chunks too large for the kernels (empty
    when it is null or valid)."""
    errors = [e for e in schemas.errors(cfg, SCHEMA) if e.startswith("bsa_params")]
    params = cfg.get("bsa_params")
    if errors or not isinstance(params, dict):
        return errors
    found = (chunks.chunk_error(params[k], f"bsa_params.{k}")
             for k in ("chunk_3d_shape_q", "chunk_3d_shape_k"))
    return [e for e in found if e]


def kept_params(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """The config's ``bsa_params`` when it is a valid object, else None."""
    params = cfg.get("bsa_params")
    if isinstance(params, dict) and not param_errors(cfg):
        return params
    return None


def with_preset(cfg: dict[str, Any], name: str,
                style: JsonStyle = JsonStyle()) -> tuple[dict[str, Any], list[str]]:
    """The config with a preset's ``enable_bsa`` and ``bsa_params`` (every other field kept)."""
    p = bsa_presets.get(name)
    new = copy.deepcopy(cfg)
    _put(new, "enable_bsa", p.enable_bsa, style)
    params = None if p.params is None else _ordered_params(p.params, cfg.get("bsa_params"), style)
    _put(new, "bsa_params", params, style)
    return new, [f"preset {name}: {p.intent}"]


def with_enabled(cfg: dict[str, Any], style: JsonStyle = JsonStyle(), *, sparsity: Any = KEEP,
                 cdf_threshold: Any = KEEP, chunk_q: list[int] | None = None,
                 chunk_k: list[int] | None = None) -> tuple[dict[str, Any], list[str]]:
    """``enable_bsa: true``. Options given replace those fields; the others keep the config's
    current params, or where it has none (null or invalid), 720p-balanced's. ``chunk_k`` follows
    ``chunk_q`` when only that is given."""
    old = cfg.get("bsa_params")
    kept = kept_params(cfg)
    if kept is not None:
        params = dict(kept)
        given = (sparsity is not KEEP or cdf_threshold is not KEEP or chunk_q is not None
                 or chunk_k is not None)
        notes = ["started from the config's params" if given else "kept the config's params"]
    else:
        params = dict(bsa_presets.PRESETS[bsa_presets.DEFAULT_ENABLE].params or {})
        name = bsa_presets.DEFAULT_ENABLE
        why = "not an object" if not isinstance(old, dict) else param_errors(cfg)[0]
        notes = [f"bsa_params was null: started from {name}" if old is None else
                 f"bsa_params was invalid ({why}): replaced by {name}'s"]
    if sparsity is not KEEP:
        params["sparsity"] = sparsity
    if cdf_threshold is not KEEP:
        params["cdf_threshold"] = cdf_threshold
    if chunk_q is not None:
        params["chunk_3d_shape_q"] = list(chunk_q)
        params["chunk_3d_shape_k"] = list(chunk_k if chunk_k is not None else chunk_q)
    elif chunk_k is not None:
        params["chunk_3d_shape_k"] = list(chunk_k)
    if params.get("sparsity") is None and params.get("cdf_threshold") is None:
        raise UsageError("sparsity and cdf_threshold cannot both be none: BSA selects key chunks "
                         "by one of them (or by the larger count of both)")
    new = copy.deepcopy(cfg)
    _put(new, "enable_bsa", True, style)
    _put(new, "bsa_params", params if params == old else _ordered_params(params, old, style),
         style)
    return new, notes


def with_disabled(cfg: dict[str, Any],
                  style: JsonStyle = JsonStyle()) -> tuple[dict[str, Any], list[str]]:
    """``enable_bsa: false``; the params stay so that ``enable`` brings them back, unless they
    fail the schema: then they go (null), so that BSA can always be turned off (the backup,
    if kept, has them)."""
    new = copy.deepcopy(cfg)
    _put(new, "enable_bsa", False, style)
    params = cfg.get("bsa_params")
    if isinstance(params, dict) and (errors := param_errors(cfg)):
        _put(new, "bsa_params", None, style)
        return new, [f"BSA off (bsa_params was invalid ({errors[0]}): set to null)"]
    kept = "params kept" if isinstance(params, dict) else "no params to keep"
    return new, [f"BSA off ({kept})"]


# --------------------------------------------------------------------------- argument parsing


def parse_fraction(text: str | float | None, option: str, *, inclusive_one: bool) -> float | None:
    """A fraction in (0, 1), or (0, 1] for cdf_threshold; ``none`` or ``null`` for a null."""
    if text is None or (isinstance(text, str) and text.strip().lower() in ("none", "null")):
        return None
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{option} {text}: not a number (a fraction such as 0.9375, or "
                         "'none')") from None
    hi_ok = value <= 1 if inclusive_one else value < 1
    if not (0 < value and hi_ok) or math.isnan(value):
        span = "0 < x <= 1" if inclusive_one else "0 < x < 1"
        example = ("0.9 keeps key chunks until 90% of the softmax mass" if inclusive_one else
                   "0.9375 drops 93.75% of key chunks, keeping 6.25%")
        raise UsageError(f"{option} {text}: out of range ({span}); e.g. {example}")
    return value


def parse_chunk(text: str, option: str) -> list[int]:
    """``t,h,w`` (or ``txhxw``) in latent tokens, each a positive integer."""
    parts = text.replace("x", ",").replace(" ", "").split(",")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 3 or any(v < 1 for v in values):
        raise UsageError(f"{option} {text}: expected three positive integers t,h,w (latent "
                         "frames, token rows, token columns), e.g. 4,4,4")
    too_large = chunks.chunk_error(values, option)
    if too_large:
        raise UsageError(too_large)
    return values


# --------------------------------------------------------------------------- files and locking


def backup_path(path: Path) -> Path:
    return path.with_name(path.name + BACKUP_SUFFIX)


def open_checkpoint(model: str | Path | None) -> layouts.Checkpoint:
    """The checkpoint from ``--model`` (or $LONGCAT_TOOLS_MODEL, or the current folder)."""
    return layouts.detect(layouts.resolve_model(model))


def open_configs(model: str | Path | None) -> list[layouts.Checkpoint]:
    """The transformer configs bsa acts on: a base checkpoint's one, or one view per DiT folder of
    an avatar checkpoint. An avatar's DiT folders are one model in several forms (1.0's single-
    and multi-speaker fine-tunes, 1.5's DiT and its INT8 copy) and a run may load any of them,
    so every change goes to all of them."""
    found = layouts.detect_any(layouts.resolve_model(model))
    if isinstance(found, layouts.AvatarCheckpoint):
        views, seen = [], set()
        for view in found.views():  # one folder linked under two names is changed once
            real = view.config_path.parent.resolve()
            if real not in seen:
                seen.add(real)
                views.append(view)
        if not views:
            found.dit()  # one line: no DiT folder
        return views
    return [found]


def _read_config_text(path: Path) -> str:
    try:
        return jsonio.read_text(path, what="transformer config")
    except jsonio.Missing:
        raise LongcatError(f"{path}: missing (the transformer config that holds enable_bsa and "
                           "bsa_params); copy it from the release or examples/bsa_configs/, or "
                           "`bsa restore` if a backup exists") from None


def config_path(ckpt: layouts.Checkpoint) -> Path:
    """The config bsa reads, after checking that it (links followed) stays in the checkpoint. A
    link that does is read, then replaced by the new file, never written through."""
    layouts.check_contained(ckpt.config_path, ckpt.containment)
    return ckpt.config_path


def read_config(ckpt: layouts.Checkpoint) -> dict[str, Any]:
    path = config_path(ckpt)
    return parse_config(_read_config_text(path), path)


def check_writable(path: Path) -> None:
    """Refuse a read-only config before anything is written. The owner's write bit counts even
    for root (who passes ``os.access``): a cleared bit is a request to leave the file alone."""
    if path.exists():
        mode = path.stat().st_mode
        if not mode & stat.S_IWUSR:
            raise LongcatError(f"{path}: read-only (mode {stat.S_IMODE(mode):04o}); make it "
                               "writable (chmod u+w) to change it")
        if not os.access(path, os.W_OK):  # another owner's file, or a read-only file system
            raise LongcatError(f"{path}: not writable by this user or on this file system")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise LongcatError(f"{path.parent}: folder not writable (bsa writes a temp file next to "
                           f"{path.name} and renames it)")


def check_folder(ckpt: layouts.Checkpoint) -> None:
    """bsa writes in the config's own folder only (temp file, backup, lock); that folder must be
    the checkpoint's, not a link leading out of it. The checksum list it refreshes must be a
    plain file."""
    layouts.check_contained(ckpt.config_path.parent, ckpt.containment)
    check_refreshable(ckpt.root)


@contextmanager
def config_lock(path: Path, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """An exclusive lock on ``<config>.lock`` for a read-modify-write of the config; temp files of
    writers killed mid-write are cleared once we hold it."""
    with file_lock(path.with_name(path.name + LOCK_SUFFIX), timeout, "another bsa command"):
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        yield


def _write_backup(path: Path, text: str) -> Path:
    bak = backup_path(path)
    atomic_write_text(bak, text)
    shutil.copymode(path, bak)
    return bak


@dataclass
class Update:
    """What a write did (or, under ``--dry-run``, would do)."""

    path: Path
    before: str
    after: str
    config: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    written: bool = False
    backup: Path | None = None
    dry_run: bool = False

    @property
    def changed(self) -> bool:
        return self.before != self.after

    def diff(self) -> str:
        """A unified diff, in LF line ends whatever the file's (a CRLF one printed \\x0d)."""
        return "".join(difflib.unified_diff(
            [f"{ln}\n" for ln in self.before.splitlines()],
            [f"{ln}\n" for ln in self.after.splitlines()],
            fromfile=str(self.path), tofile=f"{self.path} (new)"))


Change = Callable[[dict[str, Any], JsonStyle], tuple[dict[str, Any], list[str]]]


def _plan(path: Path, change: Change) -> Update:
    before = _read_config_text(path)
    cfg = parse_config(before, path)
    style = JsonStyle.of(before, cfg)
    new, notes = change(cfg, style)
    if style.dumps(new) == style.dumps(cfg):
        return Update(path, before, before, new, notes)
    schemas.validate(new, SCHEMA, str(path))
    return Update(path, before, style.dumps(new), new, notes)


def update(ckpt: layouts.Checkpoint, change: Change, *, backup: bool = True,
           dry_run: bool = False) -> Update:
    """Apply ``change`` to the transformer config: under the lock, validated, atomically, with
    the previous text kept in ``config.json.bak`` unless ``backup`` is false. An unchanged config
    is not rewritten (and its backup stays as it was)."""
    path = config_path(ckpt)
    hub.check_writable(ckpt.root)  # a dry run says so too
    if backup:  # a folder there failed the rename as an internal error
        layouts.check_plain(backup_path(path), "the backup")
    if dry_run:
        u = _plan(path, change)
        u.dry_run = True
        return u
    _read_config_text(path)  # a missing config is named as such, not as a lock problem
    check_folder(ckpt)
    check_writable(path)
    with config_lock(path):
        u = _plan(path, change)
        if u.changed:
            if backup:
                u.backup = _write_backup(path, u.before)
            atomic_write_text(path, u.after)
            u.written = True
        # also when nothing changed: a run killed between its write and this refresh left the
        # list behind the config, and the rerun finds the config already as asked
        refresh_manifest(ckpt.root, [path, backup_path(path)])
    return u


def update_all(ckpts: list[layouts.Checkpoint], change: Change, *, backup: bool = True,
               dry_run: bool = False) -> list[Update]:
    """:func:`update` on several configs (an avatar's DiT folders): every change is planned and
    validated first, so a config the change does not fit stops the command before any is
    written; each is then written as :func:`update` writes one."""
    plans = [update(c, change, dry_run=True) for c in ckpts]
    if dry_run or len(ckpts) == 1:
        return plans if dry_run else [update(ckpts[0], change, backup=backup)]
    for c in ckpts:
        check_folder(c)
        check_writable(c.config_path)
    return [update(c, change, backup=backup) for c in ckpts]


def restore_all(ckpts: list[layouts.Checkpoint], *, dry_run: bool = False) -> list[Update]:
    """:func:`restore` on several configs; each must have a valid backup before any is
    swapped."""
    plans = [restore(c, dry_run=True) for c in ckpts]
    if dry_run:
        return plans
    for c in ckpts:  # a read-only config swapped none (the others were, out of step with it)
        check_folder(c)
        if config_path(c).exists():
            check_writable(config_path(c))
    return [restore(c) for c in ckpts]


def restore(ckpt: layouts.Checkpoint, *, dry_run: bool = False) -> Update:
    """Swap ``config.json.bak`` and ``config.json``: the backup becomes the config and the config
    the backup, so a second ``restore`` undoes the first. Works when the config is missing."""
    path = config_path(ckpt)
    bak = backup_path(path)
    hub.check_writable(ckpt.root)  # a snapshot as such, dry run or not (not "no backup")
    if not dry_run:
        check_folder(ckpt)

    def texts() -> tuple[str, str]:
        layouts.check_plain(bak, "the backup")  # a link could bring in any file at all
        if not bak.is_file():
            raise LongcatError(f"{bak}: no backup to restore (bsa keeps one from its last change "
                               "unless --no-backup was given)")
        restored = jsonio.read_text(bak, what="backup of the transformer config", links=False)
        old = parse_config(restored, bak, backup=True)
        schemas.validate(old, SCHEMA, str(bak))
        before = _read_config_text(path) if path.exists() else ""
        if before:  # bsa's backups differ in BSA fields; one sized otherwise is another model's
            now = parse_config(before, path)
            for key in keymap.SHAPE_FIELDS:
                if old.get(key) != now.get(key):
                    raise LongcatError(f"{bak}: its {key} is {old.get(key)!r}, the config's "
                                       f"{now.get(key)!r}: a backup of another model, which "
                                       "these weights do not fit; not restored")
        return before, restored

    if dry_run:
        before, restored = texts()
        return Update(path, before, restored, parse_config(restored, bak), dry_run=True)
    check_writable(path)
    with config_lock(path):
        before, restored = texts()
        u = Update(path, before, restored, parse_config(restored, bak))
        if u.changed:
            if before and exchange(path, bak):  # the swap in one step: no moment without either
                fsync_dir(path.parent)
            elif before:  # no exchange here: a kill between the writes leaves both the same
                atomic_write_text(bak, before)
                atomic_write_text(path, restored)
            else:
                atomic_write_text(path, restored)
            if not before:
                shutil.copymode(bak, path)
            u.written, u.backup = True, bak if before else None
            refresh_manifest(ckpt.root, [path, bak])
    return u
