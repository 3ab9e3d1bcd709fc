"""The hub's record of a repo's files (sizes, LFS sha256, git blob sha1) and checks against it.

``verify --against-hub`` asks: is this folder, byte for byte, what the hub holds for the revision?
The expected values come from, in order:

1. a manifest file given explicitly (``--manifest FILE``);
2. the hub API (``HfApi.model_info(files_metadata=True)``) when online;
3. the manifest ``download`` saved next to the snapshot (``hub_manifest.json`` in a ``--dst``
   folder, ``<repo cache>/longcat-tools/<commit>.hub_manifest.json`` for the cache);
4. for a cache snapshot only: the cache's own record, i.e. blob names (an LFS blob is named by the
   sha256 of its content, a small file by its git blob sha1) and, where huggingface_hub saved one,
   its tree listing for sizes and missing files. This catches a corrupted cache (bit rot, a
   truncated copy) offline, but cannot prove the cache matches the hub: use 1-3 for that.

LFS files are compared by size and sha256 of the content; small (non-LFS) files by size and the
git blob sha1, ``sha1(b"blob <size>\\0" + content)``. Hashing streams the files (1 MiB reads).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from longcat_tools.checkpoint import hub
from longcat_tools.errors import LongcatError, UsageError
from longcat_tools.io import jsonio
from longcat_tools.io.checksums import sha256_file

FORMAT = "longcat-tools.hub-manifest"
VERSION = 1
LOCAL_NAME = "hub_manifest.json"  # in a --dst folder
CACHE_SUBDIR = "longcat-tools"  # in a repo's cache folder: <commit>.hub_manifest.json
# Repo files that are documentation, not checkpoint: absent is fine, present is checked.
OPTIONAL = [".gitattributes", "*.md", "assets/*", "*.png", "*.jpg", "*.jpeg", "*.gif", "*.mp4"]
# Local files that are never part of a repo (huggingface_hub's metadata, our manifest).
LOCAL_ONLY = [LOCAL_NAME, ".cache/huggingface/*", ".git/*", ".DS_Store"]
FAIL = ("missing", "size", "sha256", "git-sha1", "unsafe-link")
CHUNK = 1024 * 1024
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHA1 = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class FileRecord:
    size: int | None  # bytes; None when unknown (cache blob names without a tree listing)
    sha256: str | None = None  # LFS files: sha256 of the content
    git_sha1: str | None = None  # small files: git blob sha1

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"size": self.size}
        if self.sha256:
            d["sha256"] = self.sha256
        if self.git_sha1:
            d["git_sha1"] = self.git_sha1
        return d


@dataclass
class Manifest:
    """What the hub holds for one revision of a repo."""

    repo_id: str
    commit: str | None
    files: dict[str, FileRecord]
    revision: str | None = None
    include: list[str] | None = None  # allow_patterns of the download it came with
    source: str = "manifest"  # hub, manifest <path>, cache
    complete: bool = True  # lists every file of the revision (False: only what is on disk)
    created: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "repo_id": self.repo_id,
                "revision": self.revision, "commit": self.commit, "include": self.include,
                "created": self.created or _now(),
                "files": {k: v.as_dict() for k, v in sorted(self.files.items())}}


class FileCheck(NamedTuple):
    """One file's verdict: status is ok, missing, size, sha256, git-sha1, unsafe-link (failures),
    extra (a local file the hub does not have) or not-downloaded (outside the include patterns,
    or documentation)."""

    file: str
    status: str
    message: str


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------------
# Where the expected values come from


def fetch_manifest(repo_id: str, revision: str | None = None) -> Manifest:
    """The hub's file list with sizes and hashes (``HfApi.model_info(files_metadata=True)``)."""
    from huggingface_hub import HfApi

    ref = hub.RepoRef(repo_id, revision)
    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    except Exception as e:  # noqa: BLE001 - network and hub errors alike become one line
        if hub.is_hub_refusal(e):
            raise hub.hub_error(ref, e) from e
        raise HubUnreachable(f"{ref}: cannot read the file list from the hub "
                             f"({type(e).__name__}: {hub.first_line(e)[:160]})") from e
    files: dict[str, FileRecord] = {}
    for s in info.siblings or []:
        lfs = s.lfs
        if lfs is not None:
            sha = lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)
            size = lfs.get("size") if isinstance(lfs, dict) else getattr(lfs, "size", None)
            files[s.rfilename] = FileRecord(size if size is not None else s.size, sha.lower())
        else:
            files[s.rfilename] = FileRecord(s.size, None, (s.blob_id or "").lower() or None)
    if not files:
        raise LongcatError(f"{ref}: the hub returned no file list (is it a model repo?)")
    return Manifest(repo_id, info.sha, files, revision=revision, source="hub", created=_now())


