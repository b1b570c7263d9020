"""Preference benchmarks: the ImageReward test, HPD v2 test and Pick-a-Pic v2 loaders, and their
accuracies against references written here from each upstream protocol's text.

The ImageReward counts come from the real file (../shared/benchmarks/imagereward_test). HPD v2 and
Pick-a-Pic files are not in the repository: the tests build files shaped exactly like the upstream
ones (the same keys, columns and dtypes) and compute every expected count from those files.
"""

from __future__ import annotations

import io
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from harness.errors import HarnessError
from harness.evaluation.protocols import evaluate
from harness_plugins.cards import CARDS
from harness_plugins.cards.card import card_benchmark

SHARED = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"
IMAGEREWARD_DIR = SHARED / "imagereward_test"

#: The Pick-a-Pic v2 parquet schema (dataset_info of yuvalkirstain/pickapic_v2, in file order).
PICKAPIC_SCHEMA = pa.schema([
    ("are_different", pa.bool_()), ("best_image_uid", pa.string()), ("caption", pa.string()),
    ("created_at", pa.timestamp("ns")), ("has_label", pa.bool_()),
    ("image_0_uid", pa.string()), ("image_0_url", pa.string()),
    ("image_1_uid", pa.string()), ("image_1_url", pa.string()),
    ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
    ("label_0", pa.float64()), ("label_1", pa.float64()),
    ("model_0", pa.string()), ("model_1", pa.string()),
    ("ranking_id", pa.int64()), ("user_id", pa.int64()),
    ("num_example_per_prompt", pa.int64()), ("__index_level_0__", pa.int64()),
])
PICKAPIC_TEST = "test_unique-00000-of-00001-ecef20a3469ae6e6.parquet"
PICKAPIC_VALIDATION = "validation_unique-00000-of-00001-33ead111845fc9c4.parquet"


def bench_class(card_id):
    return card_benchmark(CARDS / f"{card_id}.yaml")


def scores_frame(images, score_of):
    """Scores of one method for the images of ``images`` (``score_of(image) -> float``)."""
    return pd.DataFrame({"subset": images["subset"].astype(str), "image": images["image"],
                         "method": "m", "source": "scored",
                         "score": [float(score_of(i)) for i in images["image"]]})


def run(bench, data, scores):
    rows = evaluate(bench.get_protocol(), data.images, data.pairs, scores, n_boot=0, seed=0,
                    confidence=0.95)
    assert len(rows) == 1
    return rows.iloc[0]


# -- ImageReward test: the real file -------------------------------------------------------------
@pytest.fixture(scope="module")
def imagereward():
    bench = bench_class("imagereward_test")(IMAGEREWARD_DIR)
    return bench, bench.load()


def test_imagereward_counts_from_the_real_file(imagereward):
    bench, data = imagereward
    raw = json.loads((IMAGEREWARD_DIR / "test.json").read_text())
    images, pairs = data.images, data.pairs
    print(f"items {images['prompt_id'].nunique()}, images {len(images)}, prompts "
          f"{images['prompt'].nunique()}, untied {(pairs['label'] != 0.5).sum()}, "
          f"tied {(pairs['label'] == 0.5).sum()}")
    assert images["prompt_id"].nunique() == 466 == len(raw)
    assert len(images) == 2720 and images["image"].is_unique
    assert images["prompt"].nunique() == 463
    assert (pairs["label"] != 0.5).sum() == 6399
    assert (pairs["label"] == 0.5).sum() == 831
    assert len(pairs) == sum(math.comb(len(item["generations"]), 2) for item in raw)
    # Image paths are the file's, under the archive's top folder test_images/.
    first = raw[0]["generations"][0]
    assert images["image"].iloc[0] == f"test_images/{first}"
    assert images["binary"].isna().all() and images["graded"].isna().all()
    # Label direction: lower rank is better.
    item = raw[0]
    a, b = 0, next(j for j in range(1, len(item["ranking"])) if item["ranking"][j] != item["ranking"][0])
    row = pairs[(pairs["image_a"] == f"test_images/{item['generations'][a]}")
                & (pairs["image_b"] == f"test_images/{item['generations'][b]}")].iloc[0]
    assert row["label"] == (1.0 if item["ranking"][a] < item["ranking"][b] else 0.0)
    assert bench.files_read() == {
        "test.json": "77cff6c2d0522006f52f0b637ef8302db1782b2b761e378c124a012a3c7fc58e"}
    assert bench.mismatched_files() == []


