"""The leaderboard through the Benchmark contract alone: a benchmark that is not TIA2."""

from typing import ClassVar

import numpy as np
import pandas as pd
import pytest

from harness import Benchmark, BenchmarkData, LeaderboardConfig, run_leaderboard
from harness.evaluation.metrics import METRICS, prompt_metrics
from harness.plugins import Entry, get_plugins


class OneVote(Benchmark):
    """Majority labels only (no per-annotator columns) and one released method per prompt."""

    id: ClassVar[str] = "one-vote"
    subsets: ClassVar[tuple[str, ...]] = ("all",)
    protocol: ClassVar[str] = "per-prompt means over prompts with both classes"

    def load(self, subsets=None):
        rng = np.random.default_rng(0)
        rows = [{"subset": "all", "prompt_id": p, "prompt": f"prompt {p}", "image": f"{p}-{i}.png",
                 "binary": int(i % 2), "graded": float(i % 2)} for p in range(6) for i in range(8)]
        frame = pd.DataFrame(rows)
        frame["released"] = frame["binary"] + rng.normal(0, 0.8, len(frame))
        return BenchmarkData(self.id, frame)

    def reported(self, subsets=None):
        frame = self.load().images
        out = []
        for prompt, g in frame.groupby("prompt"):
            out.append({"subset": "all", "method": "released", "prompt": prompt,
                        **prompt_metrics(g["released"], g["binary"], g["graded"])})
        return pd.DataFrame(out)


def test_a_benchmark_without_annotator_columns(tmp_path):
    get_plugins().benchmarks.add(Entry("one-vote", OneVote, "test-plugin"))
    result = run_leaderboard(LeaderboardConfig.from_dict(
        {"data": {"benchmark": "one-vote"}, "report": {"bootstrap": 50}}))
    assert set(result.rows["source"]) == {"reported"}  # no human row without annotators
    frame = OneVote().load().images
    expected = [prompt_metrics(g["released"], g["binary"], g["graded"]) for _, g in frame.groupby("prompt")]
    row = result.rows.iloc[0]
    assert row["n_prompts"] == 6
    for m in METRICS:
        assert row[m] == pytest.approx(np.mean([e[m] for e in expected]), abs=1e-12)
    assert result.notes[0].startswith("protocol: per-prompt metrics")
    assert result.notes[0].endswith("; per-prompt means over prompts with both classes")
    assert result.manifest["data"]["benchmark"] == "one-vote"