class HubUnreachable(LongcatError):
    """The hub API could not be asked (offline, no network, auth)."""


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest file (schema ``hub_manifest``)."""
    from longcat_tools import schemas

    path = Path(path)
    doc = jsonio.read(path, what="hub manifest")
    schemas.validate(doc, "hub_manifest", str(path))
    files = {k: FileRecord(v.get("size"), v.get("sha256"), v.get("git_sha1"))
             for k, v in doc["files"].items()}
    return Manifest(doc["repo_id"], doc.get("commit"), files, revision=doc.get("revision"),
                    include=doc.get("include"), source=f"manifest {path}",
                    created=doc.get("created"))


def save_manifest(manifest: Manifest, path: str | Path) -> Path:
    from longcat_tools.io.atomic import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, jsonio.dumps(manifest.as_dict()))
    return path


def saved_manifest_path(folder: str | Path, commit: str | None = None) -> Path:
    """Where ``download`` keeps the manifest of ``folder``: inside a ``--dst`` folder, or in the
    repo's cache folder (never inside a snapshot, which must hold only the hub's files)."""
    found = hub.snapshot_repo(folder)
    if found is not None:
        ref, repo = found
        return repo / CACHE_SUBDIR / f"{commit or ref.revision}.{LOCAL_NAME}"
    return Path(folder) / LOCAL_NAME


def manifest_from_cache(snapshot: str | Path) -> Manifest:
    """The cache's own record of a snapshot: blob names as hashes, the tree listing (when
    huggingface_hub saved one) for sizes and files not on disk."""
    found = hub.snapshot_repo(snapshot)
    if found is None:
        raise LongcatError(f"{snapshot}: not a snapshot of the Hugging Face cache")
    ref, repo = found
    snapshot = Path(snapshot)
    files: dict[str, FileRecord] = {}
    tree = _cached_tree(ref, repo)
    for rel, p in local_files(snapshot).items():
        sha256 = git_sha1 = None
        if p.is_symlink():
            blob = Path(os.readlink(p)).name
            sha256 = blob if _SHA256.fullmatch(blob) else None
            git_sha1 = blob if _SHA1.fullmatch(blob) else None
        size = tree[rel][0] if rel in tree else None
        files[rel] = FileRecord(size, sha256, git_sha1)
    for rel, (size, _blob) in tree.items():
        files.setdefault(rel, FileRecord(size))
    return Manifest(ref.repo_id, ref.revision, files, revision=ref.revision, source="cache",
                    complete=bool(tree))


def _cached_tree(ref: hub.RepoRef, repo: Path) -> dict[str, tuple[int, str]]:
    """path -> (size, git blob id) from huggingface_hub's cached tree listing, if it has one."""
    import huggingface_hub as hf

    getter = getattr(hf, "get_cached_repo_tree", None)
    if getter is None:
        return {}
    try:
        entries = getter(ref.repo_id, revision=ref.revision, cache_dir=str(repo.parent))
    except Exception:  # noqa: BLE001 - no listing cached (or an older format): blob names only
        return {}
    return {e.path: (e.size, e.blob_id) for e in entries}


