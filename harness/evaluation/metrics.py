"""Per-prompt alignment metrics, aggregation over prompts and bootstrap statistics.

Definitions (checked against every per-prompt value the TIA2 authors released; see
``docs/metrics.md``). For one prompt with images ``i``, scores ``s_i``, binary labels ``y_i``
and graded labels ``g_i``:

- ``auroc``: ROC AUC of ``s`` against ``y``; ties count 1/2 (sklearn ``roc_auc_score``).
- ``auprc``: step-wise average precision, ``sum_k (R_k - R_{k-1}) P_k`` over distinct score
  thresholds (sklearn ``average_precision_score``), not the trapezoidal area.
- ``ap5``, ``ap10``, ``ap25``: images sorted by score descending (ties keep input order);
  ``AP@K = (1/h_K) sum_{i<=K, y_i=1} hits(i)/i`` with ``h_K`` the hits in the top ``K``; 0 when
  ``h_K = 0``; ``K`` is capped at the number of images.
- ``spearman``: Spearman rank correlation of ``s`` with ``g`` (average ranks for ties).
- ``kendall``: Kendall tau-b of ``s`` with ``g``.

Ties: scores of one prompt that differ by no more than rounding noise (``|a - b| <= 1e-9
max(|a|, |b|) + 1e-15``, chained through sorted neighbours) are the same score for every metric
(:func:`merge_ties`), so a reward that cannot tell images apart gets an AUROC of exactly 1/2
rather than whatever its last bits say. Scores a benchmark's authors released are taken exactly
as given (``snap_ties=False``), so their rows reproduce the authors' computation.

Everything is vectorised over prompts: a prompt is one row of a padded ``[P, N]`` matrix with a
boolean mask of the images it really has. Prompts whose images all share one binary label have an
undefined AUROC (NaN); :func:`aggregate` drops them, as the paper does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import rankdata

METRICS: tuple[str, ...] = ("auroc", "auprc", "ap5", "ap10", "ap25", "spearman", "kendall")
AP_KS: dict[str, int] = {"ap5": 5, "ap10": 10, "ap25": 25}

# Kendall's tau is computed from all pairs; keep each chunk's [chunk, N, N] arrays small.
_PAIR_BUDGET = 4_000_000


def _masked_ranks(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Average ranks (1-based) of the valid entries of each row; padded entries rank last."""
    return rankdata(np.where(mask, values, np.inf), axis=1, method="average")


