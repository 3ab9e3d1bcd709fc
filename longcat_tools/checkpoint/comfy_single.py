"""A ComfyUI single-file DiT (Kijai's ``LongCat-Video_comfy``): what it holds, checked.

The file is the DiT alone, in the comfy key flavour (:mod:`longcat_tools.model.comfy_keys`),
bf16/fp16/fp32 as stored, or ``fp8_e4m3fn_scaled``: float8 weights, each with a one-element
``<module>.scale_weight`` (WanVideoWrapper reads a file as scaled when it has such scales or a
``scaled_fp8`` marker). A scaled weight is dequantized as
``(fp8.to(float32) * scale.to(float32)).to(out_dtype)``. ``<module>.scale_input`` tensors are
activation scales for fp8 matmuls, not part of any weight: they are checked and left out.
Everything else is refused in one line; only the header and the scalar scales are read here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from longcat_tools.errors import LongcatError
from longcat_tools.io.safetensors import (
    Header,
    TensorInfo,
    read_header,
    read_tensor,
    require_float,
)
from longcat_tools.model import comfy_keys, keymap

if TYPE_CHECKING:
    import torch

FP8 = ("F8_E4M3", "F8_E5M2")
FILE_NAME = "diffusion_model.safetensors"  # what ``convert --to comfy`` writes into its folder


@dataclass(frozen=True)
class ComfyFile:
    path: Path
    tensors: dict[str, TensorInfo]  # comfy name (prefix stripped) -> stored tensor
    scales: dict[str, float]  # comfy weight name -> its scale (float32 value)
    dims: keymap.DiTDims
    header: Header  # the file's, as read (names with their prefix)
    input_scales: int = 0  # ``scale_input`` tensors left out (they change no weight)

    @property
    def scaled(self) -> bool:
        return bool(self.scales)

    def load(self, name: str) -> torch.Tensor:
        """The tensor as stored, a scaled float8 weight dequantized to float32."""
        import torch

        info = self.tensors[name]
        with open(self.path, "rb") as f:
            t = read_tensor(f, info)
        if name in self.scales:
            scale = torch.tensor(self.scales[name], dtype=torch.float32)
            return t.to(torch.float32) * scale
        return t


def read(path: Path) -> ComfyFile:
    """Parse and check a single-file DiT from its header (and its small scale tensors)."""
    import torch

    where = str(path)
    header = read_header(path)
    names = list(header.tensors)
    prefixed = [n for n in names if n.startswith(comfy_keys.PREFIX)]
    if prefixed and len(prefixed) != len(names):
        bare = next(n for n in names if not n.startswith(comfy_keys.PREFIX))
        raise LongcatError(f"{where}: some tensors carry the '{comfy_keys.PREFIX}' prefix and "
                           f"some do not ('{bare}'); one file must use one naming")
    strip = len(comfy_keys.PREFIX) if prefixed else 0
    stored = {n[strip:]: header.tensors[n] for n in names}
    marker = stored.pop(comfy_keys.SCALED_FP8_MARKER, None)
    scale_infos = {n[: -len(comfy_keys.SCALE_SUFFIX)] + ".weight": stored.pop(n)
                   for n in list(stored) if n.endswith(comfy_keys.SCALE_SUFFIX)}
    input_scales = {n: stored.pop(n) for n in list(stored)
                    if n.endswith(comfy_keys.INPUT_SCALE_SUFFIX)}
    for name, info in stored.items():
        try:
            comfy_keys.comfy_to_native(name)
        except LongcatError as e:  # e.g. a shard of a checkpoint's dit/, in LongCat's names
            raise LongcatError(f"{where}: {e}: not a ComfyUI single-file DiT; to convert a "
                               "checkpoint, pass its folder") from None
        require_float(where, info)
    dims = comfy_keys.dims_from_shapes({n: i.shape for n, i in stored.items()}, where)
    expected = dict(comfy_keys.tensor_specs(dims))
    for name, shape in expected.items():
        if name not in stored:
            raise LongcatError(f"{where}: DiT tensor '{name}' is missing (the other shapes imply "
                               f"depth {dims.depth}, hidden {dims.hidden_size})")
        if stored[name].shape != shape:
            raise LongcatError(f"{where}: tensor '{name}' has shape {list(stored[name].shape)}, "
                               f"the other shapes imply {list(shape)}")
    extra = sorted(set(stored) - set(expected))
    if extra:
        raise LongcatError(f"{where}: tensor '{extra[0]}' does not fit a DiT of depth "
                           f"{dims.depth} (block index beyond the others?)")
    scales: dict[str, float] = {}
    with open(path, "rb") as f:
        for weight, info in scale_infos.items():
            key = weight[: -len(".weight")] + comfy_keys.SCALE_SUFFIX
            if weight not in stored:
                raise LongcatError(f"{where}: scale '{key}' belongs to no weight of the DiT")
            if stored[weight].dtype not in FP8:
                raise LongcatError(f"{where}: scale '{key}' belongs to '{weight}', which is "
                                   f"{stored[weight].dtype}, not float8")
            if math.prod(info.shape) != 1 or info.dtype not in ("F32", "F16", "BF16"):
                raise LongcatError(f"{where}: scale '{key}' must be one float value, got "
                                   f"{info.dtype} {list(info.shape)}")
            value = read_tensor(f, info).to(torch.float32).reshape(())
            if not bool(torch.isfinite(value)) or float(value) <= 0:
                raise LongcatError(f"{where}: scale '{key}' is {float(value)}, not a positive "
                                   "finite number")
            scales[weight] = float(value)
    for key, info in input_scales.items():
        weight = key[: -len(comfy_keys.INPUT_SCALE_SUFFIX)] + ".weight"
        if weight not in scales:
            raise LongcatError(f"{where}: '{key}' belongs to no scaled float8 weight (expected "
                               f"'{weight}' with a '{comfy_keys.SCALE_SUFFIX}')")
        if math.prod(info.shape) != 1:
            raise LongcatError(f"{where}: '{key}' must be one value, got {list(info.shape)}")
    for name, info in stored.items():
        if info.dtype in FP8 and name not in scales:
            how = ("has no scale" if marker is not None or scales
                   else "is float8 without scales (only fp8_scaled files are read)")
            raise LongcatError(f"{where}: '{name}' {how}: expected "
                               f"'{name[: -len('.weight')]}{comfy_keys.SCALE_SUFFIX}'")
    return ComfyFile(path, stored, scales, dims, header, len(input_scales))
