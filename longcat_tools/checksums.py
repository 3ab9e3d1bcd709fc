"""SHA-256 of every byte a command writes, computed while writing, kept in ``checksums.sha256``.

Hashing runs in one background thread (hashlib releases the GIL on large buffers), so a writer
that reads, writes and hashes keeps both cores busy instead of hashing after the fact. The
manifest is in ``sha256sum`` format (``<hex>  <path>``), so ``sha256sum -c checksums.sha256``
checks a checkpoint with no tool installed.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path

from longcat_tools.errors import LongcatError

MANIFEST = "checksums.sha256"
_CHUNK = 16 << 20


class HashPool:
    """One thread that feeds byte buffers to their hashers in the order they were handed over.

    A buffer given to :meth:`update` must not change afterwards (the thread reads it later).
    """

    def __init__(self, depth: int = 6) -> None:
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            h, data = item
            if isinstance(data, Future):
                data.set_result(h.hexdigest())
            else:
                h.update(data)

    def new(self):
        return hashlib.sha256()

    def update(self, h, data) -> None:
        if len(data):
            self._q.put((h, data))

    def hexdigest(self, h) -> str:
        fut: Future = Future()
        self._q.put((h, fut))
        return fut.result()

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()

    def __enter__(self) -> HashPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class HashingFile:
    """A new file whose bytes are hashed as they are written; :meth:`close` fsyncs it and
    returns ``(sha256 hex, size)``."""

    def __init__(self, path: Path, pool: HashPool) -> None:
        self.path = path
        self._pool = pool
        self._h = pool.new()
        self._f = open(path, "xb", buffering=0)
        self.size = 0

    def write(self, data) -> None:
        view = memoryview(data)
        while view:
            n = self._f.write(view)
            view = view[n:]
        self._pool.update(self._h, data)
        self.size += len(data)

    def close(self, fsync: bool = True) -> tuple[str, int]:
        if fsync:
            os.fsync(self._f.fileno())
        self._f.close()
        return self._pool.hexdigest(self._h), self.size

    def abort(self) -> None:
        self._f.close()


def copy_hashed(src: Path, dst: Path, pool: HashPool, progress=None,
                fsync: bool = True) -> tuple[str, int]:
    """Copy a file chunk by chunk, hashing what is written; returns ``(sha256 hex, size)``."""
    out = HashingFile(dst, pool)
    try:
        with open(src, "rb", buffering=0) as f:
            while chunk := f.read(_CHUNK):
                out.write(chunk)
                if progress:
                    progress(len(chunk))
    except BaseException:
        out.abort()
        raise
    return out.close(fsync)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def format_manifest(digests: Mapping[str, str]) -> str:
    """``sha256sum`` lines, sorted by path (POSIX separators, relative to the folder)."""
    for rel in digests:
        if "\n" in rel or "\\" in rel:
            raise LongcatError(f"cannot list '{rel}' in {MANIFEST} (newline or backslash in name)")
    return "".join(f"{digests[rel]}  {rel}\n" for rel in sorted(digests))


def read_manifest(path: Path) -> dict[str, str]:
    """Path -> hex of a ``sha256sum`` file; a malformed line is a LongcatError naming it."""
    out: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise LongcatError(f"{path}: cannot read ({e.strerror or e})") from e
    for i, line in enumerate(text.splitlines(), 1):
        hexd, sep, rel = line.partition("  ")
        if not sep or len(hexd) != 64 or any(c not in "0123456789abcdef" for c in hexd) or not rel:
            raise LongcatError(f"{path}:{i}: not a sha256sum line: {line[:80]!r}")
        if rel.startswith("*"):
            rel = rel[1:]
        if rel in out:
            raise LongcatError(f"{path}:{i}: '{rel}' is listed twice")
        out[rel] = hexd
    return out


def check_manifest(folder: Path, manifest: str = MANIFEST) -> dict[str, str]:
    """Re-hash every file the manifest lists; returns path -> problem for those that differ
    or are missing (empty when all match)."""
    from longcat_tools.layouts import inside

    bad: dict[str, str] = {}
    for rel, hexd in read_manifest(folder / manifest).items():
        path = inside(folder, rel, "manifest entry")
        if not path.is_file():
            bad[rel] = "missing"
        elif sha256_file(path) != hexd:
            bad[rel] = "checksum differs"
    return bad
