"""Statistics the report's verdicts rest on: t intervals, unigram entropy, LR sensitivity.

Stdlib + numpy only (the unigram entropy memory-maps the training data's ``.bin``). The
definitions are stated in docs/evidence.md; the tests compare each with a hand computation.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

# Two-sided 95% Student t quantiles t_{0.975, df}, df = 1..30 (scipy.stats.t.ppf(0.975, df)); the
# normal 1.96 beyond (the error at df = 31 is 2%, and seeds rarely exceed a handful).
_T975 = (
    12.706205,
    4.302653,
    3.182446,
    2.776445,
    2.570582,
    2.446912,
    2.364624,
    2.306004,
    2.262157,
    2.228139,
    2.200985,
    2.178813,
    2.160369,
    2.144787,
    2.131450,
    2.119905,
    2.109816,
    2.100922,
    2.093024,
    2.085963,
    2.079614,
    2.073873,
    2.068658,
    2.063899,
    2.059539,
    2.055529,
    2.051831,
    2.048407,
    2.045230,
    2.042272,
)


def t975(df: float) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (df rounded down for
    Welch's fractional df: a slightly wider, conservative interval)."""
    if df < 1:
        raise ValueError(f"t quantile needs df >= 1, got {df}")
    k = int(math.floor(df))
    return _T975[k - 1] if k <= len(_T975) else 1.959964


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values and its two-sided 95% t interval (``lo``/``hi`` None when n < 2)."""

    mean: float
    lo: float | None
    hi: float | None
    n: int

    @property
    def half(self) -> float | None:
        return None if self.lo is None else self.mean - self.lo

    def text(self, digits: int = 4) -> str:
        if self.lo is None:
            return f"{self.mean:.{digits}f} (n={self.n}, no interval)"
        return f"{self.mean:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}] (n={self.n})"


def finite(values: Iterable[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def t_interval(values: Iterable[float | None]) -> Interval | None:
    """95% t interval of the mean over the finite values; None when there are none."""
    xs = finite(values)
    if not xs:
        return None
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return Interval(mean, None, None, n)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t975(n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def welch_interval(a: Sequence[float], b: Sequence[float]) -> Interval | None:
    """95% Welch interval of mean(a) - mean(b); no interval (lo None) unless both have n >= 2."""
    a, b = finite(a), finite(b)
    if not a or not b:
        return None
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    diff = ma - mb
    if len(a) < 2 or len(b) < 2:
        return Interval(diff, None, None, min(len(a), len(b)))
    va = sum((x - ma) ** 2 for x in a) / (len(a) - 1) / len(a)
    vb = sum((x - mb) ** 2 for x in b) / (len(b) - 1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return Interval(diff, diff, diff, min(len(a), len(b)))
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = t975(df) * se
    return Interval(diff, diff - half, diff + half, min(len(a), len(b)))


def compare(a: Interval | None, b: Interval | None) -> str:
    """'below' when a's interval lies wholly below b's, 'above' when wholly above, else 'overlap'
    (which includes either side having fewer than 2 values: no interval, no separation)."""
    if a is None or b is None or a.lo is None or b.lo is None:
        return "overlap"
    if a.hi < b.lo:
        return "below"
    if a.lo > b.hi:
        return "above"
    return "overlap"


# --- unigram entropy of the training data -------------------------------------------------------

_IDX_MAGIC = b"MMIDIDX\x00\x00"
# Megatron's DType codes (megatron.core.datasets.indexed_dataset.DType).
_IDX_DTYPES = {
    1: "uint8",
    2: "int8",
    3: "int16",
    4: "int32",
    5: "int64",
    6: "float64",
    7: "float32",
    8: "uint16",
}
_ENTROPY_CACHE: dict[tuple[str, ...], tuple[float, int]] = {}


def idx_dtype(prefix: str | Path) -> str:
    """The token dtype a Megatron ``.idx`` header records (magic, version <Q, dtype code <B)."""
    with open(f"{prefix}.idx", "rb") as f:
        header = f.read(len(_IDX_MAGIC) + 9)
    if not header.startswith(_IDX_MAGIC) or len(header) < len(_IDX_MAGIC) + 9:
        raise ValueError(f"{prefix}.idx is not a Megatron indexed-dataset index")
    (code,) = struct.unpack("<B", header[len(_IDX_MAGIC) + 8 :])
    if code not in _IDX_DTYPES:
        raise ValueError(f"{prefix}.idx: unknown dtype code {code}")
    return _IDX_DTYPES[code]


def unigram_entropy(prefixes: Sequence[str | Path]) -> tuple[float, int]:
    """(entropy in nats, tokens) of the token frequencies of the ``.bin`` files, pooled.

    The entropy H = -sum_v p_v ln p_v of the unigram distribution is the loss of the best model
    that ignores context: a run whose loss sits there has learned token frequencies only. Whole
    files are counted (with ``data.split`` the train split is a subset of their documents).
    """
    import numpy as np

    key = tuple(sorted(str(p) for p in prefixes))
    if key in _ENTROPY_CACHE:
        return _ENTROPY_CACHE[key]
    counts = None
    for prefix in key:
        tokens = np.memmap(f"{prefix}.bin", dtype=idx_dtype(prefix), mode="r")
        c = np.bincount(np.asarray(tokens, dtype=np.int64))
        counts = c if counts is None else _add(counts, c)
    if counts is None or counts.sum() == 0:
        raise ValueError("no tokens to count")
    total = int(counts.sum())
    p = counts[counts > 0] / total
    result = (float(-(p * np.log(p)).sum()), total)
    _ENTROPY_CACHE[key] = result
    return result


def _add(a, b):
    import numpy as np

    n = max(len(a), len(b))
    return np.pad(a, (0, n - len(a))) + np.pad(b, (0, n - len(b)))


# --- LR sensitivity ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sensitivity:
    value: float
    l0: float
    best: float
    lrs: int


def lr_sensitivity(losses: dict[float, Sequence[float | None]], l0: float) -> Sensitivity | None:
    """Wortsman et al. (2023): LRS = mean over the LR grid of min(l(eta), l0) - l*.

    ``losses`` maps each grid LR to its seeds' final losses (None or non-finite = diverged, which
    counts as l0: the min caps a run that blew up at the loss it started from); l(eta) is the mean
    over the LR's seeds of min(loss, l0); l* = min over the grid of l(eta). 0 = every LR as good
    as the best; l0 - l* = only the best LR trains at all. None when no LR has a run.
    """
    per_lr = []
    for lr in sorted(losses):
        seeds = list(losses[lr])
        if not seeds:
            continue
        capped = [min(v, l0) if v is not None and math.isfinite(v) else l0 for v in seeds]
        per_lr.append(sum(capped) / len(capped))
    if not per_lr:
        return None
    best = min(per_lr)
    return Sensitivity(sum(x - best for x in per_lr) / len(per_lr), l0, best, len(per_lr))


def kendall_tau(a: Sequence[str], b: Sequence[str]) -> float | None:
    """Kendall's tau between two rankings of the same items (1 = same order); None if < 2 items."""
    items = [x for x in a if x in b]
    if len(items) < 2:
        return None
    pos = {x: i for i, x in enumerate(b)}
    concordant = discordant = 0
    for i in range(len(items)):
        for j in range(i + 1, len(items)):
            if pos[items[i]] < pos[items[j]]:
                concordant += 1
            else:
                discordant += 1
    return (concordant - discordant) / (concordant + discordant)