def _row_pearson(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> np.ndarray:
    n = mask.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        am = np.where(mask, a, 0.0).sum(1) / n
        bm = np.where(mask, b, 0.0).sum(1) / n
        da = np.where(mask, a - am[:, None], 0.0)
        db = np.where(mask, b - bm[:, None], 0.0)
        num = (da * db).sum(1)
        den = np.sqrt((da * da).sum(1) * (db * db).sum(1))
        out = num / den
    # Rounding can push a perfect correlation a hair past 1.
    return np.clip(out, -1.0, 1.0)


def _kendall_tau_b(s: np.ndarray, g: np.ndarray, mask: np.ndarray) -> np.ndarray:
    P, N = s.shape
    out = np.empty(P)
    upper = np.triu(np.ones((N, N), dtype=bool), k=1)
    step = max(1, _PAIR_BUDGET // max(1, N * N))
    for lo in range(0, P, step):
        hi = min(P, lo + step)
        ss, gg, mm = s[lo:hi], g[lo:hi], mask[lo:hi]
        pair = mm[:, :, None] & mm[:, None, :] & upper
        dx = np.sign(ss[:, :, None] - ss[:, None, :])
        dy = np.sign(gg[:, :, None] - gg[:, None, :])
        dx = np.where(pair, dx, 0.0)
        dy = np.where(pair, dy, 0.0)
        concordance = (dx * dy).sum((1, 2))
        untied_x = (dx != 0).sum((1, 2))
        untied_y = (dy != 0).sum((1, 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[lo:hi] = concordance / np.sqrt(untied_x.astype(float) * untied_y)
    return np.clip(out, -1.0, 1.0)


#: scores within ``RTOL * max(|a|, |b|) + ATOL`` of each other are tied
TIE_RTOL = 1e-9
TIE_ATOL = 1e-15


def merge_ties(scores: np.ndarray, mask: np.ndarray, rtol: float = TIE_RTOL,
               atol: float = TIE_ATOL) -> np.ndarray:
    """``[P, N]`` scores with each run of near-equal valid scores of a row set to its smallest.

    Sorted neighbours within ``rtol * max(|a|, |b|) + atol`` join one group (so a group spans
    at most a few tolerances in practice); padded entries are returned unchanged.
    """
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(np.where(mask, s, np.inf), axis=1, kind="stable")
    ss = np.take_along_axis(s, order, axis=1)
    ms = np.take_along_axis(mask, order, axis=1)
    gap = np.abs(np.diff(ss, axis=1))
    close = gap <= rtol * np.maximum(np.abs(ss[:, 1:]), np.abs(ss[:, :-1])) + atol
    close &= ms[:, 1:] & ms[:, :-1]
    # Each entry takes the value at the start of its run of "close" steps.
    start = np.where(np.concatenate([np.ones((len(ss), 1), bool), ~close], axis=1),
                     np.arange(ss.shape[1]), 0)
    start = np.maximum.accumulate(start, axis=1)
    merged = np.take_along_axis(ss, start, axis=1)
    out = s.copy()
    np.put_along_axis(out, order, np.where(ms, merged, ss), axis=1)
    return out


def batch_prompt_metrics(
    scores: np.ndarray,
    binary_labels: np.ndarray,
    graded_labels: np.ndarray,
    mask: np.ndarray | None = None,
    snap_ties: bool = True,
    correlations: bool = True,
) -> dict[str, np.ndarray]:
    """All metrics for ``P`` prompts at once.

    :param scores: float ``[P, N]``; padded entries (``mask`` False) are ignored.
    :param binary_labels: ``[P, N]`` of 0/1 (or bool).
    :param graded_labels: float ``[P, N]``, the target of ``spearman`` and ``kendall``.
    :param mask: bool ``[P, N]``, True where the prompt has an image; all True when omitted.
    :param correlations: False: only the binary-label metrics (no ``spearman``/``kendall``).
    :param snap_ties: scores within rounding noise of each other are ties (:func:`merge_ties`);
        False for numbers someone else computed (released scores are taken exactly as given, so
        their metrics equal the authors' own computation).
    :returns: ``{metric: float64 [P]}`` with NaN where a metric is undefined (one class, constant
        scores or labels).
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be 2-D [prompts, images], got shape {s.shape}")
    y = np.asarray(binary_labels).astype(bool)
    g = np.asarray(graded_labels, dtype=np.float64)
    m = np.ones_like(y, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if not (s.shape == y.shape == g.shape == m.shape):
        raise ValueError(
            f"shapes differ: scores {s.shape}, binary {y.shape}, graded {g.shape}, mask {m.shape}"
        )
    if not np.isfinite(s[m]).all():
        rows = sorted(set(np.nonzero(~np.isfinite(np.where(m, s, 0.0)))[0].tolist()))
        raise ValueError(f"scores contain NaN or infinite values (prompt rows {rows[:10]})")
    if not np.isfinite(g[m]).all():
        raise ValueError("graded labels contain NaN or infinite values")
    P, N = s.shape
    s = merge_ties(s, m) if snap_ties and N > 1 else s
    y = y & m
    n = m.sum(1)
    npos = y.sum(1)
    nneg = n - npos
    out: dict[str, np.ndarray] = {}

    with np.errstate(invalid="ignore", divide="ignore"):
        # AUROC via the Mann-Whitney U statistic with average ranks (ties count 1/2).
        ranks = _masked_ranks(s, m)
        u = (ranks * y).sum(1) - npos * (npos + 1) / 2.0
        auroc = u / (npos * nneg)
        auroc[(npos == 0) | (nneg == 0)] = np.nan
        out["auroc"] = auroc

        # Sort by score descending; padded entries (-inf) go last; ties keep input order.
        order = np.argsort(-np.where(m, s, -np.inf), axis=1, kind="stable")
        ss = np.take_along_axis(np.where(m, s, -np.inf), order, axis=1)
        ys = np.take_along_axis(y, order, axis=1)
        tp = np.cumsum(ys, axis=1)
        rank = np.arange(1, N + 1)
        precision = tp / rank

        # Step-wise AP: every positive earns the precision at the end of its tie group.
        is_end = np.ones_like(ys)
        is_end[:, :-1] = ss[:, :-1] != ss[:, 1:]
        end_pos = np.where(is_end, np.arange(N), N - 1)
        end_pos = np.minimum.accumulate(end_pos[:, ::-1], axis=1)[:, ::-1]
        prec_at_end = np.take_along_axis(precision, end_pos, axis=1)
        auprc = (prec_at_end * ys).sum(1) / npos
        auprc[npos == 0] = np.nan
        out["auprc"] = auprc

        for name, k in AP_KS.items():
            kk = np.minimum(k, n)
            in_top = rank[None, :] <= kk[:, None]
            hits_k = np.where(kk > 0, np.take_along_axis(tp, np.maximum(kk - 1, 0)[:, None], 1)[:, 0], 0)
            total = np.where(ys & in_top, precision, 0.0).sum(1)
            out[name] = np.where(hits_k > 0, total / np.maximum(hits_k, 1), 0.0)

    if correlations:  # Kendall's tau costs O(N^2) pairs per prompt
        out["spearman"] = _row_pearson(ranks, _masked_ranks(g, m), m)
        out["kendall"] = _kendall_tau_b(s, g, m)
    return out


def prompt_metrics(
    scores: Sequence[float] | np.ndarray,
    binary_labels: Sequence[int] | np.ndarray,
    graded_labels: Sequence[float] | np.ndarray,
) -> dict[str, float]:
    """The seven metrics of one prompt.

    :param scores: float ``[N]``, one score per image (higher = better aligned).
    :param binary_labels: ``[N]`` of 0/1.
    :param graded_labels: float ``[N]`` (e.g. the mean of the three human labels).
    :returns: ``{"auroc", "auprc", "ap5", "ap10", "ap25", "spearman", "kendall"}`` -> float.
    """
    batch = batch_prompt_metrics(
        np.asarray(scores, dtype=np.float64)[None, :],
        np.asarray(binary_labels)[None, :],
        np.asarray(graded_labels, dtype=np.float64)[None, :],
    )
    return {k: float(v[0]) for k, v in batch.items()}


def per_prompt_metrics(
    frame: pd.DataFrame,
    score: str = "score",
    by: Sequence[str] = ("subset", "prompt"),
    binary: str = "binary",
    graded: str = "graded",
    snap_ties: bool = True,
) -> pd.DataFrame:
    """Metrics for every prompt of a long table (one row per image).

    :returns: one row per group of ``by`` with columns ``*by, n_images, n_positive`` + METRICS.
    """
    by = list(by)
    if frame.empty:
        raise ValueError("no images to evaluate")
    groups = frame.groupby(by, sort=False, observed=True)
    code = groups.ngroup().to_numpy()
    pos = groups.cumcount().to_numpy()
    P, N = int(code.max()) + 1, int(pos.max()) + 1
    s = np.zeros((P, N))
    y = np.zeros((P, N), dtype=bool)
    g = np.zeros((P, N))
    m = np.zeros((P, N), dtype=bool)
    s[code, pos] = frame[score].to_numpy(dtype=np.float64)
    y[code, pos] = frame[binary].to_numpy().astype(bool)
    g[code, pos] = frame[graded].to_numpy(dtype=np.float64)
    m[code, pos] = True
    values = batch_prompt_metrics(s, y, g, m, snap_ties=snap_ties)
    keys = groups.size().reset_index()[by]  # group order == ngroup order (sort=False)
    out = keys.copy()
    out["n_images"] = m.sum(1)
    out["n_positive"] = y.sum(1)
    for name in METRICS:
        out[name] = values[name]
    return out


def bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """``[n_boot, n]`` resampling indices over prompts; the same (n, seed) gives the same draws."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n, size=(n_boot, n))


def _nanmean_rows(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        ok = ~np.isnan(x)
        return np.where(ok, x, 0.0).sum(-1) / ok.sum(-1)


def aggregate(
    per_prompt: pd.DataFrame,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    metrics: Sequence[str] = METRICS,
) -> dict[str, Any]:
    """Unweighted mean over prompts with both binary classes, with percentile bootstrap CIs.

    :param per_prompt: one row per prompt with the metric columns (NaN ``auroc`` = one class).
    :returns: ``{"n_prompts": int, metric: mean, f"{metric}_ci": [low, high]}``. A metric that is
        NaN for some kept prompts (e.g. constant scores) is averaged over the others.
    """
    kept = per_prompt[per_prompt["auroc"].notna()] if "auroc" in per_prompt else per_prompt
    n = len(kept)
    out: dict[str, Any] = {"n_prompts": n}
    if n == 0:
        for name in metrics:
            out[name] = float("nan")
            out[f"{name}_ci"] = [float("nan"), float("nan")]
        return out
    values = kept[list(metrics)].to_numpy(dtype=np.float64)  # [P, M]
    idx = bootstrap_indices(n, n_boot, seed) if n_boot > 0 else None
    alpha = (1.0 - confidence) / 2.0
    for j, name in enumerate(metrics):
        col = values[:, j]
        out[name] = float(_nanmean_rows(col))
        if idx is None:
            out[f"{name}_ci"] = [float("nan"), float("nan")]
            continue
        boot = _nanmean_rows(col[idx])
        if np.isnan(boot).all():  # undefined on every prompt (e.g. constant scores)
            out[f"{name}_ci"] = [float("nan"), float("nan")]
            continue
        lo, hi = np.nanquantile(boot, [alpha, 1.0 - alpha])
        out[f"{name}_ci"] = [float(lo), float(hi)]
    return out


def paired_bootstrap(
    a: np.ndarray | pd.Series,
    b: np.ndarray | pd.Series,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, float]:
    """Paired bootstrap over prompts of the difference of means ``mean(a) - mean(b)``.

    ``a`` and ``b`` hold one metric of two methods on the same prompts (same order); prompts
    where either is NaN are dropped. The p-value is two-sided: twice the share of resampled
    differences on the far side of zero (capped at 1).

    :returns: ``{"n_prompts", "diff", "ci_low", "ci_high", "p_value"}``.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {a.shape} vs {b.shape}")
    ok = ~(np.isnan(a) | np.isnan(b))
    d = a[ok] - b[ok]
    n = d.size
    if n == 0:
        nan = float("nan")
        return {"n_prompts": 0, "diff": nan, "ci_low": nan, "ci_high": nan, "p_value": nan}
    boot = d[bootstrap_indices(n, n_boot, seed)].mean(1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(boot, [alpha, 1.0 - alpha])
    p = min(1.0, 2.0 * min(float((boot <= 0).mean()), float((boot >= 0).mean())))
    return {"n_prompts": int(n), "diff": float(d.mean()), "ci_low": float(lo),
            "ci_high": float(hi), "p_value": p}
