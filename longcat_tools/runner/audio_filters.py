"""The signal conditioning the original applies before its audio encoders, in numpy (float64):

* ``loudness_normalize``: ITU-R BS.1770-4 integrated loudness as ``pyloudnorm`` 0.1.1 measures
  it (its K-weighting biquads from the RBJ cookbook: a +4 dB high shelf at 1500 Hz, Q 1/sqrt(2),
  then a high pass at 38 Hz, Q 0.5; 400 ms blocks every 100 ms, each block's mean square divided by
  the full block length; gates at -70 LUFS and 10 LU under the gated mean), then a gain to
  -23 LUFS. A track whose loudness is beyond +-100 (silence measures -inf) is returned unchanged.
* ``add_noise_floor`` (1.0 only): white noise at -45 dBFS. The original draws it from numpy's
  global, unseeded generator; here it comes from ``numpy.random.RandomState(seed)``, the same
  generator the global one is, so a seed reproduces the original run after ``np.random.seed``.
* ``smooth_transients`` (1.0 only): a 3rd-order Butterworth low pass at 3 kHz, designed as
  ``scipy.signal.butter`` does (bilinear transform with pre-warping) and run as ``lfilter`` does
  (zero initial state).

IIR filters run as an FFT convolution with the impulse response, cut where its tail is below
float64 resolution: the same output as a sample loop to about 1e-15, at numpy speed.
"""

from __future__ import annotations

import numpy as np

from longcat_tools.errors import LongcatError

TARGET_LUFS = -23.0
LOUDNESS_LIMIT = 100.0  # |loudness| above this (silence: -inf) leaves the track as it is
BLOCK_S = 0.4
BLOCK_STEP = 0.25  # of a block: 75 % overlap
ABSOLUTE_GATE = -70.0
RELATIVE_GATE = -10.0
NOISE_DB = -45.0
LOWPASS_HZ = 3000.0
LOWPASS_ORDER = 3


def _biquad(kind: str, gain_db: float, q: float, fc: float, rate: float
            ) -> tuple[np.ndarray, np.ndarray]:
    """The RBJ cookbook high shelf / high pass, normalised by a0 (pyloudnorm's formulas)."""
    a = 10 ** (gain_db / 40.0)
    w0 = 2.0 * np.pi * (fc / rate)
    alpha = np.sin(w0) / (2.0 * q)
    cos = np.cos(w0)
    if kind == "high_shelf":
        b = [a * ((a + 1) + (a - 1) * cos + 2 * np.sqrt(a) * alpha),
             -2 * a * ((a - 1) + (a + 1) * cos),
             a * ((a + 1) + (a - 1) * cos - 2 * np.sqrt(a) * alpha)]
        den = [(a + 1) - (a - 1) * cos + 2 * np.sqrt(a) * alpha,
               2 * ((a - 1) - (a + 1) * cos),
               (a + 1) - (a - 1) * cos - 2 * np.sqrt(a) * alpha]
    else:  # high pass
        b = [(1 + cos) / 2, -(1 + cos), (1 + cos) / 2]
        den = [1 + alpha, -2 * cos, 1 - alpha]
    return np.array(b) / den[0], np.array(den) / den[0]


def k_weighting(rate: float) -> list[tuple[np.ndarray, np.ndarray]]:
    return [_biquad("high_shelf", 4.0, 1 / np.sqrt(2), 1500.0, rate),
            _biquad("high_pass", 0.0, 0.5, 38.0, rate)]


def butter_lowpass(order: int, cutoff: float) -> tuple[np.ndarray, np.ndarray]:
    """Digital Butterworth low pass, ``cutoff`` a fraction of Nyquist, as scipy designs it."""
    fs2 = 4.0  # 2 * fs with scipy's fs = 2
    poles = np.exp(1j * np.pi * np.arange(-order + 1, order, 2) / (2 * order)) * -1
    warped = fs2 * np.tan(np.pi * cutoff / 2.0)
    p = poles * warped
    k = warped ** order
    pz = (fs2 + p) / (fs2 - p)
    k = k * np.real(1.0 / np.prod(fs2 - p))
    return k * np.real(np.poly(-np.ones(order))), np.real(np.poly(pz))


