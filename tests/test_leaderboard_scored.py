"""`harness leaderboard` scoring real reward-model architectures on a TIA2-layout image folder."""

import json

import numpy as np
import pandas as pd
import pytest
from test_cli import harness, one_line_error
from tiny_models import make_tiny_blip2, make_tiny_clip

from harness.evaluation.metrics import METRICS, prompt_metrics


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tia2_dir):
    from PIL import Image

    from harness_plugins.tia2 import TIA2

    root = tmp_path_factory.mktemp("lb")
    labels = TIA2(tia2_dir).load(["counting"]).images
    share = labels.groupby("prompt", sort=False)["binary"].mean()
    chosen = list(share[(share > 0) & (share < 1)].index[:5]) + list(share[share == 1].index[:1])
    rows = labels[labels["prompt"].isin(chosen)]
    folder = root / "images" / "counting"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in rows["image"]:
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / name)
    return {
        "root": root, "rows": rows, "chosen": chosen,
        "clip": make_tiny_clip(root / "clip"), "blip2": make_tiny_blip2(root / "blip2"),
    }


def run_board(setup, tia2_dir, out, *extra):
    return harness(
        "leaderboard", "tia2", "--data", tia2_dir, "--subset", "counting",
        "--images", setup["root"] / "images", "--skip-missing",
        "--model", f"clip:checkpoint={setup['clip']}", "--model", f"blip2:checkpoint={setup['blip2']}",
        "--bootstrap", 200, "--no-plots", "--cache", setup["root"] / "scores.sqlite", "--out", out,
        *extra,
    )


def test_scored_rows_comparisons_and_cache(setup, tia2_dir):
    out = setup["root"] / "run1"
    result = run_board(setup, tia2_dir, out)
    assert result.returncode == 0, result.stderr
    assert "Skipped 7200 missing or unreadable images." in result.stderr
    rows = json.loads((out / "leaderboard.json").read_text())
    scored = {r["method"]: r for r in rows if r["source"] == "scored"}
    assert set(scored) == {"clip", "blip2"}
    assert all(r["n_prompts"] == 5 for r in scored.values())  # the all-aligned prompt is dropped

    scores = pd.read_parquet(out / "scores.parquet")
    assert len(scores) == 2 * 300 and set(scores["method"]) == {"clip", "blip2"}
    # The table is exactly the metrics of the written scores, prompt by prompt.
    merged = scores.merge(setup["rows"], on=["subset", "prompt", "image"])
    clip = merged[merged["method"] == "clip"]
    per_prompt = [prompt_metrics(g["score"], g["binary"], g["graded"])
                  for p, g in clip.groupby("prompt") if p in setup["chosen"][:5]]
    for m in METRICS:
        assert scored["clip"][m] == pytest.approx(np.mean([x[m] for x in per_prompt]), abs=1e-12)

    comparisons = pd.read_csv(out / "comparisons.csv")
    auroc = comparisons[comparisons["metric"] == "auroc"].set_index("method")
    assert set(auroc.index) == {"clip", "blip2"}
    assert (auroc["n_prompts"] == 5).all()
    assert auroc.loc["clip", "against"] == "clip (reported)"
    assert "scored vs reported" in result.stdout

    manifest = json.loads((out / "manifest.json").read_text())
    by_method = {m["method"]: m for m in manifest["models"]}
    assert by_method["clip"]["computed"] == 300 and by_method["clip"]["encoded_images"] == 300
    assert by_method["blip2"]["variant"] == "itm"
    assert by_method["clip"]["max_text_tokens"] == 77

    # Re-running a finished run computes nothing and gives the same table.
    again = run_board(setup, tia2_dir, setup["root"] / "run2")
    assert again.returncode == 0, again.stderr
    manifest2 = json.loads((setup["root"] / "run2" / "manifest.json").read_text())
    assert [m["computed"] for m in manifest2["models"]] == [0, 0]
    assert [m["cached"] for m in manifest2["models"]] == [300, 300]
    rows2 = json.loads((setup["root"] / "run2" / "leaderboard.json").read_text())
    assert rows2 == rows


def test_model_without_images_and_unknown_model(setup, tia2_dir, tmp_path):
    one_line_error(harness("leaderboard", "tia2", "--data", tia2_dir, "--model", "clip",
                           "--out", tmp_path / "o"), "--images is needed to score reward models")
    one_line_error(run_board(setup, tia2_dir, tmp_path / "o", "--model", "pickscor"),
                   "Unknown reward model 'pickscor'. Did you mean 'pickscore'?")


def test_harness_score_command(setup, tmp_path):
    folder = setup["root"] / "images" / "counting"
    out = tmp_path / "scores.csv"
    result = harness("score", "--model", f"clip:checkpoint={setup['clip']}", "--images", folder,
                     "--prompt", "a realistic photo of an airplane", "--prompt", "two airplanes",
                     "--out", out, "--no-cache")
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(out)
    assert len(table) == 2 * 300 and set(table["model"]) == {"clip"}
    pairs = tmp_path / "pairs.csv"
    first = sorted(folder.iterdir())[:3]
    pd.DataFrame({"image": [p.name for p in first], "prompt": ["two airplanes", "b", "c"]}
                 ).to_csv(pairs, index=False)
    result = harness("score", "--model", f"clip:checkpoint={setup['clip']}", "--pairs", pairs,
                     "--images", folder, "--json", "--no-cache")
    assert result.returncode == 0, result.stderr
    records = json.loads(result.stdout)
    assert [r["prompt"] for r in records] == ["two airplanes", "b", "c"]
    # Same image and prompt -> same score as in the folder run (a pair scored alone, in another
    # batch, with no cache in between).
    row = table[(table["image"] == str(first[0])) & (table["prompt"] == "two airplanes")]
    assert len(row) == 1
    assert records[0]["image"] == str(first[0])
    assert records[0]["score"] == pytest.approx(float(row["score"].iloc[0]), abs=1e-6)
    assert records[1]["score"] != pytest.approx(records[2]["score"], abs=1e-9)
    one_line_error(harness("score", "--model", "clip", "--images", folder), "--prompt")
    one_line_error(harness("score", "--model", f"clip:checkpoint={setup['clip']}", "--pairs",
                           tmp_path / "missing.csv"), "cannot read --pairs file")


