"""Calibration of a method's confidences against human labels: ECE, Brier score, reliability.

A row is calibrated when, among images it gives probability ``p``, a fraction ``p`` are labelled
aligned by humans. Probabilities come from the method itself where it makes one (TextNorm and its
probability-valued ensembles, a reward model whose score is a probability such as BLIP-2 ITM or
VQAScore: :attr:`~harness.types.RewardModel.score_is_probability`), or, for raw scores, from a
monotone mapping fitted by cross-validation over prompts (``platt``: logistic in the score;
``isotonic``: pool-adjacent-violators), never on the prompts it is evaluated on. Preference
benchmarks get the analogue: the predicted probability that ``image_a`` wins, a logistic in the
score difference fitted the same way, against the human choice (tied pairs left out).

- ``ece``: expected calibration error with equal-mass bins (``bins`` groups of nearly equal size
  after sorting by probability): ``sum_b n_b / N |mean(y_b) - mean(p_b)|``.
- ``brier``: ``mean((p - y)^2)``.
- ``reliability``: per bin, ``[mean p, mean y, n]``, the points of the reliability diagram.

Intervals are percentile bootstraps over prompts (bins are recomputed on every resample).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from harness.errors import HarnessError
from harness.evaluation.metrics import bootstrap_indices

MAPPINGS = ("platt", "isotonic")


def equal_mass_bins(p: np.ndarray, bins: int) -> list[np.ndarray]:
    """Indices of ``p`` split into ``bins`` groups of nearly equal size, in order of ``p``; equal
    probabilities always share a bin (a bin then holds more, its neighbour fewer)."""
    p = np.asarray(p, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    sorted_p = p[order]
    first = np.searchsorted(sorted_p, sorted_p, side="left")  # where each value's ties begin
    k = max(1, min(bins, len(p)))
    size, extra = divmod(len(p), k)  # np.array_split's sizes: `extra` bins hold one more
    big = extra * (size + 1)
    which = np.where(first < big, first // (size + 1), extra + (first - big) // max(size, 1))
    return [order[which == b] for b in np.unique(which)]


def ece(p: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    p, y = np.asarray(p, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if not len(p):
        return float("nan")
    return float(sum(len(b) * abs(y[b].mean() - p[b].mean()) for b in equal_mass_bins(p, bins)) / len(p))


def brier(p: np.ndarray, y: np.ndarray) -> float:
    p, y = np.asarray(p, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return float(np.mean((p - y) ** 2)) if len(p) else float("nan")


def reliability(p: np.ndarray, y: np.ndarray, bins: int = 10) -> list[list[float]]:
    """``[[mean p, mean y, n], ...]`` per equal-mass bin."""
    p, y = np.asarray(p, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return [[float(p[b].mean()), float(y[b].mean()), int(len(b))] for b in equal_mass_bins(p, bins)]


def platt_fit(s: np.ndarray, y: np.ndarray, iters: int = 100) -> tuple[float, float]:
    """``(a, b)`` of ``P(y = 1) = sigmoid(a s + b)`` by Newton's method on the log-loss (with
    Platt's smoothed targets, so a separable fold does not diverge)."""
    s, y = np.asarray(s, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n_pos, n_neg = y.sum(), len(y) - y.sum()
    t = np.where(y > 0.5, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    mu, sd = s.mean(), s.std() or 1.0
    z = (s - mu) / sd
    a, b = 0.0, float(np.log((t.mean() + 1e-12) / (1 - t.mean() + 1e-12)))
    for _ in range(iters):
        q = 1 / (1 + np.exp(-(a * z + b)))
        w = q * (1 - q) + 1e-12
        g = np.array([((q - t) * z).sum(), (q - t).sum()])
        h = np.array([[(w * z * z).sum(), (w * z).sum()], [(w * z).sum(), w.sum()]]) + 1e-9 * np.eye(2)
        step = np.linalg.solve(h, g)
        a, b = a - step[0], b - step[1]
        if np.abs(step).max() < 1e-10:
            break
    return float(a / sd), float(b - a * mu / sd)


def isotonic_fit(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pool-adjacent-violators: the non-decreasing step function of ``s`` closest to ``y`` in
    squared error, as (thresholds, values) for :func:`isotonic_apply`."""
    order = np.argsort(s, kind="stable")
    xs, ys = np.asarray(s, dtype=np.float64)[order], np.asarray(y, dtype=np.float64)[order]
    values, weights, starts = [], [], []
    for i, v in enumerate(ys):
        values.append(v)
        weights.append(1.0)
        starts.append(xs[i])
        while len(values) > 1 and values[-2] > values[-1]:
            w = weights[-2] + weights[-1]
            values[-2] = (values[-2] * weights[-2] + values[-1] * weights[-1]) / w
            weights[-2] = w
            values.pop()
            weights.pop()
            starts.pop()
    return np.array(starts), np.array(values)


def isotonic_apply(model: tuple[np.ndarray, np.ndarray], s: np.ndarray) -> np.ndarray:
    starts, values = model
    idx = np.searchsorted(starts, np.asarray(s, dtype=np.float64), side="right") - 1
    return values[np.clip(idx, 0, len(values) - 1)]


def cross_fitted(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, mapping: str,
                 k: int = 5, seed: int = 0) -> np.ndarray:
    """Probabilities for ``scores``, each from a ``mapping`` fitted on the other folds' groups
    (prompts): nothing is fitted on the prompts it is evaluated on."""
    if mapping not in MAPPINGS:
        raise HarnessError(f"unknown probability mapping '{mapping}'; choose {', '.join(MAPPINGS)}")
    names, group_of = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    if len(names) < 2:
        raise HarnessError("a cross-fitted probability mapping needs at least 2 prompts")
    perm = np.random.default_rng(seed).permutation(len(names))
    folds = np.array_split(perm, max(2, min(k, len(names))))
    out = np.full(len(scores), np.nan)
    for fold in folds:
        test = np.isin(group_of, fold)
        train = ~test
        if mapping == "platt":
            a, b = platt_fit(scores[train], labels[train])
            out[test] = 1 / (1 + np.exp(-(a * scores[test] + b)))
        else:
            out[test] = isotonic_apply(isotonic_fit(scores[train], labels[train]), scores[test])
    return out


def calibration_row(p: np.ndarray, y: np.ndarray, groups: np.ndarray, *, bins: int = 10,
                    n_boot: int = 1000, seed: int = 0, confidence: float = 0.95) -> dict[str, Any]:
    """``ece``, ``brier`` with intervals (bootstrap over ``groups``) and the reliability points."""
    p, y = np.asarray(p, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if np.isnan(p).any() or ((p < 0) | (p > 1)).any():
        raise HarnessError("calibration needs probabilities in [0, 1]")
    out: dict[str, Any] = {"ece": ece(p, y, bins), "brier": brier(p, y),
                           "reliability": reliability(p, y, bins)}
    names, group_of = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    members = [np.flatnonzero(group_of == g) for g in range(len(names))]
    if n_boot and len(names) > 1:
        draws = bootstrap_indices(len(names), n_boot, seed)
        eces, briers = [], []
        for row in draws:
            idx = np.concatenate([members[g] for g in row])
            eces.append(ece(p[idx], y[idx], bins))
            briers.append(brier(p[idx], y[idx]))
        alpha = (1 - confidence) / 2
        out["ece_ci"] = [float(v) for v in np.quantile(eces, [alpha, 1 - alpha])]
        out["brier_ci"] = [float(v) for v in np.quantile(briers, [alpha, 1 - alpha])]
    else:
        out["ece_ci"] = out["brier_ci"] = [float("nan"), float("nan")]
    return out


def win_probabilities(diff: np.ndarray, wins: np.ndarray, groups: np.ndarray, k: int = 5,
                      seed: int = 0) -> np.ndarray:
    """Preference analogue: ``P(image_a wins) = sigmoid(a (s_a - s_b) + b)``, cross-fitted over
    prompts on untied pairs (``wins``: 1 when ``image_a`` was preferred)."""
    return cross_fitted(np.asarray(diff, dtype=np.float64), np.asarray(wins, dtype=np.float64),
                        groups, "platt", k=k, seed=seed)


def calibration_table(protocol: Any, labels: Any, pairs: Any, per_image: Any, *, bins: int = 10,
                      mapping: str = "platt", n_boot: int = 1000, seed: int = 0,
                      confidence: float = 0.95) -> tuple[Any, list[str]]:
    """Calibration of every method with per-image scores, one row per (subset, method, source):
    ``ece``, ``ece_ci``, ``brier``, ``brier_ci`` and ``calibration`` (``{"mapping": native | platt
    | isotonic, "n_bins", "bins": [[mean p, mean y, n], ...]}``: the reliability diagram's points),
    and notes on what could not be computed.

    :param per_image: columns ``subset, image, method, source, score, native`` (``native``: the
        score is already a probability).
    """
    import pandas as pd

    columns = ["subset", "method", "source", "ece", "ece_ci", "brier", "brier_ci", "calibration"]
    rows, notes = [], []
    keys = ["subset", "method", "source"]
    if protocol.family == "preference":
        if pairs is None or pairs.empty:
            return pd.DataFrame(columns=columns), notes
        from harness.evaluation.protocols import score_pairs

        for (subset, method, source), group in per_image.groupby(keys, sort=False):
            mine = score_pairs(pairs[pairs["subset"].astype(str) == subset], group)
            if "split" in mine:
                mine = mine[mine["split"] == "test"]
            mine = mine[mine["label"] != 0.5]
            if mine["prompt_id"].nunique() < 2:
                continue
            diff = (mine["score_a"] - mine["score_b"]).to_numpy(np.float64)
            wins = (mine["label"] == 1.0).to_numpy(np.float64)
            groups = mine["prompt_id"].astype(str).to_numpy()
            p = win_probabilities(diff, wins, groups, seed=seed)
            row = calibration_row(p, wins, groups, bins=bins, n_boot=n_boot, seed=seed, confidence=confidence)
            rows.append({"subset": subset, "method": method, "source": source, **_row(row, "platt", bins)})
        if rows:
            notes.append(f"calibration: the win probability of image A, {describe('platt', bins)}, "
                         "against the human choice on untied pairs")
        return pd.DataFrame(rows, columns=columns), notes
    labelled = labels[["subset", "image", "prompt", "binary"]].assign(subset=labels["subset"].astype(str))
    if "split" in labels:
        labelled = labelled[labels["split"].to_numpy() == "test"]
    if labelled["binary"].isna().all():
        notes.append("calibration (ECE, Brier) needs binary per-image labels, which this benchmark has "
                     "not: not computed")
        return pd.DataFrame(columns=columns), notes
    used = set()
    for (subset, method, source), group in per_image.groupby(keys, sort=False):
        frame = group.merge(labelled, on=["subset", "image"]).dropna(subset=["binary"])
        if frame["prompt"].nunique() < 2:
            continue
        y = frame["binary"].to_numpy(np.float64)
        s = frame["score"].to_numpy(np.float64)
        groups = frame["prompt"].astype(str).to_numpy()
        native = bool(group["native"].iloc[0]) and bool(((s >= 0) & (s <= 1)).all())
        how = "native" if native else mapping
        p = s if native else cross_fitted(s, y, groups, mapping, seed=seed)
        row = calibration_row(p, y, groups, bins=bins, n_boot=n_boot, seed=seed, confidence=confidence)
        rows.append({"subset": subset, "method": method, "source": source, **_row(row, how, bins)})
        used.add(how)
    for how in sorted(used):
        notes.append(f"calibration ({how}): {describe(how, bins)}")
    return pd.DataFrame(rows, columns=columns), notes


def _row(row: dict[str, Any], how: str, bins: int) -> dict[str, Any]:
    return {"ece": row["ece"], "ece_ci": row["ece_ci"], "brier": row["brier"], "brier_ci": row["brier_ci"],
            "calibration": {"mapping": how, "n_bins": bins, "bins": row["reliability"]}}


def describe(source: str, bins: int) -> str:
    what = {"native": "the method's own probability", "platt": "a Platt (logistic) mapping",
            "isotonic": "an isotonic mapping"}.get(source, source)
    fitted = "" if source == "native" else ", cross-fitted over prompts (never on the evaluated prompts)"
    return f"ECE ({bins} equal-mass bins) and Brier of {what}{fitted}"


__all__: Sequence[str] = ("ece", "brier", "reliability", "platt_fit", "isotonic_fit", "isotonic_apply",
                          "cross_fitted", "calibration_row", "calibration_table", "win_probabilities",
                          "describe")