def expected_files(path: str | Path, repo_id: str | None = None, revision: str | None = None,
                   manifest: str | Path | Manifest | None = None) -> Manifest:
    """The expected files for ``path`` (a folder, or a repo id found in the cache), from the best
    source available (module docstring)."""
    path = hub.resolve_source(path)
    if manifest is not None:
        m = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
        if repo_id and m.repo_id != repo_id:
            raise UsageError(f"{m.source}: a manifest for {m.repo_id}, not {repo_id}")
        return m
    snap = hub.snapshot_repo(path)
    saved_path = saved_manifest_path(path)
    saved = load_manifest(saved_path) if saved_path.is_file() else None
    repo_id = repo_id or (snap[0].repo_id if snap else None) or (saved.repo_id if saved else None)
    if repo_id is None:
        raise UsageError(f"{path}: which hub repo is it? name it (e.g. --repo {hub.DEFAULT_REPO})")
    revision = revision or (snap[0].revision if snap else None) or (saved.commit if saved else None)
    unreachable = ""
    if not hub.offline():
        try:
            return fetch_manifest(repo_id, revision)
        except HubUnreachable as e:
            unreachable = f" (the hub was unreachable: {e})"
    if saved is not None and saved.repo_id == repo_id:
        saved.source += unreachable
        return saved
    if snap is not None and snap[0].repo_id == repo_id:
        m = manifest_from_cache(path)
        m.source += unreachable
        return m
    why = "downloads are off (HF_HUB_OFFLINE=1)" if hub.offline() else unreachable.strip(" ()")
    raise LongcatError(f"{path}: no record of the hub's hashes for {repo_id} and {why}: save one "
                       f"on a machine with network (`longcat-tools hub-manifest {repo_id} --out "
                       "FILE`) and pass it with --manifest FILE")


# ---------------------------------------------------------------------------------------------
# The comparison


def local_files(root: Path) -> dict[str, Path]:
    """Repo-relative path -> file, not descending into symlinked folders."""
    from huggingface_hub.utils import filter_repo_objects

    out: dict[str, Path] = {}
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            p = Path(dirpath) / n
            out[p.relative_to(root).as_posix()] = p
    keep = set(filter_repo_objects(list(out), ignore_patterns=LOCAL_ONLY))
    return {k: v for k, v in out.items() if k in keep}


def file_git_sha1(path: Path, progress: Callable[[int], None] | None = None) -> str:
    """git's blob id of a file: sha1 of ``blob <size>\\0`` + content."""
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            if progress:
                progress(len(chunk))
    return h.hexdigest()


def compare_with_manifest(path: str | Path, manifest: Manifest, *,
                          include: list[str] | None = None, hashes: bool = True,
                          progress: Callable[[int], None] | None = None) -> list[FileCheck]:
    """Check every file the manifest lists (and report local files it does not). ``include``
    (default: the manifest's own) limits which absent files count as missing."""
    from huggingface_hub.utils import filter_repo_objects

    from longcat_tools.checkpoint import layouts

    root = Path(path)
    if not root.is_dir():
        raise UsageError(f"{root}: no such folder (pass a checkpoint folder)")
    allowed = hub.snapshot_roots(root) or (root.resolve(),)
    local = local_files(root)
    patterns = include if include is not None else manifest.include
    wanted = set(filter_repo_objects(list(manifest.files), allow_patterns=patterns))
    optional = set(filter_repo_objects(list(manifest.files), allow_patterns=OPTIONAL))
    checks: list[FileCheck] = []
    for rel, rec in sorted(manifest.files.items()):
        p = local.get(rel)
        if p is None or not p.exists():
            if rel in wanted and rel not in optional:
                size = f" ({rec.size:,} bytes)" if rec.size is not None else ""
                checks.append(FileCheck(rel, "missing", f"{rel}: missing{size}; download it "
                                        f"again (`longcat-tools download {manifest.repo_id}`)"))
            else:
                why = "documentation" if rel in optional else "not in the downloaded components"
                checks.append(FileCheck(rel, "not-downloaded", f"{rel}: absent ({why})"))
            continue
        try:
            layouts.check_contained(p, allowed)
        except LongcatError as e:
            checks.append(FileCheck(rel, "unsafe-link", str(e)))
            continue
        checks.append(_check_file(rel, p, rec, hashes, progress))
    for rel in sorted(set(local) - set(manifest.files)):
        checks.append(FileCheck(rel, "extra", f"{rel}: not a file of {manifest.repo_id}"
                                f"{'@' + manifest.commit[:12] if manifest.commit else ''}"))
    return checks


