"""All-or-nothing outputs: a folder or file appears complete under its final name, or not at all.

Writers fill ``DST.partial`` and rename it at the end, so a run killed at any moment never leaves a
DST that looks complete; the next run removes the stale ``.partial`` (one the killed run's lock
file shows to be ours) and starts again. One writer
at a time per destination (a lock file beside it), and one ``--force`` rule for every command.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

from longcat_tools.errors import LongcatError, UsageError

log = logging.getLogger(__name__)
WAIT_NOTE_S = 2.0  # a lock wait this long gets a line saying what the command waits for


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


def lock_path(dst: Path) -> Path:
    """The writer lock of ``dst``: a hidden file beside it (not inside, so it never becomes part
    of the output, and not ``DST.partial``, which the writer deletes and renames)."""
    return dst.with_name(f".{dst.name}.lock")


@dataclass(frozen=True)
class _Kind:
    """What a command writes, and why an existing path is not one (None when it is)."""

    name: str
    problem: Callable[[Path], str | None]


def _avatar_dit(path: Path) -> bool:
    from longcat_tools.checkpoint.layouts import avatar_version

    version = avatar_version(path)
    return version is not None and any(
        (path / d / "config.json").is_file()
        for d in (*version.dit_folders, *([version.int8_folder] if version.int8_folder else [])))


def real_path(path: Path) -> Path:
    """``path`` with its links followed; a link loop is one line, not a traceback."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: Python < 3.13's "Symlink loop"
        raise LongcatError(f"{path}: cannot be resolved ({e}); remove the link loop") from None


def enclosing_checkpoint(path: Path) -> Path | None:
    """The checkpoint folder ``path`` would be written inside (links followed): the nearest
    folder above it with a DiT config (``dit/``, ``transformer/`` or an avatar's) or the one
    file of ``convert --to comfy``. Why: a stray file in a checkpoint can be read as part of the
    model (a shard, an adapter)."""
    from longcat_tools.checkpoint.comfy_single import FILE_NAME as COMFY_FILE

    for folder in real_path(path).parents:
        if ((folder / "dit" / "config.json").is_file()
                or (folder / "transformer" / "config.json").is_file() or _avatar_dit(folder)
                or (folder / COMFY_FILE).is_file()):
            return folder
    return None


def _checkpoint_problem(path: Path) -> str | None:
    from longcat_tools.checkpoint.comfy_single import FILE_NAME as COMFY_FILE
    from longcat_tools.checkpoint.layouts import looks_like_checkpoint

    if not path.is_dir():
        return "exists and is not a folder; --force only replaces a checkpoint folder"
    if any(path.iterdir()) and not (looks_like_checkpoint(path) or _avatar_dit(path)
                                    or (path / "model_index.json").is_file()
                                    or (path / COMFY_FILE).is_file()):  # convert --to comfy
        return ("exists and does not look like a checkpoint; refusing to replace it even with "
                "--force (remove it yourself)")
    return None


def _safetensors_problem(path: Path) -> str | None:
    """A regular ``.safetensors`` file whose first bytes are a safetensors header."""
    if not path.is_file() or not path.name.endswith(".safetensors"):
        return "exists and is not a .safetensors file; --force only replaces one"
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return ("exists and is not a safetensors file (no header); refusing to replace it even "
                "with --force (remove it yourself)")
    return None


REPLACEABLE = {k.name: k for k in (_Kind("checkpoint", _checkpoint_problem),
                                   _Kind("safetensors", _safetensors_problem))}


def check_named(dst: Path) -> None:
    """An output path names its own entry: not '', '.' or '..', whose scratch name
    (``DST.partial``) would land beside the current folder or its parent."""
    if Path(dst).name in ("", ".", ".."):
        raise UsageError(f"'{dst}': name the output itself (a path ending in a new or "
                         "replaceable folder or file, not '.', '..' or empty)")


def check_parent(dst: Path) -> None:
    """An output goes into a folder that exists: no command makes missing parents."""
    parent = Path(dst).parent
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"{parent}: output's parent is not a folder")
    if not parent.is_dir():
        raise UsageError(f"{parent}: output's parent folder does not exist (create it first)")


