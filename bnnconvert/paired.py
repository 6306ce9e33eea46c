"""Paired differences between two methods scored on the same items, with bootstrap intervals.

Two methods evaluated on the same test items (and the same out-of-distribution items)
differ by a mean per-item difference (e.g. of the NLL) or by a difference of AUROCs. Its
uncertainty comes from which items were drawn, so both methods of a bootstrap draw see
the same resampled items (a paired bootstrap). Over several seeds (checkpoints, fits)
scored on the *same* items, a draw resamples the items once for every seed and also
resamples the seeds (a two-way bootstrap): resampling each seed's items independently
would count the shared items once per seed, and on the posterior study's eighteen seeds
gave intervals 3 to 8 times too narrow (docs/results.md, item 17).

    nll_a = metrics.item_nll(pred_a.probs, y)      # (N,) per test item
    nll_b = metrics.item_nll(pred_b.probs, y)
    print(paired_difference(nll_a, nll_b))         # "+0.0023 [-0.0051, +0.0102]"
    print(paired_difference(ent_a, ent_b, ood_a=ood_ent_a, ood_b=ood_ent_b))  # AUROCs
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["PairedDifference", "auroc_rows", "paired_difference"]

Values = Tensor | np.ndarray | Sequence[float]


@dataclass(frozen=True)
class PairedDifference:
    """A - B and its bootstrap interval.

    Attributes:
        estimate: the mean over seeds of the per-seed difference (mean per-item
            difference, or AUROC of A minus AUROC of B).
        low, high: the percentile interval at ``level``.
        level: e.g. 0.95.
        seeds: how many seeds were pooled (1: the items alone were resampled).
        items: test items per seed.
        statistic: "mean" or "auroc".
    """

    estimate: float
    low: float
    high: float
    level: float
    seeds: int
    items: int
    statistic: str

    def __str__(self) -> str:
        return f"{self.estimate:+.4f} [{self.low:+.4f}, {self.high:+.4f}]"


def paired_difference(
    a: Values | Sequence[Values],
    b: Values | Sequence[Values],
    *,
    ood_a: Values | Sequence[Values] | None = None,
    ood_b: Values | Sequence[Values] | None = None,
    draws: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> PairedDifference:
    """A minus B on the same items, with a paired (over seeds: two-way) bootstrap interval.

    Without ``ood_a``/``ood_b``: ``a`` and ``b`` are per-item values (N,) of the two
    methods on the same items (e.g. :func:`bnnconvert.metrics.item_nll`); the statistic
    is the mean of a - b. With them: ``a``, ``b`` are per-item uncertainty scores (N,) of
    the in-distribution items and ``ood_a``, ``ood_b`` those of the same M
    out-of-distribution items; the statistic is AUROC(a vs ood_a) - AUROC(b vs ood_b)
    (OOD items the positives, ties counted 1/2). In- and out-of-distribution items are
    resampled independently.

    A list of such arrays (one per seed, every seed scoring the same items) gives the
    two-way bootstrap: each draw resamples the seeds and, once for all of them, the items.
    The estimate is the mean over seeds.

    Args:
        a, b: (N,) values, or a list of (N,) per seed.
        ood_a, ood_b: (M,) scores, or a list per seed (both or neither).
        draws: bootstrap draws.
        level: the interval's coverage, in (0, 1).
        seed: the bootstrap's random numbers (numpy ``default_rng(seed)``).

    Raises ValueError when the shapes do not pair up (the message says which).
    """
    if (ood_a is None) != (ood_b is None):
        raise ValueError("pass both ood_a and ood_b (an AUROC difference) or neither")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if draws < 1:
        raise ValueError(f"draws must be a positive integer, got {draws}")
    arrays = {"a": _per_seed(a), "b": _per_seed(b)}
    if ood_a is not None:
        arrays.update(ood_a=_per_seed(ood_a), ood_b=_per_seed(ood_b))
    _check_pairing(arrays)
    n_seeds, n_items = arrays["a"].shape
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, n_seeds, (draws, n_seeds)) if n_seeds > 1 else None
    if ood_a is None:
        diff = arrays["a"] - arrays["b"]  # (seeds, N)
        items = rng.integers(0, n_items, (draws, n_items))
        per_seed = diff[:, items].mean(2).T  # (draws, seeds)
        estimate = float(diff.mean(1).mean())
    else:
        n_ood = arrays["ood_a"].shape[1]
        pairs = [(rng.integers(0, n_items, n_items), rng.integers(0, n_ood, n_ood))
                 for _ in range(draws)]  # fmt: skip
        inside, outside = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
        per_seed = np.stack([
            auroc_rows(arrays["a"][s][inside], arrays["ood_a"][s][outside])
            - auroc_rows(arrays["b"][s][inside], arrays["ood_b"][s][outside])
            for s in range(n_seeds)
        ], 1)  # fmt: skip
        estimate = float(np.mean([
            auroc_rows(arrays["a"][s][None], arrays["ood_a"][s][None])[0]
            - auroc_rows(arrays["b"][s][None], arrays["ood_b"][s][None])[0]
            for s in range(n_seeds)
        ]))  # fmt: skip
    if seeds is not None:
        per_seed = np.take_along_axis(per_seed, seeds, 1)
    low, high = np.percentile(per_seed.mean(1), [50 * (1 - level), 50 * (1 + level)])
    statistic = "mean" if ood_a is None else "auroc"
    return PairedDifference(estimate, float(low), float(high), level, n_seeds, n_items, statistic)


def auroc_rows(negatives: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """AUROC of each row: P(positive > negative) + P(tie) / 2.

    Args:
        negatives: (D, N) scores; positives: (D, M) scores.

    Returns (D,) float64.
    """
    neg = torch.as_tensor(np.asarray(negatives, dtype=np.float64)).sort(1).values
    pos = torch.as_tensor(np.asarray(positives, dtype=np.float64))
    below = torch.searchsorted(neg, pos, right=False).sum(1, dtype=torch.float64)
    not_above = torch.searchsorted(neg, pos, right=True).sum(1, dtype=torch.float64)
    return ((below + not_above) / (2 * neg.shape[1] * pos.shape[1])).numpy()


def _per_seed(values: Values | Sequence[Values]) -> np.ndarray:
    """(seeds, N) float64 from (N,) or a list of (N,)."""
    if isinstance(values, Tensor):
        values = values.detach().cpu().numpy()
    if isinstance(values, np.ndarray):
        arr = values.astype(np.float64)
    else:
        rows = [v.detach().cpu().numpy() if isinstance(v, Tensor) else v for v in values]
        try:
            arr = np.asarray(rows, dtype=np.float64)
        except ValueError as exc:
            raise ValueError(
                "every seed must score the same number of items (a two-way bootstrap "
                "pairs the items across seeds)"
            ) from exc
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(f"expected (N,) values or a list of (N,) per seed, got shape {arr.shape}")
    return arr


def _check_pairing(arrays: dict[str, np.ndarray]) -> None:
    for x, y in (("a", "b"), ("ood_a", "ood_b")):
        if x in arrays and arrays[x].shape != arrays[y].shape:
            raise ValueError(
                f"{x} and {y} must score the same items: shapes (seeds, items) "
                f"{arrays[x].shape} and {arrays[y].shape}"
            )
    if "ood_a" in arrays and arrays["ood_a"].shape[0] != arrays["a"].shape[0]:
        raise ValueError("the OOD scores need one array per seed, as many as a and b")
    if not all(np.isfinite(v).all() for v in arrays.values()):
        raise ValueError("the values contain NaN or infinity; a bootstrap needs finite values")