def _check_file(rel: str, p: Path, rec: FileRecord, hashes: bool,
                progress: Callable[[int], None] | None) -> FileCheck:
    size = p.stat().st_size
    if rec.size is not None and size != rec.size:
        return FileCheck(rel, "size", f"{rel}: {size:,} bytes, the hub's file has {rec.size:,} "
                         "(truncated or another revision; download it again)")
    if not hashes or not (rec.sha256 or rec.git_sha1):
        what = "size matches" if rec.size is not None else "present"
        return FileCheck(rel, "ok", f"{rel}: {what} (hash not checked)")
    if rec.sha256:
        got, want, algo = sha256_file(p, progress), rec.sha256, "sha256"
    else:
        got, want, algo = file_git_sha1(p, progress), rec.git_sha1, "git-sha1"
    if got != want:
        return FileCheck(rel, algo, f"{rel}: {algo} {got[:16]}… differs from the hub's "
                         f"{want[:16]}… (corrupt or another revision; download it again)")
    return FileCheck(rel, "ok", f"{rel}: {algo} matches")


def bytes_to_hash(path: str | Path, manifest: Manifest) -> int:
    """How many bytes a hashing comparison will read (for a progress bar's total)."""
    local = local_files(Path(path))
    return sum(local[r].stat().st_size for r, rec in manifest.files.items()
               if r in local and local[r].exists() and (rec.sha256 or rec.git_sha1))


def compare_with_hub(path: str | Path, repo_id: str | None = None, revision: str | None = None,
                     manifest: str | Path | Manifest | None = None, *, hashes: bool = True,
                     progress: Callable[[int], None] | None = None) -> list[FileCheck]:
    """``verify --against-hub``: every file of ``path`` (a folder, or a repo id in the cache)
    against the hub's sizes and hashes."""
    path = hub.resolve_source(path)
    m = expected_files(path, repo_id, revision, manifest)
    return compare_with_manifest(path, m, hashes=hashes, progress=progress)


@dataclass
class HubReport:
    """A comparison with its context, ready for a human table or ``--json``."""

    repo_id: str
    commit: str | None
    source: str
    complete: bool
    checks: list[FileCheck] = field(default_factory=list)

    @property
    def failures(self) -> list[FileCheck]:
        return [c for c in self.checks if c.status in FAIL]

    @property
    def ok(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for c in self.checks:
            counts[c.status] = counts.get(c.status, 0) + 1
        return {"ok": self.ok, "repo_id": self.repo_id, "commit": self.commit,
                "source": self.source, "complete": self.complete, "counts": counts,
                "checks": [c._asdict() for c in self.checks]}


def against_hub_report(path: str | Path, repo_id: str | None = None,
                       revision: str | None = None,
                       manifest: str | Path | Manifest | None = None, *, hashes: bool = True,
                       progress: Callable[[int], None] | None = None) -> HubReport:
    """``compare_with_hub`` plus where the expected values came from."""
    path = hub.resolve_source(path)
    m = expected_files(path, repo_id, revision, manifest)
    return HubReport(m.repo_id, m.commit, m.source, m.complete,
                     compare_with_manifest(path, m, hashes=hashes, progress=progress))
