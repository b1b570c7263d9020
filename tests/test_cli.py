import hashlib
import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
from click.testing import CliRunner
from test_tia2 import PAPER_AUROC

from harness.evaluation.config import LeaderboardConfig
from harness.evaluation.leaderboard import ROW_KEYS, run_leaderboard
from harness.evaluation.metrics import METRICS


class Result:
    """What a test reads of a command run: exit status and the two streams."""

    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def harness(*args):
    """Run a command in-process with click's CliRunner (fast; the suite's default)."""
    from harness.cli import cli

    out = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True)
    if out.exception is not None and not isinstance(out.exception, SystemExit):
        raise out.exception
    return Result(out.exit_code, out.stdout, out.stderr)


def harness_process(*args, cwd=None):
    """Run the real ``python -m harness.cli`` process (for what only a process shows)."""
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


def leaderboard(subsets=(), bootstrap=1000, seed=0, confidence=0.95, **data):
    config = LeaderboardConfig.from_dict({
        "data": {"benchmark": "tia2", "subsets": list(subsets), **data},
        "report": {"bootstrap": bootstrap, "seed": seed, "confidence": confidence}})
    return run_leaderboard(config)


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
    assert manifest["config"] == LeaderboardConfig.from_dict(
        {"data": {"data": str(tia2_dir)}, "report": {"bootstrap": 300}}).asdict()
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
    frame = leaderboard(data=str(tia2_dir), bootstrap=300).rows
    assert isinstance(frame, pd.DataFrame)
    cli_rows = json.loads((out / "leaderboard.json").read_text())
    assert len(frame) == len(cli_rows)
    for rec, row in zip(frame.to_dict(orient="records"), cli_rows, strict=True):
        assert rec["method"] == row["method"]
        assert rec["auroc"] == pytest.approx(row["auroc"], abs=1e-12)
        assert rec["auroc_ci"] == pytest.approx(row["auroc_ci"], abs=1e-12)


def test_seeded_and_reproducible(tia2_dir):
    a = leaderboard(["counting"], data=str(tia2_dir), bootstrap=200, seed=1).rows
    b = leaderboard(["counting"], data=str(tia2_dir), bootstrap=200, seed=1).rows
    c = leaderboard(["counting"], data=str(tia2_dir), bootstrap=200, seed=2).rows
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
    # A real process: exit status 2, one line on stderr, no traceback.
    one_line_error(harness_process("leaderboard", "tia2", "--data", tmp_path / "nope", "--out", tmp_path / "o"),
                   "does not exist")
    assert not (tmp_path / "o").exists()


