"""Streaming safetensors: read headers and single tensors, write sharded files tensor by tensor.

The safetensors library loads or maps a whole file; a 54 GB checkpoint needs one tensor at a time,
with every header field checked before anything is trusted. Files are written header first, then
each tensor's bytes, so memory is bounded by the largest tensor. A "sparse" write leaves the data
as a file hole: valid headers at full scale for almost no disk.
"""

from __future__ import annotations

import errno
import math
import os
import stat
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from longcat_tools.errors import LongcatError, why_not_a_file
from longcat_tools.io import jsonio

if TYPE_CHECKING:
    import torch

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit: every reader's
T = TypeVar("T")

# safetensors dtype -> (torch dtype attribute, bytes per element). Header checks need only the
# sizes, so torch (seconds to import) is loaded only when tensors are read or written.
DTYPE_TABLE: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}
DTYPE_SIZES: dict[str, int] = {name: size for name, (_, size) in DTYPE_TABLE.items()}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


@cache
def _torch_tables() -> tuple[dict[str, tuple[torch.dtype, int]], dict[torch.dtype, str]]:
    import torch

    dtypes = {name: (getattr(torch, attr), size) for name, (attr, size) in DTYPE_TABLE.items()}
    return dtypes, {dt: name for name, (dt, _) in dtypes.items()}


def __getattr__(name: str) -> Any:
    # DTYPES (name -> (torch dtype, size)) and DTYPE_NAMES (torch dtype -> name), built on first use
    if name == "DTYPES":
        return _torch_tables()[0]
    if name == "DTYPE_NAMES":
        return _torch_tables()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    end: int  # absolute file offset past the last byte

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return _torch_tables()[0][self.dtype][0]


def require_float(where: str | Path, info: TensorInfo) -> None:
    """Model weights are floating point: an integer tensor would be cast to its values and
    load as nonsense, so it is one line instead."""
    if info.dtype not in FLOAT_DTYPES:
        raise LongcatError(f"{where}: tensor '{info.name}' is {info.dtype}, not floating point "
                           "(weights are F32, BF16, F16 or scaled F8): re-export the file")


@dataclass(frozen=True)
class Header:
    path: Path
    tensors: dict[str, TensorInfo]  # in data order
    metadata: dict[str, str]
    data_start: int
    file_size: int


def _open_nonblocking(name: str, flags: int) -> int:
    """Even if a FIFO replaces the file after the stat, opening it does not block."""
    return os.open(name, flags | os.O_NONBLOCK)


