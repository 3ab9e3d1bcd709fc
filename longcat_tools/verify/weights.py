"""Header-level checks of one weights folder: its index, its safetensors headers, the tensor set.

Nothing here reads tensor data. Every shard the index names must exist inside the folder, every
shard on disk must be named, each tensor must live exactly once in the shard the index says,
``total_size`` must be the bytes the headers describe, and each header must be sound
(``safetensors_io.read_header``). What the tensors should be is the caller's business
(``expect``).
"""

from __future__ import annotations

import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from longcat_tools import schemas
from longcat_tools.checkpoint import layouts
from longcat_tools.errors import LongcatError
from longcat_tools.io import jsonio
from longcat_tools.io.safetensors import FLOAT_DTYPES, Header, TensorInfo, read_header
from longcat_tools.verify.report import Recorder, count, listing

MAX_INDEX_TENSORS = 200_000  # the real DiT has 1,310 tensors, UMT5-XXL ~250: far more is hostile
MAX_SHARDS = 10_000
MAX_INDEX_BYTES = 16 * 1024 * 1024  # the real DiT's index is ~100 KB
MAX_ROWS = 8  # rows of one kind before the rest are summed up in one


@dataclass
class WeightSet:
    """What a weights folder holds, as far as its files could be read."""

    component: str
    folder: Path
    files: list[Path] = field(default_factory=list)  # every safetensors file that belongs to it
    headers: dict[Path, Header] = field(default_factory=dict)  # those whose header is sound
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    where: dict[str, Path] = field(default_factory=dict)  # tensor -> file holding it
    complete: bool = True  # False when a file or the index is broken: sets are partial

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def label(self) -> Path:
        """The file a row about the whole set names: the index, else the single file."""
        return self.files[0] if len(self.files) == 1 else self.folder


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


def _rows(rec: Recorder, component: str, name: str, problems: list[tuple[Path, str]]) -> None:
    for file, msg in problems[:MAX_ROWS]:
        rec.fail(component, name, file, msg)
    if len(problems) > MAX_ROWS:
        rec.fail(component, name, problems[MAX_ROWS][0],
                 f"{len(problems) - MAX_ROWS} more problems of this kind")


def read_weights(rec: Recorder, component: str, folder: Path, index_name: str | None,
                 singles: tuple[str, ...]) -> WeightSet:
    """Resolve and check the safetensors files of a weights folder (index or single file)."""
    ws = WeightSet(component, folder)
    index = folder / index_name if index_name else None
    if index is not None and (index.exists() or index.is_symlink()):
        _read_index(rec, ws, index)
    else:
        found = [folder / n for n in singles if (folder / n).exists()]
        if not found:
            names = " or ".join([*( [index_name] if index_name else []), *singles])
            rec.fail(component, "files", folder, f"no weights: expected {names}")
            ws.complete = False
            return ws
        ws.files = found[:1]
        stray = sorted(p for p in folder.glob("*.safetensors") if p != found[0])
        _rows(rec, component, "files", [
            (p, f"shard on disk next to {found[0].name} without an index naming it (a glob-based "
                "loader would load it too; remove it or write an index)") for p in stray])
        try:
            layouts.check_contained(found[0], rec.allowed)
        except LongcatError as e:
            rec.fail(component, "files", found[0], str(e))
            ws.files, ws.complete = [], False
        _read_headers(rec, ws)
    return ws


