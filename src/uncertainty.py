"""How sure a test score is (report.py; docs/results.md): percentile bootstrap intervals over the test clips,
one set of resamples scoring every run, so differences between runs are paired. A tag that a resample leaves
without a positive or a negative clip is left out of its macro means (common.roc_auc's rule), NaN per tag.

    result = bootstrap_runs(labels, [a1, a2, b1, b2], comparisons=[[(0, 2), (1, 3)]])  # a - b, paired by seed
"""
import warnings

import numpy as np
import scipy.stats

CONFIDENCE = 0.95
N_RESAMPLES = 2000  # resamples of the test clips; a p-value resolves down to 2 / (N + 1)
SEED = 0  # of the resampling: a report is the same every time it is made
BATCH = 50  # resamples scored at once: bounds memory (a few arrays of BATCH x clips per tag)


def tag_orders(labels, scores):
    """Per tag of one run (labels 0/1, scores (clips, T)): negatives, positives in order of score, and per
    positive the negatives scored lower (neg_below), at most as high (neg_up_to), the positives lower."""
    prepared = []
    for tag in range(labels.shape[1]):
        positive = labels[:, tag].astype(bool)
        negatives, positives = np.flatnonzero(~positive), np.flatnonzero(positive)
        negatives = negatives[np.argsort(scores[negatives, tag], kind="stable")]
        positives = positives[np.argsort(scores[positives, tag], kind="stable")]
        neg_scores, pos_scores = scores[negatives, tag], scores[positives, tag]
        prepared.append((negatives, positives, np.searchsorted(neg_scores, pos_scores, "left"),
                         np.searchsorted(neg_scores, pos_scores, "right"),
                         np.searchsorted(pos_scores, pos_scores, "left")))
    return prepared


def weighted_per_tag(prepared, counts):
    """(roc, pr) (B, T) per tag of B resampled test sets, counts (B, clips) the draws of each clip; NaN where
    a tag is unscorable. scikit-learn's figures, ties included, without its sort per resample and tag."""
    roc, pr = np.full((2, len(counts), len(prepared)), np.nan)
    zeros = np.zeros((len(counts), 1), dtype=counts.dtype)
    for tag, (negatives, positives, neg_below, neg_up_to, pos_below) in enumerate(prepared):
        cum_neg = np.concatenate([zeros, np.cumsum(counts[:, negatives], axis=1)], axis=1)
        pos_weight = counts[:, positives].astype(np.float64)
        cum_pos = np.concatenate([zeros, np.cumsum(counts[:, positives], axis=1)], axis=1)
        n_neg, n_pos = cum_neg[:, -1].astype(np.float64), cum_pos[:, -1].astype(np.float64)
        scorable = (n_pos > 0) & (n_neg > 0)
        below, up_to = cum_neg[:, neg_below].astype(np.float64), cum_neg[:, neg_up_to].astype(np.float64)
        pairs = (pos_weight * (below + up_to) / 2).sum(axis=1)  # ROC-AUC: pairs ranked right, ties count half
        # average precision: each positive's precision at its own score as the threshold
        tp = n_pos[:, None] - cum_pos[:, pos_below]
        called = tp + n_neg[:, None] - below
        precision = np.divide(tp, called, out=np.zeros_like(tp), where=called > 0)
        roc[scorable, tag] = pairs[scorable] / (n_pos[scorable] * n_neg[scorable])
        pr[scorable, tag] = (pos_weight * precision).sum(axis=1)[scorable] / n_pos[scorable]
    return roc, pr


def bootstrap_p_value(differences):
    """Two-sided p of 'no difference' from a bootstrap distribution (B,): min(1, 2 (1 + k) / (B + 1)), k the
    resamples at or beyond 0 on its far side; NaN if any resample is NaN."""
    differences = np.asarray(differences, dtype=np.float64)
    if np.isnan(differences).any():
        return float("nan")
    far_side = min((differences <= 0).sum(), (differences >= 0).sum())
    return min(1.0, 2 * (1 + far_side) / (len(differences) + 1))


def bootstrap_runs(labels, run_scores, comparisons=(), n_resamples=N_RESAMPLES, seed=SEED):
    """Intervals of R runs' scores (clips, T) on the same 0/1 labels (clips, T), and per comparison (a list of
    (a, b) run indices paired by seed) the mean of a - b. -> dict: runs: R {'roc', 'pr': (point, low, high)};
    comparisons: {'roc', 'pr': (point, low, high, p), 'roc_per_tag', 'pr_per_tag': the four per tag (T,)}."""
    labels = np.asarray(labels)
    n_clips, n_tags = labels.shape
    prepared = [tag_orders(labels, np.asarray(scores)) for scores in run_scores]
    comparisons = [list(pairs) for pairs in comparisons]

    def statistic(clips, axis=-1):
        """Resampled clip indices (B, clips) -> every figure, (K, B)."""
        single = clips.ndim == 1
        clips = np.atleast_2d(clips)
        offsets = n_clips * np.arange(len(clips))[:, None]
        counts = np.bincount((clips + offsets).ravel(), minlength=clips.size).reshape(clips.shape)
        counts = counts.astype(np.int32)  # cumulative sums of at most n_clips: exact, and half the memory
        per_run = [weighted_per_tag(p, counts) for p in prepared]
        rows = [np.nanmean(metric, axis=1) for roc, pr in per_run for metric in (roc, pr)]
        for pairs in comparisons:
            for metric in (0, 1):
                gain = np.mean([per_run[a][metric] - per_run[b][metric] for a, b in pairs], axis=0)  # (B, T)
                rows.append(np.nanmean(gain, axis=1))  # the same tags are scorable in a and b
                rows.extend(gain.T)
        values = np.stack(rows)
        return values[:, 0] if single else values

    with warnings.catch_warnings():  # NaN (an unscorable tag) is handled below, not warned about
        warnings.simplefilter("ignore")
        point = statistic(np.arange(n_clips))
        result = scipy.stats.bootstrap((np.arange(n_clips),), statistic, vectorized=True, batch=BATCH,
                                       n_resamples=n_resamples, method="percentile",
                                       confidence_level=CONFIDENCE, random_state=np.random.default_rng(seed))
    distribution = result.bootstrap_distribution
    unscorable = np.isnan(distribution).any(axis=1)
    low, high = (np.where(unscorable, np.nan, bound) for bound in result.confidence_interval)

    def figure(k):
        return float(point[k]), float(low[k]), float(high[k])

    out = {"runs": [{"roc": figure(2 * r), "pr": figure(2 * r + 1)} for r in range(len(run_scores))],
           "comparisons": [], "n_resamples": n_resamples, "confidence": CONFIDENCE}
    k = 2 * len(run_scores)
    for _ in comparisons:
        entry = {}
        for name in ("roc", "pr"):
            entry[name] = figure(k) + (bootstrap_p_value(distribution[k]),)
            tags = slice(k + 1, k + 1 + n_tags)
            entry[f"{name}_per_tag"] = (point[tags], low[tags], high[tags],
                                        np.array([bootstrap_p_value(d) for d in distribution[tags]]))
            k += 1 + n_tags
        out["comparisons"].append(entry)
    return out
