"""A real Hugging Face cache layout built from a local folder, and the hub's answer about it.

``models--org--name/{blobs/<sha256 for LFS files, git sha1 for small ones>, refs/<branch>
(commit hash text, no newline), snapshots/<commit>/<path> -> relative symlinks to ../../blobs/}``,
as huggingface_hub writes it; optionally its tree listing (``trees/<commit>.json``). The same
helper answers ``HfApi.model_info(files_metadata=True)`` for the folder, as the hub would.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from huggingface_hub.hf_api import ModelInfo

REPO = "meituan-longcat/LongCat-Video"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_SUFFIXES = (".safetensors",)


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(rel: str) -> bool:
    return rel.endswith(LFS_SUFFIXES)


def source_files(src: Path) -> dict[str, Path]:
    return {p.relative_to(src).as_posix(): p for p in sorted(src.rglob("*")) if p.is_file()}


def blob_name(rel: str, data: bytes) -> str:
    return hashlib.sha256(data).hexdigest() if is_lfs(rel) else git_sha1(data)


def build_cache(src: Path, cache: Path, repo_id: str = REPO, commit: str = COMMIT,
                ref: str | None = "main", tree: bool = False,
                only: list[str] | None = None) -> Path:
    """Put ``src`` into ``cache`` as ``repo_id`` at ``commit``; return the snapshot folder.
    ``only`` limits the files placed in the snapshot (a partial download); ``tree`` also writes
    huggingface_hub's tree listing of all files."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    listing = {}
    for rel, p in source_files(src).items():
        data = p.read_bytes()
        name = blob_name(rel, data)
        entry = {"size": len(data), "blob_id": git_sha1(data)}
        if is_lfs(rel):
            pointer = (f"version https://git-lfs.github.com/spec/v1\noid sha256:{name}\n"
                       f"size {len(data)}\n")
            entry = {"size": len(data), "blob_id": git_sha1(pointer.encode()),
                     "lfs_sha256": name, "lfs_size": len(data)}
        listing[rel] = entry
        if only is not None and not any(rel.startswith(o) or rel == o for o in only):
            continue
        blob = repo / "blobs" / name
        if not blob.exists():
            blob.write_bytes(data)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    if ref:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    if tree:
        (repo / "trees").mkdir(exist_ok=True)
        (repo / "trees" / f"{commit}.json").write_text(
            json.dumps({"format_version": 1, "files": listing}, indent=1))
    return snap


def model_info(src: Path, repo_id: str = REPO, commit: str = COMMIT) -> ModelInfo:
    """What ``HfApi().model_info(repo_id, files_metadata=True)`` returns for ``src``."""
    siblings = []
    for rel, p in source_files(src).items():
        data = p.read_bytes()
        s = {"rfilename": rel, "size": len(data), "blobId": git_sha1(data)}
        if is_lfs(rel):
            s["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                        "pointerSize": 134}
            s["blobId"] = "f" * 40  # the pointer's id: never compared with the content
        siblings.append(s)
    return ModelInfo(id=repo_id, sha=commit, siblings=siblings)


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst
