"""The leaderboard: reward models (and the paper's reported numbers) against human labels.

Rows are methods, columns the seven metrics of :mod:`harness.evaluation.metrics` with bootstrap confidence
intervals over prompts, per benchmark subset. Sources:

- ``reported``: the mean of the per-prompt metrics the benchmark's authors released;
- ``human``: leave-one-annotator-out agreement (:mod:`harness.evaluation.agreement`);
- ``scored``: a reward model run by this harness on the benchmark's images, with a paired
  bootstrap test against the ``reported`` row of the same model on the same prompts.

``run_leaderboard(LeaderboardConfig(...))`` computes and returns a :class:`LeaderboardResult`;
:func:`harness.evaluation.report.write_run` writes it as a run folder (the CLI does both).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.errors import HarnessError
from harness.evaluation.agreement import human_agreement, label_columns
from harness.evaluation.config import (
    CalibrationSection,
    ConfigError,
    LeaderboardConfig,
    ScoringSection,
)
from harness.evaluation.contrastive import construct, contrastive_sets
from harness.evaluation.metrics import METRICS, aggregate
from harness.plugins import get_plugins
from harness.types import BenchmarkData, Protocol


class NothingToShow(HarnessError):
    """A benchmark with no rows for this run: no released numbers and no models scored."""


ROW_KEYS = ("subset", "method", "source", "n_prompts", *METRICS, *(f"{m}_ci" for m in METRICS))
PER_PROMPT_KEYS = ("subset", "method", "source", "prompt", "n_images", "n_positive", *METRICS)


@dataclass
class LeaderboardResult:
    #: one row per (subset, method, source); columns ROW_KEYS, plus ``uncertainty_mean`` when a
    #: scored model reports uncertainty (its mean predicted standard deviation; NaN elsewhere)
    rows: pd.DataFrame
    #: one row per (subset, method, source, prompt) with both binary classes; PER_PROMPT_KEYS
    per_prompt: pd.DataFrame
    manifest: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    missing_images: list[str] = field(default_factory=list)
    run_dir: Path | None = None
    #: one row per (model, image, prompt) scored: subset, prompt, image, method, column, text,
    #: score, uncertainty (the model's predicted standard deviation; NaN where it reports none)
    scores: pd.DataFrame | None = None
    #: paired bootstrap of each scored model against its reported row, per subset and metric
    comparisons: pd.DataFrame | None = None
    #: image path -> reason, for images a reward model could not read
    failed_images: dict[str, str] = field(default_factory=dict)
    title: str = ""
    confidence: float = 0.95  #: the level of every interval, printed as given
    protocol: Protocol = field(default_factory=Protocol)  #: how the benchmark's numbers are computed
    benchmark: str = ""


def _rows_for(per_prompt: pd.DataFrame, n_boot: int, seed: int, confidence: float) -> list[dict]:
    rows = []
    for (subset, method, source), group in per_prompt.groupby(
        ["subset", "method", "source"], sort=False, observed=True
    ):
        agg = aggregate(group, n_boot=n_boot, seed=seed, confidence=confidence)
        rows.append({"subset": subset, "method": method, "source": source, **agg})
    return rows


def run_leaderboard(config: LeaderboardConfig, *, progress: bool = False) -> LeaderboardResult:
    """Compute the leaderboard ``config`` describes (nothing is written).

    Rows follow the benchmark's :class:`~harness.types.Protocol`. Per-prompt per-image protocols
    (TIA2): the benchmark's reported per-prompt metrics, the human-agreement row, and with
    ``scoring.models`` one scored row per model plus one row per normalizer (each model alone) and
    ensemble (all models), calibrated without test labels. Pooled and preference protocols: the
    released per-image scores (:meth:`~harness.types.Benchmark.reported_scores`) and each scored
    model, evaluated by :func:`harness.evaluation.protocols.evaluate`.
    """
    config.validate()
    d, s, c, r = config.data, config.scoring, config.calibration, config.report
    plugins = get_plugins()
    bench = construct(plugins.benchmarks.get(d.benchmark), {}, {"data_dir": d.data})
    protocol = bench.get_protocol()
    if problems := protocol.problems():
        raise HarnessError(f"benchmark '{bench.id}' declares an inconsistent protocol: {problems[0]}")
    by_prompt = protocol.family == "per_image" and protocol.grouping == "prompt"
    subsets = bench.check_subsets(d.subsets)
    jobs = _calibration_jobs(c, s.models)
    if jobs and not by_prompt:
        raise ConfigError("calibration.normalizers" if c.normalizers else "calibration.ensembles",
                          f"needs per-prompt per-image labels to calibrate against (as tia2 has); "
                          f"'{bench.id}' is a {protocol.family} benchmark evaluated "
                          f"{protocol.grouping}: score its models without normalizers")
    if s.models:
        from harness.scoring.specs import check_model_spec, check_unique_labels

        check_unique_labels([check_model_spec(m) for m in s.models])
        from harness.scoring.cache import open_score_cache

        if (store := open_score_cache(s.cache)) is not None:  # a bad cache fails before any work
            store.close()
    loaded = bench.load(subsets)
    # The released metrics were computed on every image of the benchmark: their counts too.
    counts = (
        loaded.images.groupby(["subset", "prompt"], observed=True)["binary"]
        .agg(n_images="size", n_positive="sum")
        .reset_index()
    )
    missing: list[str] = []
    if d.images is not None:
        loaded, missing = bench.resolve_images(loaded, d.images, skip_missing=d.skip_missing)
    labels = loaded.images

    parts: list[pd.DataFrame] = []
    item_scores: list[pd.DataFrame] = []  # pooled and preference protocols: subset, image, method, source, score
    #: every per-image score of the run, for calibration: subset, image, method, source, score, native
    per_image: list[pd.DataFrame] = []
    notes: list[str] = []
    released_metrics = False  # the benchmark released per-prompt metrics (no per-image scores)
    if d.include_reported:
        if by_prompt:
            reported = bench.reported(subsets)
            released_metrics = not reported.empty
            if released_metrics:
                reported = reported.merge(counts, on=["subset", "prompt"], how="left")
                reported["source"] = "reported"
                parts.append(reported)
                notes += _tuned_notes(reported)
        released = bench.reported_scores(subsets)
        if not released.empty:
            released = released.assign(subset=released["subset"].astype(str), source="reported")
            per_image.append(released.assign(native=False))
            if by_prompt:
                parts += _prompt_rows(released, labels, "reported")
            else:
                item_scores.append(released)
    scores_frame = None
    comparisons = None
    failed: dict[str, str] = {}
    model_info: list[dict[str, Any]] = []
    calibration: list[dict[str, Any]] = []
    if s.models:
        contrastive = None
        if any(plugins.normalizers.get(name).needs_contrastive for name, _ in jobs):
            contrastive = contrastive_sets(loaded, c.prompts, c.prompt_options, d.data)
        scores_frame, failed, model_info = _score(labels, s, contrastive, progress)
        # Rows side by side judge the same images: those every model scored.
        scores_frame, evaluated = _common_images(scores_frame, labels, len(model_info))
        if len(evaluated) < len(labels):
            notes.append(f"{len(labels) - len(evaluated)} images not scored by every model (see "
                         "failed_images in manifest.json) were left out of the scored, calibrated "
                         "and human rows; reported rows are the released metrics on all images")
        labels = evaluated
        if jobs:
            cal_parts, calibration, cal_scores = _calibrated_rows(scores_frame, labels, jobs, c, seed=r.seed)
            parts.extend(cal_parts)
            per_image += cal_scores
            for cal in calibration:
                notes.append(f"{cal['subset']}/{cal['method']}: prompts {cal['prompts']}; {cal['summary']}")
                if cal.get("without_uncertainty"):
                    notes.append(f"{cal['subset']}/{cal['method']}: {', '.join(cal['without_uncertainty'])} "
                                 "report no uncertainty; the normalizer got NaN standard deviations "
                                 "for them (see its documentation for what it does then)")
        own = scores_frame[scores_frame["column"] == 0][["subset", "image", "method", "score"]]
        native = {m["method"]: bool(m.get("score_is_probability", _class_says_probability(m))) for m in model_info}
        per_image.append(own.assign(source="scored", native=own["method"].map(native).fillna(False)))
        if by_prompt:
            parts += _prompt_rows(own.assign(source="scored"), labels, "scored")
        else:
            item_scores.append(own.assign(source="scored"))
    if by_prompt and d.include_human and len(label_columns(labels)) >= 2:
        human = human_agreement(labels)
        human["method"] = "human"
        human["source"] = "human"
        parts.append(human)
    order = {name: i for i, name in enumerate(bench.subsets)}
    pairs = _pairs_of(loaded, labels)
    if by_prompt:
        if not parts:
            raise NothingToShow("nothing to put on the leaderboard: no reported rows and no human row")
        per_prompt = _per_prompt_table(parts, bench.id, order)
        rows = pd.DataFrame(_rows_for(per_prompt, r.bootstrap, r.seed, r.confidence), columns=list(ROW_KEYS))
        if s.models and d.include_reported:
            comparisons = compare_with_reported(per_prompt, n_boot=r.bootstrap, seed=r.seed,
                                                confidence=r.confidence)
    else:
        if not item_scores:
            raise NothingToShow(f"nothing to put on the leaderboard: '{bench.id}' releases no "
                                "per-image scores; score reward models with --model and --images")
        from harness.evaluation.protocols import evaluate

        rows = evaluate(protocol, labels, pairs, pd.concat(item_scores, ignore_index=True),
                        n_boot=r.bootstrap, seed=r.seed, confidence=r.confidence)
        rows = rows.sort_values("subset", key=lambda col: col.map(order), kind="stable").reset_index(drop=True)
        per_prompt = pd.DataFrame(columns=list(PER_PROMPT_KEYS))
    if scores_frame is not None:
        rows = _with_uncertainty(rows, scores_frame)
    if per_image:
        from harness.evaluation.reliability import calibration_table

        table, cal_notes = calibration_table(
            protocol, labels, pairs, pd.concat(per_image, ignore_index=True),
            bins=r.calibration_bins, mapping=r.calibration_mapping, n_boot=r.bootstrap, seed=r.seed,
            confidence=r.confidence)
        notes += cal_notes
        if not table.empty:
            rows = rows.merge(table, on=["subset", "method", "source"], how="left")
            for col in ("ece_ci", "brier_ci"):  # rows without per-image scores: no interval
                rows[col] = [v if isinstance(v, list) else [float("nan"), float("nan")] for v in rows[col]]
            rows["calibration"] = [v if isinstance(v, dict) else None for v in rows["calibration"]]
    if released_metrics:
        notes.append("reported rows: the released data holds per-prompt metrics, not per-image scores "
                     "or probabilities, so their calibration (ECE, Brier) cannot be computed")
    from harness.evaluation.manifest import build_manifest

    title = f"{bench.id} leaderboard"
    notes.insert(0, f"protocol: {protocol.describe()}")
    if bench.published:
        shown = "; ".join(f"{method} " + ", ".join(f"{k} {v:g}" for k, v in values.items())
                          for method, values in bench.published.items() if isinstance(values, dict))
        notes.insert(1, f"published numbers (their checkpoints and preprocessing; see the "
                        f"protocol note for sources): {shown}")
    manifest = build_manifest(
        config.asdict(),
        r.seed,
        {
            "benchmark": bench.id,
            "subsets": subsets,
            "protocol": protocol.asdict(),
            "published": bench.published,
            "source": loaded.source,
            "files": {**loaded.files, **bench.files_read()},
            "checksum_mismatches": bench.mismatched_files(),
            "n_images": int(len(loaded.images)),
            "n_images_evaluated": int(len(labels)),
            "missing_images": len(missing),
            "failed_images": failed,
        },
    )
    manifest["models"] = model_info
    manifest["calibration"] = calibration
    manifest["report"] = {"title": title, "notes": notes, "confidence": r.confidence,
                          "protocol": protocol.describe(), "headline": protocol.headline}
    return LeaderboardResult(rows, per_prompt, manifest, notes, missing, scores=scores_frame,
                             comparisons=comparisons, failed_images=failed, title=title,
                             confidence=r.confidence, protocol=protocol, benchmark=bench.id)


def _with_uncertainty(rows: pd.DataFrame, scores: pd.DataFrame) -> pd.DataFrame:
    """``rows`` with an ``uncertainty_mean`` column when a scored model reports uncertainty: the
    mean standard deviation it predicts for the scores of the images it scored against their own
    prompts, per subset, on its ``scored`` rows; NaN (null in leaderboard.json) on every other
    row. Unchanged when no model reports uncertainty."""
    own = scores[(scores["column"] == 0) & scores["uncertainty"].notna()]
    if own.empty:
        return rows
    means = own.groupby(["subset", "method"], sort=False)["uncertainty"].mean()
    rows = rows.copy()
    rows["uncertainty_mean"] = [
        float(means.get((str(sub), method), np.nan)) if source == "scored" else np.nan
        for sub, method, source in zip(rows["subset"], rows["method"], rows["source"], strict=True)
    ]
    return rows


def _prompt_rows(scores: pd.DataFrame, labels: pd.DataFrame, source: str) -> list[pd.DataFrame]:
    """Per-prompt metric tables, one per method, of per-image ``scores`` (subset, image, method,
    score) against the labels of a per-prompt benchmark."""
    from harness.evaluation.metrics import per_prompt_metrics

    merged = scores.merge(
        labels[["subset", "prompt", "image", "binary", "graded"]].assign(subset=labels["subset"].astype(str)),
        on=["subset", "image"], how="inner")
    out = []
    for method, group in merged.groupby("method", sort=False):
        pp = per_prompt_metrics(group, score="score", by=("subset", "prompt"),
                                snap_ties=source != "reported")
        out.append(pp.assign(method=method, source=source))
    return out


def _per_prompt_table(parts: list[pd.DataFrame], benchmark: str, order: dict[str, int]) -> pd.DataFrame:
    per_prompt = pd.concat([p[list(PER_PROMPT_KEYS)] for p in parts], ignore_index=True)
    # Only prompts with both binary classes enter the means (AUROC is undefined otherwise).
    per_prompt = per_prompt[per_prompt["auroc"].notna()].copy()
    for col in ("n_images", "n_positive"):
        if per_prompt[col].isna().any():  # pragma: no cover - a benchmark whose reported prompts have no labels
            bad = per_prompt.loc[per_prompt[col].isna(), "prompt"].iloc[0]
            raise HarnessError(f"benchmark '{benchmark}' reports prompt {bad!r} that has no labelled images")
        per_prompt[col] = per_prompt[col].astype(np.int64)
    per_prompt = per_prompt.sort_values(
        "subset", key=lambda col: col.map(order), kind="stable"
    ).reset_index(drop=True)
    per_prompt["subset"] = per_prompt["subset"].astype(str)
    return per_prompt


def _pairs_of(loaded: BenchmarkData, labels: pd.DataFrame) -> pd.DataFrame | None:
    """The benchmark's pairs whose two images are among ``labels`` (resolved and scored)."""
    if loaded.pairs is None:
        return None
    pairs = loaded.pairs.assign(subset=loaded.pairs["subset"].astype(str))
    present = pd.MultiIndex.from_frame(labels[["subset", "image"]].astype({"subset": str}))
    keep = (pd.MultiIndex.from_arrays([pairs["subset"], pairs["image_a"]]).isin(present)
            & pd.MultiIndex.from_arrays([pairs["subset"], pairs["image_b"]]).isin(present))
    return pairs[keep].reset_index(drop=True)


