"""Hugging Face Hub repo ids as checkpoint sources, and the ``download`` command's library part.

Every checkpoint argument may be a local folder or a repo id, ``org/name[@revision]``
(``meituan-longcat/LongCat-Video``, ``meituan-longcat/LongCat-Video@<commit>``). The rules:

- an existing local path always wins over a repo id of the same spelling;
- a repo id is looked up in the local Hugging Face cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``)
  through ``huggingface_hub`` itself, so it works with ``HF_HUB_OFFLINE=1``;
- only ``longcat-tools download`` ever fetches files: the model is about 78 GiB, and a command that
  was asked to read a checkpoint must not start a download as a side effect. Other commands say
  how to download instead.

A snapshot's files are symlinks into the repo's ``blobs/`` (and, with huggingface_hub 2.x, possibly
on into the cache-wide shared blob store); ``snapshot_roots`` gives that boundary to ``layouts``, so
reads follow symlinks inside the repo's cache folder but never out of it.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longcat_tools.errors import LongcatError, UsageError, refuse_empty
from longcat_tools.io import jsonio

DEFAULT_REPO = "meituan-longcat/LongCat-Video"
MODEL_SIZE_NOTE = "about 78 GiB"
# --include components -> allow_patterns; the top-level JSON stubs always come along.
COMPONENT_PATTERNS: dict[str, list[str]] = {
    "dit": ["dit/*", "transformer/*"],  # native release, or a converted repo
    "lora": ["lora/*"],
    "vae": ["vae/*"],
    "text_encoder": ["text_encoder/*"],
    "tokenizer": ["tokenizer/*"],
    "scheduler": ["scheduler/*"],
}
TOP_LEVEL_FILES = ["model_index.json", "config.json"]
_REPO_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,254}")
_COMMIT = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
_TRUE = {"1", "ON", "YES", "TRUE"}


@dataclass(frozen=True)
class RepoRef:
    """A model repo on the hub and an optional revision (branch, tag or commit)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")

    @property
    def folder_name(self) -> str:
        """The repo's folder in the cache: ``models--org--name``."""
        return "models--" + self.repo_id.replace("/", "--")


def parse_repo_ref(arg: str) -> RepoRef | None:
    """``org/name[@revision]`` as a RepoRef; None when ``arg`` is not shaped like a repo id (a
    path such as ``./x``, ``/abs/x`` or ``a/b/c``). A repo id with a malformed revision is a
    UsageError rather than a path."""
    text = str(arg)
    repo, sep, revision = text.partition("@")
    parts = repo.split("/")
    if len(parts) != 2 or not all(_REPO_PART.fullmatch(p) for p in parts):
        return None
    if "--" in repo or ".." in repo or len(repo) > 96 or repo.endswith(".git"):
        return None
    if not sep:
        return RepoRef(repo)
    _check_revision(revision, text)
    return RepoRef(repo, revision)


def _check_revision(revision: str, where: str) -> None:
    """A branch, tag or commit name: never a path (it names a folder of the cache)."""
    bad = (not _REVISION.fullmatch(revision) or ".." in revision.split("/")
           or revision.endswith("/") or "//" in revision)
    if bad:
        raise UsageError(f"{where}: invalid revision '{revision}' (expected a branch, tag or "
                         "commit hash, e.g. meituan-longcat/LongCat-Video@main)")


def repo_ref(arg: str, revision: str | None = None) -> RepoRef:
    """A repo id argument plus an optional ``--revision``; anything else is a UsageError."""
    ref = parse_repo_ref(arg)
    if ref is None:
        raise UsageError(f"'{arg}' is not a Hugging Face repo id (expected org/name[@revision], "
                         f"e.g. {DEFAULT_REPO})")
    if revision is not None:
        _check_revision(revision, "--revision")
    if revision and ref.revision and revision != ref.revision:
        raise UsageError(f"two revisions given: '{ref.revision}' in {arg} and --revision "
                         f"'{revision}'")
    return RepoRef(ref.repo_id, revision or ref.revision)


