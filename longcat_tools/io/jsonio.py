"""The one way the tools read and write JSON: every file, every header, every metadata string.

Python's ``json`` accepts things no config should hold and fails in ways a user cannot act on: it
blocks forever on a FIFO, reads a 100 GB sparse file into memory, keeps the last of two equal keys,
takes ``NaN``/``Infinity`` (and ``1e999``, which becomes inf), raises a bare ``ValueError`` on an
integer beyond the interpreter's digit limit and a ``RecursionError`` on deep nesting. Here each of
those is a :class:`JsonError`: one line naming the file as the caller gave it. Writing is strict
(``allow_nan=False``), so nothing the tools write is rejected by a strict reader.
"""

from __future__ import annotations

import json
import math
import os
import stat
import sys
from pathlib import Path
from typing import Any

from longcat_tools.errors import LongcatError

MAX_BYTES = 64 * 1024 * 1024  # the real DiT index is ~100 KB; anything near this is hostile
MAX_DEPTH = 64  # real configs nest < 10 deep; recursive consumers stay far from their limit
_CHUNK = 1 << 20


class JsonError(LongcatError):
    """A file or string that is not acceptable JSON; ``reason`` is the message without the place."""

    def __init__(self, where: str | Path, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where = str(where)
        self.reason = reason


class Missing(JsonError):
    """No file by that name (callers with a better hint catch this one)."""


class DuplicateKey(JsonError):
    """An object names a key twice (``json`` would silently keep the last one)."""

    def __init__(self, where: str | Path, key: str) -> None:
        super().__init__(where, f"key '{key}' appears twice")
        self.key = key


def kind_of(mode: int) -> str:
    """What a file of this ``st_mode`` is, in words, for messages."""
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a folder"),
                       (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a symlink")):
        if test(mode):
            return name
    return "a special file"


def read_text(path: str | Path, *, what: str, max_bytes: int = MAX_BYTES,
              links: bool = True) -> str:
    """The UTF-8 text of a small regular file. Anything else is refused before it is read: a FIFO
    or device is never opened in a way that can block, a file over ``max_bytes`` is not read.
    ``links=False`` refuses a symlink (for files the tools own and never link); with the default,
    links are followed, as in a Hugging Face cache snapshot (callers check containment)."""
    where = str(path)
    try:
        st = os.stat(path) if links else os.lstat(path)
    except FileNotFoundError:
        raise Missing(where, f"missing ({what})") from None
    except OSError as e:
        raise JsonError(where, f"cannot read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise JsonError(where, f"{kind_of(st.st_mode)}, not a regular file ({what}): replace it "
                               "with the file itself")
    _check_size(where, st.st_size, max_bytes, what)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if not links:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise JsonError(where, f"cannot read ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)  # what was opened, in case the name was swapped since the stat
        if not stat.S_ISREG(st.st_mode):
            raise JsonError(where, f"{kind_of(st.st_mode)}, not a regular file ({what})")
        chunks: list[bytes] = []
        total = 0
        while chunk := os.read(fd, min(_CHUNK, max_bytes + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            _check_size(where, total, max_bytes, what)  # the file grew while being read
    except OSError as e:
        raise JsonError(where, f"cannot read ({e.strerror or e})") from None
    finally:
        os.close(fd)
    return decode(b"".join(chunks), where)


def _check_size(where: str, size: int, max_bytes: int, what: str) -> None:
    if size > max_bytes:
        raise JsonError(where, f"{size:,} bytes, more than the {max_bytes:,}-byte limit for "
                               f"{what} (corrupt, or not the file it claims to be)")


def decode(raw: bytes, where: str | Path) -> str:
    """UTF-8 bytes -> text; invalid bytes are one line naming the place and offset."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JsonError(where, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                               f"{e.start})") from None


def read(path: str | Path, *, what: str, max_bytes: int = MAX_BYTES, links: bool = True) -> Any:
    """Parse a JSON file under every check of :func:`read_text` and :func:`loads`."""
    return loads(read_text(path, what=what, max_bytes=max_bytes, links=links), path)


def loads(text: str, where: str | Path) -> Any:
    """Parse JSON text: duplicate keys, non-finite numbers, integers past the interpreter's digit
    limit and nesting deeper than ``MAX_DEPTH`` are refused, each as one line naming ``where``."""
    def no_dupes(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(pairs)  # at C speed; the loop below runs only when a key repeats
        if len(out) != len(pairs):
            seen: set[str] = set()
            for k, _ in pairs:
                if k in seen:
                    raise DuplicateKey(where, k)
                seen.add(k)
        return out

    if not text.strip():
        raise JsonError(where, "empty (a JSON document is expected)")

    def finite(token: str) -> float:
        value = float(token)
        if not math.isfinite(value):
            non_finite(token)
        return value

    def non_finite(token: str) -> float:
        raise JsonError(where, f"holds the number {token}, which is not finite (JSON has no "
                               "NaN or Infinity): write a finite number or null")

    try:
        doc = json.loads(text, object_pairs_hook=no_dupes, parse_float=finite,
                         parse_constant=non_finite)
    except json.JSONDecodeError as e:
        raise JsonError(where, f"invalid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise JsonError(where, _too_deep()) from None
    except ValueError:  # int(): "Exceeds the limit (4300 digits) for integer string conversion"
        limit = sys.get_int_max_str_digits() if hasattr(sys, "get_int_max_str_digits") else 4300
        raise JsonError(where, f"holds an integer of more than {limit:,} digits, far beyond any "
                               "value a config needs") from None
    if _depth(doc) > MAX_DEPTH:
        raise JsonError(where, _too_deep())
    return doc


def _too_deep() -> str:
    return f"invalid JSON (nested too deeply: more than {MAX_DEPTH} levels)"


def _depth(doc: Any) -> int:
    """Nesting depth of a parsed document, without recursion."""
    deepest = 0
    stack = [(doc, 1)] if isinstance(doc, (dict, list)) else []
    while stack:
        node, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > MAX_DEPTH:
            break
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, (dict, list)):
                stack.append((child, d + 1))
    return deepest


def finite(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None: for reports (``--json``, a run's
    sidecar), where a measured value may be undefined and the document must still be strict."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj: Any, *, indent: int | str | None = 2, newline: bool = True, **options: Any) -> str:
    """Strict JSON text (no NaN/Infinity); ``options`` as for ``json.dumps`` (``sort_keys``,
    ``ensure_ascii``, ``separators``, ``default``). With ``newline``, ends in one, as configs do."""
    try:
        text = json.dumps(obj, indent=indent, allow_nan=False, **options)
    except ValueError as e:  # "Out of range float values are not JSON compliant"
        raise LongcatError(f"refusing to write invalid JSON ({e}): a value is NaN or infinite"
                           ) from None
    return text + "\n" if newline else text