def _tuned_notes(reported: pd.DataFrame) -> list[str]:
    """Notes on reported rows that carry released per-prompt hyperparameters."""
    if "scale" not in reported:
        return []
    notes = []
    tuned = reported[reported["scale"].notna()]
    for (subset, method), g in tuned.groupby(["subset", "method"], observed=True):
        lam = g["lambda"] if "lambda" in g else pd.Series(dtype=float)
        notes.append(
            f"{subset}/{method} (reported): released per-prompt hyperparameters "
            f"scale in [{g['scale'].min():g}, {g['scale'].max():g}]"
            + (f", lambda in [{lam.min():g}, {lam.max():g}]" if lam.notna().any() else "")
            + "; if chosen per prompt against the labels they are oracle-tuned"
        )
    return notes


def _calibration_jobs(c: CalibrationSection, models: Sequence[str]) -> list[tuple[str, list[str]]]:
    """(normalizer id, models) pairs: each normalizer on each model alone, each ensemble on all.

    Checked against what each normalizer declares (how many models it combines) before any work.
    """
    from harness.scoring.specs import parse_model_spec

    catalog = get_plugins().normalizers
    labels = [parse_model_spec(m).label for m in models]
    jobs: list[tuple[str, list[str]]] = []
    for name in c.normalizers:
        cls = catalog.get(name)
        if cls.min_models > 1:
            raise ConfigError("calibration.normalizers",
                              f"has '{name}', which combines at least {cls.min_models} models: "
                              "use it as an ensemble")
        jobs += [(catalog.entry(name).id, [m]) for m in labels]
    for name in c.ensembles:
        cls = catalog.get(name)
        if len(labels) < cls.min_models:
            raise ConfigError("calibration.ensembles",
                              f"has '{name}', which combines at least {cls.min_models} models; "
                              f"{len(labels)} given")
        if cls.max_models is not None and len(labels) > cls.max_models:
            raise ConfigError("calibration.ensembles",
                              f"has '{name}', which takes at most {cls.max_models} model(s): use "
                              "it as a normalizer (each model alone)")
        job = (catalog.entry(name).id, labels)
        if job not in jobs:
            jobs.append(job)
    return jobs


