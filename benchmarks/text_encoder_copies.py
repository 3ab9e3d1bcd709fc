"""What ``--offload text-encoder`` costs per prompt: host-to-GPU copies of UMT5, pinned or not.

UMT5 from ``CKPT/text_encoder`` on the CPU, then in this process: every tensor copied to the GPU
from pageable memory (twice), pinned (once), copied from pinned memory (twice); then our
``runner.offload.on_device`` encoding one prompt, use after use, which pins at its
``PIN_FROM_USE``-th use. Seconds, GPU-synchronised; a table, and ``--out`` a JSON file.

The encode that pins reuses the pinned blocks the first pinning left in torch's caching host
allocator, so its row shows the copies, not the pinning: that costs what "pin every tensor"
shows, the first time a process pins.

  PYTHONPATH=. python3 benchmarks/text_encoder_copies.py CKPT --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import torch
from load_threads import timed  # this folder: the script's own, first on sys.path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt", type=Path, help="a converted checkpoint (its text_encoder/)")
    ap.add_argument("--uses", type=int, default=4, help="encodes through on_device")
    ap.add_argument("--out", type=Path, default=None, help="folder for the JSON result")
    a = ap.parse_args()
    from transformers import UMT5EncoderModel

    from longcat_tools.runner.offload import PIN_FROM_USE, on_device

    model = UMT5EncoderModel.from_pretrained(a.ckpt / "text_encoder",
                                             torch_dtype=torch.bfloat16).eval()
    host = [t.data for t in (*model.parameters(), *model.buffers())]
    gib = sum(t.numel() * t.element_size() for t in host) / 2**30
    dev = torch.device("cuda")
    torch.zeros(1, device=dev)
    rows = []

    def copy_all(tensors):
        return [t.to(dev, non_blocking=True) for t in tensors]

    for i in range(2):
        _, s = timed(lambda: copy_all(host))
        rows.append({"what": f"copy from pageable memory #{i + 1}", "s": s})
    pinned, s = timed(lambda: [t.pin_memory() for t in host])
    rows.append({"what": "pin every tensor (once)", "s": s})
    for i in range(2):
        _, s = timed(lambda: copy_all(pinned))
        rows.append({"what": f"copy from pinned memory #{i + 1}", "s": s})
    pinned.clear()  # freed to torch's caching host allocator, which keeps the pinned blocks
    ids = torch.randint(0, 1000, (1, 512), device=dev)
    mask = torch.ones_like(ids)
    for use in range(1, a.uses + 1):
        def encode():
            with on_device(model, dev, blocks=model.encoder.block), torch.no_grad():
                return model(ids, mask).last_hidden_state
        _, s = timed(encode)
        rows.append({"what": f"on_device encode, use {use}"
                     + (" (pins)" if use == PIN_FROM_USE else ""), "s": s})
    print(f"UMT5 {gib:.2f} GiB, {torch.cuda.get_device_name()}")
    print(f"{'what':40} {'s':>7}")
    for r in rows:
        print(f"{r['what']:40} {r['s']:7.3f}")
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        doc = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(),
               "torch": torch.__version__, "python": platform.python_version(),
               "host": platform.node(), "text_encoder_gib": gib,
               "pin_from_use": PIN_FROM_USE, "rows": rows}
        (a.out / "text_encoder_copies.json").write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