def _imagereward_reference(raw, score):
    """ImageReward test.py: every pair i < j of an item; a human tie is skipped; otherwise right
    only when the model orders the pair strictly the same way (a model tie is wrong); pooled."""
    right = total = 0
    for item in raw:
        ranks, gens = item["ranking"], item["generations"]
        for i, j in itertools.combinations(range(len(gens)), 2):
            if ranks[i] == ranks[j]:
                continue
            total += 1
            if ranks[i] > ranks[j]:  # j is better
                right += score[gens[i]] < score[gens[j]]
            else:
                right += score[gens[i]] > score[gens[j]]
    return right / total, total


def test_imagereward_skip_rule_against_upstream_reference(imagereward):
    bench, data = imagereward
    raw = json.loads((IMAGEREWARD_DIR / "test.json").read_text())
    rng = np.random.default_rng(7)
    score = {}
    for n, item in enumerate(raw):
        values = rng.normal(size=len(item["generations"])).round(3)
        if n % 4 == 0:  # exact model ties: wrong under this protocol
            values[1] = values[0]
        score.update(zip(item["generations"], values, strict=True))
    expected, n_pairs = _imagereward_reference(raw, score)
    row = run(bench, data, scores_frame(data.images, lambda i: score[i.removeprefix("test_images/")]))
    print(f"ImageReward skip rule: accuracy {row['accuracy']:.6f} (reference {expected:.6f}) "
          f"over {row['n_accuracy_pairs']} pairs")
    assert row["n_accuracy_pairs"] == n_pairs == 6399
    assert row["accuracy"] == pytest.approx(expected, abs=1e-12)
    assert 0.4 < expected < 0.6  # random scores: near chance, model ties pulling it down


# -- HPD v2 test: a file shaped like test.json ---------------------------------------------------
def _hpdv2_items(n_prompts=40, seed=3):
    """Items shaped like HPD v2's test.json: prompt, image_path, rank (int, averaged ranking,
    lower is better; ties allowed) and raw_annotations [{rank, user_hash}]."""
    rng = np.random.default_rng(seed)
    items = []
    for p in range(n_prompts):
        n = int(rng.integers(2, 10))
        rank = [int(r) for r in rng.integers(1, 5, size=n)]
        paths = [f"{p:05d}_{k}.jpg" for k in range(n)]
        annotations = [{"rank": [int(x) for x in rng.permutation(n) + 1], "user_hash": f"u{p}_{a}"}
                       for a in range(3)]
        items.append({"prompt": f"prompt number {p}", "image_path": paths, "rank": rank,
                      "raw_annotations": annotations})
    return items


def _inversion_reference(items, score):
    """HPSv2 evaluate_rank + inversion_score: per prompt, the model's ranking (0 = best score)
    against the human rank; a pair is discordant when the two order it strictly opposite ways;
    1 - discordant / C(n, 2), then the mean over prompts. Model ties are never discordant here."""
    per_prompt = []
    for item in items:
        s = [score[p] for p in item["image_path"]]
        model_rank = [sum(t > v for t in s) for v in s]  # how many images score higher
        human = item["rank"]
        n = len(s)
        discordant = sum(
            1 for i, j in itertools.combinations(range(n), 2)
            if (model_rank[i] > model_rank[j] and human[i] < human[j])
            or (model_rank[i] < model_rank[j] and human[i] > human[j]))
        per_prompt.append(1 - discordant / (n * (n - 1) / 2))
    return float(np.mean(per_prompt))