def _read_index(rec: Recorder, ws: WeightSet, index: Path) -> None:
    component, folder = ws.component, ws.folder
    try:
        doc = jsonio.read(index, what="shard index", max_bytes=MAX_INDEX_BYTES)
    except LongcatError as e:
        rec.fail(component, "index", index, str(e))
        ws.complete = False
        return
    errs = _index_errors(doc)
    if errs:
        rec.fail(component, "index", index, f"{errs[0]} [schema safetensors_index]")
        ws.complete = False
        return
    wm: dict[str, str] = doc["weight_map"]
    shards = set(wm.values())
    if len(wm) > MAX_INDEX_TENSORS or len(shards) > MAX_SHARDS:
        rec.fail(component, "index", index,
                 f"weight_map lists {len(wm):,} tensors in {len(shards):,} shards, more than a "
                 f"LongCat component can have ({MAX_INDEX_TENSORS:,} / {MAX_SHARDS:,}): corrupt "
                 "or hostile index")
        ws.complete = False
        return
    problems: list[tuple[Path, str]] = []
    files: dict[str, Path] = {}
    for rel in sorted(shards):
        try:  # a local shard stays in its folder; a cache snapshot's may lead into blobs/
            path = layouts.inside(folder, rel, "shard", rec.cache_roots or None)
            layouts.check_contained(path, rec.allowed)
        except LongcatError as e:
            problems.append((index, str(e).replace(f"{folder}: ", "", 1)))
            continue
        if rel.endswith(layouts.PICKLE_SUFFIXES) or not rel.endswith(".safetensors"):
            problems.append((index, f"names shard '{rel}', which is not a .safetensors file "
                                    "(pickle files are never loaded)"))
        elif not (path.exists() or path.is_symlink()):
            problems.append((index, f"names shard '{rel}', which is missing"))
        elif not _regular(path):
            problems.append((path, "not a regular file (the index names it as a shard)"))
        else:
            files[rel] = path
    on_disk = {p.name for p in folder.glob("*.safetensors")}
    for name in sorted(on_disk - shards):
        problems.append((folder / name, f"shard on disk that {index.name} does not name (a stray "
                                        "shard would be loaded by glob-based loaders; remove it "
                                        "or fix the index)"))
    _rows(rec, component, "index", problems)
    if problems:
        ws.complete = False
    ws.files = [files[r] for r in sorted(files)]
    _read_headers(rec, ws)
    _check_against_index(rec, ws, index, wm, doc.get("metadata") or {}, files)


def _index_errors(doc: object) -> list[str]:
    """Schema violations of an index. The weight_map's entries are checked here with the
    schema's own rules (non-empty names to non-empty strings): jsonschema would spend a second on
    the real DiT's 1,310 entries."""
    if not isinstance(doc, dict):
        return ["(root): not a JSON object"]
    wm = doc.get("weight_map")
    if isinstance(wm, dict) and wm:
        bad = [k for k, v in wm.items() if not k or not isinstance(v, str) or not v]
        if bad:
            return [f"weight_map/{bad[0]}: {wm[bad[0]]!r} is not a shard file name"]
        doc = {**doc, "weight_map": dict([next(iter(wm.items()))])}
    return schemas.errors(doc, "safetensors_index")


def _read_headers(rec: Recorder, ws: WeightSet) -> None:
    for path in ws.files:
        try:
            h = read_header(path)
        except LongcatError as e:
            rec.fail(ws.component, "header", path, str(e))
            ws.complete = False
            continue
        ws.headers[path] = h
        for name, info in h.tensors.items():
            if name not in ws.tensors:
                ws.tensors[name] = info
                ws.where[name] = path
    if ws.files and not ws.tensors and len(ws.headers) == len(ws.files):
        rec.fail(ws.component, "header", ws.label, "the weight files hold no tensors")
        ws.complete = False
    elif ws.headers and len(ws.headers) == len(ws.files):
        n = len(ws.files)
        rec.ok(ws.component, "header", ws.label,
               f"{count(n, 'safetensors file')} sound: {count(len(ws.tensors), 'tensor')}, "
               f"{ws.nbytes:,} bytes of data")


