"""Memory options for GPUs smaller than the 13.6B DiT: block swap, text-encoder offload, VAE tiling.

The DiT alone is 25.3 GiB in bf16, so a 24 GB card cannot hold it. ``BlockSwap`` keeps the 48
transformer blocks in pinned CPU memory and copies each to the GPU just before it runs (the next
one on a side stream while the current one computes), then drops the GPU copy; only the small
embedders, final layer, LoRA deltas and at most two blocks stay on the GPU. Each block is about
0.5 GB in bf16, so a 480p forward streams ~24 GB over PCIe per step.

``offload_text_encoder`` keeps the UMT5 encoder in CPU memory and copies it to the GPU only while
a prompt is encoded, block by block (dropping each GPU copy after use: no copy back).
``enable_vae_tiling`` turns on the VAE's tiled decode where the VAE has one.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class BlockSwap:
    """Stream ``model.blocks`` from pinned CPU memory to ``device`` one block at a time.

    ``resident`` leading blocks stay on the device for good (more memory, fewer copies).
    Everything outside ``model.blocks`` is moved to ``device``. ``remove()`` puts the blocks
    back on the device as ordinary parameters.
    """

    def __init__(self, model: nn.Module, device: torch.device | str, resident: int = 0,
                 prefetch: bool = True) -> None:
        self.model, self.device = model, torch.device(device)
        self.blocks: list[nn.Module] = list(model.blocks)
        self.resident = max(0, min(resident, len(self.blocks)))
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda and prefetch else None
        self.loads: list[int] = []  # block indices in load order (for tests and reports)
        self._ready: dict[int, Any] = {}  # block index -> event (or None) of its copy
        self._host: list[list[tuple[nn.Parameter, torch.Tensor]]] = []
        blocks = set(id(b) for b in self.blocks)
        for name, child in model.named_children():
            if name != "blocks" and id(child) not in blocks:
                child.to(self.device)
        for i, block in enumerate(self.blocks):
            if i < self.resident:
                block.to(self.device)
                self._host.append([])
                continue
            host = []
            for p in (*block.parameters(), *block.buffers()):  # fp8 scales are buffers
                t = p.data.to("cpu")
                if cuda:
                    t = t.pin_memory()
                p.data = t
                host.append((p, t))
            self._host.append(host)
        self._hooks = [b.register_forward_pre_hook(self._pre(i)) for i, b in
                       enumerate(self.blocks)]
        self._hooks += [b.register_forward_hook(self._post(i)) for i, b in
                        enumerate(self.blocks)]

    def _swapped(self, i: int) -> bool:
        return 0 <= i < len(self.blocks) and bool(self._host[i])

    def _load(self, i: int) -> None:
        """Start copying block i to the device (on the side stream when there is one)."""
        if not self._swapped(i) or i in self._ready:
            return
        self.loads.append(i)
        if self.stream is None:
            for p, t in self._host[i]:
                p.data = t.to(self.device)
            self._ready[i] = None
            return
        with torch.cuda.stream(self.stream):
            for p, t in self._host[i]:
                p.data = t.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        self._ready[i] = event

    def _pre(self, i: int):
        def hook(module: nn.Module, args: Any) -> None:
            self._load(i)
            event = self._ready.get(i)
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)
                for p, _ in self._host[i]:  # made on the side stream, used on this one
                    p.data.record_stream(torch.cuda.current_stream(self.device))
            self._load(i + 1)  # prefetch the next block while this one computes
        return hook

    def _post(self, i: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._swapped(i):
                for p, t in self._host[i]:
                    p.data = t
                self._ready.pop(i, None)
        return hook

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        for i, host in enumerate(self._host):
            for p, t in host:
                p.data = t.to(self.device)
            self._host[i] = []
        self._ready.clear()


def enable_block_swap(model: nn.Module, device: torch.device | str, resident: int = 0,
                      prefetch: bool = True) -> BlockSwap:
    """Attach a ``BlockSwap`` to the DiT (``model.block_swap`` keeps it)."""
    swap = BlockSwap(model, device, resident=resident, prefetch=prefetch)
    model.block_swap = swap
    return swap


@contextmanager
def on_device(module: nn.Module, device: torch.device, home: torch.device | str = "cpu",
              blocks: nn.ModuleList | None = None):
    """Run ``module`` on ``device`` for the duration, its weights living in host memory.

    On a GPU the weights stay in host memory: entering copies them in, leaving just drops the
    GPU copies, since inference never changes them. From the ``PIN_FROM_USE``-th use on they
    are pinned (once), so later copies are fast; a module used a few times never pays for the
    pinning. Elsewhere: ``.to`` and back.

    ``blocks`` (on a GPU): these submodules come in one at a time, each just before it runs and
    dropped right after, so the module never sits whole on the GPU (UMT5-XXL's 24 blocks: 0.4 GB
    each instead of 10.6 GiB at once; the same bytes cross, in the same total time, since an
    encode is bound by the copy anyway).
    """
    if device.type != "cuda":
        module.to(device)
        try:
            yield module
        finally:
            module.to(home)
        return
    uses = getattr(module, "_longcat_uses", 0) + 1
    module._longcat_uses = uses
    host = _pinned(module) if uses >= PIN_FROM_USE else _pageable(module)
    streamed = {id(t) for b in (blocks or []) for t in (*b.parameters(), *b.buffers())}
    for t, h in host:
        if id(t) not in streamed:
            t.data = h.to(device, non_blocking=True)
    hooks = []
    for block in blocks or []:
        ids = {id(x) for x in (*block.parameters(), *block.buffers())}
        mine = [(t, h) for t, h in host if id(t) in ids]

        def load(_module, _args, mine=mine) -> None:
            for t, h in mine:
                t.data = h.to(device, non_blocking=True)

        def drop(_module, _args, _output, mine=mine) -> None:
            for t, h in mine:
                t.data = h

        hooks += [block.register_forward_pre_hook(load), block.register_forward_hook(drop)]
    try:
        yield module
    finally:
        for hook in hooks:
            hook.remove()
        for t, h in host:
            t.data = h
        torch.cuda.empty_cache()


# UMT5-XXL's 10.6 GiB on an H100 host (benchmarks/results/text_encoder_copies_h100.json): pinning
# took 9.0 s, a copy from pinned memory 0.21 s, from pageable memory 1.8-2.2 s. Pin once the
# pageable copies have cost about what pinning does (four, ~8 s): never much more than twice the
# best choice in hindsight. Most jobs encode one or two prompts and never pin; long CFG jobs
# and batches pin once.
PIN_FROM_USE = 5


def _pageable(module: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tensor, its host copy) for every parameter and buffer, unpinned, in place on the CPU."""
    host = []
    for t in (*module.parameters(), *module.buffers()):
        t.data = t.data.to("cpu")
        host.append((t, t.data))
    return host


def _pinned(module: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tensor, its pinned host copy) for every parameter and buffer, made once per module."""
    host = getattr(module, "_longcat_pinned", None)
    tensors = [*module.parameters(), *module.buffers()]
    if host is None or [id(t) for t, _ in host] != [id(t) for t in tensors]:
        host = []
        for t in tensors:
            h = t.data.to("cpu").pin_memory()
            t.data = h
            host.append((t, h))
        module._longcat_pinned = host
    return host


def enable_vae_tiling(vae: Any) -> bool:
    """Tiled VAE decode where the VAE supports it (diffusers' ``enable_tiling``)."""
    if hasattr(vae, "enable_tiling"):
        vae.enable_tiling()
        return True
    return False
