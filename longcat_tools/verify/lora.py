"""Header-level checks of LoRA adapters against the transformer they are meant for.

Every adapted module must exist in the DiT and its A/B matrices must fit that layer:
``A [r, in]``, ``B [out, r]`` (or, in the native format's fused targets, ``n`` up blocks of
``[out/n, r/n]``), with a scalar alpha. The keys are read by ``lora.formats.parse_keys``, the
rules ``lora attach`` reads a file by, so both judge a file's format and targets alike.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longcat_tools import schemas
from longcat_tools.checkpoint import layouts
from longcat_tools.errors import LongcatError
from longcat_tools.io import jsonio
from longcat_tools.io.safetensors import FLOAT_DTYPES, Header, TensorInfo, read_header, read_scalar
from longcat_tools.lora import formats as lora_formats
from longcat_tools.lora.registry import REGISTRY, SCHEMA, check_scale, is_scratch, target_patterns
from longcat_tools.model import keymap
from longcat_tools.verify.report import Recorder, count, listing

_KNOWN = ("known: native lora_down/lora_up, FastVideo lora_A/lora_B, PEFT "
          "lora_A.weight/lora_B.weight")


@dataclass
class Target:
    """One adapted module: its down (A), up (B or up blocks) and alpha tensors."""

    module: str
    down: TensorInfo | None = None
    ups: dict[int, TensorInfo] = field(default_factory=dict)  # block index (0 when single) -> B
    alpha: TensorInfo | None = None

    @property
    def rank(self) -> int | None:
        """Rows of A per up block: the rank r of each low-rank update."""
        if self.down is None or not self.down.shape:
            return None
        return self.down.shape[0] // max(len(self.ups), 1)


def read_targets(tensors: dict[str, TensorInfo], where: str = "LoRA file"
                 ) -> tuple[str, dict[str, Target], list[str]]:
    """(format, module in the file's own names -> Target, names that are no key of that format)
    of a LoRA file's tensors; a LongcatError where no format, or several, claim them."""
    keys = lora_formats.parse_keys(tensors, where)
    targets: dict[str, Target] = {}
    for module, roles in keys.modules.items():
        t = targets[module] = Target(module)
        for role, key in roles.items():
            if role == "down":
                t.down = tensors[key]
            elif role == "alpha":
                t.alpha = tensors[key]
            else:
                t.ups[int(role[3:]) if role.startswith("up.") else 0] = tensors[key]
    return keys.format, targets, keys.unknown


def _bad_alphas(path: Path, targets: dict[str, Target]) -> list[str]:
    """Targets whose alpha tensor (a scalar: read at header cost) is NaN, Inf, zero or
    negative."""
    bad = []
    with open(path, "rb") as f:
        for mod, t in targets.items():
            value = read_scalar(f, t.alpha) if t.alpha is not None else None
            if value is not None and not (math.isfinite(value) and value > 0):
                bad.append(f"{mod} alpha {value:g}")
    return bad


def _fit_conv(t: Target, weight: tuple[int, ...]) -> str | None:
    """The Conv3d patch embedding takes PEFT's Conv3d LoRA only: A ``[r, in, *kernel]``, one B
    ``[out, r, 1, 1, 1]``."""
    a = list(t.down.shape)
    if a[1:] != list(weight[1:]):
        return (f"{t.module} down/A is {a}; the Conv3d (weight {list(weight)}) takes PEFT's "
                f"Conv3d LoRA, A [r, {', '.join(map(str, weight[1:]))}]")
    want = [weight[0], a[0], 1, 1, 1]
    if len(t.ups) != 1 or list(t.ups.get(0, t.down).shape) != want:
        return f"{t.module} up/B must be one tensor {want} (a 1x1x1 Conv3d)"
    if t.alpha is not None and t.alpha.numel != 1:
        return f"{t.module} alpha is {list(t.alpha.shape)}, not a scalar"
    return None


def _fit(t: Target, weight: tuple[int, ...]) -> str | None:
    """Why the A/B tensors of a target cannot update a weight of this shape (None: they fit)."""
    if t.down is None or not t.ups:
        return f"{t.module} has {'no down/A' if t.down is None else 'no up/B'} matrix"
    if t.rank == 0:
        return f"{t.module} has rank 0 (down/A {list(t.down.shape)} has no rows)"
    if len(weight) == 5:
        return _fit_conv(t, weight)
    if len(weight) != 2:
        return f"{t.module} is not a linear layer (weight {list(weight)})"
    out_dim, in_dim = weight
    a = t.down.shape
    if len(a) != 2 or a[1] != in_dim:
        return f"{t.module} down/A is {list(a)}, the layer takes {in_dim} inputs"
    r = a[0]
    n = len(t.ups)
    if sorted(t.ups) != list(range(n)):
        return f"{t.module} up blocks are numbered {sorted(t.ups)}, expected 0..{n - 1}"
    if r % n or out_dim % n:
        return (f"{t.module} has {n} up blocks, which do not divide the {r} rows of down/A and "
                f"the {out_dim} outputs")
    for j, b in sorted(t.ups.items()):
        if list(b.shape) != [out_dim // n, r // n]:
            part = "up/B" if n == 1 else f"up block {j}"
            return (f"{t.module} {part} is {list(b.shape)}, expected {[out_dim // n, r // n]} "
                    f"(layer {list(weight)}, rank {r // n})")
    if t.alpha is not None and t.alpha.numel != 1:
        return f"{t.module} alpha is {list(t.alpha.shape)}, not a scalar"
    return None


@dataclass
class LoraFile:
    path: Path
    format: str | None
    targets: dict[str, Target]
    header: Header | None = None


def check_file(rec: Recorder, path: Path, flavour: str | None,
               shapes: dict[str, dict[str, tuple[int, ...]]] | None,
               layout: str) -> LoraFile | None:
    """Header, format, targets and shapes of one adapter file."""
    comp = "lora"
    try:
        h = read_header(path)
    except LongcatError as e:
        rec.fail(comp, "header", path, str(e))
        return None
    try:
        fmt, targets, unknown = read_targets(h.tensors, str(path))
    except LongcatError as e:
        rec.fail(comp, "format", path, str(e).removeprefix(f"{path}: "))
        return LoraFile(path, None, {}, h)
    if unknown:
        rec.fail(comp, "format", path, f"{count(len(unknown), 'tensor')} that fit no LoRA "
                 f"format: {listing(unknown)} ({_KNOWN})")
        return LoraFile(path, fmt, targets, h)
    lf = LoraFile(path, fmt, targets, h)
    if shapes is None or flavour is None:
        rec.warn(comp, "targets", path, f"{fmt} format, {count(len(targets), 'target')}; not "
                 "compared with the transformer (its config or weights are broken, see above)")
        return lf
    other = "native" if flavour == "fastvideo" else "fastvideo"
    unknown_mods, foreign, misfit = [], [], []
    for mod, t in targets.items():
        key = f"{mod}.weight"
        if key in shapes[flavour]:
            why = _fit(t, shapes[flavour][key])
        elif key in shapes[other]:
            foreign.append(mod)
            why = _fit(t, shapes[other][key])
        else:
            unknown_mods.append(mod)
            continue
        if why:
            misfit.append(why)
    if unknown_mods:
        rec.fail(comp, "targets", path, f"adapted modules that do not exist in the transformer "
                 f"({len(unknown_mods)}): {listing(unknown_mods)}")
    if misfit:
        rec.fail(comp, "shapes", path, f"targets that do not fit their layer ({len(misfit)}): "
                 f"{listing(misfit, 2)}")
    if foreign:
        hint = ("FastVideo loads only its own names; convert it with `longcat-tools lora`"
                if flavour == "fastvideo" else "the runner must convert it before use")
        rec.warn(comp, "targets", path, f"{fmt} format names {other}-flavour modules "
                 f"({listing(foreign, 2)}) but the transformer has {flavour} keys: {hint}")
    if bad := _bad_alphas(path, targets):
        rec.fail(comp, "alpha", path, f"alphas that are not a positive number ({len(bad)}): "
                 f"{listing(bad, 2)}; every LoRA reader refuses them")
    if not unknown_mods and not misfit and not bad:
        ranks = sorted({t.rank for t in targets.values() if t.rank})
        rec.ok(comp, "targets", path, f"{fmt} format, {count(len(targets), 'target')}, rank "
               f"{'/'.join(map(str, ranks))}: every target exists and fits")
    mats = Counter(i.dtype for t in targets.values() for i in [t.down, *t.ups.values()] if i)
    if any(d not in FLOAT_DTYPES for d in mats):
        rec.fail(comp, "dtype", path, f"non-floating A/B matrices ({dict(mats)})")
    elif len(mats) > 1:
        rec.warn(comp, "dtype", path, f"mixed A/B dtypes ({dict(mats)})")
    return lf


def lora_files(root: Path) -> list[Path]:
    """Adapter files: ``lora/*.safetensors`` (the hub's) and ``lora/<name>/*.safetensors``."""
    d = root / "lora"
    if not d.is_dir():
        return []
    return sorted(p for p in [*d.glob("*.safetensors"), *d.glob("*/*.safetensors")]
                  if not any(is_scratch(part) for part in p.relative_to(d).parts))


def check_manifest(rec: Recorder, root: Path, parsed: dict[Path, LoraFile]) -> None:
    """``lora/adapters.json``: schema, unique names, files inside lora/, facts match the files."""
    path = root / "lora" / REGISTRY
    if not (path.exists() or path.is_symlink()):
        return
    comp = "lora"
    try:
        doc: Any = jsonio.read(path, what="LoRA manifest")
        schemas.validate(doc, SCHEMA, str(path))
    except LongcatError as e:
        rec.fail(comp, "manifest", path, str(e))
        return
    problems: list[str] = []
    names = Counter(a["name"] for a in doc["adapters"])
    problems += [f"adapter name '{n}' is used {k} times" for n, k in names.items() if k > 1]
    files = Counter(a["file"] for a in doc["adapters"])
    problems += [f"{f} is named by {k} adapters (detaching one would delete the others' "
                 "weights)" for f, k in files.items() if k > 1]
    for a in doc["adapters"]:
        try:  # the rule every lora command applies when it reads the registry
            check_scale(a["default_scale"], f"adapter '{a['name']}' default_scale",
                        LongcatError)
        except LongcatError as e:
            problems.append(str(e))
        try:
            f = layouts.inside(root / "lora", a["file"], "adapter file")
        except LongcatError as e:
            problems.append(str(e))
            continue
        lf = parsed.get(f)
        if not f.is_file():
            problems.append(f"adapter '{a['name']}' names {a['file']}, which is missing")
        elif lf is None or lf.format is None:
            problems.append(f"adapter '{a['name']}': {a['file']} could not be read (see above)")
        else:
            if lf.format != a["format"]:
                problems.append(f"adapter '{a['name']}' says format {a['format']}, the file is "
                                f"{lf.format}")
            ranks = {t.rank for t in lf.targets.values()}
            if a["rank"] not in ranks:
                problems.append(f"adapter '{a['name']}' says rank {a['rank']}, the file has "
                                f"{sorted(r for r in ranks if r)}")
            have, said = set(target_patterns(set(lf.targets))), set(a["targets"])
            if have != said:
                problems.append(f"adapter '{a['name']}' targets differ from the file's: listed "
                                f"only {listing(said - have, 2) or '-'}; in the file only "
                                f"{listing(have - said, 2) or '-'}")
    for p in problems:
        rec.fail(comp, "manifest", path, p)
    if not problems:
        rec.ok(comp, "manifest", path, f"{count(len(doc['adapters']), 'adapter')} registered, each "
               "matching its file")


def dit_shapes(dims: keymap.DiTDims) -> dict[str, dict[str, tuple[int, ...]]]:
    return {f: dict(keymap.tensor_specs(dims, f)) for f in keymap.FLAVOURS}