def cache_dir() -> Path:
    """The hub cache huggingface_hub uses, re-read from the environment at call time so a variable
    set after import (notebooks, tests) counts: HF_HUB_CACHE, else HF_HOME/hub."""
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(os.path.expandvars(os.path.expanduser(env)))
    home = os.environ.get("HF_HOME")
    if home:
        return Path(os.path.expandvars(os.path.expanduser(home))) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as huggingface_hub reads it, at call time."""
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if env is not None:
        return env.upper() in _TRUE
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def repo_folder(ref: RepoRef, cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / ref.folder_name


def snapshot_roots(root: str | Path) -> tuple[Path, ...]:
    """The real folders the files of a cache snapshot may resolve into: its repo's cache folder and
    the cache's shared blob store when huggingface_hub made one. Empty for any other folder."""
    real = Path(root).resolve()
    snapshots = real.parent
    repo = snapshots.parent
    if (snapshots.name != "snapshots" or not repo.name.startswith("models--")
            or not _COMMIT.fullmatch(real.name) or not (repo / "blobs").is_dir()):
        return ()
    roots = [repo]
    shared = repo.parent / "blobs"
    if shared.is_dir() and _is_shared_blob_store(shared):
        roots.append(shared)
    return tuple(roots)


def _is_shared_blob_store(path: Path) -> bool:
    try:
        from huggingface_hub.utils._shared_blobs import is_shared_blobs_dir
    except ImportError:  # huggingface_hub without a shared store: nothing else is allowed
        return False
    return is_shared_blobs_dir(path)


def snapshot_repo(root: str | Path) -> tuple[RepoRef, Path] | None:
    """(repo at its commit, repo cache folder) when ``root`` is a cache snapshot, else None."""
    roots = snapshot_roots(root)
    if not roots:
        return None
    real = Path(root).resolve()
    repo_id = roots[0].name[len("models--"):].replace("--", "/", 1)
    return RepoRef(repo_id, real.name), roots[0]


def resolve_source(arg: str | Path, *, allow_download: bool = False) -> Path:
    """A checkpoint argument as a folder: the local path when it exists, else the cached snapshot
    of the repo id (``org/name[@revision]``). Downloads only when ``allow_download`` and not
    offline; otherwise a repo missing from the cache is one line saying how to get it."""
    refuse_empty(arg, "checkpoint")
    if not isinstance(arg, (str, os.PathLike)):  # None failed in pathlib, a raw TypeError
        raise UsageError(f"checkpoint: a folder or a repo id expected, not "
                         f"{type(arg).__name__}")
    path = Path(arg).expanduser()
    if path.exists():
        return path
    ref = parse_repo_ref(str(arg))
    if ref is None:
        return path  # not a repo id: the caller's layout check names the missing folder
    found = find_cached(ref)
    if found is not None:
        return found
    if allow_download and not offline():
        return download(ref)
    raise LongcatError(not_cached_message(ref))


def find_cached(ref: RepoRef, cache: Path | None = None) -> Path | None:
    """The cached snapshot of ``ref`` (refs resolved by huggingface_hub, no network), or None.

    A snapshot that huggingface_hub knows to be partial (``download --include``) is still
    returned: each command then checks the parts it needs.
    """
    import huggingface_hub as hf
    from huggingface_hub import errors as hf_errors

    cache = cache or cache_dir()
    incomplete = getattr(hf_errors, "IncompleteSnapshotError", None)
    try:
        found = hf.snapshot_download(ref.repo_id, revision=ref.revision, cache_dir=str(cache),
                                     local_files_only=True)
    except Exception as e:  # noqa: BLE001 - huggingface_hub's error classes vary by version
        if incomplete is not None and isinstance(e, incomplete):
            found = e.snapshot_path
        elif isinstance(e, (hf_errors.LocalEntryNotFoundError, FileNotFoundError)):
            return None
        elif isinstance(e, (hf_errors.HFValidationError, ValueError)):
            raise UsageError(f"{ref}: not a valid Hugging Face repo id ({e})") from e
        else:
            raise LongcatError(f"{ref}: cannot read the Hugging Face cache {cache} "
                               f"({type(e).__name__}: {first_line(e)})") from e
    return _checked_snapshot(ref, Path(found), cache)


def _checked_snapshot(ref: RepoRef, snap: Path, cache: Path) -> Path:
    """Refuse a snapshot path that a tampered ``refs/`` file steered out of the repo's folder."""
    expected = (repo_folder(ref, cache) / "snapshots").resolve()
    real = snap.resolve()
    if real.parent != expected or not _COMMIT.fullmatch(real.name):
        raise LongcatError(f"{ref}: the cache's refs/{ref.revision or 'main'} points to {real}, "
                           f"not a commit folder in {expected} (a corrupt or tampered cache: "
                           "delete that repo from the cache and download it again)")
    return snap