def test_hpdv2_loader_and_inversion_accuracy(tmp_path):
    items = _hpdv2_items()
    (tmp_path / "test.json").write_text(json.dumps(items))
    bench = bench_class("hpdv2_test")(tmp_path)
    data = bench.load()
    n_images = sum(len(i["image_path"]) for i in items)
    n_pairs = sum(math.comb(len(i["image_path"]), 2) for i in items)
    n_ties = sum(r[a] == r[b] for i in items for r in [i["rank"]]
                 for a, b in itertools.combinations(range(len(r)), 2))
    assert len(data.images) == n_images and data.images["prompt_id"].nunique() == len(items)
    assert len(data.pairs) == n_pairs and (data.pairs["label"] == 0.5).sum() == n_ties
    assert data.images["image"].iloc[0] == "test/00000_0.jpg"  # under the images root test/
    assert set(bench.files_read()) == {"test.json"}  # sha256 recorded though the card has none

    rng = np.random.default_rng(11)
    score = {p: float(v) for i in items for p, v in zip(
        i["image_path"], rng.integers(0, 6, size=len(i["image_path"])), strict=True)}  # many ties
    expected = _inversion_reference(items, score)
    row = run(bench, data, scores_frame(data.images, lambda i: score[i.removeprefix("test/")]))
    print(f"HPD v2 inversions: accuracy {row['accuracy']:.6f} (reference {expected:.6f}), "
          f"{len(items)} prompts, {n_pairs} pairs, {n_ties} human ties")
    assert row["n_prompts"] == len(items)
    assert row["accuracy"] == pytest.approx(expected, abs=1e-12)
    # Perfect scores (the negated human rank) give 1 even with human ties; reversed ones do not.
    rank_of = {p: r for i in items for p, r in zip(i["image_path"], i["rank"], strict=True)}
    perfect = run(bench, data, scores_frame(data.images, lambda i: -rank_of[i.removeprefix("test/")]))
    assert perfect["accuracy"] == 1.0
    worst = run(bench, data, scores_frame(data.images, lambda i: rank_of[i.removeprefix("test/")]))
    assert worst["accuracy"] == pytest.approx(_inversion_reference(
        items, {p: float(r) for p, r in rank_of.items()}), abs=1e-12)
    assert worst["accuracy"] < 0.5


def test_hpdv2_malformed_file_is_one_line(tmp_path):
    items = _hpdv2_items(3)
    items[1]["rank"] = items[1]["rank"][:-1]  # one rank short
    (tmp_path / "test.json").write_text(json.dumps(items))
    with pytest.raises(HarnessError) as err:
        bench_class("hpdv2_test")(tmp_path).load()
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "test.json") in message and "item 1" in message


# -- Pick-a-Pic v2: parquet files shaped like the upstream ones ------------------------------------
def _jpeg(value):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value % 256, 40, 90)).save(buf, format="JPEG")
    return buf.getvalue()


def _pickapic_table(n, seed, tie_share=0.2):
    """A table with the upstream columns and dtypes; label_0 is 1, 0 or 0.5 (a tie)."""
    rng = np.random.default_rng(seed)
    label_0 = rng.choice([1.0, 0.0, 0.5], size=n, p=[(1 - tie_share) / 2] * 2 + [tie_share])
    rows = {
        "are_different": [True] * n,
        "best_image_uid": [f"uid{seed}_{r}_{0 if lab == 1 else 1}" for r, lab in enumerate(label_0)],
        "caption": [f"caption {seed} {r}" for r in range(n)],
        "created_at": pd.to_datetime(np.arange(n) * 10**9 + 1_700_000_000 * 10**9),
        "has_label": [True] * n,
        "image_0_uid": [f"uid{seed}_{r}_0" for r in range(n)],
        "image_0_url": [f"https://example.invalid/{seed}/{r}/0.png" for r in range(n)],
        "image_1_uid": [f"uid{seed}_{r}_1" for r in range(n)],
        "image_1_url": [f"https://example.invalid/{seed}/{r}/1.png" for r in range(n)],
        "jpg_0": [_jpeg(2 * r) for r in range(n)],
        "jpg_1": [_jpeg(2 * r + 1) for r in range(n)],
        "label_0": label_0,
        "label_1": 1.0 - label_0,
        "model_0": ["sdxl"] * n,
        "model_1": ["sd-2.1"] * n,
        "ranking_id": np.arange(n, dtype=np.int64) + 1000 * seed,
        "user_id": rng.integers(1, 50, size=n),
        "num_example_per_prompt": np.ones(n, dtype=np.int64),
        "__index_level_0__": np.arange(n, dtype=np.int64),
    }
    return pa.Table.from_pydict(rows, schema=PICKAPIC_SCHEMA)


