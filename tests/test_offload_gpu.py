"""GPU test of the text-encoder offload: weights live in pinned host memory, are copied in for
the duration and dropped afterwards (no copy back), and the pinned copies are made once."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_on_device_uses_pinned_host_weights():
    from longcat_tools.runner.offload import on_device

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64)).eval()
    want = [t.detach().clone() for t in [*net.parameters(), *net.buffers()]]
    x = torch.randn(8, 64)
    ref = net(x)
    dev = torch.device("cuda")
    for _ in range(2):
        with on_device(net, dev):
            assert all(t.is_cuda for t in [*net.parameters(), *net.buffers()])
            out = net(x.to(dev))
        torch.testing.assert_close(out.cpu(), ref)
        now = [*net.parameters(), *net.buffers()]
        assert all(not t.is_cuda and t.is_pinned() for t in now)
        assert all(torch.equal(t, w) for t, w in zip(now, want, strict=True))
    first = [h.data_ptr() for _, h in net._longcat_pinned]
    with on_device(net, dev):
        pass
    assert [h.data_ptr() for _, h in net._longcat_pinned] == first  # pinned once
