"""Read, change and check the block-sparse-attention settings of a checkpoint.

The settings live in the transformer config (``dit/config.json`` or ``transformer/config.json``):
``enable_bsa`` and ``bsa_params``. Every change is a pure function on the config dict; ``update``
applies one under an exclusive lock next to the config (read, change, validate against the schema,
back up, write a temp file and rename it), so concurrent writers queue up and readers only ever see
a whole file. ``check`` is the arithmetic of what the kernel does for one video size.
"""

from __future__ import annotations

import copy
import difflib
import json
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
from longcat_tools.errors import LongcatError
from longcat_tools.io.atomic import atomic_write_text, file_lock
from longcat_tools.io.checksums import refresh_manifest
from longcat_tools.model import bsa_presets

SCHEMA = "transformer_config"
BACKUP_SUFFIX = ".bak"
LOCK_SUFFIX = ".lock"
LOCK_TIMEOUT_S = 60.0
PARAM_KEYS = ("sparsity", "cdf_threshold", "chunk_3d_shape_q", "chunk_3d_shape_k")
AXES = ("T", "H", "W")
VAE_STRIDE = (4, 8, 8)  # Wan 2.1 VAE: 4x in time (the first frame alone), 8x8 in space
IGNORED_FLAGS = ("enable_flashattn3", "enable_flashattn2", "enable_xformers")
KEEP: Any = object()  # "option not given"; None means an explicit null


# --------------------------------------------------------------------------- JSON style


@dataclass(frozen=True)
class JsonStyle:
    """How a config file is written, detected from its text so a change keeps the file's look:
    indent, trailing newline, ASCII escapes, and whether its keys are sorted (diffusers saves
    configs with ``indent=2, sort_keys=True``)."""

    indent: int | str | None = 2
    trailing_newline: bool = True
    ensure_ascii: bool = True
    sorted_keys: bool = True

    @classmethod
    def of(cls, text: str, cfg: dict[str, Any]) -> JsonStyle:
        lines = text.strip("\n").splitlines()
        indent: int | str | None = None
        if len(lines) > 1:
            second = lines[1]
            ws = second[: len(second) - len(second.lstrip())]
            indent = len(ws) if set(ws) <= {" "} else ws
        return cls(indent, text.endswith("\n"), text.isascii(), list(cfg) == sorted(cfg))

    def dumps(self, obj: Any) -> str:
        text = json.dumps(obj, indent=self.indent, ensure_ascii=self.ensure_ascii)
        return text + "\n" if self.trailing_newline else text


