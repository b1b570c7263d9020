"""Run folders appear whole or not at all, replace an earlier run whole, never overwrite a
folder that is not a run without --force, follow the umask, and a failure while writing them
loses no scores."""

import errno
import json
import os
import sqlite3
import stat

import numpy as np
import pytest
from ray_models import OffsetColor
from test_cli import harness, leaderboard, one_line_error

from harness.errors import HarnessError
from harness.evaluation import report
from harness.evaluation.report import is_run_folder, write_run


@pytest.fixture(scope="module")
def result(tia2_dir):
    return leaderboard(subsets=["counting"], bootstrap=20, data=str(tia2_dir))


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_a_run_folder_is_written_whole_with_the_umask(result, tmp_path):
    old = os.umask(0o027)
    try:
        out = write_run(tmp_path / "run", result, plots=False)
    finally:
        os.umask(old)
    assert is_run_folder(out) and _leftovers(tmp_path) == []
    assert {p.name for p in out.iterdir()} >= {"leaderboard.json", "leaderboard.csv", "leaderboard.md",
                                               "leaderboard.html", "per_prompt.csv", "manifest.json"}
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()} == {0o640}
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_dir()} <= {0o750}
    os.umask(0o002)
    try:
        write_run(tmp_path / "shared", result, plots=True)
    finally:
        os.umask(old)
    plots = tmp_path / "shared" / "plots"
    assert stat.S_IMODE((tmp_path / "shared" / "manifest.json").stat().st_mode) == 0o664
    assert stat.S_IMODE(plots.stat().st_mode) == 0o775


def test_a_failure_while_writing_leaves_nothing_or_the_old_run(result, tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report, "render_html", full_disk)
    with pytest.raises(HarnessError, match="cannot write run folder .*: No space left on device"):
        write_run(tmp_path / "new", result, plots=False)
    assert not (tmp_path / "new").exists() and _leftovers(tmp_path) == []

    monkeypatch.undo()
    out = write_run(tmp_path / "old", result, plots=False)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    monkeypatch.setattr(report, "render_html", full_disk)
    with pytest.raises(HarnessError):
        write_run(out, result, plots=False)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert _leftovers(tmp_path) == []


def test_a_rerun_replaces_the_old_run_whole(result, tmp_path):
    out = write_run(tmp_path / "run", result, plots=False)
    (out / "comparisons.csv").write_text("left over from a scored run\n")
    (out / "plots").mkdir()
    write_run(out, result, plots=False)
    assert not (out / "comparisons.csv").exists() and not (out / "plots").exists()
    assert _leftovers(tmp_path) == []


def test_a_folder_that_is_not_a_run_needs_force(tmp_path, tia2_dir):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("precious")
    result = harness("leaderboard", "tia2", "--data", tia2_dir, "--subset", "counting", "--out", mine,
                     "--bootstrap", 10, "--no-plots")
    one_line_error(result, "is a folder with files but not a harness run")
    assert "--force" in result.stderr and (mine / "chapter1.tex").read_text() == "precious"
    forced = harness("leaderboard", "tia2", "--data", tia2_dir, "--subset", "counting", "--out", mine,
                     "--bootstrap", 10, "--no-plots", "--force")
    assert forced.returncode == 0, forced.stderr
    assert is_run_folder(mine) and not (mine / "chapter1.tex").exists()
    # An empty folder and a file.
    (tmp_path / "empty").mkdir()
    assert harness("leaderboard", "tia2", "--data", tia2_dir, "--subset", "counting", "--out",
                   tmp_path / "empty", "--bootstrap", 10, "--no-plots").returncode == 0
    (tmp_path / "file").write_text("x")
    one_line_error(harness("leaderboard", "tia2", "--data", tia2_dir, "--out", tmp_path / "file"),
                   "is not a folder (it is a file)")


def test_scores_survive_a_failure_while_writing_the_run(tmp_path, tia2_dir, monkeypatch):
    from PIL import Image

    from harness.plugins import Entry, get_plugins
    from harness_plugins.tia2 import TIA2

    labels = TIA2(tia2_dir).load(["counting"]).images
    rows = labels[labels["prompt"].isin(list(dict.fromkeys(labels["prompt"]))[:3])]
    folder = tmp_path / "images" / "counting"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in rows["image"]:
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / name)
    get_plugins().reward_models.add(Entry("offset-color", OffsetColor, "test-plugin"))
    cache = tmp_path / "scores.sqlite"
    args = ["leaderboard", "tia2", "--data", tia2_dir, "--subset", "counting", "--images", tmp_path / "images",
            "--skip-missing", "--model", "offset-color", "--cache", cache, "--bootstrap", 10, "--no-plots",
            "--out", tmp_path / "run", "--json"]  # --json: no progress bars on stderr

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report, "render_markdown", full_disk)
    failed = harness(*args)
    one_line_error(failed, "No space left on device")
    assert f"the scores are kept in the score cache {cache}, so a rerun does not score again" in failed.stderr
    assert not (tmp_path / "run").exists()
    with sqlite3.connect(cache) as db:
        assert db.execute("SELECT COUNT(*) FROM scores").fetchone()[0] == len(rows)
    monkeypatch.undo()
    again = harness(*args)
    assert again.returncode == 0, again.stderr
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["models"][0]["computed"] == 0 and manifest["models"][0]["cached"] == len(rows)
