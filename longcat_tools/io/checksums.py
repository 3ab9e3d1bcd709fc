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
import re
import stat
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from longcat_tools.errors import LongcatError, why_not_a_file
from longcat_tools.io import jsonio
from longcat_tools.io.atomic import atomic_write_text, file_lock
from longcat_tools.io.sources import Sources, aligned

MANIFEST = "checksums.sha256"
# Default buffer size of a BufferRing (convert casts 1 MiB of source at a time).
SLICE = 1 << 20
# Output files are written from a few staging buffers of this size, with O_DIRECT where the file
# system allows: measured on a 2-vCPU VM with an ext4 virtio disk, 2 GB written this way (and
# hashed) took 1.4 s where ``cp`` + ``sync`` took 2.9-6.9 s, since the page cache is bypassed
# (no second copy, no writeback threads, nothing left to flush at the end).
STAGE = 8 << 20
STAGES = 4
ENV_NO_DIRECT = "LONGCAT_TOOLS_NO_DIRECT_IO"
LOCK_TIMEOUT_S = 60.0


class BufferRing:
    """A fixed set of reusable page-aligned buffers: no allocation (and no page faults) per
    chunk, and usable for O_DIRECT."""

    def __init__(self, size: int = SLICE, count: int = 16) -> None:
        self.size = aligned(size)
        self._free: queue.Queue = queue.Queue()
        for _ in range(count):
            self._free.put(mmap.mmap(-1, self.size))

    def get(self) -> mmap.mmap:
        return self._free.get()

    def put(self, buf: mmap.mmap) -> None:
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


def _open_output(path: Path) -> tuple[int, bool]:
    """A new file for writing, with O_DIRECT where the file system takes it (tmpfs does not)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    direct = getattr(os, "O_DIRECT", 0)
    if direct and not os.environ.get(ENV_NO_DIRECT):
        try:
            return os.open(path, flags | direct, 0o644), True
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
    return os.open(path, flags, 0o644), False


class Writers:
    """What hashing files share: the hash thread, one write thread (so reading the next chunk
    overlaps writing the last) and the staging buffers between them."""

    def __init__(self, stage: int = STAGE, count: int = STAGES) -> None:
        self.pool = HashPool()
        self.ring = BufferRing(stage, count)
        self.io = ThreadPoolExecutor(1, thread_name_prefix="write")

    def file(self, path: Path) -> HashingFile:
        return HashingFile(path, self)

    def close(self) -> None:
        self.io.shutdown(wait=True)
        self.pool.close()

    def __enter__(self) -> Writers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _AfterBoth:
    """Calls ``fn`` on the second call: a staging buffer is free once hashed and written."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self._fn = fn
        self._left = 2
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            self._fn()