def check_replaceable(dst: Path, what: str, *, source: Path | None = None,
                      force: bool = True, writes: Collection[str] | None = None) -> None:
    """The one ``--force`` rule of every command that writes a new checkpoint or file.

    ``what`` is what the command writes (a key of ``REPLACEABLE``: ``checkpoint`` = a folder that
    is empty or holds ``dit/``, ``transformer/``, ``model_index.json`` or a ComfyUI
    ``diffusion_model.safetensors``; ``safetensors`` = a
    regular ``.safetensors`` file with a header). Refuses with one line: ``dst`` equal to,
    inside or containing ``source`` (or ``source`` being ``DST.partial``, which the run
    deletes); a new checkpoint inside another one; a symlink (never replaced, whatever it
    points to, dangling or not); an existing ``dst`` without ``force``; with ``force``,
    anything that is not ``what``; a missing parent folder. ``writes``: the names at the top of
    the new folder; an old one holding anything else but a checkpoint's parts
    (``layouts.part_names``: your samples/ or notes) is refused, not emptied. A ``dst`` that
    does not exist passes. Run it while planning, and again under the writer lock
    (``atomic_folder`` does).
    """
    from longcat_tools.checkpoint.layouts import part_names

    kind = REPLACEABLE[what]
    check_named(dst)
    dst = Path(dst)
    if source is not None:
        s, d = real_path(Path(source)), real_path(dst)
        if s == d or s in d.parents:
            raise UsageError(f"{dst}: the output may not be inside the source checkpoint {source}")
        if d in s.parents:
            raise UsageError(f"{dst}: the output may not contain the source checkpoint {source}")
        tmp = partial_path(d)
        if s == tmp or tmp in s.parents:
            raise UsageError(f"{source}: is the scratch folder of --dst {dst} (a run would delete "
                             "it); rename it first")
    if dst.is_symlink():  # first: "already exists" hid a dangling link
        raise LongcatError(f"{dst}: is a symbolic link (to {os.readlink(dst)}); no command "
                           "replaces a link or writes through it, even with --force (remove "
                           "the link yourself)")
    if dst.exists():
        if not force:
            raise LongcatError(f"{dst}: already exists (pass --force to replace it)")
        problem = kind.problem(dst)
        if problem is not None:
            raise LongcatError(f"{dst}: {problem}")
        others = sorted(p.name for p in dst.iterdir()
                        if p.name not in writes and p.name not in part_names()) \
            if writes is not None and dst.is_dir() else []
        if others:
            raise LongcatError(f"{dst}: holds {others[0]}, which this run does not write; "
                               "refusing to replace it even with --force (move it out or "
                               "remove it yourself)")
    check_parent(dst)
    if what == "checkpoint":
        check_outside_checkpoints(dst)


def check_outside_checkpoints(dst: Path, what: str = "the new checkpoint") -> None:
    """``dst`` (``what``) is not written inside a checkpoint (``enclosing_checkpoint``)."""
    if (outer := enclosing_checkpoint(dst)) is not None:
        raise UsageError(f"{dst}: inside the checkpoint {outer}; write {what} outside it")


