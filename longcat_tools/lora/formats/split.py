"""What the split formats (FastVideo and PEFT) share: one A/B pair per target, a fused native
module's targets stacked back into one entry, made exact by the file's metadata records.

Where the split form alone cannot give the native tensors back bit for bit (an ``alpha_scale``
that does not survive ``* rank / rank`` in float32, an unusual block count), the file's
safetensors metadata records what is needed (``EXACT_METADATA_KEY``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from longcat_tools.errors import LongcatError
from longcat_tools.io import jsonio
from longcat_tools.io import safetensors as st
from longcat_tools.io.safetensors import Header
from longcat_tools.lora.formats.base import (
    CONV_MODULES,
    EXACT_METADATA_KEY,
    ModuleEntry,
    ModuleLora,
    Shapes,
    check_target,
    default_blocks,
    dtype_of,
    reader,
)

if TYPE_CHECKING:
    import torch

# native module -> split index -> role -> tensor name
Groups = dict[str, dict[int, dict[str, str]]]
# (native module, split index, its roles, target rank) -> scale = alpha / rank of that target
ScaleOf = Callable[[str, int, dict[str, str], int], float]


def exact_metadata(header: Header) -> dict[str, dict]:
    raw = header.metadata.get(EXACT_METADATA_KEY)
    if not raw:
        return {}
    doc = jsonio.loads(raw, f"{header.path}: metadata '{EXACT_METADATA_KEY}'")
    if not isinstance(doc, dict):
        raise LongcatError(f"{header.path}: metadata '{EXACT_METADATA_KEY}' is not an object")
    return doc


def _alpha_from_record(rec: Mapping) -> torch.Tensor:
    import torch

    dtype = st.DTYPES.get(rec.get("dtype", "F32"), (None,))[0]
    values = rec.get("values")
    shape = rec.get("shape", [])
    if dtype is None or not isinstance(values, list) or not isinstance(shape, list):
        raise ValueError(rec)
    return torch.tensor([float.fromhex(v) for v in values],
                        dtype=torch.float64).to(dtype).reshape(shape)


def exact_record(entry: ModuleEntry, back: torch.Tensor) -> dict | None:
    """What a split form of ``entry`` needs in its metadata to come back bit for bit, given the
    ``alpha_scale`` its own alpha gives ``back``."""
    import torch

    rec: dict = {}
    if entry.n != default_blocks(entry.module):
        rec["n"] = entry.n
    a = entry.alpha_scale
    if a.dtype != torch.float32 or a.shape != () or not torch.equal(a, back):
        rec["alpha_scale"] = {"dtype": st.DTYPE_NAMES[a.dtype], "shape": list(a.shape),
                              "values": [float(v).hex() for v in a.double().reshape(-1).tolist()]}
    return rec or None


def exact_records(entries: list[ModuleEntry], back: Callable[[ModuleEntry], torch.Tensor]
                  ) -> dict[str, str]:
    """The ``EXACT_METADATA_KEY`` metadata of a split-format file (empty when none is needed)."""
    recs = {e.module: r for e in entries if (r := exact_record(e, back(e)))}
    if not recs:
        return {}
    return {EXACT_METADATA_KEY: jsonio.dumps(recs, indent=None, newline=False, sort_keys=True,
                                              separators=(",", ":"))}


def is_block_diagonal(b: torch.Tensor, n: int) -> bool:
    """Whether ``b`` is zero outside its ``n`` diagonal blocks (checked on views, no copies)."""
    rows, cols = b.shape[0] // n, b.shape[1] // n
    for j in range(n):
        band = b[j * rows:(j + 1) * rows]
        if band[:, : j * cols].any() or band[:, (j + 1) * cols:].any():
            return False
    return True


def _diagonal_blocks(b: torch.Tensor, n: int, where: str, module: str) -> list[torch.Tensor]:
    if not is_block_diagonal(b, n):
        raise LongcatError(f"{where}: lora_B of '{module}' is not block-diagonal with {n} blocks "
                           "as its metadata says")
    rows, cols = b.shape[0] // n, b.shape[1] // n
    return [b[j * rows:(j + 1) * rows, j * cols:(j + 1) * cols].contiguous() for j in range(n)]


def conv_kernel(where: str, native: str, a_info: list, b_info: list) -> tuple[int, ...]:
    """The kernel of PEFT's Conv3d LoRA (A ``[r, in, *kernel]``, B ``[out, r, 1, 1, 1]``) on one
    of CONV_MODULES, or ``()`` for 2-D (Linear) weights; anything else is refused."""
    dims = {len(t.shape) for t in a_info + b_info}
    if dims == {2}:
        return ()
    if (native not in CONV_MODULES or len(a_info) != 1 or dims != {5}
            or any(d != 1 for d in b_info[0].shape[2:])):
        raise LongcatError(f"{where}: '{native}': LoRA weights must be 2-D (or, on the Conv3d "
                           "patch embedding, PEFT's 5-D Conv3d LoRA with a 1x1x1 lora_B)")
    return tuple(a_info[0].shape[2:])


def split_entries(header: Header, shapes: Shapes | None, groups: Groups,
                  targets_of: Mapping[str, tuple[str, ...]], scale_of: ScaleOf,
                  inspect_blocks: bool = True) -> dict[str, ModuleEntry]:
    """Module entries of a split format (one A/B pair per target, a fused native module's
    targets stacked back), exact with the file's ``EXACT_METADATA_KEY`` records."""
    import torch

    where = str(header.path)
    exact = exact_metadata(header)
    read = reader(header)
    out: dict[str, ModuleEntry] = {}
    for native, parts in groups.items():
        targets = targets_of[native]
        count = len(targets)
        if sorted(parts) != list(range(count)):
            have = [targets[j] for j in sorted(parts)]
            raise LongcatError(f"{where}: '{native}' is fused in the native model; its adapter "
                               f"needs all of {', '.join(targets)} (found {', '.join(have)})")
        for j, roles in parts.items():
            for role in ("lora_A", "lora_B"):
                if role not in roles:
                    raise LongcatError(f"{where}: '{targets[j]}' has no .{role}")
        a_info = [header.tensors[parts[j]["lora_A"]] for j in range(count)]
        b_info = [header.tensors[parts[j]["lora_B"]] for j in range(count)]
        kernel = conv_kernel(where, native, a_info, b_info)
        a_shapes = [(t.shape[0], math.prod(t.shape[1:])) for t in a_info]
        b_shapes = [tuple(t.shape[:2]) for t in b_info]
        ranks = {s[0] for s in a_shapes}
        ins = {s[1] for s in a_shapes}
        if len(ranks) > 1 or len(ins) > 1 or any(b[1] != a[0]
                                                 for a, b in zip(a_shapes, b_shapes, strict=True)):
            raise LongcatError(f"{where}: '{native}': lora_A/lora_B shapes "
                               f"{[list(t.shape) for t in a_info + b_info]} disagree (the split "
                               "targets of a fused module need one rank)")
        dtype = a_info[0].dtype
        if any(t.dtype != dtype for t in a_info + b_info):
            raise LongcatError(f"{where}: '{native}': lora_A and lora_B dtypes differ")
        rank_a = a_shapes[0][0]
        if rank_a == 0:
            raise LongcatError(f"{where}: '{native}': lora_A has rank 0")
        out_f, in_f = sum(b[0] for b in b_shapes), a_shapes[0][1]
        if len({b[0] for b in b_shapes}) > 1:
            raise LongcatError(f"{where}: '{native}': split targets have different widths")
        check_target(where, parts[0]["lora_A"], native, out_f, in_f, shapes, kernel)
        rec = exact.get(native, {})
        n = rec.get("n", default_blocks(native))
        if not isinstance(n, int) or n < 1:
            raise LongcatError(f"{where}: metadata gives '{native}' an invalid block count {n!r}")
        scales = [scale_of(native, j, parts[j], rank_a) for j in range(count)]
        if count > 1:
            # one block per split target, or (n == 1) one down shared by all targets
            if n not in (1, count):
                raise LongcatError(f"{where}: metadata gives fused '{native}' {n} blocks; only 1 "
                                   f"or {count} can be written natively")
            rank = rank_a
        else:
            if rank_a % n or b_info[0].shape[0] % n:
                if "n" in rec:
                    raise LongcatError(f"{where}: metadata gives '{native}' {n} blocks, which do "
                                       f"not divide its rank {rank_a}")
                n = 1  # not the conventional block split: one plain up
            rank = rank_a // n
        if len(set(scales)) > 1:
            raise LongcatError(f"{where}: split targets of '{native}' have different "
                               f"lora_alpha/rank {sorted(set(scales))}; the native format has one "
                               "alpha_scale per module")
        if "alpha_scale" in rec:
            try:
                alpha = _alpha_from_record(rec["alpha_scale"])
            except (ValueError, TypeError, KeyError) as e:
                raise LongcatError(f"{where}: metadata alpha_scale of '{native}' is invalid "
                                   f"({e})") from None
        else:
            alpha = torch.tensor(scales[0], dtype=torch.float32)
        keys = tuple(k for j in range(count) for r, k in sorted(
            parts[j].items(), key=lambda rk: (rk[0] != "lora_A", rk[0] != "lora_B", rk[0])))
        a_keys = tuple(parts[j]["lora_A"] for j in range(count))
        b_keys = tuple(parts[j]["lora_B"] for j in range(count))

        if count == 1 and n > 1 and "n" not in rec and inspect_blocks:
            # Files from other tools carry no metadata: accept the conventional block split only
            # where lora_B really is block-diagonal, else write one plain up.
            if not is_block_diagonal(read(b_keys[0]).flatten(1), n):
                n, rank = 1, rank_a

        def load(native=native, n=n, rank=rank, count=count, a_keys=a_keys, b_keys=b_keys,
                 alpha=alpha, kernel=kernel) -> ModuleLora:
            a = [read(k).flatten(1) for k in a_keys]
            b = [read(k).flatten(1) for k in b_keys]
            if kernel:
                return ModuleLora(native, a[0], b, alpha.clone(), kernel)
            if count > 1 and n == 1:
                if any(not torch.equal(x, a[0]) for x in a[1:]):
                    raise LongcatError(f"{where}: '{native}': metadata says one shared lora_down "
                                       "but the split targets' lora_A differ")
                return ModuleLora(native, a[0], [torch.cat(b, 0)], alpha.clone())
            if count > 1:
                return ModuleLora(native, torch.cat(a, 0), b, alpha.clone())
            if n == 1:
                return ModuleLora(native, a[0], b, alpha.clone())
            blocks = _diagonal_blocks(b[0], n, where, native)
            return ModuleLora(native, a[0], blocks, alpha.clone())

        out[native] = ModuleEntry(native, n, rank, in_f, out_f, dtype_of(a_info[0].dtype), alpha,
                                  keys, load, kernel)
    return out


def split_deltas(groups: Groups, read: Callable[[str], torch.Tensor], scale: float,
                 scale_of: ScaleOf) -> dict[str, torch.Tensor]:
    """Native module -> ``scale * alpha/rank * B @ A`` (float64), its targets' rows stacked."""
    import torch

    deltas = {}
    for native, parts in groups.items():
        rows = []
        for j in sorted(parts):
            a = read(parts[j]["lora_A"]).double().flatten(1)
            b = read(parts[j]["lora_B"]).double().flatten(1)
            rows.append(scale * scale_of(native, j, parts[j], a.shape[0]) * (b @ a))
        deltas[native] = torch.cat(rows, 0)
    return deltas