def _check_against_index(rec: Recorder, ws: WeightSet, index: Path, wm: dict[str, str],
                         meta: dict, files: dict[str, Path]) -> None:
    component = ws.component
    problems: list[tuple[Path, str]] = []
    seen: dict[str, Path] = {}
    not_listed: dict[Path, list[str]] = {}
    misplaced: list[str] = []
    for rel, path in sorted(files.items()):
        h = ws.headers.get(path)
        if h is None:
            continue
        for name in h.tensors:
            if name in seen:
                problems.append((path, f"tensor '{name}' is stored twice ({seen[name].name} and "
                                       f"{path.name}); loaders would keep either one"))
                continue
            seen[name] = path
            listed = wm.get(name)
            if listed is None:
                not_listed.setdefault(path, []).append(name)
            elif listed != rel:
                misplaced.append(f"'{name}' is in {rel}, the index says {listed}")
    for path, names in not_listed.items():
        problems.append((path, f"holds tensors that {index.name} does not list ({len(names)}): "
                               f"{listing(names)}"))
    if misplaced:
        problems.append((index, f"tensors not in the shard the index names ({len(misplaced)}): "
                                f"{listing(misplaced, 2)}"))
    readable = {rel for rel, p in files.items() if p in ws.headers}
    absent = [n for n, rel in wm.items() if rel in readable and n not in seen]
    if absent:
        problems.append((index, f"lists tensors that their shard does not hold ({len(absent):,}): "
                                f"{listing(absent)}"))
    total = meta.get("total_size")
    data_bytes = sum(t.nbytes for h in ws.headers.values() for t in h.tensors.values())
    complete_read = ws.complete and len(readable) == len(set(wm.values()))
    if total is None:
        rec.warn(component, "index", index, "metadata.total_size is missing")
    elif complete_read and total != data_bytes:
        problems.append((index, f"metadata.total_size is {total:,} but the shards hold "
                                f"{data_bytes:,} bytes of tensor data"))
    _rows(rec, component, "tensors", problems)
    if problems:
        ws.complete = False
    elif complete_read:
        rec.ok(component, "index", index,
               f"{count(len(wm), 'tensor')} in {count(len(files), 'shard')}, all present and "
               f"listed, "
               f"total_size {data_bytes:,}")


def expect(rec: Recorder, ws: WeightSet, expected: dict[str, tuple[int, ...]], what: str, *,
           unexpected: str | None = "fail",
           optional: set[str] | frozenset[str] = frozenset()) -> None:
    """Compare the tensor set and shapes with what a config implies (``what`` says which);
    ``unexpected`` is the status of tensors the config does not explain (None: not checked)."""
    component, file = ws.component, ws.label
    found = ws.tensors
    missing = [n for n in expected if n not in found and n not in optional]
    extra = [n for n in found if n not in expected] if unexpected else []
    if missing and ws.complete:
        rec.fail(component, "tensors", file, f"{len(missing):,} of {len(expected):,} tensors "
                                             f"{what} implies are missing: {listing(missing)}")
    elif missing:
        rec.fail(component, "tensors", file, f"{len(missing):,} expected tensors could not be "
                                             f"found (see the failures above): {listing(missing)}")
    if extra and unexpected:
        rec.add(component, "tensors", unexpected, file,
                f"tensors that {what} does not explain ({len(extra):,}): {listing(extra)}")
    if not missing and not extra:
        n = len([k for k in expected if k in found])
        rec.ok(component, "tensors", file, f"all {n:,} tensors {what} implies")
    wrong = [f"{n} is {list(found[n].shape)}, expected {list(s)}"
             for n, s in expected.items() if n in found and tuple(found[n].shape) != tuple(s)]
    if wrong:
        rec.fail(component, "shapes", file, f"wrong shape for {what} in "
                                            f"{count(len(wrong), 'tensor')}: {listing(wrong, 2)}")
    elif found:
        rec.ok(component, "shapes", file, f"every shape matches {what}")


def dtypes(rec: Recorder, ws: WeightSet, *, skip_scalars: bool = False) -> None:
    """One floating dtype per component: mixed float dtypes warn (some exports keep norms in fp32
    on purpose, but it usually means a half-finished cast); integer or bool weights fail."""
    count = Counter(t.dtype for t in ws.tensors.values()
                    if not (skip_scalars and t.numel == 1 and len(t.shape) <= 1))
    if not count:
        return
    non_float = {d: n for d, n in count.items() if d not in FLOAT_DTYPES}
    floats = {d: n for d, n in count.items() if d in FLOAT_DTYPES}
    desc = ", ".join(f"{n:,} {d}" for d, n in count.most_common())
    if non_float:
        odd = [n for n, t in ws.tensors.items() if t.dtype in non_float]
        rec.fail(ws.component, "dtype", ws.where.get(odd[0], ws.label),
                 f"non-floating weights ({desc}): {listing(odd)}")
    elif len(floats) > 1:
        major = count.most_common(1)[0][0]
        odd = [n for n, t in ws.tensors.items() if t.dtype in floats and t.dtype != major]
        rec.warn(ws.component, "dtype", ws.label,
                 f"mixed dtypes ({desc}); not {major}: {listing(odd)}")
    else:
        rec.ok(ws.component, "dtype", ws.label, f"all {desc}")