def _score(labels: pd.DataFrame, s: ScoringSection,
           contrastive: dict[tuple[str, str], list[str]] | None, progress: bool,
           ) -> tuple[pd.DataFrame, dict[str, str], list[dict[str, Any]]]:
    """Score every image against its own prompt (column 0) and its contrastive prompts.

    :returns: a long table ``subset, prompt, image, method, column, text, score,
        uncertainty`` (``uncertainty``: the standard deviation the model predicts for the score,
        NaN for models that report none), the images that could not be read, and each model's
        description for the manifest.
    """
    from harness.scoring import score_models

    texts = [
        [p] + (list(contrastive.get((str(sub), p), [])) if contrastive else [])
        for sub, p in zip(labels["subset"], labels["prompt"], strict=True)
    ]
    results = score_models(
        list(s.models), labels["path"].tolist(), texts, device=s.device, dtype=s.dtype,
        cache=s.cache, batch_size=s.batch_size, progress=progress, executor=make_executor(s),
        one_pass=s.one_pass,
    )
    # Categorical columns (integer codes into one list of distinct values), not a string per
    # (model, image, prompt) row: a TIA2 TextNorm run is ~3.6M rows for four models.
    def category(values: Any) -> tuple[np.ndarray, pd.Index]:
        codes, uniques = pd.factorize(pd.Series(values, dtype=object), sort=False)
        return codes.astype(np.int32), pd.Index(uniques, dtype=object)

    sub_codes, sub_cats = category([str(v) for v in labels["subset"]])
    prompt_codes, prompt_cats = category(labels["prompt"].tolist())
    image_codes, image_cats = category(labels["image"].tolist())
    text_codes_all, text_cats = category([t for ts in texts for t in ts])
    bounds = np.cumsum([0, *(len(ts) for ts in texts)])
    method_cats = pd.Index([scored.label for scored in results], dtype=object)
    frames, failed, info = [], {}, []
    for k, scored in enumerate(results):
        run = scored.run
        failed.update(run.failed)
        ok = np.array([i for i, v in enumerate(run.scores) if v is not None], dtype=np.int64)
        lengths = np.array([len(texts[i]) for i in ok], dtype=np.int64)
        rows = np.repeat(ok, lengths)
        column = (np.concatenate([np.arange(n) for n in lengths]) if len(ok)
                  else np.zeros(0, dtype=np.int64))
        frame = pd.DataFrame({
            "subset": pd.Categorical.from_codes(sub_codes[rows], sub_cats),
            "prompt": pd.Categorical.from_codes(prompt_codes[rows], prompt_cats),
            "image": pd.Categorical.from_codes(image_codes[rows], image_cats),
            "method": pd.Categorical.from_codes(np.full(len(rows), k, dtype=np.int32), method_cats),
            "column": column,
            "text": pd.Categorical.from_codes(text_codes_all[bounds[rows] + column], text_cats),
            "score": (np.concatenate([run.scores[i] for i in ok]) if len(ok)
                      else np.zeros(0)),
            "uncertainty": np.concatenate([
                np.full(len(texts[i]), np.nan) if run.uncertainty[i] is None
                else run.uncertainty[i] for i in ok]) if len(ok) else np.zeros(0),
        })
        frames.append(frame)
        info.append(scored.manifest())
    return pd.concat(frames, ignore_index=True), failed, info