def read_header(path: str | Path, max_header_bytes: int = MAX_HEADER_BYTES) -> Header:
    """Parse and check a safetensors header without reading tensor data.

    Checks: a regular file, header length within the file and the library's limit, UTF-8 JSON
    object without duplicate names, known dtypes, shapes of non-negative ints, bytes = numel x
    dtype size, offsets inside the file, contiguous and non-overlapping, and the file ends where
    the data ends.
    """
    path = Path(path)
    where = str(path)
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block open(), a folder cannot be read
            raise LongcatError(f"{where}: not a regular file (a safetensors file is expected)")
        size = st.st_size
        with open(path, "rb", opener=_open_nonblocking) as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise LongcatError(f"{where}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > max_header_bytes:
                raise LongcatError(f"{where}: header length {n} exceeds the "
                                   f"{max_header_bytes}-byte limit (corrupt or not safetensors)")
            if 8 + n > size:
                raise LongcatError(f"{where}: header length {n} runs past the end of the file "
                                   f"({size} bytes): truncated or not a safetensors file")
            blob = f.read(n)
    except OSError as e:
        why = why_not_a_file(path) if e.errno in (errno.ENOENT, errno.ELOOP) else None
        raise LongcatError(f"{where}: {why or f'cannot read ({e.strerror or e})'}") from e
    try:
        doc = jsonio.loads(jsonio.decode(blob, where), where)
    except jsonio.DuplicateKey as e:
        raise LongcatError(f"{where}: header names '{e.key}' twice (the safetensors library "
                           "would silently keep one of them)") from None
    except jsonio.JsonError as e:
        raise LongcatError(f"{where}: header is not valid UTF-8 JSON ({e.reason})") from None
    if not isinstance(doc, dict):
        raise LongcatError(f"{where}: header is not a JSON object")
    meta = doc.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise LongcatError(f"{where}: __metadata__ must map strings to strings")
    data_start = 8 + n
    infos: list[TensorInfo] = []
    for name, entry in doc.items():
        infos.append(_tensor_info(where, name, entry, data_start))
    infos.sort(key=lambda t: (t.begin, t.end))
    last = max(infos, key=lambda t: t.end, default=None)
    if last is not None and last.end > size:
        t = last
        raise LongcatError(f"{where}: tensor '{t.name}' ends at byte {t.end}, past the end of the "
                           f"file ({size} bytes): truncated or corrupt")
    pos = data_start
    for t in infos:
        if t.begin != pos:
            kind = "overlaps the previous tensor" if t.begin < pos else "leaves a gap before it"
            raise LongcatError(f"{where}: tensor '{t.name}' {kind} (offset {t.begin - data_start}, "
                               f"expected {pos - data_start})")
        pos = t.end
    if pos != size:
        raise LongcatError(f"{where}: file is {size} bytes but its header describes {pos}: "
                           + ("truncated" if pos > size else "trailing bytes after the data"))
    return Header(path, {t.name: t for t in infos}, dict(meta), data_start, size)


def _tensor_info(where: str, name: str, entry: object, data_start: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise LongcatError(f"{where}: entry for tensor '{name}' is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise LongcatError(f"{where}: tensor '{name}' has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise LongcatError(f"{where}: tensor '{name}' has an invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]):
        raise LongcatError(f"{where}: tensor '{name}' has invalid data_offsets {offsets!r}")
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if offsets[1] - offsets[0] != expected:
        raise LongcatError(f"{where}: tensor '{name}' spans {offsets[1] - offsets[0]} bytes but "
                           f"{dtype}{shape} needs {expected}")
    return TensorInfo(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def read_tensor(f: BinaryIO, info: TensorInfo, scratch: torch.Tensor | None = None
                ) -> torch.Tensor:
    """Read one tensor from an open binary file: only its own bytes, never the whole file.

    With ``scratch`` (a uint8 CPU tensor of at least ``info.nbytes``) the bytes land in it and
    the result is a view, valid until the next read: one reused buffer spares a checkpoint's
    loader a zero-filled, page-faulted new buffer per tensor."""
    f.seek(info.begin)
    return _read(lambda view: f.readinto(view), info, scratch, getattr(f, "name", "?"))


def read_scalar(f: BinaryIO, info: TensorInfo) -> float | None:
    """A one-element float tensor's value without torch (header-level readers stay fast);
    None for a dtype this does not decode (fp8)."""
    fmt = {"F64": "<d", "F32": "<f", "F16": "<e", "BF16": "<H"}.get(info.dtype)
    if fmt is None or info.numel != 1:
        return None
    f.seek(info.begin)
    raw = f.read(info.nbytes)
    if len(raw) != info.nbytes:
        raise LongcatError(f"tensor '{info.name}' runs past the end of the file")
    (value,) = struct.unpack(fmt, raw)
    if info.dtype == "BF16":  # the high half of a float32
        (value,) = struct.unpack("<f", struct.pack("<I", value << 16))
    return value


def read_tensor_at(fd: int, info: TensorInfo, scratch: torch.Tensor | None = None,
                   where: str | Path = "?") -> torch.Tensor:
    """``read_tensor`` through ``os.preadv``: no file position, so threads can share ``fd``."""
    def read_into(view: memoryview) -> int:
        return os.preadv(fd, [view], info.begin + info.nbytes - len(view))

    return _read(read_into, info, scratch, where)


def _read(read_into: Callable[[memoryview], int], info: TensorInfo,
          scratch: torch.Tensor | None, where: str | Path) -> torch.Tensor:
    buf = bytearray(info.nbytes) if scratch is None else scratch[:info.nbytes]
    view = memoryview(buf) if scratch is None else memoryview(buf.numpy())
    got = 0
    while got < info.nbytes:
        k = read_into(view[got:])
        if not k:
            raise LongcatError(f"{where}: unexpected end of file in tensor '{info.name}'")
        got += k
    import torch

    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.torch_dtype)
    if scratch is not None:
        return buf.view(info.torch_dtype).reshape(info.shape)
    return torch.frombuffer(buf, dtype=info.torch_dtype).reshape(info.shape)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The little-endian bytes of a tensor, without a copy when it is contiguous on the CPU."""
    import torch

    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


# A tensor to be written: its name, dtype, shape and a producer called only when data is needed.
@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor] | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def data(self) -> memoryview:
        """The produced tensor's bytes, once its dtype and shape are checked against the spec."""
        assert self.produce is not None, f"no data for tensor {self.name}"
        t = self.produce()
        if tuple(t.shape) != self.shape or t.dtype != self.dtype:
            raise LongcatError(f"internal: tensor '{self.name}' is {t.dtype}{list(t.shape)}, "
                               f"expected {self.dtype}{list(self.shape)}")
        return tensor_bytes(t)


def build_header(specs: Iterable[TensorSpec], metadata: Mapping[str, str] | None) -> bytes:
    """Header bytes (length prefix included), padded with spaces to 8-byte alignment."""
    doc: dict[str, object] = {}
    if metadata:
        doc["__metadata__"] = dict(metadata)
    pos = 0
    for s in specs:
        doc[s.name] = {"dtype": _torch_tables()[1][s.dtype], "shape": list(s.shape),
                       "data_offsets": [pos, pos + s.nbytes]}
        pos += s.nbytes
    blob = jsonio.dumps(doc, indent=None, newline=False, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob


def write_file(path: str | Path, specs: list[TensorSpec],
               metadata: Mapping[str, str] | None = None, *, sparse: bool = False,
               on_bytes: Callable[[bytes | memoryview], None] | None = None,
               progress: Callable[[int], None] | None = None) -> int:
    """Write one safetensors file tensor by tensor; returns its size in bytes.

    With ``sparse`` the data region is a hole (the file is extended, nothing is written) but
    for scalars, which are written: a LoRA's alpha read as 0 from a hole is refused by every
    reader. ``on_bytes`` sees every byte written (for hashing while writing).
    """
    header = build_header(specs, metadata)
    total = len(header) + sum(s.nbytes for s in specs)
    with open(path, "wb") as f:
        f.write(header)
        if on_bytes:
            on_bytes(header)
        if sparse:
            offset = len(header)
            for s in specs:
                if math.prod(s.shape) == 1:
                    f.seek(offset)
                    f.write(s.data())
                offset += s.nbytes
            f.truncate(total)
            return total
        for s in specs:
            data = s.data()
            f.write(data)
            if on_bytes:
                on_bytes(data)
            if progress:
                progress(len(data))
            del data
    return total


def plan_shards(specs: Sequence[T], max_shard_bytes: int) -> list[list[T]]:
    """Split tensors (anything with ``nbytes``) in order into shards of at most
    ``max_shard_bytes`` (a larger tensor gets its own shard), as huggingface_hub splits them."""
    shards: list[list[T]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def shard_names(stem: str, count: int) -> list[str]:
    """``stem.safetensors`` for one shard, else ``stem-0000k-of-0000n.safetensors``."""
    if count == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]


def write_sharded(folder: str | Path, stem: str, specs: list[TensorSpec], max_shard_bytes: int,
                  metadata: Mapping[str, str] | None = None, *, sparse: bool = False,
                  force_index: bool = False,
                  progress: Callable[[int], None] | None = None) -> list[str]:
    """Write ``specs`` as ``stem`` shards plus ``stem.safetensors.index.json`` when there is more
    than one shard (or ``force_index``); returns the file names written."""
    folder = Path(folder)
    shards = plan_shards(specs, max_shard_bytes)
    names = shard_names(stem, len(shards))
    weight_map: dict[str, str] = {}
    for name, shard in zip(names, shards, strict=False):
        write_file(folder / name, shard, metadata, sparse=sparse, progress=progress)
        weight_map.update({s.name: name for s in shard})
    written = list(names)
    if len(shards) > 1 or force_index:
        index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}
        index_name = f"{stem}.safetensors.index.json"
        write_json(folder / index_name, index)
        written.append(index_name)
    return written


def write_json(path: str | Path, obj: object) -> None:
    """JSON the way diffusers and transformers save configs: indent 2, trailing newline."""
    Path(path).write_text(jsonio.dumps(obj))