def test_textnorm_rows_with_cross_validation_and_oracle(setup, tia2_dir):
    out = setup["root"] / "tn"
    result = run_board(setup, tia2_dir, out, "--normalizer", "textnorm", "--ensemble", "mean",
                       "--ensemble", "ur", "--prompts", "tia2", "--folds", 3)
    assert result.returncode == 0, result.stderr
    rows = {(r["method"], r["source"]): r for r in json.loads((out / "leaderboard.json").read_text())}
    for method in ("textnorm(clip)", "textnorm(blip2)", "mean(clip+blip2)", "ur(clip+blip2)"):
        assert rows[(method, "scored")]["n_prompts"] == 5
    manifest = json.loads((out / "manifest.json").read_text())
    cal = {c["method"]: c for c in manifest["calibration"]}
    assert cal["ur(clip+blip2)"]["selection"] == "cv" and cal["ur(clip+blip2)"]["prompts"] == "tia2"
    assert len(cal["ur(clip+blip2)"]["chosen"]) == 3
    assert {"scale[clip]", "scale[blip2]", "lam"} <= set(cal["ur(clip+blip2)"]["chosen"][0])
    assert "3-fold cv" in (out / "leaderboard.md").read_text()
    # Every image was scored against its prompt and the released contrastive prompts, once.
    scores = pd.read_parquet(out / "scores.parquet")
    per_image = scores[scores["method"] == "clip"].groupby("image")["column"].max()
    assert set(per_image) <= {2, 3, 4} and len(per_image) == 300

    oracle = run_board(setup, tia2_dir, setup["root"] / "tn-oracle", "--normalizer", "textnorm",
                       "--prompts", "rules", "--oracle")
    assert oracle.returncode == 0, oracle.stderr
    rows = json.loads((setup["root"] / "tn-oracle" / "leaderboard.json").read_text())
    assert {r["source"] for r in rows if r["method"].startswith("textnorm(")} == {"oracle"}
    assert "oracle: tuned per prompt" in (setup["root"] / "tn-oracle" / "leaderboard.md").read_text()
    # The rules reproduce the released counting sets, so every pair is already in the cache.
    manifest = json.loads((setup["root"] / "tn-oracle" / "manifest.json").read_text())
    assert [m["computed"] for m in manifest["models"]] == [0, 0]


def test_textnorm_bad_input(setup, tia2_dir, tmp_path):
    one_line_error(run_board(setup, tia2_dir, tmp_path / "o", "--normalizer", "textnrom"),
                   "Unknown normalizer 'textnrom'. Did you mean 'textnorm'?")
    empty = tmp_path / "sets.json"
    empty.write_text(json.dumps({p: [] for p in setup["chosen"]}))
    one_line_error(run_board(setup, tia2_dir, tmp_path / "o", "--normalizer", "textnorm",
                             "--prompts", empty), "have no contrastive prompts")


def _margin_class():
    """A third-party normalizer written to the documented contract only: ``__call__`` on one
    prompt's images, no ``batched`` fast path, no hyperparameters."""
    from typing import ClassVar

    from harness import Normalizer

    class MarginNormalizer(Normalizer):
        id: ClassVar[str] = "margin"
        needs_contrastive: ClassVar[bool] = True

        def __call__(self, scores):
            (raw,) = scores.values()
            raw = np.asarray(raw, dtype=np.float64)
            return raw[:, 0] - raw[:, 1:].max(axis=1)

    return MarginNormalizer


def test_third_party_normalizer_on_the_leaderboard(setup, tia2_dir):
    from harness.plugins import Entry, get_plugins

    get_plugins().normalizers.add(Entry("margin", _margin_class(), "test-plugin"))
    out = setup["root"] / "margin"
    result = run_board(setup, tia2_dir, out, "--normalizer", "margin", "--prompts", "tia2")
    assert result.returncode == 0, result.stderr
    rows = {r["method"]: r for r in json.loads((out / "leaderboard.json").read_text())
            if r["source"] == "scored"}
    assert {"margin(clip)", "margin(blip2)"} <= set(rows)
    # The row is the margin computed independently from the written scores, prompt by prompt.
    scores = pd.read_parquet(out / "scores.parquet")
    clip = scores[scores["method"] == "clip"]
    own = clip[clip["column"] == 0].set_index("image")["score"]
    best_other = clip[clip["column"] > 0].groupby("image")["score"].max()
    margin = (own - best_other).rename("margin").reset_index()
    merged = margin.merge(setup["rows"], on="image")
    per_prompt = [prompt_metrics(g["margin"], g["binary"], g["graded"])
                  for p, g in merged.groupby("prompt") if p in setup["chosen"][:5]]
    for m in METRICS:
        assert rows["margin(clip)"][m] == pytest.approx(np.mean([x[m] for x in per_prompt]), abs=1e-12)
    assert rows["margin(clip)"]["auroc"] != pytest.approx(rows["clip"]["auroc"], abs=1e-9)
    # Declared limits are honoured before any scoring: an ensemble of one is refused.
    one_line_error(run_board(setup, tia2_dir, setup["root"] / "o", "--ensemble", "textnorm"),
                   "--ensemble has 'textnorm', which takes at most 1 model(s)")
