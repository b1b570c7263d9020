"""The leaderboard: reward models (and the paper's reported numbers) against human labels.

Rows are methods, columns the seven metrics of :mod:`harness.evaluation.metrics` with bootstrap confidence
intervals over prompts, per benchmark subset. Sources:

- ``reported``: the mean of the per-prompt metrics the benchmark's authors released;
- ``human``: leave-one-annotator-out agreement (:mod:`harness.evaluation.agreement`);
- ``scored``: a reward model run by this harness on the benchmark's images, with a paired
  bootstrap test against the ``reported`` row of the same model on the same prompts.

Use :func:`leaderboard` for a DataFrame, :func:`run_leaderboard` for the full result (per-prompt
table, manifest) and, with ``out=``, a run folder written by :mod:`harness.evaluation.report`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.evaluation.agreement import human_agreement
from harness.errors import HarnessError
from harness.evaluation.metrics import METRICS, aggregate
from harness.plugins import get_plugins

ROW_KEYS = ("subset", "method", "source", "n_prompts", *METRICS, *(f"{m}_ci" for m in METRICS))
PER_PROMPT_KEYS = ("subset", "method", "source", "prompt", "n_images", "n_positive", *METRICS)


@dataclass
class LeaderboardResult:
    rows: pd.DataFrame  #: one row per (subset, method, source); columns ROW_KEYS
    #: one row per (subset, method, source, prompt) with both binary classes; PER_PROMPT_KEYS
    per_prompt: pd.DataFrame
    manifest: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    missing_images: list[str] = field(default_factory=list)
    run_dir: Path | None = None
    #: one row per (model, image, prompt) scored: subset, prompt, image, method, score
    scores: pd.DataFrame | None = None
    #: paired bootstrap of each scored model against its reported row, per subset and metric
    comparisons: pd.DataFrame | None = None
    #: image path -> reason, for images a reward model could not read
    failed_images: dict[str, str] = field(default_factory=dict)


def _rows_for(per_prompt: pd.DataFrame, n_boot: int, seed: int, confidence: float) -> list[dict]:
    rows = []
    for (subset, method, source), group in per_prompt.groupby(
        ["subset", "method", "source"], sort=False, observed=True
    ):
        agg = aggregate(group, n_boot=n_boot, seed=seed, confidence=confidence)
        rows.append({"subset": subset, "method": method, "source": source, **agg})
    return rows


def run_leaderboard(
    benchmark: str = "tia2",
    *,
    data: str | Path | None = None,
    subsets: Sequence[str] | None = None,
    images: str | Path | None = None,
    skip_missing: bool = False,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    include_reported: bool = True,
    include_human: bool = True,
    out: str | Path | None = None,
    plots: bool = True,
    models: Sequence[str] = (),
    device: str | None = None,
    dtype: str | None = None,
    batch_size: int = 16,
    num_workers: int = 0,
    cache: str | Path | None | bool = True,
    progress: bool = False,
    normalizers: Sequence[str] = (),
    ensembles: Sequence[str] = (),
    prompt_sets: str = "tia2",
    prompt_options: dict[str, Any] | None = None,
    selection: str = "cv",
    folds: int = 5,
    select_metric: str = "auroc",
    standardize: bool = False,
    executor: str = "local",
    ray_options: Any = None,
) -> LeaderboardResult:
    """Build the leaderboard of ``benchmark``; write a run folder when ``out`` is given.

    :param data: annotation folder; downloaded into the user cache when None.
    :param images: image folder, checked for completeness (needed to score models).
    :param n_boot: bootstrap resamples over prompts for the CIs (0 disables them).
    :param models: reward-model specs (``clip``, ``blip2:mode=itc``, ...) to score on the images.
    :param cache: score cache path; True for the default in the user cache, False for none.
    :param normalizers: per-model normalizers (``textnorm``, ``identity``) and ``zscore``.
    :param ensembles: ensembles over all ``models`` (``mean``, ``ur``, ``zscore``).
    :param prompt_sets: contrastive prompts: a generator id (``tia2``, ``rules``, ``llm``) or a
        JSON file ``{prompt: [contrastive prompts]}``.
    :param selection: ``cv`` (k-fold over prompts, ``folds``) or ``oracle`` (per prompt, labelled).
    """
    if n_boot < 0:
        raise HarnessError(f"--bootstrap must be >= 0, got {n_boot}")
    if not 0.0 < confidence < 1.0:
        raise HarnessError(f"--confidence must be between 0 and 1, got {confidence}")
    bench = get_plugins().benchmarks.get(benchmark)(data_dir=data)
    subsets = bench.check_subsets(subsets) if hasattr(bench, "check_subsets") else subsets
    loaded = bench.load(subsets)
    missing: list[str] = []
    if models and images is None:
        raise HarnessError("scoring reward models needs the benchmark images: pass --images DIR")
    if models:
        from harness.scoring.specs import check_unique_labels, parse_model_spec

        check_unique_labels([parse_model_spec(m) for m in models])
    if (normalizers or ensembles) and not models:
        raise HarnessError("--normalizer and --ensemble need reward models: pass --model")
    if "ur" in ensembles or "mean" in ensembles:
        if len(models) < 2:
            raise HarnessError("an ensemble needs at least two --model")
    if images is not None:
        loaded, missing = bench.resolve_images(loaded, images, skip_missing=skip_missing)
    labels = loaded.images
    counts = (
        labels.groupby(["subset", "prompt"], observed=True)["binary"]
        .agg(n_images="size", n_positive="sum")
        .reset_index()
    )

    parts: list[pd.DataFrame] = []
    notes: list[str] = []
    if include_reported:
        reported = bench.reported(subsets)
        if not reported.empty:
            reported = reported.merge(counts, on=["subset", "prompt"], how="left")
            reported["source"] = "reported"
            parts.append(reported)
            tuned = reported[reported["scale"].notna()]
            for (subset, method), g in tuned.groupby(["subset", "method"], observed=True):
                notes.append(
                    f"{subset}/{method} (reported): released per-prompt hyperparameters "
                    f"scale in [{g['scale'].min():g}, {g['scale'].max():g}]"
                    + (f", lambda in [{g['lambda'].min():g}, {g['lambda'].max():g}]"
                       if g["lambda"].notna().any() else "")
                    + "; if chosen per prompt against the labels they are oracle-tuned"
                )
    scores_frame = None
    comparisons = None
    failed: dict[str, str] = {}
    model_info: list[dict[str, Any]] = []
    calibration: list[dict[str, Any]] = []
    if models:
        contrastive = None
        if normalizers or ensembles:
            contrastive = contrastive_sets(labels, loaded, prompt_sets, prompt_options or {}, data)
        scores_frame, failed, model_info = _score_models(
            labels, models, device=device, dtype=dtype, batch_size=batch_size,
            num_workers=num_workers, cache=cache, progress=progress, contrastive=contrastive,
            executor=executor, ray_options=ray_options,
        )
        if normalizers or ensembles:
            cal_parts, calibration = _calibrated_rows(
                scores_frame, labels, [m["method"] for m in model_info], normalizers, ensembles,
                prompt_sets=prompt_sets, selection=selection, folds=folds, seed=seed,
                metric=select_metric, standardize=standardize,
            )
            parts.extend(cal_parts)
            for c in calibration:
                notes.append(f"{c['subset']}/{c['method']}: prompts {c['prompts']}; {c['summary']}")
        own = scores_frame[scores_frame["column"] == 0]
        scored = own.merge(
            labels[["subset", "prompt", "image", "binary", "graded"]],
            on=["subset", "prompt", "image"], how="left",
        )
        from harness.evaluation.metrics import per_prompt_metrics

        for method, group in scored.groupby("method", sort=False):
            pp = per_prompt_metrics(group, score="score", by=("subset", "prompt"))
            pp["method"] = method
            pp["source"] = "scored"
            parts.append(pp)
        if failed:
            notes.append(f"{len(failed)} images could not be read and were not scored")
    if include_human:
        human = human_agreement(labels)
        human["method"] = "human"
        human["source"] = "human"
        parts.append(human)
    if not parts:
        raise HarnessError("nothing to put on the leaderboard: no reported rows and no human row")
    per_prompt = pd.concat([p[list(PER_PROMPT_KEYS)] for p in parts], ignore_index=True)
    # Only prompts with both binary classes enter the means (AUROC is undefined otherwise).
    per_prompt = per_prompt[per_prompt["auroc"].notna()]
    order = {s: i for i, s in enumerate(bench.subsets)}
    per_prompt = per_prompt.sort_values(
        "subset", key=lambda s: s.map(order), kind="stable"
    ).reset_index(drop=True)
    per_prompt["subset"] = per_prompt["subset"].astype(str)

    rows = pd.DataFrame(_rows_for(per_prompt, n_boot, seed, confidence), columns=list(ROW_KEYS))
    if models and include_reported:
        comparisons = compare_with_reported(per_prompt, n_boot=n_boot, seed=seed, confidence=confidence)
    config = {
        "benchmark": benchmark,
        "subsets": list(subsets or bench.subsets),
        "data": str(data) if data is not None else None,
        "images": str(images) if images is not None else None,
        "skip_missing": skip_missing,
        "bootstrap": n_boot,
        "confidence": confidence,
        "include_reported": include_reported,
        "include_human": include_human,
        "models": list(models),
        "device": device,
        "dtype": dtype,
        "batch_size": batch_size,
        "num_workers": num_workers,
        "cache": str(cache) if not isinstance(cache, bool) else cache,
        "normalizers": list(normalizers),
        "ensembles": list(ensembles),
        "prompt_sets": prompt_sets if (normalizers or ensembles) else None,
        "selection": selection,
        "folds": folds,
        "select_metric": select_metric,
        "standardize": standardize,
        "executor": executor,
        "ray": None if ray_options is None else {
            "address": ray_options.address, "actors": ray_options.actors,
            "gpus_per_actor": ray_options.gpus_per_actor, "cpus_per_actor": ray_options.cpus_per_actor},
    }
    from harness.evaluation.manifest import build_manifest

    manifest = build_manifest(
        config,
        seed,
        {
            "source": loaded.source,
            "files": dict(getattr(bench, "checksums", None) or loaded.files),
            "checksum_mismatches": list(getattr(bench, "checksum_mismatches", [])),
            "n_images": int(len(labels)),
            "missing_images": len(missing),
            "failed_images": failed,
        },
    )
    manifest["models"] = model_info
    manifest["calibration"] = calibration
    result = LeaderboardResult(rows, per_prompt, manifest, notes, missing, scores=scores_frame,
                               comparisons=comparisons, failed_images=failed)
    if out is not None:
        from harness.evaluation.report import write_run

        result.run_dir = write_run(out, result, plots=plots)
    return result


def _score_models(
    labels: pd.DataFrame, models: Sequence[str], *, device: str | None, dtype: str | None,
    batch_size: int, num_workers: int, cache: str | Path | None | bool, progress: bool,
    contrastive: dict[tuple[str, str], list[str]] | None = None,
    executor: str = "local", ray_options: Any = None,
) -> tuple[pd.DataFrame, dict[str, str], list[dict[str, Any]]]:
    """Score every image against its own prompt (column 0) and its contrastive prompts.

    :returns: a long table ``subset, prompt, image, method, column, text, score``, the images
        that could not be read, and each model's description for the manifest.
    """
    from harness.scoring.specs import load_reward_model, parse_model_spec
    from harness.scoring.cache import open_score_cache
    from harness.scoring.runner import score_images

    store = open_score_cache(cache)
    frames, failed, info = [], {}, []
    try:
        for text in models:
            spec = parse_model_spec(text)
            model = load_reward_model(spec, device=device, dtype=dtype)
            texts = [
                [p] + (list(contrastive.get((str(s), p), [])) if contrastive else [])
                for s, p in zip(labels["subset"], labels["prompt"], strict=True)
            ]
            run = score_images(
                model, labels["path"].tolist(), texts,
                cache=store, batch_size=batch_size, num_workers=num_workers, progress=progress,
                executor=executor, ray_options=ray_options,
            )
            failed.update(run.failed)
            ok = [i for i, s in enumerate(run.scores) if s is not None]
            lengths = [len(texts[i]) for i in ok]
            base = labels.iloc[ok][["subset", "prompt", "image"]]
            frame = base.loc[base.index.repeat(lengths)].reset_index(drop=True)
            frame["subset"] = frame["subset"].astype(str)
            frame["method"] = spec.label
            frame["column"] = np.concatenate([np.arange(n) for n in lengths]) if ok else []
            frame["text"] = [t for i in ok for t in texts[i]]
            frame["score"] = np.concatenate([run.scores[i] for i in ok]) if ok else []
            frames.append(frame)
            info.append({**model.describe(), "method": spec.label, "spec": text,
                         "computed": run.computed, "cached": run.cached,
                         "encoded_images": run.encoded_images, "seconds": round(run.seconds, 3),
                         "failed_images": len(run.failed)})
            del model
    finally:
        if store is not None:
            store.close()
    return pd.concat(frames, ignore_index=True), failed, info


def contrastive_sets(
    labels: pd.DataFrame, loaded: Any, prompt_sets: str, options: dict[str, Any],
    data: str | Path | None,
) -> dict[tuple[str, str], list[str]]:
    """``{(subset, prompt): [contrastive prompts]}`` from a generator id or a JSON file."""
    import json

    pairs = list(dict.fromkeys(zip(labels["subset"].astype(str), labels["prompt"], strict=True)))
    path = Path(prompt_sets).expanduser()
    if prompt_sets == "tia2" and loaded.contrastive:
        sets = {pair: loaded.contrastive.get(pair, []) for pair in pairs}
    elif path.suffix == ".json" or path.is_file():
        try:
            by_prompt = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise HarnessError(f"cannot read prompt sets '{path}': {exc}") from exc
        if not isinstance(by_prompt, dict):
            raise HarnessError(f"prompt sets '{path}' must be a JSON object {{prompt: [prompts]}}")
        sets = {(s, p): list(by_prompt.get(p, [])) for s, p in pairs}
    else:
        cls = get_plugins().prompt_generators.get(prompt_sets)
        kwargs = dict(options)
        if prompt_sets == "tia2":
            kwargs.setdefault("data_dir", data)
        generated = cls(**kwargs).generate(list(dict.fromkeys(p for _, p in pairs)))
        sets = {(s, p): list(generated.get(p, [])) for s, p in pairs}
    empty = [pair for pair, v in sets.items() if not v]
    if empty:
        s, p = empty[0]
        raise HarnessError(
            f"{len(empty)} prompts have no contrastive prompts in '{prompt_sets}', e.g. {s}: {p!r}"
        )
    return sets


def _calibrated_rows(
    scores: pd.DataFrame, labels: pd.DataFrame, models: list[str], normalizers: Sequence[str],
    ensembles: Sequence[str], *, prompt_sets: str, selection: str, folds: int, seed: int,
    metric: str, standardize: bool,
) -> tuple[list[pd.DataFrame], list[dict[str, Any]]]:
    from harness.evaluation.calibration import ContrastiveScores, calibrate

    registry = get_plugins().normalizers
    for name in [*normalizers, *ensembles]:
        registry.get(name)  # unknown ids fail here with "did you mean"
    merged = scores.merge(labels[["subset", "prompt", "image", "binary", "graded"]].assign(
        subset=labels["subset"].astype(str)), on=["subset", "prompt", "image"], how="left")
    merged = merged.rename(columns={"method": "model"})
    jobs: list[tuple[str, list[str]]] = []
    for name in normalizers:
        if name == "zscore":
            jobs.append((name, models))
        else:
            jobs += [(name, [m]) for m in models]
    jobs += [(name, models) for name in ensembles if (name, models) not in jobs]
    parts, record = [], []
    for subset, frame in merged.groupby("subset", sort=False):
        # Images that some model could not score are left out of every calibrated row, so that
        # each model and ensemble sees the same images.
        own = frame[frame["column"] == 0]
        per_image = own.groupby(["prompt", "image"])["model"].nunique()
        complete = per_image[per_image == len(models)].index
        if len(complete) < len(per_image):
            record.append({"subset": subset, "method": "(calibration)", "prompts": prompt_sets,
                           "summary": f"{len(per_image) - len(complete)} images not scored by every "
                                      "model were left out of the calibrated rows",
                           "selection": None, "chosen": []})
        keep = frame.set_index(["prompt", "image"]).index.isin(complete)
        frame = frame[keep]
        tensor = ContrastiveScores.from_long(frame, subset)
        if standardize:
            tensor = tensor.standardized()
        counts = pd.DataFrame({"prompt": tensor.prompts, "n_images": tensor.image_mask.sum(1),
                               "n_positive": (tensor.binary * tensor.image_mask).sum(1).astype(int)})
        for name, group in jobs:
            result = calibrate(tensor, name, group, selection=selection, k=folds, seed=seed,
                               metric=metric)
            label = f"{name}({'+'.join(group)})"
            pp = result.per_prompt.assign(subset=subset, method=label,
                                          source="oracle" if result.selection == "oracle" else "scored")
            parts.append(pp.merge(counts, on="prompt", how="left"))
            record.append({"subset": subset, "method": label, "prompts": prompt_sets,
                           "selection": result.selection, "standardize": standardize,
                           "summary": result.summary(), "chosen": result.chosen})
    return parts, record


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


def leaderboard(benchmark: str = "tia2", **kwargs: Any) -> pd.DataFrame:
    """The leaderboard as a DataFrame (one row per subset, method and source)."""
    return run_leaderboard(benchmark, **kwargs).rows
