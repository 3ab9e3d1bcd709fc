"""Resolution buckets of the original pipeline, as data.

A conditioned task (i2v, vc, refine) takes its output size from the bucket whose aspect ratio
(height / width, the table key) is nearest to the input's. The tables depend on the target
resolution and on the pixel granularity: 16 px for the base tasks (VAE 8x times patch 2), 64 px for
refinement (BSA needs the token grid in whole 4x4 chunks). Values from the original's
``utils/bukcet_config.py`` (context-parallel granularities 128/256 are not needed on one GPU).
"""

from __future__ import annotations

from longcat_tools.errors import LongcatError

BUCKETS: dict[tuple[str, int], dict[str, tuple[int, int]]] = {
    ("480p", 16): {
        "0.26": (320, 1216), "0.31": (352, 1120), "0.38": (384, 1024), "0.43": (416, 960),
        "0.52": (448, 864), "0.58": (480, 832), "0.67": (512, 768), "0.74": (544, 736),
        "0.86": (576, 672), "0.95": (608, 640), "1.05": (640, 608), "1.17": (672, 576),
        "1.29": (704, 544), "1.35": (736, 544), "1.50": (768, 512), "1.67": (800, 480),
        "1.73": (832, 480), "2.00": (896, 448), "2.31": (960, 416), "2.58": (992, 384),
        "2.75": (1056, 384), "3.09": (1088, 352), "3.70": (1184, 320), "3.80": (1216, 320),
        "3.90": (1248, 320), "4.00": (1280, 320),
    },
    ("480p", 64): {
        "0.26": (320, 1216), "0.38": (384, 1024), "0.50": (448, 896), "0.67": (512, 768),
        "0.82": (576, 704), "1.00": (640, 640), "1.22": (704, 576), "1.50": (768, 512),
        "1.86": (832, 448), "2.00": (896, 448), "2.50": (960, 384), "2.83": (1088, 384),
        "3.60": (1152, 320), "3.80": (1216, 320), "4.00": (1280, 320),
    },
    ("720p", 16): {
        "0.25": (480, 1920), "0.29": (512, 1792), "0.32": (544, 1696), "0.36": (576, 1600),
        "0.40": (608, 1504), "0.49": (672, 1376), "0.54": (704, 1312), "0.59": (736, 1248),
        "0.69": (800, 1152), "0.74": (832, 1120), "0.82": (864, 1056), "0.88": (896, 1024),
        "0.94": (928, 992), "1.00": (960, 960), "1.07": (992, 928), "1.14": (1024, 896),
        "1.22": (1056, 864), "1.31": (1088, 832), "1.35": (1120, 832), "1.44": (1152, 800),
        "1.70": (1248, 736), "2.00": (1344, 672), "2.05": (1376, 672), "2.47": (1504, 608),
        "2.53": (1536, 608), "2.83": (1632, 576), "3.06": (1664, 544), "3.12": (1696, 544),
        "3.62": (1856, 512), "3.93": (1888, 480), "4.00": (1920, 480),
    },
    ("720p", 64): {
        "0.22": (448, 2048), "0.29": (512, 1792), "0.36": (576, 1600), "0.45": (640, 1408),
        "0.55": (704, 1280), "0.63": (768, 1216), "0.76": (832, 1088), "0.88": (896, 1024),
        "1.00": (960, 960), "1.14": (1024, 896), "1.31": (1088, 832), "1.50": (1152, 768),
        "1.58": (1216, 768), "1.82": (1280, 704), "1.91": (1344, 704), "2.20": (1408, 640),
        "2.30": (1472, 640), "2.67": (1536, 576), "2.89": (1664, 576), "3.62": (1856, 512),
        "3.75": (1920, 512),
    },
}
RESOLUTIONS = ("480p", "720p")


def bucket_size(height: int, width: int, resolution: str, granularity: int = 16
                ) -> tuple[int, int]:
    """(height, width) of the bucket nearest in aspect ratio to ``height x width``; ties go to
    the first bucket in table order, like the original."""
    table = BUCKETS.get((resolution, 16 if granularity == 32 else granularity))
    if table is None:
        raise LongcatError(f"no resolution buckets for '{resolution}' at {granularity} px "
                           f"(use one of {', '.join(RESOLUTIONS)})")
    ratio = height / width
    key = min(table, key=lambda k: abs(float(k) - ratio))
    return table[key]
