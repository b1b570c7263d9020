"""Evaluating scores under a benchmark's :class:`~harness.types.Protocol`, beyond per-prompt means.

Per-prompt per-image protocols (TIA2) are the per-prompt metrics of :mod:`harness.evaluation.metrics`
averaged over prompts. This module does the other two shapes, every number with a percentile
bootstrap interval over prompts (the unit that was sampled; a prompt's images or pairs move
together):

- **pooled per-image** metrics over all images of a subset: ``auroc`` and ``auprc`` against the
  binary label; ``spearman``, ``kendall`` (tau-b), ``pearson`` and ``pairwise_acc`` against the
  graded label. ``pairwise_acc`` is the tie-optimised pairwise accuracy of Deutsch et al. (2023):
  over all pairs of images, a pair is right when the model orders it as the humans do, or when
  both call it a tie, a model tie being a score gap of at most ``eps``; ``eps`` is the smallest
  of the gaps (and 0) that maximises the accuracy on the data evaluated. Its interval is computed
  only up to :data:`PAIRWISE_BOOTSTRAP_MAX` images (its cost is quadratic).
- **preference** accuracy over pairs of images of one prompt, with the protocol's tie rule
  (:data:`harness.types.TIE_RULES`): ``skip`` (human ties skipped, a model tie wrong, pooled over
  pairs: ImageReward's test), ``inversions`` (per prompt ``1 - discordant / all pairs``, then the
  mean over prompts: HPSv2's), ``threshold`` (a model tie when the softmax probabilities of the two
  differ by at most ``t``, ``t`` chosen on the ``validation`` split from the protocol's grid; 1 for
  the right call, 1/2 when either side is a tie: Pick-a-Pic's). ``accuracy_ties_dropped``: tied
  human pairs dropped, a model tie wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import kendalltau, rankdata

from harness.errors import HarnessError
from harness.evaluation.metrics import TIE_ATOL, TIE_RTOL, batch_prompt_metrics, bootstrap_indices
from harness.types import Protocol

#: ``pairwise_acc`` gets a bootstrap interval only up to this many images (quadratic cost).
PAIRWISE_BOOTSTRAP_MAX = 1500

ROW_BASE = ("subset", "method", "source", "n_prompts", "n_items")


def _snap_ties(x: np.ndarray) -> np.ndarray:
    """Scores within rounding noise of each other made equal (as :func:`metrics.merge_ties`)."""
    from harness.evaluation.metrics import merge_ties

    return merge_ties(x[None, :], np.ones((1, len(x)), bool), TIE_RTOL, TIE_ATOL)[0]


# -- pooled per-image metrics -------------------------------------------------------------------
def _binary_metric(name: str, s: np.ndarray, y: np.ndarray) -> float:
    out = batch_prompt_metrics(s[None], y[None], np.zeros((1, len(s))), snap_ties=False, correlations=False)
    return float(out[name][0])


def pooled_auroc(s: np.ndarray, y: np.ndarray, g: np.ndarray) -> float:
    return _binary_metric("auroc", s, y)


def pooled_auprc(s: np.ndarray, y: np.ndarray, g: np.ndarray) -> float:
    return _binary_metric("auprc", s, y)


def pooled_spearman(s: np.ndarray, y: np.ndarray, g: np.ndarray) -> float:
    return pooled_pearson(rankdata(s), y, rankdata(g))


def pooled_pearson(s: np.ndarray, y: np.ndarray, g: np.ndarray) -> float:
    if len(s) < 2 or np.ptp(s) == 0 or np.ptp(g) == 0:
        return float("nan")
    return float(np.clip(np.corrcoef(s, g)[0, 1], -1.0, 1.0))


def pooled_kendall(s: np.ndarray, y: np.ndarray, g: np.ndarray) -> float:
    if len(s) < 2 or np.ptp(s) == 0 or np.ptp(g) == 0:
        return float("nan")
    return float(kendalltau(s, g, variant="b").statistic)


def tie_optimised_accuracy(scores: np.ndarray, human: np.ndarray) -> tuple[float, float]:
    """Deutsch et al.'s tie-calibrated pairwise accuracy over all pairs: ``(accuracy, eps)``.

    A pair ``i < j`` is right when ``|s_i - s_j| > eps`` and the signs of ``s_i - s_j`` and
    ``h_i - h_j`` agree (human ties exact), or when ``|s_i - s_j| <= eps`` and ``h_i == h_j``.
    ``eps`` runs over 0 and every pair's gap; the smallest best one is returned.
    """
    s = np.asarray(scores, dtype=np.float64)
    h = np.asarray(human, dtype=np.float64)
    n = len(s)
    if n < 2:
        return float("nan"), float("nan")
    i, j = np.triu_indices(n, k=1)
    ds = s[i] - s[j]
    dh = h[i] - h[j]
    gap = np.abs(ds)
    human_tie = dh == 0
    concordant = (np.sign(ds) == np.sign(dh)) & ~human_tie & (gap > 0)
    total = len(ds)
    # Sweep eps upwards: a pair with gap <= eps counts as right iff it is a human tie.
    order = np.argsort(gap, kind="stable")
    g_sorted = gap[order]
    change = np.where(human_tie[order], 1, 0) - np.where(concordant[order], 1, 0)
    base = int(concordant.sum())  # eps below every gap: only concordant pairs are right
    cum = np.cumsum(change)
    # At eps = g_sorted[k], every pair up to the last with that gap is a model tie.
    last = np.r_[g_sorted[1:] != g_sorted[:-1], True]
    candidates = np.r_[base if g_sorted[0] > 0 else -1, base + cum[last]]
    eps = np.r_[0.0, g_sorted[last]]
    if g_sorted[0] == 0:  # eps = 0 already ties the zero gaps; the first group covers it
        candidates, eps = candidates[1:], eps[1:]
    k = int(np.argmax(candidates))
    return float(candidates[k] / total), float(eps[k])


def pooled_pairwise_acc(s: np.ndarray, y: np.ndarray, g: np.ndarray) -> float:
    return tie_optimised_accuracy(s, g)[0]


POOLED: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], float]] = {
    "auroc": pooled_auroc, "auprc": pooled_auprc, "spearman": pooled_spearman,
    "kendall": pooled_kendall, "pearson": pooled_pearson, "pairwise_acc": pooled_pairwise_acc,
}


def _interval(draws: np.ndarray, confidence: float) -> list[float]:
    draws = np.asarray(draws, dtype=np.float64)
    draws = draws[~np.isnan(draws)]
    if not len(draws):
        return [float("nan"), float("nan")]
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(draws, [alpha, 1.0 - alpha])
    return [float(lo), float(hi)]


def _group_draws(groups: np.ndarray, n_boot: int, seed: int) -> list[np.ndarray]:
    """Per bootstrap draw, the item indices of a resample of the groups (with repetition)."""
    codes, uniques = pd.factorize(groups)
    members = [np.flatnonzero(codes == k) for k in range(len(uniques))]
    draws = bootstrap_indices(len(uniques), n_boot, seed)
    return [np.concatenate([members[k] for k in row]) for row in draws]


def evaluate_pooled(frame: pd.DataFrame, protocol: Protocol, *, n_boot: int, seed: int,
                    confidence: float, snap_ties: bool = True) -> dict[str, Any]:
    """One row: ``frame`` holds the images of one (subset, method) with ``score, binary, graded,
    prompt_id``. ``snap_ties``: scores within rounding noise are ties (False for released
    scores, taken exactly as given)."""
    s = frame["score"].to_numpy(np.float64)
    s = _snap_ties(s) if snap_ties else s
    y = frame["binary"].to_numpy(np.float64)
    g = frame["graded"].to_numpy(np.float64)
    out: dict[str, Any] = {"n_prompts": int(frame["prompt_id"].nunique()), "n_items": len(frame)}
    draws = _group_draws(frame["prompt_id"].to_numpy(), n_boot, seed) if n_boot else []
    for metric in protocol.metrics:
        fn = POOLED[metric]
        needs_binary = metric in ("auroc", "auprc")
        labels = y if needs_binary else g
        if np.isnan(labels).any():
            out[metric], out[f"{metric}_ci"] = float("nan"), [float("nan"), float("nan")]
            continue
        out[metric] = fn(s, y, g)
        if not draws or (metric == "pairwise_acc" and len(s) > PAIRWISE_BOOTSTRAP_MAX):
            out[f"{metric}_ci"] = [float("nan"), float("nan")]
            continue
        out[f"{metric}_ci"] = _interval([fn(s[d], y[d], g[d]) for d in draws], confidence)
    return out


# -- preferences -----------------------------------------------------------------------------------
def _softmax_gap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``|p_a - p_b|`` with ``p = softmax([a, b])``: ``|tanh((a - b) / 2)|``."""
    return np.abs(np.tanh((a - b) / 2.0))


