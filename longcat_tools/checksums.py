"""SHA-256 of every byte a command writes, computed while writing, kept in ``checksums.sha256``.

Hashing runs in one background thread (hashlib releases the GIL on large buffers), so a writer
that reads, writes and hashes keeps both cores busy instead of hashing after the fact. The
manifest is in ``sha256sum`` format (``<hex>  <path>``), so ``sha256sum -c checksums.sha256``
checks a checkpoint with no tool installed.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import queue
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path

from longcat_tools.errors import LongcatError

MANIFEST = "checksums.sha256"
# Slices of about this size keep the written bytes in the CPU cache until the hash thread reads
# them; measured on a 2-core VM, 1 MiB slices copy and hash faster than 4 or 16 MiB ones.
SLICE = 1 << 20
KERNEL_CHUNK = 8 << 20
# copy_file_range is used until the kernel refuses it once (old kernels, other file systems).
_KERNEL_COPY = hasattr(os, "copy_file_range")
_NO_KERNEL_COPY = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF,
                   errno.EPERM}


class BufferRing:
    """A fixed set of reusable buffers: no allocation (and no page faults) per chunk."""

    def __init__(self, size: int = SLICE, count: int = 16) -> None:
        self.size = size
        self._free: queue.Queue = queue.Queue()
        for _ in range(count):
            self._free.put(bytearray(size))

    def get(self) -> bytearray:
        return self._free.get()

    def put(self, buf: bytearray) -> None:
        self._free.put(buf)


class HashPool:
    """One thread that feeds byte buffers to their hashers in the order they were handed over.

    A buffer given to :meth:`update` must not change until it is hashed; ``release`` (if any)
    is called then, e.g. to give the buffer back to a :class:`BufferRing`.
    """

    def __init__(self, depth: int = 128) -> None:
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            h, data, release = item
            if isinstance(data, Future):
                if self._error is not None:
                    data.set_exception(self._error)
                else:
                    data.set_result(h.hexdigest())
                continue
            try:
                h.update(data)
            except BaseException as e:  # noqa: BLE001 - reported to the writer
                self._error = e
            if release is not None:
                release()

    def new(self):
        return hashlib.sha256()

    def update(self, h, data, release: Callable[[], None] | None = None) -> None:
        if self._error is not None:
            raise self._error
        self._q.put((h, data, release))

    def digest_later(self, h) -> Future:
        """The hex digest once every buffer handed over so far is hashed (no waiting now)."""
        fut: Future = Future()
        self._q.put((h, fut, None))
        return fut

    def hexdigest(self, h) -> str:
        return self.digest_later(h).result()

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()

    def __enter__(self) -> HashPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class HashingFile:
    """A new file whose bytes are hashed as they are written; :meth:`close` returns
    ``(sha256 hex, size)`` (and fsyncs unless told not to)."""

    def __init__(self, path: Path, pool: HashPool) -> None:
        self.path = path
        self._pool = pool
        self._h = pool.new()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self.size = 0

    def _write_all(self, view: memoryview) -> None:
        while view:
            n = os.write(self._fd, view)
            view = view[n:]

    def write(self, data, release: Callable[[], None] | None = None) -> None:
        """Write ``data`` (kept unchanged until hashed) in cache-sized slices."""
        view = memoryview(data).cast("B")
        n = len(view)
        for i in range(0, n, SLICE):
            part = view[i:i + SLICE]
            self._write_all(part)
            last = i + SLICE >= n
            self._pool.update(self._h, part, release if last else None)
        if n == 0 and release is not None:
            release()
        self.size += n

    def copy_from(self, fd: int, offset: int, n: int, ring: BufferRing,
                  progress: Callable[[int], None] | None = None) -> None:
        """Append ``n`` bytes at ``offset`` of the open file ``fd``.

        The kernel copies them (``copy_file_range``: no trip through user space) while the hash
        thread reads the same page-cache pages through a short-lived read-only mapping; where the
        kernel cannot, the bytes go through ``ring``'s buffers instead.
        """
        end = offset + n
        global _KERNEL_COPY
        while offset < end and _KERNEL_COPY:
            want = min(KERNEL_CHUNK, end - offset)
            try:
                got = os.copy_file_range(fd, self._fd, want, offset)
            except OSError as e:
                if e.errno not in _NO_KERNEL_COPY:
                    raise
                _KERNEL_COPY = False
                break
            if got <= 0:
                raise LongcatError(f"unexpected end of file at byte {offset} of a source file "
                                   "(truncated while converting?)")
            start = offset - offset % mmap.ALLOCATIONGRANULARITY
            mm = mmap.mmap(fd, offset + got - start, prot=mmap.PROT_READ, offset=start)
            view = memoryview(mm)[offset - start:]

            def release(view=view, mm=mm) -> None:
                view.release()
                mm.close()

            self._pool.update(self._h, view, release)
            self.size += got
            offset += got
            if progress:
                progress(got)
        while offset < end:
            buf = ring.get()
            want = min(ring.size, end - offset)
            view = memoryview(buf)[:want]
            got = 0
            while got < want:
                k = os.preadv(fd, [view[got:]], offset + got)
                if k <= 0:
                    ring.put(buf)
                    raise LongcatError(f"unexpected end of file at byte {offset + got} of a "
                                       "source file (truncated while converting?)")
                got += k
            self._write_all(view)
            self._pool.update(self._h, view, lambda b=buf: ring.put(b))
            self.size += want
            offset += want
            if progress:
                progress(want)

    def close(self, fsync: bool = True) -> tuple[str, int]:
        if fsync:
            os.fsync(self._fd)
        os.close(self._fd)
        return self._pool.hexdigest(self._h), self.size

    def close_later(self) -> Future:
        """Close without fsync or waiting for the hash: a future of the hex digest."""
        os.close(self._fd)
        return self._pool.digest_later(self._h)

    def abort(self) -> None:
        os.close(self._fd)


def copy_hashed(src: Path, dst: Path, pool: HashPool, ring: BufferRing,
                progress=None) -> Future:
    """Copy a file, hashing what is written; returns a future of its sha256 hex."""
    out = HashingFile(dst, pool)
    try:
        fd = os.open(src, os.O_RDONLY)
        try:
            out.copy_from(fd, 0, os.fstat(fd).st_size, ring, progress)
        finally:
            os.close(fd)
    except BaseException:
        out.abort()
        raise
    return out.close_later()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(16 * SLICE):
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
