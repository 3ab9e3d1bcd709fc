"""The one error type a user sees, and the exit codes every command shares."""

from __future__ import annotations

import errno
import os
import stat

EXIT_OK = 0
EXIT_FAIL = 1  # a check failed or the input is bad
EXIT_USAGE = 2  # the command line itself is wrong


class LongcatError(Exception):
    """A problem the user can fix: printed as one line (what, where, how to fix), exit 1.

    Library code raises it instead of printing, so other programs can catch it.
    """

    exit_code = EXIT_FAIL


class UsageError(LongcatError):
    """The command line is wrong: a value outside its option's range or choices, options that
    contradict each other or the checkpoint, a path that names nothing or a place the command
    may not write: exit 2."""

    exit_code = EXIT_USAGE


EMPTY_PATH = "an empty path; name the file or folder"


def refuse_empty(path: object, what: str) -> None:
    """'' where a path is expected: ``Path('')`` is the current folder, so an empty name meant
    '.' without a word (or, for --model, "not given")."""
    if path == "":
        raise UsageError(f"{what}: {EMPTY_PATH}")


def why_not_a_file(path: str | os.PathLike[str], folder_hint: str = "give the file") -> str:
    """Why ``path`` is not a regular file to read, in a few words: what the user sees after
    ``--image PATH: ``."""
    try:
        mode = os.stat(path).st_mode
    except ValueError:  # a NUL character
        return "not a valid path"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symlink loop"
        if e.errno == errno.ENOTDIR:
            return "no such file (a part of the path is a file)"
        if e.errno == errno.ENOENT and os.path.islink(path):
            return f"a broken symlink (to {os.readlink(path)})"
        return "no such file" if e.errno == errno.ENOENT else f"cannot be read ({e.strerror})"
    if stat.S_ISDIR(mode):
        return f"a folder; {folder_hint}"
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device")):
        if test(mode):
            return f"{kind}, not a regular file"
    return "not a regular file"