def discard(path: Path) -> None:
    """Remove a scratch or replaced output; a link is removed itself, never followed."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing names in one step (Linux ``renameat2`` with ``RENAME_EXCHANGE``), so
    there is no moment when either is missing; False where the system or file system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    return fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _swap_in(tmp: Path, dst: Path) -> None:
    """Put the finished ``tmp`` at ``dst``. An existing ``dst`` is exchanged with ``tmp`` in one
    step, so ``dst`` is always complete, old or new; a run killed before the old one is deleted
    leaves it as ``DST.partial``, reclaimed by the next run. Where the exchange is not available,
    two renames: a kill between them leaves no ``dst`` (the new one is ``DST.partial``, the old
    one ``.DST.old-PID``)."""
    if not (dst.is_symlink() or dst.exists()):
        os.rename(tmp, dst)
        fsync_dir(dst.parent)
        return
    if exchange(tmp, dst):
        fsync_dir(dst.parent)
        discard(tmp)
        return
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    os.rename(dst, old)
    os.rename(tmp, dst)
    fsync_dir(dst.parent)
    discard(old)


@contextmanager
def writer_lock(dst: Path) -> Iterator[Callable[[Path], None]]:
    """The writer lock of an output ``dst`` (``flock`` on ``.DST.lock`` beside it), for the whole
    write: a second writer is refused at once with one line. Yields the function that removes
    a stale scratch path (``DST.partial``) under it: only one a killed run left, which it knows
    by the lock file that run left behind; anything else of that name is the user's, and the
    write is refused rather than deleting it."""
    lock = lock_path(dst)
    ours: list[Path] = []  # scratch paths cleared for this writer

    # one of ours still there on release (its removal interrupted by a second Ctrl-C) keeps
    # the lock file: the next run's proof that the scratch was a killed run's
    with _held(lock, 0.0, lambda: f"{dst}: another process is writing it (it holds {lock}); "
               "try again when that run is done",
               keep_file=lambda: any(os.path.lexists(p) for p in ours)) as inherited:
        def clear(scratch: Path) -> None:
            if scratch.exists() or scratch.is_symlink():
                if not inherited:  # a link too: ours only where a killed --force run left it
                    raise LongcatError(f"{scratch}: exists, and no killed run of longcat-tools "
                                       f"left it (it would have left {lock}); move it away or "
                                       "remove it")
                discard(scratch)
            ours.append(scratch)

        yield clear


@contextmanager
def atomic_folder(dst: Path, *, force: bool = False, what: str | None = None,
                  writes: Collection[str] | None = None) -> Iterator[Path]:
    """Yield a scratch folder (``DST.partial``) that becomes ``dst`` when the block succeeds.

    The whole write holds the writer lock of ``dst`` (``flock`` on ``.DST.lock`` beside it): a
    second writer to the same ``dst`` is refused at once with one line rather than waiting
    behind a run that may take an hour, and a stale ``DST.partial`` (left by a killed run) is
    deleted only under the lock, never under a live writer, and only when that run's lock file
    is still there to show it was ours (``writer_lock``). ``what`` (a key of ``REPLACEABLE``)
    applies :func:`check_replaceable` again under the lock, with ``writes``; without it any
    existing ``dst`` may be replaced with ``force``. The lock file is removed on release (a
    killed run leaves it; the next run takes it over, the kernel having dropped the dead run's
    lock)."""
    check_named(dst)
    dst = Path(dst)
    if (dst.exists() or dst.is_symlink()) and not force:
        raise LongcatError(f"{dst}: already exists (pass --force to replace it)")
    check_parent(dst)
    with writer_lock(dst) as clear:
        if what is not None:
            check_replaceable(dst, what, force=force, writes=writes)
        tmp = partial_path(dst)
        clear(tmp)  # left by a killed run; it never was a finished output
        tmp.mkdir()
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _swap_in(tmp, dst)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace a file's content atomically (temp file in the same folder, fsync, rename)."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file whole or not at all: a temp file beside it, fsync, rename (a link at
    ``path`` is replaced, never written through). A replaced file keeps its mode; a new one gets
    the usual 0666 less the umask, not mkstemp's 0600."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if path.exists() and not path.is_symlink():
            shutil.copymode(path, tmp)
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def _open_lock(lock: Path) -> tuple[int, bool]:
    """Open (creating) a lock file, and whether this call created it: never through a symlink
    (a link planted there would make us create or lock a file elsewhere), never a FIFO or
    device (which could block or be shared)."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    created = True
    try:
        try:
            fd = os.open(lock, flags | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            created = False
            fd = os.open(lock, flags | os.O_CREAT, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise LongcatError(f"{lock}: the lock file is a symbolic link; remove it (a lock is "
                               "never taken through a link)") from e
        if e.errno == errno.EISDIR:
            raise LongcatError(f"{lock}: the lock file is a folder; remove it") from e
        raise LongcatError(f"{lock}: cannot create the lock file ({e.strerror}); is the "
                           "folder read-only?") from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LongcatError(f"{lock}: the lock file is not a regular file; remove it")
    return fd, created


@contextmanager
def _held(lock: Path, timeout: float, busy: Callable[[], str],
          waiting: str | None = None,
          keep_file: Callable[[], bool] = lambda: False) -> Iterator[bool]:
    """An exclusive ``flock`` on ``lock`` (created, and removed on release unless
    ``keep_file()``); after ``timeout`` seconds of waiting, a LongcatError with ``busy()``;
    ``waiting`` is logged once when the wait passes ``WAIT_NOTE_S``, so a queued command does
    not look hung. A holder that dies
    releases it (the kernel drops flocks) but leaves the file: yields True when the lock file
    was there before us, i.e. a run died holding it. After locking we check the file is still
    the one on disk, because a releasing holder may have just removed it."""
    start = time.monotonic()
    deadline = start + timeout
    noted = waiting is None
    while True:
        fd, created = _open_lock(lock)
        try:
            delay = 0.001
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    now = time.monotonic()
                    if now >= deadline:
                        raise LongcatError(busy()) from None
                    if not noted and now - start >= WAIT_NOTE_S:
                        log.warning(waiting)
                        noted = True
                    time.sleep(delay)
                    delay = min(delay * 2, 0.02)
            try:
                on_disk, mine = os.stat(lock, follow_symlinks=False), os.fstat(fd)
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
        yield not created
    finally:
        try:
            if not keep_file():
                os.unlink(lock)
        except FileNotFoundError:
            pass
        os.close(fd)


def file_lock(lock: Path, timeout: float,
              holder: str = "another process") -> AbstractContextManager[bool]:
    """An exclusive ``flock`` on ``lock`` for a short read-modify-write: concurrent writers queue
    up for ``timeout`` seconds, then give up with one line."""
    return _held(lock, timeout, lambda: f"{lock}: {holder} has held the lock for over "
                 f"{timeout:.0f} s; try again when it is done",
                 f"{lock}: waiting for {holder} to finish (at most {timeout:.0f} s)")