def not_cached_message(ref: RepoRef, cache: Path | None = None) -> str:
    cache = cache or cache_dir()
    have = cached_revisions(ref, cache)
    hint = f" (cached: {', '.join(have)}; pick one with @REVISION)" if have else ""
    if offline():
        return (f"{ref} is not a local folder and not in the Hugging Face cache ({cache}){hint}, "
                "and downloads are off (HF_HUB_OFFLINE=1): run `longcat-tools download "
                f"{ref}` on a machine with network, or pass a local folder")
    return (f"{ref} is not a local folder and not in the Hugging Face cache ({cache}){hint}; only "
            f"`longcat-tools download` fetches models ({MODEL_SIZE_NOTE}): run `longcat-tools "
            f"download {ref}` first, or pass a local folder")


def cached_revisions(ref: RepoRef, cache: Path | None = None) -> list[str]:
    """What the cache holds for a repo: ``branch -> commit`` for each ref, then bare commits."""
    folder = repo_folder(ref, cache)
    snaps = sorted(p.name for p in (folder / "snapshots").glob("*") if p.is_dir())
    out, named = [], set()
    for ref_file in sorted((folder / "refs").glob("**/*")):
        if ref_file.is_file():
            try:
                commit = jsonio.read_text(ref_file, what="cache ref", max_bytes=4096).strip()
            except jsonio.JsonError:
                continue  # not a ref huggingface_hub wrote: nothing to list
            named.add(commit)
            out.append(f"{ref_file.relative_to(folder / 'refs').as_posix()} -> {commit[:12]}")
    return out + [s for s in snaps if s not in named]


def include_patterns(include: str | Iterable[str] | None) -> list[str] | None:
    """``dit,lora`` -> allow_patterns for snapshot_download (plus the top-level JSON stubs);
    None (everything) for no selection or ``all``."""
    if include is None:
        return None
    items = include.split(",") if isinstance(include, str) else list(include)
    names = [i.strip() for i in items]
    if not all(names):  # '' meant everything, 'dit,' as if 'dit'
        raise UsageError(f"--include {','.join(items)}: an empty component name (choose from "
                         f"{', '.join(COMPONENT_PATTERNS)} or all, comma-separated)")
    if "all" in names:
        return None
    unknown = [n for n in names if n not in COMPONENT_PATTERNS]
    if unknown:
        raise UsageError(f"--include: unknown component '{unknown[0]}' (choose from "
                         f"{', '.join(COMPONENT_PATTERNS)} or all)")
    out: list[str] = []
    for n in dict.fromkeys(names):
        out += COMPONENT_PATTERNS[n]
    return out + TOP_LEVEL_FILES


def download(ref: RepoRef, *, dst: Path | None = None, patterns: list[str] | None = None,
             max_workers: int = 8, quiet: bool = False, force: bool = False,
             local_only: bool | None = None) -> Path:
    """``snapshot_download``: into the cache, or into ``dst`` (``local_dir``) when given. Resumes
    partial files, shows huggingface_hub's progress bars (unless ``quiet``). With ``local_only``
    (default: under HF_HUB_OFFLINE=1) it only returns what the cache (or ``dst``) holds."""
    local_only = offline() if local_only is None else local_only
    import huggingface_hub as hf
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )
    from huggingface_hub.utils import logging as hf_logging

    cache = cache_dir()
    kwargs: dict[str, Any] = dict(revision=ref.revision, cache_dir=str(cache),
                                  allow_patterns=patterns, max_workers=max_workers,
                                  local_files_only=local_only)
    if force:
        kwargs["force_download"] = True
    if dst is not None:
        kwargs["local_dir"] = str(dst)
    was_disabled = are_progress_bars_disabled()
    hf_logger = hf_logging.get_logger()  # its warnings ("Returning existing local_dir ...")
    level = hf_logger.level
    if quiet:
        disable_progress_bars()
        hf_logger.setLevel(logging.ERROR)
    try:
        path = Path(hf.snapshot_download(ref.repo_id, **kwargs))
    except Exception as e:  # noqa: BLE001 - mapped to one line below
        raise hub_error(ref, e, dst or cache) from e
    finally:
        if quiet:
            hf_logger.setLevel(level)
            if not was_disabled:
                enable_progress_bars()
    if dst is None:
        _checked_snapshot(ref, path, cache)
    return path


