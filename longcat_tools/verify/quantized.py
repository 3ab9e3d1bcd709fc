"""Checks of an fp8 DiT folder (``model.fp8``): its quantization config, the dtypes of its
weights and scales, and the scales' values.

Scales are small (one float32 per output row), so they are read and checked on every run: a
zero, negative, NaN or huge scale would make ``weight * scale`` wrong or non-finite everywhere
in that row. NaN inside the e4m3 weights themselves is found by ``--deep``'s scan.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from longcat_tools.checkpoint import layouts
from longcat_tools.errors import LongcatError
from longcat_tools.io.safetensors import TensorInfo, read_tensor
from longcat_tools.model import flavours, fp8
from longcat_tools.verify.report import Recorder, count, listing
from longcat_tools.verify.weights import WeightSet

E4M3, E4M3_MAX = fp8.STORED_DTYPE, fp8.E4M3_MAX


def declared(rec: Recorder, component: str, folder: Path) -> bool:
    """Whether ``folder`` says it is fp8 (its quantization config); an unreadable config or
    another method fails a row and counts as not fp8."""
    path = folder / fp8.CONFIG_FILE
    if not path.exists():
        return False
    with rec.guard(component, "quantization", path):
        layouts.fp8_declared(folder)
        rec.ok(component, "quantization", path, f"{fp8.METHOD}: e4m3 block GEMM weights, "
                                                "float32 scales per output channel")
        return True
    return False


def _is_quantized_weight(name: str, flavour: str, param: str) -> bool:
    native = flavours.to_native(name, flavour).native
    module, _, p = native.rpartition(".")
    return p == param and fp8.is_quantized(module)


def check(rec: Recorder, ws: WeightSet, flavour: str, is_fp8: bool) -> None:
    """Dtypes of an fp8 folder (e4m3 weights, float32 scales, one dtype for the rest) and the
    values of its scales; in a plain folder, e4m3 weights or scales without the config fail."""
    comp, label = ws.component, ws.label

    def kind(name: str) -> str:
        try:
            if _is_quantized_weight(name, flavour, "weight"):
                return "weight"
            if _is_quantized_weight(name, flavour, fp8.SCALE):
                return "scale"
        except LongcatError:  # not a DiT name: reported by the tensor-set check
            pass
        return "rest"

    kinds = {n: kind(n) for n in ws.tensors}
    if not is_fp8:
        odd = [n for n, t in ws.tensors.items()
               if t.dtype.startswith("F8") or kinds[n] == "scale"]
        if odd:
            rec.fail(comp, "quantization", label,
                     f"float8 weights or weight scales but no {fp8.CONFIG_FILE} saying how to "
                     f"read them: {listing(odd)} (write the folder with convert --dtype fp8)")
        return
    wrong = [f"{n} is {t.dtype}" for n, t in ws.tensors.items()
             if (kinds[n] == "weight" and t.dtype != E4M3)
             or (kinds[n] == "scale" and t.dtype != "F32")]
    rest = {t.dtype for n, t in ws.tensors.items() if kinds[n] == "rest"}
    wrong += [f"{n} is {t.dtype} without a scale" for n, t in ws.tensors.items()
              if kinds[n] == "rest" and t.dtype.startswith("F8")]  # read as if it were bf16
    if wrong:
        rec.fail(comp, "dtype", label, f"fp8 folder: block GEMM weights must be F8_E4M3 and "
                                       f"their scales F32, the rest unquantized: "
                                       f"{listing(wrong, 3)}")
    elif len(rest) > 1:
        rec.warn(comp, "dtype", label, f"fp8 folder: the other tensors mix {sorted(rest)}")
    else:
        n_w = sum(k == "weight" for k in kinds.values())
        rec.ok(comp, "dtype", label, f"fp8: {count(n_w, 'e4m3 weight')} with float32 scales, "
                                     f"the rest {', '.join(sorted(rest)) or 'none'}")
    _scale_values(rec, ws, [n for n, k in kinds.items() if k == "scale"
                            and ws.tensors[n].dtype == "F32"])


def unusable_scales(tensors: Mapping[str, tuple[Path, TensorInfo]], qmax: float) -> list[str]:
    """``"<name> holds <value>"`` for each scale tensor (name -> its file and header entry) with
    a value that is not positive or whose largest weight (``qmax * scale``) is not a finite
    float32; each file opened once. ``verify`` and ``convert`` (before writing) judge alike."""
    bad: list[str] = []
    by_file: dict[Path, list[str]] = {}
    for name, (path, _) in tensors.items():
        by_file.setdefault(path, []).append(name)
    for path, group in by_file.items():
        with open(path, "rb") as f:
            for name in group:
                s = read_tensor(f, tensors[name][1]).double()
                ok = (s > 0) & (s * qmax).float().isfinite()
                if s.numel() and not bool(ok.all()):
                    bad.append(f"{name} holds {s[~ok][0].item()}")
    return bad


def check_scales(infos: dict[str, tuple[Path, TensorInfo]], suffix: str, qmax: float,
                 where: Path) -> None:
    """Every quantization scale among ``infos`` (names ending ``.suffix``) finite and positive,
    for the commands that read the weights, before they do: ``convert`` wrote weight x scale as
    NaN, Inf or negated with exit 0, and ``run`` made a NaN video, where ``verify`` fails the
    same folder."""
    bad = unusable_scales({n: i for n, i in infos.items() if n.endswith(f".{suffix}")}, qmax)
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise LongcatError(f"{where}: weight scales must be finite and positive (weight x "
                           f"scale must stay finite): {bad[0]}{more}; `longcat-tools verify` "
                           "lists every such scale")


def _scale_values(rec: Recorder, ws: WeightSet, names: list[str]) -> None:
    bad = unusable_scales({n: (ws.where[n], ws.tensors[n]) for n in names}, E4M3_MAX)
    if bad:
        rec.fail(ws.component, "scales", ws.label,
                 f"weight scales must be finite and positive (weight x scale must stay finite): "
                 f"{listing(bad, 3)}")
    elif names:
        rec.ok(ws.component, "scales", ws.label,
               f"{count(len(names), 'scale tensor')}: finite and positive")