def write_pickapic(folder, n_test=80, n_validation=80):
    folder.mkdir(parents=True, exist_ok=True)
    test, validation = _pickapic_table(n_test, 1), _pickapic_table(n_validation, 2)
    pq.write_table(test, folder / PICKAPIC_TEST)
    pq.write_table(validation, folder / PICKAPIC_VALIDATION)
    return test, validation


def _pickapic_scores(table, seed):
    """Logits: the preferred image usually scores higher; a tied pair scores nearly the same."""
    rng = np.random.default_rng(seed)
    label = table.column("label_0").to_numpy()
    base = rng.normal(size=len(label))
    gap = np.where(label == 0.5, rng.normal(scale=0.15, size=len(label)),
                   np.where(label == 1.0, 1.0, -1.0) * rng.gamma(2.0, 0.6, size=len(label)))
    flip = rng.random(len(label)) < 0.2  # some wrong calls
    gap = np.where(flip & (label != 0.5), -gap, gap)
    return base + gap, base  # scores of jpg_0, jpg_1


def _pick_credit(s0, s1, label_0, t):
    """PickScore eval_preference_predictor.py: probabilities by softmax over the two scores; the
    label is a tie at 0.5, "0" at 1, else "1"; the prediction is a tie when |p1 - p0| <= t, else
    the likelier image; 1 for a match, 0.5 when either is a tie, else 0."""
    out = []
    for a, b, lab in zip(s0, s1, label_0, strict=True):
        p0 = math.exp(a) / (math.exp(a) + math.exp(b))
        p1 = 1 - p0
        label = "tie" if lab == 0.5 else "0" if lab == 1 else "1"
        pred = "tie" if abs(p1 - p0) <= t else "0" if p0 > p1 else "1"
        out.append(1.0 if label == pred else 0.5 if "tie" in (label, pred) else 0.0)
    return float(np.mean(out))


def test_pickapic_loader_reads_labels_and_images_from_parquet(tmp_path):
    from harness.images import open_image, read_image_bytes

    test, validation = write_pickapic(tmp_path)
    bench = bench_class("pickapic_v2")(tmp_path)
    data = bench.load()
    n_test, n_val = test.num_rows, validation.num_rows
    assert len(data.pairs) == n_test + n_val and len(data.images) == 2 * (n_test + n_val)
    assert (data.pairs["split"] == "test").sum() == n_test
    assert (data.images["split"] == "validation").sum() == 2 * n_val
    ties = int((test.column("label_0").to_numpy() == 0.5).sum())
    got = data.pairs[data.pairs["split"] == "test"]
    assert int((got["label"] == 0.5).sum()) == ties
    np.testing.assert_array_equal(got["label"].to_numpy(), test.column("label_0").to_numpy())
    row = 5
    ref_a = got["image_a"].iloc[row]
    assert ref_a == f"{PICKAPIC_TEST}::{row}/jpg_0"
    assert got["image_b"].iloc[row] == f"{PICKAPIC_TEST}::{row}/jpg_1"
    assert data.images.set_index("image").loc[ref_a, "prompt"] == test.column("caption")[row].as_py()
    # The images are the parquet bytes, read in place (the --images folder holds the parquets).
    assert read_image_bytes(tmp_path / ref_a) == test.column("jpg_0")[row].as_py()
    assert open_image(tmp_path / got["image_b"].iloc[row]).size == (8, 8)
    resolved, missing = bench.resolve_images(data, tmp_path)
    assert missing == [] and len(resolved.images) == len(data.images)
    assert set(bench.files_read()) == {PICKAPIC_TEST, PICKAPIC_VALIDATION}