class HashingFile:
    """A new file whose bytes are hashed as they are written.

    Bytes are gathered in the staging buffers; a full buffer goes to the hash thread and to the
    write thread (one ``pwrite``, O_DIRECT where possible: the last, partial block is padded and
    the file truncated back) and returns to the ring when both are done with it.
    """

    def __init__(self, path: Path, writers: Writers) -> None:
        self.path = path
        self._w = writers
        self._h = writers.pool.new()
        self._fd, self._direct = _open_output(path)
        self._buf: mmap.mmap | None = None
        self._fill = 0
        self._pending: deque[Future] = deque()
        self._padded = False  # a block was written past the end: truncate at the finish
        self.size = 0

    def _space(self) -> memoryview:
        if self._buf is None:
            self._buf = self._w.ring.get()
            self._fill = 0
        return memoryview(self._buf)[self._fill:]

    def _added(self, n: int) -> None:
        self._fill += n
        self.size += n
        if self._buf is not None and self._fill == len(self._buf):
            self._flush()

    def _flush(self) -> None:
        buf, n = self._buf, self._fill
        if buf is None:
            return
        self._buf = None
        ring = self._w.ring
        if n == 0:
            ring.put(buf)
            return
        view = memoryview(buf)
        done = _AfterBoth(lambda: ring.put(buf))
        self._w.pool.update(self._h, view[:n], done)
        length = aligned(n) if self._direct else n
        self._padded |= length > n
        self._pending.append(self._w.io.submit(self._pwrite_all, view[:length], self.size - n,
                                               done))
        while self._pending and self._pending[0].done():
            self._pending.popleft().result()  # a failed write stops the writer here

    def _pwrite_all(self, view: memoryview, offset: int, done: Callable[[], None]) -> None:
        try:
            while view:
                try:
                    k = os.pwrite(self._fd, view, offset)
                except OSError as e:
                    if not (self._direct and e.errno == errno.EINVAL):
                        raise
                    # accepted at open, refused at write (some network and FUSE file systems)
                    import fcntl

                    fcntl.fcntl(self._fd, fcntl.F_SETFL,
                                fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                    self._direct = False
                    continue
                view, offset = view[k:], offset + k
        finally:
            done()

    def write(self, data) -> None:
        """Append ``data`` (copied into the staging buffers)."""
        view = memoryview(data).cast("B")
        while view:
            space = self._space()
            k = min(len(space), len(view))
            space[:k] = view[:k]
            view = view[k:]
            self._added(k)

    def copy_from(self, sources: Sources, path: Path, offset: int, n: int,
                  progress: Callable[[int], None] | None = None) -> None:
        """Append ``n`` bytes at ``offset`` of ``path``, read straight into the staging
        buffers."""
        end = offset + n
        while offset < end:
            space = self._space()
            want = min(len(space), end - offset)
            got = sources.read(path, offset, space[:want])
            if got <= 0:
                raise LongcatError(f"{path}: unexpected end of file at byte {offset} "
                                   "(truncated while converting?)")
            offset += got
            self._added(got)
            if progress:
                progress(got)

    def _finish(self) -> None:
        self._flush()
        while self._pending:
            self._pending.popleft().result()
        if self._padded:  # even if O_DIRECT was refused after the padded block was queued
            os.ftruncate(self._fd, self.size)

    def close(self, fsync: bool = True) -> tuple[str, int]:
        """Flush, fsync unless told not to, close; ``(sha256 hex, size)``."""
        self._finish()
        if fsync:
            os.fsync(self._fd)
        self._close_fd()
        return self._w.pool.hexdigest(self._h), self.size

    def close_later(self) -> Future:
        """Flush and close without fsync or waiting for the hash: a future of the hex digest."""
        self._finish()
        self._close_fd()
        return self._w.pool.digest_later(self._h)

    def abort(self) -> None:
        """Close after a failure; the file is left for the caller's scratch folder to remove."""
        if self._buf is not None:
            self._w.ring.put(self._buf)
            self._buf = None
        for f in self._pending:
            f.exception()  # wait: the write thread must be done with this descriptor
        self._close_fd()

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def copy_hashed(src: Path, dst: Path, writers: Writers, sources: Sources,
                progress: Callable[[int], None] | None = None) -> Future:
    """Copy a file, hashing what is written; returns a future of its sha256 hex."""
    out = writers.file(dst)
    try:
        out.copy_from(sources, src, 0, os.fstat(sources.fd(src)).st_size, progress)
        return out.close_later()
    except BaseException:
        out.abort()
        raise


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    """The sha256 hex of a file already on disk, read in large blocks; ``progress`` gets the
    bytes of each block."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(16 * SLICE):
            h.update(chunk)
            if progress:
                progress(len(chunk))
    return h.hexdigest()


def unlistable(rel: str) -> str | None:
    """Why a path cannot be a line of ``checksums.sha256``, or None."""
    if "\n" in rel or "\\" in rel:
        return "a newline or backslash in its name"
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return "bytes in its name that are not UTF-8"
    return None


def format_manifest(digests: Mapping[str, str]) -> str:
    """``sha256sum`` lines, sorted by path (POSIX separators, relative to the folder)."""
    for rel in digests:
        why = unlistable(rel)
        if why is not None:
            raise LongcatError(f"cannot list {rel!r} in {MANIFEST} ({why})")
    return "".join(f"{digests[rel]}  {rel}\n" for rel in sorted(digests))


def check_carried(path: Path, rel: str) -> None:
    """A file a command carries into a new checkpoint as it is (hard link or copy), checked
    while planning: a FIFO hung the final fsync, an unreadable file failed the copy (or that
    fsync) half way, and a name the checksums cannot list failed after every byte was
    written. ``rel``: its path in the output."""
    try:
        st = os.stat(path)
    except OSError:
        raise LongcatError(f"{path}: {why_not_a_file(path)}; fix or remove it") from None
    if not stat.S_ISREG(st.st_mode):
        raise LongcatError(f"{path}: not a regular file (a FIFO, socket or device is no part of "
                           "a checkpoint); remove it")
    try:
        os.close(os.open(path, os.O_RDONLY))
    except OSError as e:
        raise LongcatError(f"{path}: cannot read ({e.strerror})") from None
    why = unlistable(rel)
    if why is not None:
        raise LongcatError(f"{path}: cannot be listed in {MANIFEST} ({why}); rename it")


_LINE = re.compile(r"^(?P<esc>\\?)(?P<hex>[0-9a-fA-F]{64}) [ *](?P<name>.+)$")


def parse_manifest(text: str) -> tuple[list[tuple[int, str, str]], list[str]]:
    """The lines of a ``sha256sum`` file as ``(line number, path, lower-case hex)``, plus one
    problem per malformed line. Blank and ``#`` lines are skipped; sha256sum's escaped names
    (a leading ``\\``) are unescaped and a leading ``./`` dropped. Paths are not checked here."""
    entries: list[tuple[int, str, str]] = []
    problems: list[str] = []
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            problems.append(f"line {no} is not a sha256sum line ('<sha256>  <file>'): "
                            f"{line[:60]!r}")
            continue
        name = m["name"]
        if m["esc"]:  # sha256sum escapes \ and newline in names and marks the line with \
            name = name.replace("\\n", "\n").replace("\\\\", "\\")
        entries.append((no, name.removeprefix("./"), m["hex"].lower()))
    return entries, problems


def read_manifest(path: Path) -> dict[str, str]:
    """Path -> hex of a ``sha256sum`` file; a malformed line or a path listed twice is a
    LongcatError naming it."""
    text = jsonio.read_text(path, what="checksum list")
    entries, problems = parse_manifest(text)
    if problems:
        raise LongcatError(f"{path}: {problems[0]}")
    out: dict[str, str] = {}
    for no, rel, hexd in entries:
        if rel in out:
            raise LongcatError(f"{path}: line {no}: '{rel}' is listed twice")
        out[rel] = hexd
    return out


def check_refreshable(root: Path) -> None:
    """Refuse, before a command changes anything, a ``root/checksums.sha256`` that
    ``refresh_manifest`` could not rewrite in place: a link (it was read through and replaced
    by a file holding whatever it pointed at) or anything but a regular file."""
    from longcat_tools.checkpoint.layouts import check_plain

    check_plain(Path(root) / MANIFEST, "the checksum list")


def refresh_manifest(root: Path, changed: Iterable[Path]) -> None:
    """Keep ``root/checksums.sha256`` true after a command changed files in place (``bsa``, the
    ``lora`` registry and adapters): a listed file that is, or lies under, one of ``changed`` is
    hashed again, or its line dropped when it is gone. Files the list does not name stay
    unnamed; without a list there is nothing to do."""
    from longcat_tools.checkpoint.layouts import inside

    manifest = Path(root) / MANIFEST
    check_refreshable(root)
    if not manifest.is_file():
        return
    top = os.path.abspath(root)
    rels = [Path(os.path.relpath(os.path.abspath(p), top)).as_posix() for p in changed]
    with file_lock(manifest.with_name(MANIFEST + ".lock"), LOCK_TIMEOUT_S,
                   "another longcat-tools command"):
        listed = read_manifest(manifest)
        fresh = dict(listed)
        for rel in listed:
            if any(rel == r or rel.startswith(r + "/") for r in rels):
                path = inside(manifest.parent, rel, "manifest entry")
                if path.is_file():
                    fresh[rel] = sha256_file(path)
                else:
                    del fresh[rel]
        if fresh != listed:
            atomic_write_text(manifest, format_manifest(fresh))


def check_manifest(folder: Path, manifest: str = MANIFEST) -> dict[str, str]:
    """Re-hash every file the manifest lists; returns path -> problem for those that differ
    or are missing (empty when all match)."""
    from longcat_tools.checkpoint.layouts import inside

    bad: dict[str, str] = {}
    for rel, hexd in read_manifest(folder / manifest).items():
        path = inside(folder, rel, "manifest entry")
        if not path.is_file():
            bad[rel] = "missing"
        elif sha256_file(path) != hexd:
            bad[rel] = "checksum differs"
    return bad
