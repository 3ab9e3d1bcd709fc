"""What ``longcat-tools download`` does, as a library call: list, fetch, record, check.

1. ask the hub for the revision's file list with sizes and hashes (pins the commit, sizes the
   download); when the hub cannot be reached, fall back to the copy already on this machine;
2. ``snapshot_download`` (resumable) into the cache or a folder;
3. save the hub's record next to what arrived (``hub_manifest``), for offline checks later;
4. check every safetensors header (and the DiT against its index and config): ``check_headers``;
5. optionally hash every file against the record.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longcat_tools.checkpoint import hub, hub_manifest, layouts
from longcat_tools.errors import LongcatError, UsageError
from longcat_tools.io.atomic import check_outside_checkpoints


@dataclass
class Plan:
    files: int
    bytes: int
    commit: str | None
    target: Path
    free_bytes: int | None


@dataclass
class DownloadResult:
    ref: hub.RepoRef
    path: Path
    commit: str | None
    local_only: bool  # nothing was fetched: offline, or the hub was unreachable
    unreachable: str | None  # why the hub could not be asked, when it could not
    manifest_path: Path | None
    headers: HeaderSummary
    hashes: hub_manifest.HubReport | None
    seconds: float


def run(ref: hub.RepoRef, *, dst: Path | None = None, patterns: list[str] | None = None,
        check_hashes: bool = False, force: bool = False, max_workers: int = 8,
        quiet: bool = False, on_plan: Callable[[Plan], None] | None = None,
        hash_progress: Callable[[int], Callable[[int], None]] | None = None) -> DownloadResult:
    """Fetch ``ref`` (or find it, offline) and check it. ``on_plan`` hears the size before the
    transfer starts; ``hash_progress(total_bytes)`` returns the callback hashing reports to."""
    t0 = time.perf_counter()
    if dst is not None:
        check_outside_checkpoints(Path(dst))
        if Path(dst).exists() and not Path(dst).is_dir():
            raise UsageError(f"--dst {dst}: exists and is not a folder; name a folder to "
                             "download into")
    manifest = unreachable = None
    fetch_ref = ref
    if force and hub.offline():  # it found the local copy and fetched nothing, silently
        raise LongcatError("--force-download fetches every file again, and downloads are off "
                           "(HF_HUB_OFFLINE=1): unset it, or drop --force-download")
    if not hub.offline():
        try:
            manifest = hub_manifest.fetch_manifest(ref.repo_id, ref.revision)
        except hub_manifest.HubUnreachable as e:
            unreachable = str(e)
    if manifest is not None:
        manifest.include = patterns
        if on_plan is not None:
            on_plan(plan(manifest, patterns, dst))
        if dst is not None and manifest.commit:  # a folder has no refs: pin what was listed
            fetch_ref = hub.RepoRef(ref.repo_id, manifest.commit)
    local_only = manifest is None
    if force and unreachable is not None:
        raise LongcatError(f"--force-download: {unreachable}; nothing was fetched again")
    recorded = None
    if local_only and dst is not None:
        recorded = check_folder_record(ref, Path(dst), unreachable)
    try:
        path = hub.download(fetch_ref, dst=dst, patterns=patterns, max_workers=max_workers,
                            quiet=quiet, force=force, local_only=local_only)
    except LongcatError as e:
        if unreachable is None:
            raise
        raise LongcatError(f"{unreachable}, and there is no copy on this machine "
                           f"({dst or hub.cache_dir()})") from e
    found = hub.snapshot_repo(path)
    listed = manifest or recorded  # offline, a --dst folder's commit is its record's
    commit = found[0].revision if found else (listed.commit if listed else None)
    saved = None
    if manifest is not None:
        if commit and manifest.commit != commit:  # the branch moved during the download
            manifest = hub_manifest.fetch_manifest(ref.repo_id, commit)
            manifest.include = patterns
        manifest.revision = ref.revision
        saved = hub_manifest.save_manifest(
            manifest, hub_manifest.saved_manifest_path(path, manifest.commit))
    check_present(path, patterns, components=local_only)
    headers = check_headers(path, patterns)
    report = None
    if check_hashes:
        m = manifest or hub_manifest.expected_files(path, ref.repo_id, ref.revision)
        progress = hash_progress(hub_manifest.bytes_to_hash(path, m)) if hash_progress else None
        report = hub_manifest.HubReport(m.repo_id, m.commit, m.source, m.complete,
                                        hub_manifest.compare_with_manifest(path, m,
                                                                           progress=progress))
    return DownloadResult(ref, path, commit, local_only, unreachable, saved, headers, report,
                          time.perf_counter() - t0)


def check_folder_record(ref: hub.RepoRef, dst: Path, unreachable: str | None = None
                        ) -> hub_manifest.Manifest:
    """Without the hub, take ``dst`` as ``ref`` only on the record a download left there: given
    ``local_dir``, huggingface_hub returns any existing folder for any repo id."""
    why = unreachable or "downloads are off (HF_HUB_OFFLINE=1)"
    if not dst.exists():  # huggingface_hub would blame the cache, which --dst does not use
        raise LongcatError(f"{dst}: no such folder, and {why}: rerun the download with network "
                           "to fill it, or name with --dst the folder an earlier download wrote")
    saved = hub_manifest.saved_manifest_path(dst)
    layouts.check_plain(saved, "the download's record")  # a link could name any repo
    if not saved.is_file():
        raise LongcatError(f"{dst}: no record that it holds {ref.repo_id} ({saved.name} is "
                           f"missing) and {why}: rerun the download with network, or check the "
                           f"folder with `longcat-tools verify {dst}`")
    m = hub_manifest.load_manifest(saved)
    at = f"{m.repo_id} at {str(m.commit)[:12]}"
    if m.repo_id.lower() != ref.repo_id.lower():  # the hub's ids ignore case
        raise LongcatError(f"{dst}: holds {at}, not {ref.repo_id}: name that repo, or another "
                           "--dst")
    rev = ref.revision
    if rev and rev not in (m.revision or "main", m.commit) and not (
            len(rev) >= 7 and str(m.commit).startswith(rev)):
        raise LongcatError(f"{dst}: holds {at} (revision {m.revision or 'main'}), not revision "
                           f"{rev}: rerun the download with network, or drop the revision")
    return m


def plan(manifest: hub_manifest.Manifest, patterns: list[str] | None,
         dst: Path | None) -> Plan:
    from huggingface_hub.utils import filter_repo_objects

    chosen = list(filter_repo_objects(list(manifest.files), allow_patterns=patterns))
    target = dst or hub.cache_dir()
    return Plan(len(chosen), sum(manifest.files[f].size or 0 for f in chosen), manifest.commit,
                Path(target), hub.free_bytes(Path(target)))


# What a copy found offline must hold when the selection asks for it: the release's adapters
# (lora/) may be absent from a repo, these may not.
REQUIRED_COMPONENTS = ("dit", "vae", "text_encoder", "tokenizer", "scheduler")


def check_present(path: str | Path, patterns: list[str] | None = None,
                  components: bool = True) -> None:
    """Every file of the selection resolves inside the copy (the cache's blobs, or the folder) to
    a regular file; with ``components``, every component the selection asks for is there (all
    of ``REQUIRED_COMPONENTS`` without ``--include``). Why: offline, a copy with its vae/ gone,
    or a blob deleted from the cache, passed as "ready" or failed as an internal error."""
    from huggingface_hub.utils import filter_repo_objects

    from longcat_tools.errors import why_not_a_file

    root = Path(path)
    allowed = hub.snapshot_roots(root) or (root.resolve(),)
    if components:
        for comp, globs in hub.COMPONENT_PATTERNS.items():
            asked = any(g in patterns for g in globs) if patterns is not None else \
                comp in REQUIRED_COMPONENTS
            folders = [root / g.removesuffix("/*") for g in globs]
            there = [f for f in folders if f.exists() or f.is_symlink()]
            if asked and not there:
                raise LongcatError(f"{root}: no {' or '.join(f.name + '/' for f in folders)} in "
                                   "this copy: it is incomplete; download it again with network "
                                   f"(--include {comp} for just that part)")
            for folder in there:
                layouts.check_contained(folder, allowed)
        _check_recorded(root, patterns)
    files = hub_manifest.local_files(root)
    for rel in filter_repo_objects(sorted(files), allow_patterns=patterns):
        layouts.check_contained(files[rel], allowed)
        if not files[rel].is_file():
            raise LongcatError(f"{files[rel]}: {why_not_a_file(files[rel])}: the copy is "
                               "damaged; download it again (--force-download)")


def _check_recorded(root: Path, patterns: list[str] | None) -> None:
    """Every file of the selection that the record an earlier download left lists is there: a
    copy whose tokenizer/ was emptied passed as "ready"."""
    from huggingface_hub.utils import filter_repo_objects

    saved = hub_manifest.saved_manifest_path(root)
    if not (saved.is_file() and not saved.is_symlink()):
        return
    record = hub_manifest.load_manifest(saved)
    listed = filter_repo_objects(sorted(record.files), allow_patterns=patterns,
                                 ignore_patterns=hub_manifest.OPTIONAL)
    for rel in listed:
        if not ((root / rel).exists() or (root / rel).is_symlink()):
            raise LongcatError(f"{root / rel}: missing, though {saved} lists it: the copy is "
                               "incomplete; download it again with network")


@dataclass
class HeaderSummary:
    """What a header-level check of a downloaded checkpoint found (no tensor data is read)."""

    layout: str | None = None
    dit_tensors: int = 0
    dit_parameters: int = 0
    dit_bytes: int = 0
    dit_shards: int = 0
    safetensors_files: int = 0  # every .safetensors file whose header was checked

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def check_headers(path: str | Path, patterns: list[str] | None = None) -> HeaderSummary:
    """Header-level check of a download: the DiT (when it was included) matches its index and the
    tensor names and shapes its config implies; every other safetensors file has a sound header.
    The first problem is a LongcatError naming the file."""
    import math

    from huggingface_hub.utils import filter_repo_objects

    from longcat_tools.checkpoint import layouts
    from longcat_tools.io.safetensors import read_header
    from longcat_tools.model import keymap

    root = Path(path)
    out = HeaderSummary()
    wants_dit = patterns is None or any(p.startswith(("dit/", "transformer/")) for p in patterns)
    dit_files: set[Path] = set()
    allowed = hub.snapshot_roots(root) or (root.resolve(),)
    if wants_dit:
        ckpt = layouts.detect(root)
        out.layout = ckpt.layout
        shards = layouts.transformer_shards(ckpt)
        by_file: dict[Path, set[str]] = {}
        for name, f in shards.items():
            by_file.setdefault(f, set()).add(name)
        expected = dict(keymap.tensor_specs(keymap.dit_dims(ckpt.config(), str(ckpt.config_path)),
                                            ckpt.flavour))
        seen: set[str] = set()
        for f, names in sorted(by_file.items()):
            header = read_header(f)
            if set(header.tensors) != names:
                odd = sorted(names ^ set(header.tensors))[0]
                raise LongcatError(f"{f}: its header and {layouts.INDEX_NAME} disagree on tensor "
                                   f"'{odd}' (a shard from another revision? download it again)")
            for name in names:
                info = header.tensors[name]
                want = expected.get(name)
                if want is None:
                    raise LongcatError(f"{f}: tensor '{name}' is not part of the "
                                       f"{ckpt.flavour} DiT its config describes")
                if tuple(want) != info.shape:
                    raise LongcatError(f"{f}: tensor '{name}' has shape {list(info.shape)}, the "
                                       f"config implies {list(want)}")
                out.dit_parameters += math.prod(info.shape)
                out.dit_bytes += info.nbytes
            seen |= names
            dit_files.add(f.resolve())
        absent = sorted(set(expected) - seen)
        if absent:
            raise LongcatError(f"{ckpt.transformer_dir}: tensor '{absent[0]}' is missing "
                               f"({len(absent)} of {len(expected)} absent): an incomplete download")
        out.dit_tensors, out.dit_shards = len(seen), len(by_file)
        out.safetensors_files += len(by_file)
    rels = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.safetensors")
                  if ".cache" not in p.relative_to(root).parts)
    for rel in filter_repo_objects(rels, allow_patterns=patterns):
        f = root / rel
        layouts.check_contained(f, allowed)
        if f.resolve() in dit_files:
            continue
        read_header(f)
        out.safetensors_files += 1
    return out
