"""``verify --deep``: one sequential pass over every file, hashing and scanning the same bytes.

Files are read in large blocks cut at element boundaries; while one thread hashes a block
(``hashlib`` releases the GIL), the reading thread scans the tensors in it for NaN/Inf and all-zero
weights with torch (which also releases it), so the pass runs at the speed of the slower of the
two, not their sum. A tensor's sum is finite and non-zero for almost every healthy tensor, so the
exact (slower) NaN/Inf and zero counts run only on tensors that fail that quick test.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from longcat_tools import layouts
from longcat_tools.errors import LongcatError
from longcat_tools.safetensors_io import FLOAT_DTYPES, Header, TensorInfo

BLOCK = 16 * 1024 * 1024
CHECKSUMS = "checksums.sha256"
MAX_LISTED = 20_000  # a checkpoint has a few dozen files
_LINE = re.compile(r"^(?P<esc>\\?)(?P<hex>[0-9a-fA-F]{64}) [ *](?P<name>.+)$")


@dataclass
class TensorScan:
    nan: int = 0
    inf: int = 0
    nonzero: bool = False


@dataclass
class FileScan:
    path: Path
    bytes_read: int = 0
    sha256: str | None = None
    tensors: dict[str, TensorScan] = field(default_factory=dict)
    error: str | None = None


def parse_checksums(path: Path, root: Path) -> tuple[dict[Path, str], list[str]]:
    """``sha256sum`` output (``<hex>  <path>``, paths relative to the checkpoint) -> file -> hex,
    plus the problems found (bad lines, paths leaving the checkpoint, duplicates)."""
    out: dict[Path, str] = {}
    problems: list[str] = []
    try:
        if not path.is_file():
            raise LongcatError(f"{path}: not a regular file")
        if path.stat().st_size > layouts.MAX_JSON_BYTES:
            raise LongcatError(f"{path}: too large for a checksum list")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return out, [f"cannot read ({e})"]
    except LongcatError as e:
        return out, [str(e).replace(f"{path}: ", "", 1)]
    lines = text.splitlines()
    if len(lines) > MAX_LISTED:
        return out, [f"{len(lines):,} lines, more than a checkpoint has files (limit "
                     f"{MAX_LISTED:,}): not a checksum list of this checkpoint"]
    for no, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            problems.append(f"line {no} is not '<sha256>  <file>': {line[:60]!r}")
            continue
        name = m["name"]
        if m["esc"]:  # sha256sum escapes \ and newline in names and marks the line with \
            name = name.replace("\\n", "\n").replace("\\\\", "\\")
        name = name.removeprefix("./")
        try:
            file = layouts.inside(root, name, "listed file")
        except LongcatError as e:
            problems.append(f"line {no}: {str(e).replace(f'{root}: ', '', 1)}")
            continue
        if file in out:
            problems.append(f"line {no}: {name} is listed twice")
            continue
        out[file] = m["hex"].lower()
    return out, problems


class _Scanner:
    """Per-tensor NaN/Inf/zero state, fed segment by segment."""

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.state: dict[str, TensorScan] = {}

    def feed(self, info: TensorInfo, buf: bytearray, offset: int, nbytes: int) -> None:
        if info.dtype not in FLOAT_DTYPES or nbytes == 0:
            return
        torch = self.torch
        st = self.state.setdefault(info.name, TensorScan())
        x = torch.frombuffer(buf, dtype=info.torch_dtype, count=nbytes // (
            info.nbytes // info.numel), offset=offset)
        if x.dtype.itemsize == 1:  # float8: no reductions, widen first
            x = x.float()
        # fp16 sums overflow at 65504: accumulate in fp32 (a slower kernel, so only there)
        s = x.sum(dtype=torch.float32) if x.dtype == torch.float16 else x.sum()
        if not torch.isfinite(s):  # NaN/Inf, or an overflowing sum of finite values
            st.nan += int(torch.isnan(x).sum())
            st.inf += int(torch.isinf(x).sum())
        if not st.nonzero and (s != 0 or bool(x.any())):
            st.nonzero = True


def scan_file(path: Path, header: Header | None, want_hash: bool,
              progress: Callable[[int], None] | None = None) -> FileScan:
    """Read a file once: sha256 of every byte (if asked) and, for a safetensors file whose header
    was checked, NaN/Inf/zero state of each floating tensor."""
    res = FileScan(path)
    tensors = sorted(header.tensors.values(), key=lambda t: t.begin) if header else []
    scanner = _Scanner() if tensors else None
    h = hashlib.sha256() if want_hash else None
    bufs = [bytearray(BLOCK) for _ in range(3 if h else 1)]
    pending: list[Future | None] = [None] * len(bufs)
    k = 0
    threads = scanner.torch.get_num_threads() if scanner else 0
    if scanner and h is not None:
        scanner.torch.set_num_threads(1)  # the hasher has the other core
    try:
        with open(path, "rb") as f, ThreadPoolExecutor(1) as pool:
            pos, ti = 0, 0
            end = header.file_size if header else None
            while True:
                slot = k % len(bufs)
                if pending[slot] is not None:
                    pending[slot].result()  # the hasher is done with this buffer
                buf = bufs[slot]
                want = BLOCK
                if tensors and ti < len(tensors):
                    want = _cut(tensors, ti, pos, BLOCK)
                n = f.readinto(memoryview(buf)[:want])
                if not n:
                    break
                view = memoryview(buf)[:n]
                if h is not None:
                    pending[slot] = pool.submit(h.update, view)
                if scanner is not None:
                    ti = _scan_block(scanner, tensors, ti, buf, pos, pos + n)
                pos += n
                res.bytes_read += n
                k += 1
                if progress:
                    progress(n)
            for fut in pending:
                if fut is not None:
                    fut.result()
            if end is not None and pos != end:
                raise LongcatError(f"{path}: ended after {pos} bytes, the header says {end} "
                                   "(changed while being read?)")
    except OSError as e:
        res.error = f"cannot read ({e.strerror or e})"
        return res
    except LongcatError as e:
        res.error = str(e).replace(f"{path}: ", "", 1)
        return res
    finally:
        if threads:
            scanner.torch.set_num_threads(threads)
    res.sha256 = h.hexdigest() if h is not None else None
    if scanner is not None:
        res.tensors = scanner.state
    return res


def _cut(tensors: list[TensorInfo], ti: int, pos: int, block: int) -> int:
    """Bytes to read from ``pos`` so that the block ends on an element boundary."""
    stop = pos + block
    while ti < len(tensors) and tensors[ti].end <= stop:
        ti += 1
    if ti < len(tensors) and tensors[ti].begin < stop:
        t = tensors[ti]
        size = t.nbytes // t.numel if t.numel else 1
        stop -= (stop - t.begin) % size
    return max(stop - pos, 1)


def _scan_block(scanner: _Scanner, tensors: list[TensorInfo], ti: int, buf: bytearray,
                start: int, stop: int) -> int:
    """Scan every tensor segment in file bytes [start, stop); returns the first tensor not done."""
    while ti < len(tensors):
        t = tensors[ti]
        if t.begin >= stop:
            break
        lo, hi = max(t.begin, start), min(t.end, stop)
        if hi > lo:
            scanner.feed(t, buf, lo - start, hi - lo)
        if t.end > stop:
            break
        ti += 1
    return ti


def hash_only(path: Path, progress: Callable[[int], None] | None = None) -> FileScan:
    """sha256 of a file that is not a checked safetensors file (configs, tokenizer files)."""
    return scan_file(path, None, True, progress)