def pair_credit(a: np.ndarray, b: np.ndarray, label: np.ndarray, rule: str,
                threshold: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Per pair: the credit (0, 1/2 or 1) and whether the pair counts, under ``rule``."""
    diff = a - b
    model_tie = np.abs(diff) <= TIE_RTOL * np.maximum(np.abs(a), np.abs(b)) + TIE_ATOL
    human_tie = label == 0.5
    says_a = (diff > 0) & ~model_tie
    human_a = label == 1.0
    if rule == "skip":
        counts = ~human_tie
        credit = np.where(~model_tie & (says_a == human_a), 1.0, 0.0)
    elif rule == "inversions":
        counts = np.ones(len(a), dtype=bool)
        discordant = ~human_tie & ~model_tie & (says_a != human_a)
        credit = np.where(discordant, 0.0, 1.0)
    elif rule == "threshold":
        counts = np.ones(len(a), dtype=bool)
        tie_call = _softmax_gap(a, b) <= threshold
        right = np.where(human_tie, tie_call, ~tie_call & (says_a == human_a))
        credit = np.where(right, 1.0, np.where(human_tie | tie_call, 0.5, 0.0))
    elif rule == "dropped":
        counts = ~human_tie
        credit = np.where(~model_tie & (says_a == human_a), 1.0, 0.0)
    else:
        raise HarnessError(f"unknown tie rule '{rule}'")
    return credit, counts


def choose_threshold(pairs: pd.DataFrame, grid: Sequence[float]) -> float:
    """The smallest ``t`` of ``grid`` with the best mean credit on ``pairs`` (the validation split)."""
    if pairs.empty:
        raise HarnessError("the tie threshold is chosen on the validation split, but it has no "
                           "scored pairs: score its images too")
    a, b, label = (pairs[c].to_numpy(np.float64) for c in ("score_a", "score_b", "label"))
    means = [pair_credit(a, b, label, "threshold", t)[0].mean() for t in grid]
    return float(grid[int(np.argmax(means))])


def evaluate_preference(pairs: pd.DataFrame, protocol: Protocol, *, n_boot: int, seed: int,
                        confidence: float, threshold: float = 0.0) -> dict[str, Any]:
    """One row from the test pairs of one (subset, method): columns ``prompt_id, score_a,
    score_b, label``."""
    a, b, label = (pairs[c].to_numpy(np.float64) for c in ("score_a", "score_b", "label"))
    codes, uniques = pd.factorize(pairs["prompt_id"])
    G = len(uniques)
    out: dict[str, Any] = {"n_prompts": G, "n_items": len(pairs)}
    idx = bootstrap_indices(G, n_boot, seed) if n_boot else None
    weights = None if idx is None else np.stack([np.bincount(row, minlength=G) for row in idx])
    for metric in protocol.metrics:
        rule = protocol.tie_rule if metric == "accuracy" else "dropped"
        credit, counts = pair_credit(a, b, label, str(rule), threshold)
        right = np.bincount(codes, weights=credit * counts, minlength=G)
        n = np.bincount(codes, weights=counts.astype(float), minlength=G)
        if rule == "inversions" or protocol.grouping == "prompt":
            keep = n > 0
            per_group = np.where(keep, right / np.where(keep, n, 1), np.nan)
            out[metric] = float(np.nanmean(per_group)) if keep.any() else float("nan")
            if weights is not None:
                w = weights * keep
                with np.errstate(invalid="ignore", divide="ignore"):
                    draws = (w * np.nan_to_num(per_group)).sum(1) / w.sum(1)
                out[f"{metric}_ci"] = _interval(draws, confidence)
        else:
            out[metric] = float(right.sum() / n.sum()) if n.sum() else float("nan")
            if weights is not None:
                with np.errstate(invalid="ignore", divide="ignore"):
                    draws = (weights @ right) / (weights @ n)
                out[f"{metric}_ci"] = _interval(draws, confidence)
        if weights is None:
            out[f"{metric}_ci"] = [float("nan"), float("nan")]
        out[f"n_{metric}_pairs"] = int(n.sum())
    if protocol.tie_rule == "threshold":
        out["threshold"] = threshold
    return out


def score_pairs(pairs: pd.DataFrame, scores: pd.DataFrame) -> pd.DataFrame:
    """``pairs`` with ``score_a``/``score_b`` of one method (``scores``: subset, image, score);
    pairs with an image the method did not score are dropped."""
    lookup = scores.set_index(["subset", "image"])["score"]
    keys_a = pd.MultiIndex.from_arrays([pairs["subset"].astype(str), pairs["image_a"]])
    keys_b = pd.MultiIndex.from_arrays([pairs["subset"].astype(str), pairs["image_b"]])
    out = pairs.assign(score_a=lookup.reindex(keys_a).to_numpy(), score_b=lookup.reindex(keys_b).to_numpy())
    return out[out["score_a"].notna() & out["score_b"].notna()]


def evaluate(protocol: Protocol, images: pd.DataFrame, pairs: pd.DataFrame | None,
             scores: pd.DataFrame, *, n_boot: int, seed: int, confidence: float) -> pd.DataFrame:
    """Rows of the pooled or preference ``protocol`` for every (subset, method, source) in
    ``scores`` (columns ``subset, image, method, source, score``). Released scores (source
    ``reported``) are taken exactly as given; the harness's own have rounding-noise ties merged."""
    rows = []
    keys = ["subset", "method", "source"]
    if protocol.family == "preference":
        if pairs is None:
            raise HarnessError("a preference benchmark must give pairs (BenchmarkData.pairs)")
        split = "split" in pairs
        for (subset, method, source), group in scores.groupby(keys, sort=False):
            mine = score_pairs(pairs[pairs["subset"].astype(str) == subset], group)
            test = mine[mine["split"] == "test"] if split else mine
            threshold = 0.0
            if protocol.tie_rule == "threshold":
                if not split:
                    raise HarnessError("tie_rule threshold needs a validation split (a 'split' column)")
                threshold = choose_threshold(mine[mine["split"] == "validation"], protocol.thresholds)
            row = evaluate_preference(test, protocol, n_boot=n_boot, seed=seed, confidence=confidence,
                                      threshold=threshold)
            rows.append({"subset": subset, "method": method, "source": source, **row})
        return pd.DataFrame(rows)
    labelled = images[["subset", "image", "prompt_id", "binary", "graded"]].assign(
        subset=images["subset"].astype(str))
    if "split" in images:
        labelled = labelled[images["split"].to_numpy() == "test"]
    for (subset, method, source), group in scores.groupby(keys, sort=False):
        frame = group[["subset", "image", "score"]].merge(labelled, on=["subset", "image"])
        if frame.empty:
            continue
        row = evaluate_pooled(frame, protocol, n_boot=n_boot, seed=seed, confidence=confidence,
                              snap_ties=source != "reported")
        rows.append({"subset": subset, "method": method, "source": source, **row})
    return pd.DataFrame(rows)
