"""All-or-nothing outputs: a folder or file appears complete under its final name, or not at all.

Writers fill ``DST.partial`` and rename it at the end, so a run killed at any moment never leaves a
DST that looks complete; the next run removes the stale ``.partial`` and starts again.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from longcat_tools.errors import LongcatError


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened).

    Kept here, free of torch, so that small writers (``bsa``) start fast."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Make every file and folder entry under ``root`` durable before its final rename. Done
    once at the end, like ``cp`` then ``sync``: the kernel writes back while the writer runs,
    where a per-file fsync would stall it on each file in turn."""
    paths = sorted(Path(root).rglob("*"), reverse=True) + [Path(root)]
    for p in paths:
        if p.is_symlink():
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def try_link(src: Path, dst: Path) -> bool:
    """Hard-link ``src`` as ``dst``, a symlink followed to its real file (a hard link to the
    link would dangle in its new place); False where the file system cannot, so the caller
    copies it."""
    try:
        os.link(Path(src).resolve(), dst)
        return True
    except OSError:
        return False


def partial_path(dst: Path) -> Path:
    return dst.with_name(dst.name + ".partial")


@contextmanager
def atomic_folder(dst: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a scratch folder that becomes ``dst`` when the block succeeds."""
    dst = Path(dst)
    if dst.exists() and not force:
        raise LongcatError(f"{dst}: already exists (pass --force to replace it)")
    if not dst.parent.is_dir():
        raise LongcatError(f"{dst.parent}: output's parent folder does not exist")
    tmp = partial_path(dst)
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a killed run; it never was a finished output
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.rename(dst, old)
    os.rename(tmp, dst)
    fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    """Replace a file's content atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            shutil.copymode(path, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


@contextmanager
def file_lock(lock: Path, timeout: float, holder: str = "another process") -> Iterator[None]:
    """An exclusive ``flock`` on ``lock`` (created, and removed on release), so concurrent
    writers queue up. A holder that dies releases it (the kernel drops flocks); after locking we
    check the file is still the one on disk, because a releasing holder may have just removed it.
    """
    import fcntl

    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise LongcatError(f"{lock}: cannot create the lock file ({e.strerror}); is the "
                               "checkpoint read-only?") from e
        try:
            delay = 0.001
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise LongcatError(f"{lock}: {holder} has held the lock for over "
                                           f"{timeout:.0f} s; try again when it is done") from None
                    time.sleep(delay)
                    delay = min(delay * 2, 0.02)
            try:
                on_disk, mine = os.stat(lock), os.fstat(fd)
                current = (on_disk.st_dev, on_disk.st_ino) == (mine.st_dev, mine.st_ino)
            except FileNotFoundError:
                current = False
        except BaseException:
            os.close(fd)
            raise
        if current:
            break
        os.close(fd)
    try:
        yield
    finally:
        try:
            os.unlink(lock)
        except FileNotFoundError:
            pass
        os.close(fd)