def parse_config(text: str, where: Path | str) -> dict[str, Any]:
    """A config's JSON object; duplicate keys are refused (``json`` would keep the last one)."""
    def no_dupes(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise LongcatError(f"{where}: key '{k}' appears twice")
            out[k] = v
        return out

    try:
        cfg = json.loads(text, object_pairs_hook=no_dupes)
    except json.JSONDecodeError as e:
        raise LongcatError(f"{where}: invalid JSON ({e.msg} at line {e.lineno}); `longcat-tools "
                           "bsa restore` brings back the backup if bsa wrote one") from e
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
    """Schema violations inside ``bsa_params`` (empty when it is null or valid)."""
    return [e for e in schemas.errors(cfg, SCHEMA) if e.startswith("bsa_params")]


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
        why = "null" if old is None else "invalid"
        notes = [f"bsa_params was {why}: started from {bsa_presets.DEFAULT_ENABLE}"]
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
        raise LongcatError("sparsity and cdf_threshold cannot both be none: BSA selects key chunks "
                           "by one of them (or by the larger count of both)")
    new = copy.deepcopy(cfg)
    _put(new, "enable_bsa", True, style)
    _put(new, "bsa_params", params if params == old else _ordered_params(params, old, style),
         style)
    return new, notes


def with_disabled(cfg: dict[str, Any],
                  style: JsonStyle = JsonStyle()) -> tuple[dict[str, Any], list[str]]:
    """``enable_bsa: false``; the params stay so that ``enable`` brings them back."""
    new = copy.deepcopy(cfg)
    _put(new, "enable_bsa", False, style)
    kept = "params kept" if isinstance(cfg.get("bsa_params"), dict) else "no params to keep"
    return new, [f"BSA off ({kept})"]


# --------------------------------------------------------------------------- argument parsing


def parse_fraction(text: str | float | None, option: str, *, inclusive_one: bool) -> float | None:
    """A fraction in (0, 1), or (0, 1] for cdf_threshold; ``none`` or ``null`` for a null."""
    if text is None or (isinstance(text, str) and text.strip().lower() in ("none", "null")):
        return None
    try:
        value = float(text)
    except ValueError:
        raise LongcatError(f"{option} {text}: not a number (a fraction such as 0.9375, or "
                           "'none')") from None
    hi_ok = value <= 1 if inclusive_one else value < 1
    if not (0 < value and hi_ok) or math.isnan(value):
        span = "0 < x <= 1" if inclusive_one else "0 < x < 1"
        raise LongcatError(f"{option} {text}: out of range ({span}); e.g. sparsity 0.9375 drops "
                           "93.75% of key chunks, keeping 6.25%")
    return value


def parse_chunk(text: str, option: str) -> list[int]:
    """``t,h,w`` (or ``txhxw``) in latent tokens, each a positive integer."""
    parts = text.replace("x", ",").replace(" ", "").split(",")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 3 or any(v < 1 for v in values):
        raise LongcatError(f"{option} {text}: expected three positive integers t,h,w (latent "
                           "frames, token rows, token columns), e.g. 4,4,4")
    return values


# --------------------------------------------------------------------------- files and locking


def backup_path(path: Path) -> Path:
    return path.with_name(path.name + BACKUP_SUFFIX)


def open_checkpoint(model: str | Path | None) -> layouts.Checkpoint:
    """The checkpoint from ``--model`` (or $LONGCAT_TOOLS_MODEL, or the current folder)."""
    return layouts.detect(layouts.resolve_model(model))


def _read_config_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LongcatError(f"{path}: missing (the transformer config that holds enable_bsa and "
                           "bsa_params); copy it from the release or examples/bsa_configs/, or "
                           "`bsa restore` if a backup exists") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LongcatError(f"{path}: cannot read ({e})") from e


def read_config(ckpt: layouts.Checkpoint) -> dict[str, Any]:
    path = ckpt.config_path
    return parse_config(_read_config_text(path), path)


def check_writable(path: Path) -> None:
    """Refuse a read-only config before anything is written. The owner's write bit counts even
    for root (who passes ``os.access``): a cleared bit is a request to leave the file alone."""
    if path.exists():
        mode = path.stat().st_mode
        if not mode & stat.S_IWUSR or not os.access(path, os.W_OK):
            raise LongcatError(f"{path}: read-only (mode {stat.S_IMODE(mode):04o}); make it "
                               "writable (chmod u+w) to change it")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise LongcatError(f"{path.parent}: folder not writable (bsa writes a temp file next to "
                           f"{path.name} and renames it)")


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
        return "".join(difflib.unified_diff(
            self.before.splitlines(keepends=True), self.after.splitlines(keepends=True),
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
    path = ckpt.config_path
    if dry_run:
        u = _plan(path, change)
        u.dry_run = True
        return u
    _read_config_text(path)  # a missing config is named as such, not as a lock problem
    hub.check_writable(ckpt.root)
    check_writable(path)
    with config_lock(path):
        u = _plan(path, change)
        if u.changed:
            if backup:
                u.backup = _write_backup(path, u.before)
            atomic_write_text(path, u.after)
            u.written = True
            refresh_manifest(ckpt.root, [path, backup_path(path)])
    return u


def restore(ckpt: layouts.Checkpoint, *, dry_run: bool = False) -> Update:
    """Swap ``config.json.bak`` and ``config.json``: the backup becomes the config and the config
    the backup, so a second ``restore`` undoes the first. Works when the config is missing."""
    path = ckpt.config_path
    bak = backup_path(path)
    if not dry_run:
        hub.check_writable(ckpt.root)

    def texts() -> tuple[str, str]:
        if not bak.is_file():
            raise LongcatError(f"{bak}: no backup to restore (bsa keeps one from its last change "
                               "unless --no-backup was given)")
        restored = _read_config_text(bak)
        schemas.validate(parse_config(restored, bak), SCHEMA, str(bak))
        return (_read_config_text(path) if path.exists() else ""), restored

    if dry_run:
        before, restored = texts()
        return Update(path, before, restored, parse_config(restored, bak), dry_run=True)
    check_writable(path)
    with config_lock(path):
        before, restored = texts()
        u = Update(path, before, restored, parse_config(restored, bak))
        if u.changed:
            if before:
                atomic_write_text(bak, before)  # the swap: what was current becomes the backup
            atomic_write_text(path, restored)
            if not before:
                shutil.copymode(bak, path)
            u.written, u.backup = True, bak if before else None
            refresh_manifest(ckpt.root, [path, bak])
    return u


# --------------------------------------------------------------------------- status


def mode_of(params: dict[str, Any]) -> str:
    s, cdf = params.get("sparsity"), params.get("cdf_threshold")
    if s is not None and cdf is not None:
        return "max"
    return "cdf" if cdf is not None else "top-k"


def describe_params(params: dict[str, Any]) -> str:
    s, cdf = params.get("sparsity"), params.get("cdf_threshold")
    q, k = params.get("chunk_3d_shape_q"), params.get("chunk_3d_shape_k")
    parts = []
    if s is not None:
        parts.append(f"sparsity {s:g} (keeps {(1 - s) * 100:g}% of key chunks)")
    if cdf is not None:
        parts.append(f"cdf_threshold {cdf:g}")
    parts.append(f"chunks q {q} / k {k}")
    parts.append(f"mode {mode_of(params)}")
    return ", ".join(parts)


def attention_path(cfg: dict[str, Any]) -> str:
    """In words: the attention the runner takes for this config."""
    params = kept_params(cfg)
    if cfg.get("enable_bsa") is True:
        if params is None:
            return ("none: enable_bsa is true but bsa_params is "
                    f"{'null' if cfg.get('bsa_params') is None else 'invalid'} (see the warning)")
        return (f"BSA ({describe_params(params)}) for videos with more than one latent frame; "
                "dense SDPA otherwise")
    return "dense SDPA"


def matching_presets(cfg: dict[str, Any]) -> list[str]:
    """Presets whose ``bsa_params`` equal the config's (whatever ``enable_bsa`` says)."""
    def norm(p: dict[str, Any] | None) -> Any:
        if not isinstance(p, dict):
            return None
        return tuple(tuple(v) if isinstance(v, list) else v for v in (p.get(k) for k in PARAM_KEYS))

    mine = norm(cfg.get("bsa_params"))
    return [p.name for p in bsa_presets.PRESETS.values() if norm(p.params) == mine
            and (p.params is not None or cfg.get("enable_bsa") is not True)]


def status(ckpt: layouts.Checkpoint) -> dict[str, Any]:
    """The BSA state of a checkpoint, the attention path it gives and what looks wrong."""
    cfg = read_config(ckpt)
    path = ckpt.config_path
    enabled = cfg.get("enable_bsa", False)
    params = cfg.get("bsa_params")
    warnings: list[str] = []
    notes: list[str] = []
    if "enable_bsa" not in cfg:
        notes.append("enable_bsa is absent: the model's default (false) applies")
    elif not isinstance(enabled, bool):
        warnings.append(f"enable_bsa is {enabled!r}, not true/false")
    perrs = param_errors(cfg)
    if enabled is True and params is None:
        warnings.append("enable_bsa is true but bsa_params is null: the original model stops with "
                        "an assertion; set params with `bsa enable` or `bsa preset NAME`")
    if perrs:
        warnings.append(f"bsa_params is invalid: {perrs[0]}"
                        + (f" (and {len(perrs) - 1} more)" if len(perrs) > 1 else "")
                        + "; `bsa preset NAME` or `bsa enable` writes valid params")
    other = [e for e in schemas.errors(cfg, SCHEMA) if not e.startswith("bsa_params")]
    if other:
        warnings.append(f"config does not match the schema: {other[0]}")
    for flag in IGNORED_FLAGS:
        if cfg.get(flag) is True:
            notes.append(f"{flag} is true: our runner ignores it (dense attention is PyTorch SDPA, "
                         "which picks flash or memory-efficient kernels itself)")
    if isinstance(params, dict) and not perrs:
        if params.get("sparsity") is None and params.get("cdf_threshold") is not None:
            notes.append("cdf-only mode (sparsity null): chunks kept vary per query chunk, until "
                         f"their softmax mass reaches {params['cdf_threshold']:g}; a query chunk "
                         "may keep none")
        if enabled is not True:
            notes.append("BSA is off; its params are kept and `bsa enable` turns them back on")
    same = matching_presets(cfg)
    preset = next((n for n in same if bsa_presets.PRESETS[n].enable_bsa == (enabled is True)),
                  None)
    bak = backup_path(path)
    return {
        "checkpoint": str(ckpt.root), "layout": ckpt.layout, "flavour": ckpt.flavour,
        "layout_description": ckpt.describe(), "config": str(path),
        "enable_bsa": enabled, "bsa_params": params,
        "mode": mode_of(params) if isinstance(params, dict) and not perrs else None,
        "preset": preset, "params_match": same,
        "attention": attention_path(cfg),
        "backup": str(bak) if bak.is_file() else None,
        "warnings": warnings, "notes": notes,
    }


# --------------------------------------------------------------------------- check arithmetic


@dataclass(frozen=True)
class ModelDims:
    """What attention cost depends on."""

    heads: int
    head_dim: int
    depth: int
    patch: tuple[int, int, int]


REAL_MODEL = ModelDims(heads=32, head_dim=128, depth=48, patch=(1, 2, 2))  # the 13.6B release


def model_dims(cfg: dict[str, Any], where: str) -> ModelDims:
    from longcat_tools.model.keymap import dit_dims

    d = dit_dims(cfg, where)
    return ModelDims(d.num_heads, d.head_dim, d.depth, d.patch_size)


def optimal_split(n: int) -> tuple[int, int]:
    """The factor pair of ``n`` closest to square, smaller first (the original's
    ``get_optimal_split``: 1 -> 1x1, 2 -> 1x2, 4 -> 2x2, 8 -> 2x4)."""
    a = max(i for i in range(1, math.isqrt(n) + 1) if n % i == 0)
    return a, n // a


def _chunking(grid: tuple[int, int, int], chunk: list[int]) -> dict[str, Any]:
    counts = [math.ceil(g / c) for g, c in zip(grid, chunk, strict=True)]
    return {"chunk": list(chunk), "tokens_per_chunk": math.prod(chunk), "counts": counts,
            "chunks": math.prod(counts),
            "divides": [g % c == 0 for g, c in zip(grid, chunk, strict=True)],
            "edge": [g % c for g, c in zip(grid, chunk, strict=True)]}


def latent_frames(frames: int, refine: bool) -> tuple[int, int, str | None]:
    """(frames used, latent frames, note). Generation rounds to 4k+1 frames; the refinement stage
    encodes ceil(F/4) latent frames padded up to a multiple of 4 (``bsa_latent_granularity``)."""
    step = VAE_STRIDE[0]
    if refine:
        raw = math.ceil(frames / step)
        t = math.ceil(raw / 4) * 4
        note = (f"refine: {frames} frames give {raw} latent frames, padded to {t} (a multiple of "
                "4) by repeating the last frame" if t != raw else None)
        return frames, t, note
    if frames % step == 1:
        return frames, (frames - 1) // step + 1, None
    used = frames // step * step + 1
    return used, (used - 1) // step + 1, (f"{frames} frames is not 4k+1: the pipeline rounds it "
                                          f"to {used}")


def check(height: int, width: int, frames: int, params: dict[str, Any], *, cp: int = 1,
          refine: bool = False, dims: ModelDims = REAL_MODEL) -> dict[str, Any]:
    """Token grid, chunking, chunks kept and attention FLOPs of one video size under ``params``
    (self-attention with queries and keys over the same tokens, as in text-to-video and refine).
    ``refine``: ``frames`` is the refinement stage's output (twice the stage-1 video)."""
    spatial = VAE_STRIDE[1] * dims.patch[1], VAE_STRIDE[2] * dims.patch[2]
    for name, v, m in (("--height", height, spatial[0]), ("--width", width, spatial[1])):
        if v < 1 or v % m:
            raise LongcatError(f"{name} {v}: must be a positive multiple of {m} (VAE 8x times "
                               f"patch {m // 8}x)")
    if frames < 1:
        raise LongcatError(f"--frames {frames}: must be at least 1")
    if cp < 1:
        raise LongcatError(f"--cp {cp}: must be at least 1")
    if dims.heads % cp:
        raise LongcatError(f"--cp {cp}: the {dims.heads} attention heads do not split over {cp} "
                           "ranks (context parallel scatters heads across ranks)")
    used, t_lat, note = latent_frames(frames, refine)
    notes = [note] if note else []
    latent = (t_lat, height // VAE_STRIDE[1], width // VAE_STRIDE[2])
    grid = (latent[0] // dims.patch[0], latent[1] // dims.patch[1], latent[2] // dims.patch[2])
    tokens = math.prod(grid)
    split = optimal_split(cp)
    for axis, g, s in (("H", grid[1], split[0]), ("W", grid[2], split[1])):
        if g % s:
            raise LongcatError(f"token grid {axis} {g} does not split over cp_split_hw "
                               f"{list(split)} for --cp {cp}; pick a size that is a multiple of "
                               f"{16 * max(split)} px")
    rank = (grid[0], grid[1] // split[0], grid[2] // split[1])
    # Ulysses gathers the sequence as rank tiles one after another: the kernel sees T*cp frames.
    seen = (grid[0] * cp, rank[1], rank[2])
    q = _chunking(seen, params["chunk_3d_shape_q"])
    k = _chunking(seen, params["chunk_3d_shape_k"])
    s, cdf = params.get("sparsity"), params.get("cdf_threshold")
    mode = mode_of(params)
    topk = int((1 - s) * k["chunks"]) if s is not None else None
    dense = 4 * tokens * tokens * dims.head_dim * dims.heads  # QK^T and PV, 2 FLOPs per MAC
    gating = 2 * q["chunks"] * k["chunks"] * dims.head_dim * dims.heads
    kept_fraction = topk / k["chunks"] if topk is not None else None
    kept = round(dense * kept_fraction) if kept_fraction is not None else None
    if mode == "cdf":
        notes.append(f"cdf mode: chunks kept per query vary with content (until the softmax mass "
                     f"reaches {cdf:g}); FLOPs kept cannot be known in advance")
    elif mode == "max":
        notes.append(f"max mode: at least {topk} chunks per query, more where the CDF "
                     f"{cdf:g} needs them")
    warnings: list[str] = []
    applies = grid[0] > 1
    if not applies:
        notes.append("one latent frame: the runner uses dense attention (BSA needs more than one)")
    if topk == 0:
        warnings.append(f"sparsity {s:g} keeps int({1 - s:g} x {k['chunks']}) = 0 key chunks per "
                        "query: attention output would be zero; lower the sparsity")
    fits = all(q["divides"]) and all(k["divides"])
    if not fits:
        bad = [f"{a} {g} % {c} = {e}" for side in (q, k) for a, g, c, e
               in zip(AXES, seen, side["chunk"], side["edge"], strict=True) if e]
        notes.append(f"{', '.join(dict.fromkeys(bad))}: the original kernel asserts divisibility "
                     "and stops; ours makes edge chunks with fewer tokens (pooled over their real "
                     "tokens, masked in the kernel)")
    return {
        "height": height, "width": width, "frames": frames, "frames_used": used, "cp": cp,
        "refine": refine,
        "latent": list(latent), "patch": list(dims.patch), "token_grid": list(grid),
        "tokens": tokens, "cp_split_hw": list(split), "rank_grid": list(rank),
        "kernel_grid": list(seen), "bsa_applies": applies,
        "params": params, "mode": mode, "q": q, "k": k,
        "kept_per_query": topk, "kept_fraction": kept_fraction,
        "original_kernel_ok": fits,
        "heads": dims.heads, "head_dim": dims.head_dim, "depth": dims.depth,
        "flops": {"dense_per_block": dense, "kept_per_block": kept, "gating_per_block": gating,
                  "dense_per_forward": dense * dims.depth,
                  "kept_per_forward": kept * dims.depth if kept is not None else None,
                  "per_rank_divisor": cp},
        "notes": notes, "warnings": warnings,
    }


# --------------------------------------------------------------------------- examples


def example_files() -> dict[str, str]:
    """``examples/bsa_configs/``: one complete config per preset for the real 13.6B DiT (native
    flavour, the hub's field set), plus its README; all generated from the preset table."""
    from longcat_tools.synth import dit_config  # torch: needed only to regenerate examples

    base = dit_config("real")
    style = JsonStyle()
    files: dict[str, str] = {}
    rows = []
    for p in bsa_presets.examples():
        cfg, _ = with_preset(base, p.name, style)
        schemas.validate(cfg, SCHEMA, f"examples/{bsa_presets.EXAMPLES_FOLDER}/{p.example}")
        files[str(p.example)] = style.dumps(cfg)
        prm = p.params
        cells = (["—"] * 3 if prm is None else
                 [prm["sparsity"], json.dumps(prm["cdf_threshold"]), prm["chunk_3d_shape_q"]])
        rows.append(f"| `{p.example}` | `{p.name}` | {json.dumps(p.enable_bsa)} | "
                    + " | ".join(map(str, cells)) + f" | {p.intent} |")
    files["README.md"] = EXAMPLES_README.format(table="\n".join(rows))
    return files


EXAMPLES_README = """\
# BSA example configs

Complete transformer configs for the real 13.6B LongCat-Video DiT (the hub's `dit/config.json`
field set, native flavour: `_class_name LongCatVideoTransformer3DModel`, `num_heads`), one per
block-sparse-attention preset. They are generated from the preset table
`longcat_tools/bsa_presets.py` (`python -m longcat_tools.model.bsa_presets --write
examples/bsa_configs`), and a test checks that they still match it.

| file | preset | enable_bsa | sparsity | cdf_threshold | chunk q = k | intent |
|---|---|---|---|---|---|---|
{table}

To switch a checkpoint, prefer `longcat-tools bsa preset NAME`: it works on every layout and key
flavour, keeps the file's other fields, validates, backs up and writes atomically. Copying one of
these files over `dit/config.json` is only right for the native layout of the real model.
"""