def test_pickapic_threshold_protocol_against_upstream_reference(tmp_path):
    test, validation = write_pickapic(tmp_path, 120, 120)
    bench = bench_class("pickapic_v2")(tmp_path)
    data = bench.load()
    protocol = bench.get_protocol()
    t_s0, t_s1 = _pickapic_scores(test, 5)
    v_s0, v_s1 = _pickapic_scores(validation, 6)
    score = {}
    for name, (s0, s1) in ((PICKAPIC_TEST, (t_s0, t_s1)), (PICKAPIC_VALIDATION, (v_s0, v_s1))):
        for r in range(len(s0)):
            score[f"{name}::{r}/jpg_0"], score[f"{name}::{r}/jpg_1"] = s0[r], s1[r]
    row = run(bench, data, scores_frame(data.images, score.__getitem__))

    v_label = validation.column("label_0").to_numpy()
    t_label = test.column("label_0").to_numpy()
    grid = list(protocol.thresholds)
    assert grid == [round(0.1 * k, 1) for k in range(11)]
    on_validation = [_pick_credit(v_s0, v_s1, v_label, t) for t in grid]
    t_best = grid[int(np.argmax(on_validation))]  # the first best threshold
    expected = _pick_credit(t_s0, t_s1, t_label, t_best)
    untied = t_label != 0.5
    dropped = float(np.mean(np.where(t_label[untied] == 1.0, t_s0[untied] > t_s1[untied],
                                     t_s1[untied] > t_s0[untied])))
    print(f"Pick-a-Pic: t = {t_best} (validation {max(on_validation):.4f}); accuracy "
          f"{row['accuracy']:.6f} (reference {expected:.6f}); ties dropped "
          f"{row['accuracy_ties_dropped']:.6f} (reference {dropped:.6f}) over {untied.sum()} of "
          f"{len(t_label)} pairs")
    assert 0.0 < t_best < 1.0  # the data make the search matter
    assert row["threshold"] == t_best
    assert row["accuracy"] == pytest.approx(expected, abs=1e-12)
    assert row["accuracy_ties_dropped"] == pytest.approx(dropped, abs=1e-12)
    assert row["n_accuracy_pairs"] == len(t_label)  # ties kept
    assert row["n_accuracy_ties_dropped_pairs"] == int(untied.sum())  # counted from this file
    # Chance level of the upstream script at t = 1 (always a tie): 0.5 per untied pair, 1 per tie.
    assert _pick_credit(t_s0, t_s1, t_label, 1.0) == pytest.approx(
        (0.5 * untied.sum() + (~untied).sum()) / len(t_label))


@pytest.mark.parametrize("change, culprit", [
    (lambda t: t.drop_columns(["jpg_1"]), "no column(s) jpg_1"),
    (lambda t: t.set_column(t.schema.get_field_index("label_0"), "label_0",
                            pa.array([0.3] + [1.0] * (t.num_rows - 1))), "row 0 has label_0=0.3"),
])
def test_pickapic_malformed_file_is_one_line(tmp_path, change, culprit):
    write_pickapic(tmp_path, 6, 6)
    path = tmp_path / PICKAPIC_TEST
    pq.write_table(change(pq.read_table(path)), path)
    with pytest.raises(HarnessError) as err:
        bench_class("pickapic_v2")(tmp_path).load()
    message = str(err.value)
    assert "\n" not in message and str(path) in message and culprit in message, message


def test_imagereward_malformed_file_is_one_line(tmp_path):
    raw = json.loads((IMAGEREWARD_DIR / "test.json").read_text())[:3]
    del raw[2]["ranking"]
    (tmp_path / "test.json").write_text(json.dumps(raw))
    bench = bench_class("imagereward_test")(tmp_path)
    with pytest.raises(HarnessError) as err:
        bench.load()
    message = str(err.value)
    assert "\n" not in message and "item 2" in message and str(tmp_path / "test.json") in message
    assert bench.mismatched_files() == ["test.json"]  # not the released file: recorded
