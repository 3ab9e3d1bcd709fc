"""``verify --deep``: one pass over every file, hashing and scanning the same bytes.

Each file is memory-mapped; one thread hashes it block by block (``hashlib`` releases the GIL)
while the calling thread scans its tensors for NaN/Inf and all-zero weights with torch (which
releases it too), so the pass runs at the speed of the slower of the two, not their sum. A
tensor's sum is finite and non-zero for almost every healthy tensor, so the exact (slower)
NaN/Inf and zero counts run only on tensors that fail that quick test.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longcat_tools.checkpoint import layouts
from longcat_tools.errors import LongcatError
from longcat_tools.io import jsonio
from longcat_tools.io.checksums import parse_manifest
from longcat_tools.io.safetensors import FLOAT_DTYPES, Header, TensorInfo

BLOCK = 16 * 1024 * 1024
CHECKSUMS = "checksums.sha256"
MAX_LISTED = 20_000  # a checkpoint has a few dozen files


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
        text = jsonio.read_text(path, what="checksum list")
    except jsonio.JsonError as e:
        return out, [e.reason]
    lines = text.splitlines()
    if len(lines) > MAX_LISTED:
        return out, [f"{len(lines):,} lines, more than a checkpoint has files (limit "
                     f"{MAX_LISTED:,}): not a checksum list of this checkpoint"]
    entries, problems = parse_manifest(text)
    for no, name, hexd in entries:
        try:
            file = layouts.inside(root, name, "listed file")
        except LongcatError as e:
            problems.append(f"line {no}: {str(e).replace(f'{root}: ', '', 1)}")
            continue
        if file in out:
            problems.append(f"line {no}: {name} is listed twice")
            continue
        out[file] = hexd
    return out, problems


class _Scanner:
    """Per-tensor NaN/Inf/zero state, fed segment by segment."""

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.state: dict[str, TensorScan] = {}

    def feed(self, info: TensorInfo, buf: Any, offset: int, nbytes: int) -> None:
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
    was checked, NaN/Inf/zero state of each floating tensor.

    The file is memory-mapped: the hasher thread walks it in blocks while this thread scans the
    tensors in it, both straight from the page cache (no copy into Python buffers, which cost
    more CPU than the scan itself). A file truncated by another process while it is being read
    would fault; the size is checked against the header first.
    """
    res = FileScan(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if header is not None and size != header.file_size:
                res.error = (f"is {size} bytes, its header described {header.file_size} "
                             "(changed while being verified?)")
                return res
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
    except (OSError, ValueError) as e:
        res.error = f"cannot read ({getattr(e, 'strerror', None) or e})"
        return res
    h = hashlib.sha256() if want_hash else None
    scanner = _Scanner() if header is not None and header.tensors and m is not None else None
    threads = scanner.torch.get_num_threads() if scanner else 0
    try:
        with ThreadPoolExecutor(1) as pool:
            futures = []
            if h is not None and m is not None:
                view = memoryview(m)
                futures = [pool.submit(h.update, view[p:p + BLOCK]) for p in range(0, size, BLOCK)]
                del view
            done = 0
            if scanner is not None:
                if h is not None:
                    scanner.torch.set_num_threads(1)  # the hasher has the other core
                for t in sorted(header.tensors.values(), key=lambda t: t.begin):
                    step = max(BLOCK - BLOCK % max(t.nbytes // max(t.numel, 1), 1), 1)
                    for off in range(t.begin, t.end, step):
                        n = min(step, t.end - off)
                        scanner.feed(t, m, off, n)
                        done += n
                        if progress:
                            progress(n)
                res.tensors = scanner.state
            for i, fut in enumerate(futures):
                fut.result()
                if progress and scanner is None:
                    progress(min(BLOCK, size - i * BLOCK))
            if progress and scanner is not None:
                progress(size - done)
            elif progress and not futures:
                progress(size)
    finally:
        if threads:
            scanner.torch.set_num_threads(threads)
        if m is not None:
            try:
                m.close()
            except BufferError:  # a view still alive; the mapping goes when it does
                pass
    res.bytes_read = size
    res.sha256 = h.hexdigest() if h is not None else None
    return res