def is_hub_refusal(e: BaseException) -> bool:
    """The hub answered, and the answer is no: unknown or private repo, unknown revision."""
    from huggingface_hub import errors as hf_errors

    return isinstance(e, (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError))


# errno values behind an OSError while writing a download: what the user can do differs
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_NO_PERMISSION = {errno.EACCES, errno.EPERM, errno.EROFS}
_IN_THE_WAY = {errno.EEXIST, errno.ENOTDIR, errno.EISDIR}  # an entry where a file must go


def hub_error(ref: RepoRef, e: Exception, where: Path | None = None) -> LongcatError:
    """One line for whatever huggingface_hub raised while fetching ``ref`` into ``where``."""
    from huggingface_hub import errors as hf_errors

    name = type(e).__name__
    where = where or cache_dir()
    if isinstance(e, getattr(hf_errors, "IncompleteSnapshotError", ())):
        m = re.search(r"(\d+) file\(s\) are missing \((.*?)\)\.", str(e))
        missing = f" ({m.group(1)} files missing: {m.group(2)})" if m else ""
        why = ("downloads are off (HF_HUB_OFFLINE=1)" if offline()
               else "the hub cannot be reached")
        return LongcatError(f"{ref}: the copy in {where} is incomplete{missing} and {why}: rerun "
                            "the download with network, or name the components you have with "
                            "--include")
    if isinstance(e, hf_errors.LocalEntryNotFoundError):
        if offline():
            return LongcatError(not_cached_message(ref))
        return LongcatError(f"{ref}: the hub cannot be reached and there is no copy in {where}: "
                            "check the network (or HF_ENDPOINT, HTTPS_PROXY) and rerun")
    if isinstance(e, hf_errors.RevisionNotFoundError):
        return LongcatError(f"{ref}: revision '{ref.revision}' not found on the hub")
    if isinstance(e, (hf_errors.RepositoryNotFoundError, hf_errors.GatedRepoError)):
        return LongcatError(f"{ref}: no such repo on the hub, or it is private or gated (log in "
                            "with `hf auth login` or set HF_TOKEN)")
    if isinstance(e, (hf_errors.HFValidationError, ValueError)):
        return UsageError(f"{ref}: {first_line(e)}")
    if isinstance(e, OSError) and e.errno in _NO_SPACE:
        return LongcatError(f"{ref}: cannot write to {where} ({e.strerror}); free some space "
                            f"({MODEL_SIZE_NOTE} for the whole model) and rerun: the download "
                            "resumes")
    if isinstance(e, OSError) and e.errno in _NO_PERMISSION:
        return LongcatError(f"{ref}: cannot write to {where} ({e.strerror}): download into a "
                            "folder you can write (--dst, or HF_HUB_CACHE for the cache)")
    if isinstance(e, OSError) and e.errno in _IN_THE_WAY:
        return LongcatError(f"{ref}: cannot write to {where}: {e.strerror} ({e.filename}); "
                            "remove that entry if an earlier download left it, and rerun")
    if isinstance(e, (ConnectionError, TimeoutError)):
        return LongcatError(f"{ref}: the hub stopped answering ({e.strerror or name}); check the "
                            "network and rerun: the download resumes")
    return LongcatError(f"{ref}: download failed ({name}: {first_line(e)[:200]})")


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def free_bytes(path: Path) -> int | None:
    """Free disk space where ``path`` (or its nearest existing parent) lives."""
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def check_writable(path: str | Path) -> None:
    """Refuse to modify a snapshot of the Hugging Face cache (its files are shared, content-
    addressed blobs: editing one would make the cache lie). For ``bsa``/``lora`` and any command
    that writes into a checkpoint."""
    roots = snapshot_roots(path)
    if roots:
        found = snapshot_repo(path)
        repo = found[0].repo_id if found else "REPO_ID"
        raise LongcatError(f"{path} is a snapshot in the Hugging Face cache, which is read-only "
                           f"here: make a local copy first (`longcat-tools download {repo} --dst "
                           "DIR`, or `longcat-tools convert --src ... --dst DIR`) and change that")
