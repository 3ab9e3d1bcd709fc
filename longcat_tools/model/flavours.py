"""Every key flavour of the DiT behind one interface: native, FastVideo (``keymap``) and ComfyUI
(``comfy_keys``). A flavour's tensor is a native tensor or a row slice of one; converting between
any two flavours goes through the native names."""

from __future__ import annotations

from longcat_tools.model import comfy_keys, keymap


def tensor_specs(dims: keymap.DiTDims, flavour: str, fp8: bool = False
                 ) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of the DiT in ``flavour`` (``fp8``: with the per-channel
    weight scales of an fp8 checkpoint; not a ComfyUI flavour)."""
    if flavour == comfy_keys.FLAVOUR:
        return comfy_keys.tensor_specs(dims)
    return keymap.tensor_specs(dims, flavour, fp8)


def to_native(name: str, flavour: str) -> keymap.Part:
    """The native tensor (and row slice) a tensor of ``flavour`` is."""
    if flavour == "native":
        return keymap.Part(name, name, 0, 1)
    if flavour == comfy_keys.FLAVOUR:
        return comfy_keys.comfy_to_native(name)
    return keymap.fastvideo_to_native(name)


def parts_of(native: str, flavour: str) -> list[str]:
    """The tensors of ``flavour`` whose row concatenation is a native tensor."""
    if flavour == "native":
        return [native]
    if flavour == comfy_keys.FLAVOUR:
        return [p.fastvideo for p in comfy_keys.native_to_comfy(native)]
    return [p.fastvideo for p in keymap.native_to_fastvideo(native)]


def sources_of(name: str, target: str, source: str) -> list[tuple[str, int, int]]:
    """(source tensor, slice index, slice count) whose rows, concatenated, are the ``target``
    flavour's tensor ``name``."""
    part = to_native(name, target)
    srcs = parts_of(part.native, source)
    if part.count == 1:
        return [(s, 0, 1) for s in srcs]
    if len(srcs) == 1:
        return [(srcs[0], part.index, part.count)]
    return [(srcs[part.index], 0, 1)]  # both split alike (the tables split in the same order)
