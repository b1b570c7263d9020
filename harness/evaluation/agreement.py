"""How well human annotators predict each other: the "human" row of the leaderboard.

Leave-one-annotator-out. For each annotator ``a`` of the three, the other two annotators' mean
label (0, 0.5 or 1; -1 counts as 0) is used as the "score" of every image, and annotator ``a``'s
own label is the target: binary target ``label_a == 1``, graded target the same 0/1 value. The
seven metrics are computed per prompt exactly as for a reward model; a prompt's value is the mean
over the annotators whose held-out labels contain both classes (for the others AUROC is
undefined). Only prompts kept for reward models (both binary classes under the majority label)
are reported, so the row is comparable with the model rows. It estimates how well an independent
human would rank the images, a practical ceiling for a reward model's agreement; it is not an
upper bound in the strict sense, since it is measured against one annotator, not the majority.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from harness.evaluation.metrics import METRICS, per_prompt_metrics

LABEL_COLUMN = re.compile(r"^label_\d+$")


def label_columns(images: pd.DataFrame) -> list[str]:
    """The per-annotator columns ``label_0, label_1, ...`` a benchmark's data has."""
    return sorted((c for c in images.columns if LABEL_COLUMN.match(str(c))),
                  key=lambda c: int(str(c)[6:]))


def human_agreement(images: pd.DataFrame, by: tuple[str, ...] = ("subset", "prompt")) -> pd.DataFrame:
    """Per-prompt leave-one-annotator-out metrics.

    :param images: one row per image with per-annotator labels ``label_0, label_1, ...``
        (-1/0/1; at least two annotators) and ``binary``.
    :returns: one row per prompt with columns ``*by, n_images, n_positive`` + METRICS; metrics are
        NaN for prompts whose majority labels are all one class (as for reward models).
    """
    columns = label_columns(images)
    if len(columns) < 2:
        raise ValueError("human agreement needs at least two annotators' label_* columns")
    aligned = np.stack([(images[c].to_numpy() == 1) for c in columns], axis=1).astype(float)
    per_annotator = []
    for a in range(len(columns)):
        others = np.delete(aligned, a, axis=1).mean(1)
        frame = images[list(by)].assign(score=others, binary=aligned[:, a], graded=aligned[:, a])
        m = per_prompt_metrics(frame, score="score", by=by)
        # AUROC is NaN when annotator a's labels are one class: drop all of a's metrics there.
        m.loc[m["auroc"].isna(), list(METRICS)] = np.nan
        per_annotator.append(m[list(METRICS)].to_numpy())
    stacked = np.stack(per_annotator)  # [3, P, M]
    with np.errstate(invalid="ignore"):
        ok = ~np.isnan(stacked)
        mean = np.where(ok, stacked, 0.0).sum(0) / ok.sum(0)
    majority = per_prompt_metrics(images.assign(score=0.0), score="score", by=by)
    out = majority[[*by, "n_images", "n_positive"]].copy()
    one_class = (out["n_positive"] == 0) | (out["n_positive"] == out["n_images"])
    for j, name in enumerate(METRICS):
        out[name] = np.where(one_class, np.nan, mean[:, j])
    return out
