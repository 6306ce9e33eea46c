"""bnnconvert.paired against independent references: scipy's bootstrap, scikit-learn's
AUROC, and the two-way bootstrap's defining property (copies of one seed add nothing)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bnnconvert.paired import auroc_rows, paired_difference

scipy_stats = pytest.importorskip("scipy.stats")
sk_metrics = pytest.importorskip("sklearn.metrics")


def _scores(seed: int = 0, n: int = 400, m: int = 300):
    rng = np.random.default_rng(seed)
    inside = {k: rng.normal(0.0, 1.0, n) for k in ("a", "b")}
    outside = {"a": rng.normal(1.0, 1.0, m), "b": rng.normal(0.6, 1.0, m)}
    return inside, outside


def test_mean_difference_matches_scipy_paired_percentile_bootstrap():
    rng = np.random.default_rng(1)
    a = rng.exponential(0.2, 500)
    b = a + rng.normal(0.01, 0.05, 500)
    ours = paired_difference(torch.tensor(a), torch.tensor(b), draws=4000)
    ref = scipy_stats.bootstrap((a, b), lambda x, y, axis: (x - y).mean(axis), paired=True,
                                n_resamples=4000, method="percentile", random_state=0)  # fmt: skip
    assert ours.estimate == pytest.approx((a - b).mean(), abs=1e-12)
    width = ref.confidence_interval.high - ref.confidence_interval.low
    assert ours.low == pytest.approx(ref.confidence_interval.low, abs=0.1 * width)
    assert ours.high == pytest.approx(ref.confidence_interval.high, abs=0.1 * width)
    assert (ours.seeds, ours.items, ours.statistic) == (1, 500, "mean")
    assert str(ours).startswith(f"{ours.estimate:+.4f} [")


def test_auroc_difference_matches_scikit_learn_and_scipy():
    inside, outside = _scores()

    def auc(x, o):
        return sk_metrics.roc_auc_score(np.r_[np.zeros(len(x)), np.ones(len(o))], np.r_[x, o])

    ours = paired_difference(inside["a"], inside["b"], ood_a=outside["a"], ood_b=outside["b"],
                             draws=1500)  # fmt: skip
    expected = auc(inside["a"], outside["a"]) - auc(inside["b"], outside["b"])
    assert ours.estimate == pytest.approx(expected, abs=1e-12)
    ref = scipy_stats.bootstrap(
        (np.arange(400), np.arange(300)),
        lambda i, o: auc(inside["a"][i], outside["a"][o]) - auc(inside["b"][i], outside["b"][o]),
        paired=False, vectorized=False, n_resamples=1500, method="percentile", random_state=0,
    )  # fmt: skip
    width = ref.confidence_interval.high - ref.confidence_interval.low
    assert ours.low == pytest.approx(ref.confidence_interval.low, abs=0.12 * width)
    assert ours.high == pytest.approx(ref.confidence_interval.high, abs=0.12 * width)
    assert ours.statistic == "auroc"


def test_auroc_rows_count_ties_as_half_like_scikit_learn():
    rng = np.random.default_rng(2)
    neg = np.round(rng.random((5, 40)), 1)  # many ties, within and across the classes
    pos = np.round(rng.random((5, 30)) + 0.2, 1)
    expected = [sk_metrics.roc_auc_score(np.r_[np.zeros(40), np.ones(30)], np.r_[n, p])
                for n, p in zip(neg, pos)]  # fmt: skip
    np.testing.assert_allclose(auroc_rows(neg, pos), expected, atol=1e-12)


def test_two_way_copies_of_one_seed_give_its_interval():
    """Four seeds that are copies of one scored the same items: nothing new is learned,
    so the two-way interval is that of one seed (up to the bootstrap's noise)."""
    rng = np.random.default_rng(3)
    a, b = rng.exponential(0.2, 300), rng.exponential(0.25, 300)
    one = paired_difference(a, b, draws=4000)
    four = paired_difference([a] * 4, [b] * 4, draws=4000)
    assert four.estimate == pytest.approx(one.estimate) and four.seeds == 4
    assert four.high - four.low == pytest.approx(one.high - one.low, rel=0.1)
    inside, outside = _scores(4)
    one = paired_difference(inside["a"], inside["b"], ood_a=outside["a"], ood_b=outside["b"],
                            draws=800)  # fmt: skip
    four = paired_difference([inside["a"]] * 4, [inside["b"]] * 4, ood_a=[outside["a"]] * 4,
                             ood_b=[outside["b"]] * 4, draws=800)  # fmt: skip
    assert four.estimate == pytest.approx(one.estimate)
    assert four.high - four.low == pytest.approx(one.high - one.low, rel=0.15)


def test_two_way_counts_the_spread_between_seeds():
    """Seeds whose differences disagree widen the interval beyond the items' noise: the
    seeds are resampled too."""
    rng = np.random.default_rng(5)
    b = rng.exponential(0.2, 300)
    noise = rng.normal(0, 0.01, 300)
    steady = paired_difference([b + 0.01 + noise] * 6, [b] * 6)
    spread = paired_difference([b + shift + noise for shift in (-0.04, -0.02, 0, 0.02, 0.04, 0.06)],
                               [b] * 6)  # fmt: skip
    assert spread.estimate == pytest.approx(steady.estimate)
    assert spread.high - spread.low > 5 * (steady.high - steady.low)


def test_same_seed_same_interval_and_bad_input_is_refused():
    a, b = np.arange(10.0), np.arange(10.0)[::-1]
    assert paired_difference(a, b, seed=7) == paired_difference(a, b, seed=7)
    with pytest.raises(ValueError, match="same items"):
        paired_difference(a, b[:9])
    with pytest.raises(ValueError, match="both ood_a and ood_b"):
        paired_difference(a, b, ood_a=a)
    with pytest.raises(ValueError, match="same number of items"):
        paired_difference([a, a[:5]], [b, b[:5]])
    with pytest.raises(ValueError, match="NaN or infinity"):
        paired_difference(np.r_[a[:9], np.nan], b)
    with pytest.raises(ValueError, match="level"):
        paired_difference(a, b, level=95)
