"""The course's hand-written standard measures held against maintained libraries on the same inputs.

Every figure the README quotes rests on one of these: SSIM (``metrics.ssim``, against scikit-image's
``structural_similarity`` with the same Gaussian window), the paired bootstrap interval (``evaluate.paired_bootstrap``,
against ``scipy.stats.bootstrap``) and the ROC AUC (``metrics.roc_auc``, against the Mann-Whitney U statistic of
``scipy.stats.mannwhitneyu``, which is the AUC times n_pos n_neg; and scikit-learn's ``roc_auc_score`` where it is
installed).
"""

import numpy as np
import pytest
import torch

from spinmeround_lite import metrics
from spinmeround_lite.evaluate import paired_bootstrap

pytestmark = pytest.mark.floats        # rerun under other float paths by `make test` (portability guard)


def _pairs(n=4, res=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, 3, res, res, generator=g, dtype=torch.float64)
    b = (a + 0.25 * torch.randn(a.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    b[0] = a[0]                                              # identical: SSIM 1
    b[1] = 1 - a[1]                                          # inverted: SSIM far below 0
    return a, b


@pytest.mark.parametrize("res", [40, 64, 11])
def test_ssim_is_scikit_image_with_the_same_gaussian_window(res):
    from skimage.metrics import structural_similarity

    a, b = _pairs(res=res)
    ours = metrics.ssim(a, b).double()                       # float32 inside, as in the evaluation
    theirs = torch.tensor([structural_similarity(x.numpy(), y.numpy(), channel_axis=0, data_range=1.0,
                                                 gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
                           for x, y in zip(a, b)], dtype=torch.float64)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert theirs[0] == pytest.approx(1.0) and theirs[1] < 0
    # not a tautology: a box window (scikit-image's default) gives other numbers
    box = structural_similarity(a[2].numpy(), b[2].numpy(), channel_axis=0, data_range=1.0, win_size=11)
    assert abs(box - float(ours[2])) > 1e-3


def test_paired_bootstrap_is_scipys_percentile_bootstrap():
    from scipy.stats import bootstrap

    rng = np.random.default_rng(1)
    for n, shift in ((16, 0.03), (6, -0.01), (40, 0.0)):
        a = rng.normal(0.7, 0.05, n)
        b = a - shift + rng.normal(0, 0.02, n)
        ours = paired_bootstrap(a, b, n_boot=20000, seed=0)
        res = bootstrap((a, b), lambda x, y, axis=-1: (x - y).mean(axis=axis), paired=True, vectorized=True,
                        n_resamples=20000, method="percentile", confidence_level=0.95, random_state=2)
        lo, hi = res.confidence_interval
        width = hi - lo
        assert ours["mean"] == pytest.approx(float(np.mean(a - b)), abs=1e-12)
        # both are Monte Carlo estimates of the same percentiles: they agree to a few per cent of the width
        assert abs(ours["ci95"][0] - lo) < 0.05 * width and abs(ours["ci95"][1] - hi) < 0.05 * width, (ours, lo, hi)
    # a table gives one interval per column, each the same as the column alone
    t_a, t_b = rng.normal(size=(12, 3)), rng.normal(size=(12, 3))
    cols = paired_bootstrap(t_a, t_b, n_boot=500, seed=4)
    one = paired_bootstrap(t_a[:, 1], t_b[:, 1], n_boot=500, seed=4)
    assert cols["ci95"][0][1] == pytest.approx(one["ci95"][0]) and cols["ci95"][1][1] == pytest.approx(one["ci95"][1])


def test_roc_auc_is_the_mann_whitney_statistic():
    from scipy.stats import mannwhitneyu

    rng = np.random.default_rng(3)
    for n_pos, n_neg, ties in ((30, 50, False), (7, 5, True), (200, 3, True)):
        pos, neg = rng.normal(0.4, 1, n_pos), rng.normal(0, 1, n_neg)
        if ties:                                             # rounded scores: many ties, counted half
            pos, neg = np.round(pos), np.round(neg)
        scores = torch.tensor(np.concatenate([pos, neg]))
        labels = torch.tensor([True] * n_pos + [False] * n_neg)
        perm = torch.randperm(len(scores), generator=torch.Generator().manual_seed(0))
        ours = metrics.roc_auc(scores[perm], labels[perm])
        u = mannwhitneyu(pos, neg, alternative="two-sided").statistic
        assert ours == pytest.approx(u / (n_pos * n_neg), abs=1e-12)
        try:
            from sklearn.metrics import roc_auc_score
        except ImportError:
            continue
        assert ours == pytest.approx(roc_auc_score(labels[perm].numpy(), scores[perm].numpy()), abs=1e-12)
    assert metrics.roc_auc(torch.tensor([1.0, 2.0]), torch.tensor([False, True])) == 1.0