def _impulse_response(b: np.ndarray, a: np.ndarray) -> np.ndarray:
    """The filter's impulse response until it falls below float64 resolution."""
    radius = float(np.max(np.abs(np.roots(a)))) if len(a) > 1 else 0.0
    if radius >= 1.0:
        raise ValueError("unstable filter")
    n = len(b) + len(a) + (int(np.ceil(np.log(1e-18) / np.log(radius))) * 2 if radius > 0 else 0)
    h = np.zeros(n)
    x = np.zeros(n)
    x[0] = 1.0
    for i in range(n):
        acc = sum(b[j] * x[i - j] for j in range(min(len(b), i + 1)))
        acc -= sum(a[j] * h[i - j] for j in range(1, min(len(a), i + 1)))
        h[i] = acc / a[0]
    return h


def iir_filter(b: np.ndarray, a: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``scipy.signal.lfilter(b, a, x)`` (zero initial state) for a stable filter, float64."""
    x = np.asarray(x, np.float64)
    h = _impulse_response(b, a)
    size = 1 << int(np.ceil(np.log2(len(x) + len(h) - 1)))
    y = np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(h, size), size)
    return y[:len(x)]


def integrated_loudness(x: np.ndarray, rate: int) -> float:
    """Gated loudness in LUFS of a mono track (BS.1770-4, pyloudnorm 0.1.1's block layout)."""
    x = np.asarray(x, np.float64)
    if len(x) < BLOCK_S * rate:
        raise LongcatError(f"audio of {len(x) / rate:.2f} s is shorter than the {BLOCK_S} s "
                           "loudness block")
    for b, a in k_weighting(rate):
        x = iir_filter(b, a, x)
    step = BLOCK_STEP
    n_blocks = int(np.round((len(x) / rate - BLOCK_S) / (BLOCK_S * step))) + 1
    z = np.empty(n_blocks)
    for j in range(n_blocks):
        lo = int(BLOCK_S * (j * step) * rate)
        hi = int(BLOCK_S * (j * step + 1) * rate)
        z[j] = (1.0 / (BLOCK_S * rate)) * np.sum(np.square(x[lo:hi]))
    with np.errstate(divide="ignore"):
        block_lufs = -0.691 + 10.0 * np.log10(z)
    gated = z[block_lufs >= ABSOLUTE_GATE]
    if gated.size == 0:
        return -np.inf
    relative = -0.691 + 10.0 * np.log10(np.mean(gated)) + RELATIVE_GATE
    kept = z[(block_lufs > relative) & (block_lufs > ABSOLUTE_GATE)]
    if kept.size == 0:
        return -np.inf
    return float(-0.691 + 10.0 * np.log10(np.mean(kept)))


def loudness_normalize(x: np.ndarray, rate: int, target: float = TARGET_LUFS) -> np.ndarray:
    """Gain ``x`` to ``target`` LUFS; unchanged when its loudness is beyond +-100 LUFS."""
    x = np.asarray(x, np.float64)
    loudness = integrated_loudness(x, rate)
    if abs(loudness) > LOUDNESS_LIMIT:
        return x
    return np.power(10.0, (target - loudness) / 20.0) * x


NOISE_SEEDS = range(2**32)  # what numpy's RandomState takes


def add_noise_floor(x: np.ndarray, seed: int, noise_db: float = NOISE_DB) -> np.ndarray:
    """``x`` plus white noise at ``noise_db`` dBFS from ``RandomState(seed)``."""
    noise = np.random.RandomState(seed).randn(len(x)) * 10 ** (noise_db / 20)
    return np.asarray(x, np.float64) + noise


def smooth_transients(x: np.ndarray, rate: int) -> np.ndarray:
    """The 3 kHz Butterworth low pass (order 3)."""
    b, a = butter_lowpass(LOWPASS_ORDER, LOWPASS_HZ / (rate / 2))
    return iir_filter(b, a, x)