def _common_images(scores: pd.DataFrame, labels: pd.DataFrame, n_models: int,
                   ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The scores and labels of the images every one of ``n_models`` models scored."""
    keys = ["subset", "prompt", "image"]
    per_image = scores[scores["column"] == 0].groupby(keys, sort=False)["method"].nunique()
    complete = per_image[per_image == n_models].index
    in_labels = pd.MultiIndex.from_frame(labels[keys].astype({"subset": str})).isin(complete)
    in_scores = pd.MultiIndex.from_frame(scores[keys]).isin(complete)
    return scores[in_scores].reset_index(drop=True), labels[in_labels]


def make_executor(s: ScoringSection) -> Any:
    """The executor the scoring settings ask for."""
    from harness.scoring import LocalExecutor, RayExecutor, RayOptions

    if s.executor == "ray":
        return RayExecutor(RayOptions(address=s.address, actors=s.actors,
                                      gpus_per_actor=s.gpus_per_actor))
    return LocalExecutor(num_workers=s.workers)


def _calibrated_rows(
    scores: pd.DataFrame, labels: pd.DataFrame, jobs: list[tuple[str, list[str]]],
    c: CalibrationSection, *, seed: int,
) -> tuple[list[pd.DataFrame], list[dict[str, Any]], list[pd.DataFrame]]:
    from harness.evaluation.calibration import ContrastiveScores, calibrate

    catalog = get_plugins().normalizers
    merged = scores.merge(labels[["subset", "prompt", "image", "binary", "graded"]].assign(
        subset=labels["subset"].astype(str)), on=["subset", "prompt", "image"], how="left")
    merged = merged.rename(columns={"method": "model"})
    parts, record, per_image = [], [], []
    for subset, frame in merged.groupby("subset", sort=False):
        tensor = ContrastiveScores.from_long(frame, subset)
        if c.standardize:
            tensor = tensor.standardized()
        counts = pd.DataFrame({"prompt": tensor.prompts, "n_images": tensor.image_mask.sum(1),
                               "n_positive": (tensor.binary * tensor.image_mask).sum(1).astype(int)})
        for name, group in jobs:
            result = calibrate(tensor, catalog.get(name), group, selection=c.selection, k=c.folds,
                               seed=seed, metric=c.select_metric)
            label = f"{name}({'+'.join(group)})"
            pp = result.per_prompt.assign(subset=subset, method=label,
                                          source="oracle" if result.selection == "oracle" else "scored")
            parts.append(pp.merge(counts, on="prompt", how="left"))
            if result.scores is not None:
                p_idx, i_idx = np.nonzero(tensor.image_mask)
                per_image.append(pd.DataFrame({
                    "subset": subset, "image": [tensor.images[p][i] for p, i in zip(p_idx, i_idx, strict=True)],
                    "method": label, "source": pp["source"].iloc[0] if len(pp) else "scored",
                    "score": result.scores[p_idx, i_idx],
                    "native": bool(catalog.get(name).outputs_probability)}))
            record.append({"subset": subset, "method": label, "prompts": c.prompts,
                           "selection": result.selection, "standardize": c.standardize,
                           "summary": result.summary(), "chosen": result.chosen})
            if catalog.get(name).uses_uncertainty:
                record[-1]["without_uncertainty"] = [m for m in group if m not in tensor.uncertainty]
    return parts, record, per_image


def _class_says_probability(info: dict[str, Any]) -> bool:
    """Whether a scored model's class declares probability scores (an instance may say otherwise
    in its describe(), e.g. BLIP-2 by mode)."""
    from harness.scoring.specs import parse_model_spec

    try:
        name = parse_model_spec(str(info.get("spec") or info.get("id"))).name
        return bool(get_plugins().reward_models.get(name).score_is_probability)
    except HarnessError:
        return False


def compare_with_reported(
    per_prompt: pd.DataFrame, n_boot: int = 1000, seed: int = 0, confidence: float = 0.95
) -> pd.DataFrame:
    """Paired bootstrap of each scored row against the reported row of the same model.

    A scored method ``blip2[mode=itc]`` is compared with the reported ``blip2``. Only prompts
    present in both enter the test.
    """
    from harness.evaluation.metrics import paired_bootstrap

    out = []
    scored = per_prompt[per_prompt["source"] == "scored"]
    reported = per_prompt[per_prompt["source"] == "reported"]
    for (subset, method), mine in scored.groupby(["subset", "method"], sort=False):
        base = method.split("[", 1)[0]
        theirs = reported[(reported["subset"] == subset) & (reported["method"] == base)]
        if theirs.empty:
            continue
        joined = mine.merge(theirs, on="prompt", suffixes=("", "_reported"))
        for metric in METRICS:
            test = paired_bootstrap(joined[metric], joined[f"{metric}_reported"], n_boot=n_boot,
                                    seed=seed, confidence=confidence)
            out.append({"subset": subset, "method": method, "against": f"{base} (reported)",
                        "metric": metric, **test})
    return pd.DataFrame(out)