def test_unknown_subset_and_benchmark(tia2_dir, tmp_path):
    one_line_error(harness("leaderboard", "tia2", "--data", tia2_dir, "--subset", "countng",
                           "--out", tmp_path / "o"), "Did you mean 'counting'?")
    one_line_error(harness_process("leaderboard", "tia3", "--data", tia2_dir, "--out", tmp_path / "o"),
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
        (images / name).write_bytes(b"x")  # not decoded here; an empty file would be unreadable
    args = ["leaderboard", "tia2", "--data", tia2_dir, "--subset", "counting", "--images",
            tmp_path / "images", "--bootstrap", 20, "--no-plots", "--out", tmp_path / "o"]
    one_line_error(harness(*args), "3 of 7500 TIA2 images are missing")
    result = harness(*args, "--skip-missing")
    assert result.returncode == 0, result.stderr
    assert "Skipped 3 missing or unreadable images." in result.stderr
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["data"]["missing_images"] == 3


def test_bad_options(tia2_dir, tmp_path):
    one_line_error(harness("leaderboard", "tia2", "--data", tia2_dir, "--confidence", 1.5,
                           "--out", tmp_path / "o"), "--confidence")
    (tmp_path / "file").write_text("x")
    one_line_error(harness("leaderboard", "tia2", "--data", tia2_dir, "--subset", "counting",
                           "--out", tmp_path / "file"), "is not a folder")


def test_confidence_level_is_printed_as_given_and_report_reproduces_the_run(tia2_dir, tmp_path):
    out = tmp_path / "run"
    result = harness("leaderboard", "tia2", "--data", tia2_dir, "--subset", "counting",
                     "--bootstrap", 100, "--confidence", 0.8, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "80% bootstrap intervals" in result.stdout and "95%" not in result.stdout
    md = (out / "leaderboard.md").read_text()
    html = (out / "leaderboard.html").read_text()
    assert "80% percentile-bootstrap" in md and "95%" not in md
    assert "80% percentile-bootstrap" in html and "95%" not in html
    assert md.startswith("# tia2 leaderboard") and "oracle-tuned" in md
    before = {name: (out / name).read_text() for name in ("leaderboard.md", "leaderboard.html")}
    for name in before:
        (out / name).unlink()
    again = harness("report", out, "--no-plots")
    assert again.returncode == 0, again.stderr
    assert {name: (out / name).read_text() for name in before} == before
    assert "80% bootstrap intervals" in again.stdout


def test_yaml_config_and_flag_overrides(tia2_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"data:\n  data: {tia2_dir}\n  subsets: [counting]\nreport:\n  bootstrap: 50\n"
                      "  confidence: 0.9\n  plots: false\n")
    out = tmp_path / "run"
    result = harness("leaderboard", "--config", config, "--confidence", 0.8, "--out", out)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["data"]["subsets"] == ["counting"]
    assert manifest["config"]["report"] == {"bootstrap": 50, "confidence": 0.8, "seed": 0, "plots": False,
                                            "calibration_bins": 10, "calibration_mapping": "platt"}
    rows = json.loads((out / "leaderboard.json").read_text())
    assert {r["subset"] for r in rows} == {"counting"}
    assert not (out / "plots").exists()
    # Library errors name the parameter; the command names the flag or the file's key.
    config.write_text("report:\n  bootstrap: many\n")
    one_line_error(harness("leaderboard", "--config", config, "--out", tmp_path / "o"),
                   f"report.bootstrap in {config} must be an integer, got 'many'")
    one_line_error(harness("leaderboard", "--config", config, "--bootstrap", -3, "--out", tmp_path / "o"),
                   "--bootstrap must be >= 0, got -3")
    config.write_text("scoring:\n  modles: [clip]\n")
    one_line_error(harness("leaderboard", "--config", config, "--out", tmp_path / "o"),
                   f"scoring.modles in {config} is not a setting. Did you mean 'models'?")
    with pytest.raises(Exception, match="report.bootstrap must be >= 0"):
        LeaderboardConfig.from_dict({"report": {"bootstrap": -1}})


def test_score_one_pass_flag(tmp_path, monkeypatch):
    """--one-pass (the default) decodes each image once for every model; --no-one-pass decodes
    it again per model; the scores are the same."""
    from tiny_models import make_image_folder, make_tiny_clip

    import harness.images as decoder

    a = make_tiny_clip(tmp_path / "a", seed=0)
    b = make_tiny_clip(tmp_path / "b", seed=1, image_size=48)
    folder = make_image_folder(tmp_path / "img", 5, seed=4)[0].parent
    decodes = {"n": 0}
    real = decoder.open_image

    def counting(path):
        decodes["n"] += 1
        return real(path)

    monkeypatch.setattr(decoder, "open_image", counting)
    tables = {}
    for flag, expected in (("--one-pass", 5), ("--no-one-pass", 10)):
        decodes["n"] = 0
        out = tmp_path / f"{flag}.csv"
        result = harness("score", "--model", f"clip:checkpoint={a}",
                         "--model", f"clip:checkpoint={b},label=b", "--images", folder,
                         "--prompt", "a cat", "--prompt", "two dogs", "--no-cache",
                         "--device", "cpu", "--out", out, flag)
        assert result.returncode == 0, result.stderr
        assert decodes["n"] == expected
        tables[flag] = pd.read_csv(out).sort_values(["model", "image", "prompt"])
        assert len(tables[flag]) == 2 * 5 * 2
    pd.testing.assert_frame_equal(tables["--one-pass"].reset_index(drop=True),
                                  tables["--no-one-pass"].reset_index(drop=True))
    config = LeaderboardConfig.from_dict({"scoring": {"one_pass": False}})
    assert config.scoring.one_pass is False
    with pytest.raises(Exception, match="scoring.one_pass"):
        LeaderboardConfig.from_dict({"scoring": {"one_pass": "maybe"}})
