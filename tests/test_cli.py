import hashlib
import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
from test_tia2 import PAPER_AUROC

from harness.evaluation.leaderboard import ROW_KEYS, leaderboard
from harness.evaluation.metrics import METRICS


def harness(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, timeout=300, env=os.environ.copy(),
    )


def one_line_error(result, pattern):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    assert pattern in lines[0], lines[0]


def digest_tree(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tia2_dir):
    out = tmp_path_factory.mktemp("run") / "tia2"
    result = harness("leaderboard", "tia2", "--data", tia2_dir, "--out", out, "--bootstrap", 300)
    assert result.returncode == 0, result.stderr
    return out, result


def test_leaderboard_end_to_end(full_run, tia2_dir):
    out, result = full_run
    assert {"manifest.json", "leaderboard.json", "leaderboard.csv", "leaderboard.md",
            "leaderboard.html", "per_prompt.csv"} <= {p.name for p in out.iterdir()}
    rows = json.loads((out / "leaderboard.json").read_text())
    assert len(rows) == 15 + 3  # 5 reported methods + the human row, per subset
    for row in rows:
        assert tuple(row) == ROW_KEYS
        for m in METRICS:
            lo, hi = row[f"{m}_ci"]
            assert lo <= row[m] <= hi
    reported = {(r["subset"], r["method"]): r for r in rows if r["source"] == "reported"}
    for key, value in PAPER_AUROC.items():
        assert round(reported[key]["auroc"], 4) == value
    human = {r["subset"]: r for r in rows if r["source"] == "human"}
    assert {s: r["n_prompts"] for s, r in human.items()} == {
        "comprehensive": 84, "counting": 146, "composition": 295
    }
    # The terminal shows the table.
    assert "textnorm_ur" in result.stdout and "AUROC" in result.stdout

    per_prompt = pd.read_csv(out / "per_prompt.csv")
    assert len(per_prompt) == 5 * (84 + 146 + 295) + 525
    assert (per_prompt["n_images"] == 50).all()
    csv = pd.read_csv(out / "leaderboard.csv")
    assert len(csv) == 18 and "auroc_ci_low" in csv

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 0
    assert manifest["config"]["bootstrap"] == 300
    assert "numpy" in manifest["packages"] and manifest["harness_version"]
    assert manifest["plugins"][0]["name"] == "harness_plugins.tia2"
    files = manifest["data"]["files"]
    assert len(files) == 9 and manifest["data"]["checksum_mismatches"] == []
    for rel, digest in files.items():
        assert hashlib.sha256((tia2_dir / rel).read_bytes()).hexdigest() == digest

    pngs = sorted(p.name for p in (out / "plots").iterdir())
    assert pngs == sorted(f"{m}.png" for m in METRICS)
    assert all((out / "plots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_python_api_matches_cli(full_run, tia2_dir):
    out, _ = full_run
    frame = leaderboard("tia2", data=tia2_dir, n_boot=300)
    assert isinstance(frame, pd.DataFrame)
    cli_rows = json.loads((out / "leaderboard.json").read_text())
    assert len(frame) == len(cli_rows)
    for rec, row in zip(frame.to_dict(orient="records"), cli_rows, strict=True):
        assert rec["method"] == row["method"]
        assert rec["auroc"] == pytest.approx(row["auroc"], abs=1e-12)
        assert rec["auroc_ci"] == pytest.approx(row["auroc_ci"], abs=1e-12)


def test_seeded_and_reproducible(tia2_dir):
    a = leaderboard("tia2", data=tia2_dir, subsets=["counting"], n_boot=200, seed=1)
    b = leaderboard("tia2", data=tia2_dir, subsets=["counting"], n_boot=200, seed=1)
    c = leaderboard("tia2", data=tia2_dir, subsets=["counting"], n_boot=200, seed=2)
    assert a["auroc_ci"].tolist() == b["auroc_ci"].tolist()
    assert a["auroc_ci"].tolist() != c["auroc_ci"].tolist()
    assert a["auroc"].tolist() == c["auroc"].tolist()


def test_report_rerenders(full_run, tmp_path):
    out, _ = full_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "leaderboard.md").unlink()
    result = harness("report", copy, "--no-plots")
    assert result.returncode == 0, result.stderr
    assert "| pickscore | reported | 146 | 0.7305" in (copy / "leaderboard.md").read_text()


def test_bad_data_folder(tmp_path):
    one_line_error(harness("leaderboard", "tia2", "--data", tmp_path / "nope", "--out", tmp_path / "o"),
                   "does not exist")
    assert not (tmp_path / "o").exists()


def test_unknown_subset_and_benchmark(tia2_dir, tmp_path):
    one_line_error(harness("leaderboard", "tia2", "--data", tia2_dir, "--subset", "countng",
                           "--out", tmp_path / "o"), "Did you mean 'counting'?")
    one_line_error(harness("leaderboard", "tia3", "--data", tia2_dir, "--out", tmp_path / "o"),
                   "Unknown benchmark 'tia3'. Did you mean 'tia2'?")


def test_truncated_annotations_leave_earlier_run_untouched(tia2_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tia2_dir, data)
    out = tmp_path / "run"
    ok = harness("leaderboard", "tia2", "--data", data, "--subset", "counting", "--out", out,
                 "--bootstrap", 50, "--no-plots")
    assert ok.returncode == 0, ok.stderr
    before = digest_tree(out)
    target = data / "alignment_scores/alignment_scores_counting.json"
    target.chmod(0o644)
    target.write_text(target.read_text()[:1000])
    bad = harness("leaderboard", "tia2", "--data", data, "--subset", "counting", "--out", out,
                  "--bootstrap", 50, "--no-plots")
    one_line_error(bad, "malformed annotation file")
    assert "alignment_scores_counting.json" in bad.stderr
    assert digest_tree(out) == before


def test_missing_images(tia2_dir, tmp_path):
    from harness_plugins.tia2 import TIA2

    images = tmp_path / "images" / "counting"
    images.mkdir(parents=True)
    names = TIA2(tia2_dir).load(["counting"]).images["image"].tolist()
    for name in names[:-3]:
        (images / name).write_bytes(b"")
    args = ["leaderboard", "tia2", "--data", tia2_dir, "--subset", "counting", "--images",
            tmp_path / "images", "--bootstrap", 20, "--no-plots", "--out", tmp_path / "o"]
    one_line_error(harness(*args), "3 of 7500 TIA2 images are missing")
    result = harness(*args, "--skip-missing")
    assert result.returncode == 0, result.stderr
    assert "Skipped 3 missing images." in result.stderr
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["data"]["missing_images"] == 3


def test_bad_options(tia2_dir, tmp_path):
    one_line_error(harness("leaderboard", "tia2", "--data", tia2_dir, "--confidence", 1.5,
                           "--out", tmp_path / "o"), "--confidence")
    (tmp_path / "file").write_text("x")
    one_line_error(harness("leaderboard", "tia2", "--data", tia2_dir, "--subset", "counting",
                           "--out", tmp_path / "file"), "is not a folder")
