"""Executors: where :func:`~harness.scoring.score_images` runs a reward model.

An :class:`Executor` turns a :class:`~harness.scoring.plan.ScorePlan` (the images still to score,
their prompts, the model's spec) into batches of results; the plan validates them and writes the
cache, so every executor gives the same scores and shares the cache. Two ship with the harness:
:class:`LocalExecutor` (this process) and :class:`~harness.scoring.ray.RayExecutor` (a Ray
cluster).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from harness.errors import HarnessError

if TYPE_CHECKING:
    from harness.scoring.plan import ScorePlan
    from harness.types import RewardModel

#: One batch of results: image indices into the plan, one score array per index, and failures
#: ``(index, "ErrorType: message")``.
Batch = tuple[list[int], list[np.ndarray], list[tuple[int, str]]]


@runtime_checkable
class Executor(Protocol):
    """Runs a reward model over the images of a plan."""

    #: A short name (``local``, ``ray``) recorded in ``ScoreRun.executor_info``.
    name: str

    def batches(self, model: RewardModel, plan: ScorePlan, batch_size: int) -> Iterator[Batch]:
        """Score ``plan.todo`` (indices into ``plan.paths``/``plan.prompts``) in batches.

        The model is built from ``plan.spec`` (a value) where it runs elsewhere; facts of the run
        (placement) go into ``plan.run.executor_info``.
        """
        ...

    def describe(self) -> dict[str, Any]:
        """``{"name": ..., "options": {...}}`` for the run manifest."""
        ...


class LocalExecutor:
    """This process scores; ``num_workers`` DataLoader processes decode and preprocess.

    :param pin_memory: pin batches for fast host-to-GPU copies (default: when the model is on CUDA).
    """

    name = "local"

    def __init__(self, num_workers: int = 0, pin_memory: bool | None = None):
        if num_workers < 0:
            raise HarnessError(f"num_workers must be >= 0, got {num_workers}")
        self.num_workers = int(num_workers)
        self.pin_memory = pin_memory

    def describe(self) -> dict[str, Any]:
        return {"name": self.name,
                "options": {"num_workers": self.num_workers, "pin_memory": self.pin_memory}}

    def batches(self, model: RewardModel, plan: ScorePlan, batch_size: int) -> Iterator[Batch]:
        from torch.utils.data import DataLoader

        from harness.scoring.batches import ImageDataset, collate_items, run_with_backoff

        pin_memory = self.pin_memory
        if pin_memory is None:
            pin_memory = str(getattr(model, "device", "cpu")).startswith("cuda")
        loader = DataLoader(
            ImageDataset([plan.paths[i] for i in plan.todo], model.preprocessor()),
            batch_size=batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate_items,
            pin_memory=pin_memory,
            persistent_workers=False,
        )
        for local_ids, batch, bad in loader:
            ids = [plan.todo[j] for j in local_ids]
            results = (run_with_backoff(model, batch, [plan.prompts[i] for i in ids],
                                        plan.feature_sink(ids)) if ids else [])
            yield ids, results, [(plan.todo[j], err) for j, err in bad]

    def batches_multi(self, models: Sequence[RewardModel], plans: Sequence[ScorePlan],
                      batch_size: int) -> Iterator[tuple[int, list[int], list[Any],
                                                         list[tuple[int, str]]]]:
        """One pass over the images for several models (same paths and prompts in every plan):
        each image any model still needs is read and decoded once, in order, and each needing
        model's preprocessing applied to it; yields ``(model index, ids, results, failures)``.

        ``batch_size`` images are decoded per step, so a model that needs only some of them gets
        smaller batches (scores do not depend on the batch).
        """
        from functools import partial

        from torch.utils.data import DataLoader

        from harness.scoring.batches import MultiImageDataset, collate_multi, run_with_backoff

        needs = [set(plan.todo) for plan in plans]
        union = sorted(set().union(*needs))
        if not union:
            return
        pin_memory = self.pin_memory
        if pin_memory is None:
            pin_memory = any(str(getattr(m, "device", "cpu")).startswith("cuda") for m in models)
        position = {i: j for j, i in enumerate(union)}
        dataset = MultiImageDataset([plans[0].paths[i] for i in union],
                                    [m.preprocessor() for m in models],
                                    [{position[i] for i in need} for need in needs])
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False,
                            num_workers=self.num_workers,
                            collate_fn=partial(collate_multi, models=len(models)),
                            pin_memory=pin_memory, persistent_workers=False)
        for per_model in loader:
            for k, (local_ids, batch, bad) in enumerate(per_model):
                ids = [union[j] for j in local_ids]
                failures = [(union[j], err) for j, err in bad]
                if not ids and not failures:
                    continue
                plan = plans[k]
                results = (run_with_backoff(models[k], batch, [plan.prompts[i] for i in ids],
                                            plan.feature_sink(ids)) if ids else [])
                yield k, ids, results, failures

    def __repr__(self) -> str:
        return f"LocalExecutor(num_workers={self.num_workers}, pin_memory={self.pin_memory})"
