"""GPU test of the text-encoder offload: weights live in host memory, are copied in for the
duration and dropped afterwards (no copy back), pinned from the ``PIN_FROM_USE``-th use on, once."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_on_device_pins_host_weights_once_used_enough():
    from longcat_tools.runner.offload import PIN_FROM_USE, on_device

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64)).eval()
    want = [t.detach().clone() for t in [*net.parameters(), *net.buffers()]]
    x = torch.randn(8, 64)
    ref = net(x)
    dev = torch.device("cuda")
    for use in range(1, PIN_FROM_USE + 1):
        with on_device(net, dev):
            assert all(t.is_cuda for t in [*net.parameters(), *net.buffers()])
            out = net(x.to(dev))
        torch.testing.assert_close(out.cpu(), ref)
        now = [*net.parameters(), *net.buffers()]
        assert all(not t.is_cuda and t.is_pinned() == (use >= PIN_FROM_USE) for t in now)
        assert all(torch.equal(t, w) for t, w in zip(now, want, strict=True))
    first = [h.data_ptr() for _, h in net._longcat_pinned]
    with on_device(net, dev):
        pass
    assert [h.data_ptr() for _, h in net._longcat_pinned] == first  # pinned once


def test_on_device_streams_blocks_one_at_a_time():
    from longcat_tools.runner.offload import on_device

    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(torch.nn.Linear(1024, 1024) for _ in range(8))
    net = torch.nn.Sequential(torch.nn.Linear(64, 1024), *blocks).eval()
    x = torch.randn(4, 64)
    ref = net(x)
    dev = torch.device("cuda")
    block_bytes = sum(p.numel() * p.element_size() for p in blocks[0].parameters())
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with on_device(net, dev, blocks=blocks), torch.no_grad():  # as encoders run: autograd
        assert not any(p.is_cuda for p in blocks.parameters())  # would keep every block's copy
        out = net(x.to(dev))
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    torch.testing.assert_close(out.cpu(), ref)
    assert peak < 3 * block_bytes, (peak, block_bytes)  # whole: 8 blocks
    assert all(not p.is_cuda and not p.is_pinned() for p in net.parameters())  # a first use
