"""Time the metrics over all of TIA2 (27,500 images) with 1,000 bootstrap resamples.

Prints the vectorised path (harness.evaluation.metrics) and, side by side in the same run, a loop over
prompts calling sklearn/scipy per prompt, and their ratio. Usage:

    python benchmarks/metrics_speed.py [--data ../shared/tia2] [--bootstrap 1000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd


def vectorised(images: pd.DataFrame, n_boot: int) -> pd.DataFrame:
    from harness.evaluation.metrics import aggregate, per_prompt_metrics

    per_prompt = per_prompt_metrics(images, score="score")
    rows = [
        {"subset": s, **aggregate(g, n_boot=n_boot, seed=0)}
        for s, g in per_prompt.groupby("subset", observed=True)
    ]
    return pd.DataFrame(rows)


def naive(images: pd.DataFrame, n_boot: int) -> pd.DataFrame:
    from scipy.stats import kendalltau, spearmanr
    from sklearn.metrics import average_precision_score, roc_auc_score

    rows = []
    for subset, sub in images.groupby("subset", observed=True):
        values = []
        for _, g in sub.groupby("prompt"):
            y, s, t = g["binary"].to_numpy(), g["score"].to_numpy(), g["graded"].to_numpy()
            if y.min() == y.max():
                continue
            values.append([roc_auc_score(y, s), average_precision_score(y, s),
                           spearmanr(s, t).statistic, kendalltau(s, t).statistic])
        values = np.asarray(values)
        rng = np.random.default_rng(0)
        boots = [values[rng.integers(0, len(values), len(values))].mean(0) for _ in range(n_boot)]
        lo, hi = np.quantile(np.asarray(boots), [0.025, 0.975], axis=0)
        rows.append({"subset": subset, "auroc": values[:, 0].mean(), "auroc_ci": [lo[0], hi[0]]})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "tia2"))
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    from harness_plugins.tia2 import TIA2

    images = TIA2(args.data).load().images
    images["score"] = np.random.default_rng(0).normal(size=len(images)) + images["graded"]
    print(f"TIA2: {len(images)} images, {images.groupby(['subset', 'prompt'], observed=True).ngroups} "
          f"prompts, {args.bootstrap} bootstrap resamples")

    def best(fn):
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            out = fn(images, args.bootstrap)
            times.append(time.perf_counter() - t0)
        return min(times), out

    t_vec, fast = best(vectorised)
    t_naive, slow = best(naive)
    np.testing.assert_allclose(fast["auroc"], slow["auroc"], atol=1e-12)
    print(f"vectorised (7 metrics + CIs): {t_vec:.3f} s   (target < 2 s)")
    print(f"per-prompt sklearn/scipy loop (4 metrics + CI): {t_naive:.3f} s")
    print(f"speed-up: {t_naive / t_vec:.1f}x")


if __name__ == "__main__":
    main()
