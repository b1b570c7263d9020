"""The example plugin distribution under examples/: one plugin of every kind, used through the CLI.

Each kind is exercised by a scenario function taking a ``harness(*args)`` runner, so the same
checks run in-process (click's CliRunner, with the example registered through a stand-in entry
point) and, in the ``slow`` test, through the real ``harness`` executable of a fresh virtual
environment into which the example is pip-installed. Expected numbers are computed here from the
images' colours, independently of the plugin's code.
"""

import json
import os
import subprocess
import sys
import sysconfig
from importlib.metadata import EntryPoint
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "t2i-harness-example"
KINDS = {"reward_models": ["example-color"], "normalizers": ["example-margin"],
         "prompt_generators": ["example-swap"], "finetuners": ["example-rgb"],
         "benchmarks": ["example-swatches"]}

#: the colours the test data uses, as the example reward model defines them
RGB = {"red": (1.0, 0.0, 0.0), "green": (0.0, 0.5, 0.0), "blue": (0.0, 0.0, 1.0)}
#: prompt -> [(image, colour 0-255, the three annotators' votes, PIL mode saved in)]
SWATCHES = {
    "a red square": [
        ("r1.png", (240, 20, 20), (1, 1, 1), "RGB"),
        ("r2.png", (200, 60, 40), (1, 1, 0), "RGBA"),
        ("r3.png", (170, 110, 0), (0, 1, 0), "RGB"),  # nearer red than r5, but nearer green too
        ("r4.png", (30, 160, 40), (0, 0, 0), "RGB"),
        ("r5.png", (200, 0, 150), (1, 1, 0), "RGB"),  # a magenta the annotators call red
    ],
    "a green square": [
        ("g1.png", (10, 128, 10), (1, 1, 1), "RGB"),
        ("g2.png", (60, 170, 60), (1, 0, 1), "RGB"),
        ("g3.png", (128, 128, 128), (0, 0, 1), "L"),
        ("g4.png", (230, 30, 30), (0, 0, 0), "RGB"),
    ],
    "a blue square": [
        ("b1.png", (0, 0, 255), (1, 1, 1), "P"),
        ("b2.png", (90, 90, 220), (1, 1, 0), "RGB"),
        ("b3.png", (200, 200, 60), (0, 0, 0), "RGB"),
        ("b4.png", (40, 140, 40), (0, 1, 0), "RGB"),
        ("b5.png", (20, 20, 160), (0, 0, 1), "RGB"),  # too dark for the annotators
    ],
}
#: what ``example-swap --n 2`` must write for the three prompts
SETS = {"a red square": ["a green square", "a blue square"],
        "a green square": ["a red square", "a blue square"],
        "a blue square": ["a red square", "a green square"]}


def expected_score(rgb, prompt):
    """The example reward by hand: minus the distance of the (solid) colour to the prompt's."""
    word = next(w for w in RGB if w in prompt)
    return -float(np.linalg.norm(np.asarray(rgb) / 255.0 - np.asarray(RGB[word])))


def save_swatch(path, rgb, mode):
    """A solid-colour image saved in ``mode``: the plugin receives it as opened, in that mode."""
    if mode == "P":
        image = Image.new("P", (24, 24), 0)
        image.putpalette([*rgb, *([0] * 765)])
    elif mode == "L":
        assert len(set(rgb)) == 1
        image = Image.new("L", (24, 24), rgb[0])
    elif mode == "RGBA":
        image = Image.new("RGBA", (24, 24), (*rgb, 255))
    else:
        image = Image.new("RGB", (24, 24), rgb)
    image.save(path)
    assert Image.open(path).mode == mode


def make_swatches(root: Path) -> Path:
    """``root/labels.csv`` and the images beside it (the benchmark's data and image folder)."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, (prompt, images) in enumerate(SWATCHES.items()):
        for name, rgb, votes, mode in images:
            save_swatch(root / name, rgb, mode)
            rows.append({"prompt_id": f"p{k}", "prompt": prompt, "image": name,
                         **{f"label_{a}": v for a, v in enumerate(votes)}})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root


def ok(result):
    rc, out, err = result
    assert rc == 0, f"exit {rc}\n{out}\n{err}"
    return out


# -- the scenarios: one per kind, each given a ``harness(*args) -> (rc, stdout, stderr)`` ---------
def check_listed(harness, name, version):
    plugins = {p["name"]: p for p in json.loads(ok(harness("plugins", "--json")))}
    assert plugins[name]["version"] == version
    assert plugins[name]["registered"] == KINDS
    assert plugins[name]["hooks"] == sorted(
        ["register_commands", *(f"register_{k}" for k in KINDS)])
    assert ok(harness("example-colors")).strip().split(", ")[:3] == ["black", "blue", "green"]


def check_score(harness, tmp_path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = make_swatches(tmp_path / "swatches")
    prompts = ["a red square", "a blue square"]
    out = ok(harness("score", "--model", "example-color", "--images", data, "--prompt", prompts[0],
                     "--prompt", prompts[1], "--json", "--no-cache"))
    got = {(Path(r["image"]).name, r["prompt"]): r["score"] for r in json.loads(out)}
    want = {(name, p): expected_score(rgb, p)
            for images in SWATCHES.values() for name, rgb, _, _ in images for p in prompts}
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-5), key
    # every image mode was scored as its colour: the palette, grey and RGBA files too
    assert got[("b1.png", "a blue square")] == pytest.approx(0.0, abs=1e-6)


def check_prompts(harness, tmp_path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "prompts.txt").write_text("\n".join(SETS) + "\n")
    out = tmp_path / "sets.json"
    ok(harness("prompts", "generate", "--generator", "example-swap", "--n", "2",
               "--input", tmp_path / "prompts.txt", "--out", out))
    assert json.loads(out.read_text()) == SETS
    return out


def check_leaderboard(harness, tmp_path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = make_swatches(tmp_path / "swatches")
    sets = check_prompts(harness, tmp_path)
    run = tmp_path / "run"
    ok(harness("leaderboard", "example-swatches", "--data", data, "--images", data,
               "--model", "example-color", "--normalizer", "example-margin", "--prompts", sets,
               "--folds", "3", "--bootstrap", "20", "--no-plots", "--no-cache", "--out", run))
    rows = {r["method"]: r for r in json.loads((run / "leaderboard.json").read_text())}
    assert set(rows) == {"example-color", "example-margin(example-color)", "human"}
    raw, margin = [], []
    for prompt, images in SWATCHES.items():
        binary = [int(sum(votes) >= 2) for _, _, votes, _ in images]
        own = [expected_score(rgb, prompt) for _, rgb, _, _ in images]
        best_other = [max(expected_score(rgb, c) for c in SETS[prompt]) for _, rgb, _, _ in images]
        raw.append(roc_auc_score(binary, own))
        margin.append(roc_auc_score(binary, np.subtract(own, best_other)))
    assert rows["example-color"]["source"] == "scored"
    assert rows["example-color"]["n_prompts"] == 3
    assert rows["example-color"]["auroc"] == pytest.approx(np.mean(raw), abs=1e-9)
    margin_row = rows["example-margin(example-color)"]
    assert margin_row["auroc"] == pytest.approx(np.mean(margin), abs=1e-9)
    assert np.mean(raw) != np.mean(margin)  # the contrastive prompts changed the ranking
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["data"]["files"] == {"labels.csv": _sha256(data / "labels.csv")}


def check_finetune(harness, tmp_path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "tuned"
    config = tmp_path / "run.yaml"
    config.write_text(
        "prompts: ['a red square']\n"
        "reward: example-color\n"
        "normalizer: example-margin\n"
        "contrastive_prompts: example-swap\n"
        f"output_dir: {out}\n"
        "epochs: 4\ncandidates: 6\nseed: 1\n"
    )
    ok(harness("finetune", "example-rgb", "--config", config))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4]
    for r in log:
        saved = json.loads((out / f"epoch-{r['epoch']}" / "color.json").read_text())
        assert saved == r
    rewards = [r["reward_mean"] for r in log]
    assert all(b >= a for a, b in zip(rewards, rewards[1:], strict=False))
    assert rewards[-1] > rewards[0]
    # the margin reward at the final colour, by hand: own distance against the best other colour
    color = np.asarray(log[-1]["color"])
    rgb = tuple(int(round(255 * v)) for v in color)
    others = ["green", "blue", "yellow", "black", "white", "orange", "purple", "pink"]
    table = {"yellow": (1.0, 1.0, 0.0), "black": (0.0, 0.0, 0.0), "white": (1.0, 1.0, 1.0),
             "orange": (1.0, 0.65, 0.0), "purple": (0.5, 0.0, 0.5), "pink": (1.0, 0.75, 0.8), **RGB}
    c = np.asarray(rgb) / 255.0
    expected = -np.linalg.norm(c - table["red"]) + min(np.linalg.norm(c - table[o]) for o in others)
    assert rewards[-1] == pytest.approx(expected, abs=1e-5)
    assert color[0] > 0.5  # it moved from grey towards red


def _sha256(path):
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# -- in-process -----------------------------------------------------------------------------------
@pytest.fixture
def example_module(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    import t2i_harness_example

    return t2i_harness_example


@pytest.fixture
def in_process(example_module, monkeypatch):
    """``harness(*args)`` through CliRunner, the example loaded the way a third-party plugin is:
    from an entry point in the ``t2i_harness`` group, allowed by HARNESS_LOAD_PLUGINS."""
    from click.testing import CliRunner

    import harness.plugins as hp
    from harness.cli import build_cli

    ep = EntryPoint(name="example", value="t2i_harness_example", group=hp.ENTRY_POINT_GROUP)
    monkeypatch.setattr(hp, "entry_points",
                        lambda group: [ep] if group == hp.ENTRY_POINT_GROUP else [])
    monkeypatch.setenv("HARNESS_LOAD_PLUGINS", "example")
    monkeypatch.setenv("HARNESS_STRICT_PLUGINS", "1")
    hp.reset_plugins()
    root = build_cli()

    def harness(*args):
        result = CliRunner().invoke(root, [str(a) for a in args], catch_exceptions=True)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result.exit_code, result.stdout, result.stderr

    yield harness
    root.commands.pop("example-colors", None)
    hp.reset_plugins()


def test_example_listed_with_every_kind(in_process):
    check_listed(in_process, "example", "unknown")


def test_example_reward_model_scores_through_cli(in_process, tmp_path):
    check_score(in_process, tmp_path)


def test_example_prompt_generator_through_cli(in_process, tmp_path):
    check_prompts(in_process, tmp_path)


def test_example_benchmark_and_normalizer_on_the_leaderboard(in_process, tmp_path):
    check_leaderboard(in_process, tmp_path)


def test_example_finetuner_through_cli(in_process, tmp_path):
    check_finetune(in_process, tmp_path)


def test_example_finetuner_resumes(in_process, tmp_path):
    check_finetune(in_process, tmp_path)
    out = tmp_path / "tuned"
    first = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    ok(in_process("finetune", "example-rgb", "--config", tmp_path / "run.yaml", "--resume",
                  "--set", "epochs=2"))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[:4] == first and [r["epoch"] for r in log[4:]] == [5, 6]
    assert log[4]["reward_mean"] >= first[-1]["reward_mean"]


def test_example_plugins_pass_the_conformance_checks(example_module, tmp_path):
    from harness.testing import (
        check_benchmark,
        check_normalizer,
        check_prompt_generator,
        check_reward_model,
        image_modes,
    )

    m = example_module
    images = [Image.new("RGB", (40, 30), (250, 10, 10)), Image.new("RGB", (40, 30), (10, 10, 250))]
    images += list(image_modes(images[0]).values())
    prompts = [["a red car", "a blue car", "a car"]] * len(images)
    scores = check_reward_model(m.ColorReward(), images, prompts)
    assert scores[0][0] > scores[0][1] and scores[0][2] == 0.0
    assert scores[1][1] > scores[1][0]
    check_normalizer(m.MarginNormalizer)
    check_prompt_generator(m.ColorSwapGenerator(), ["a red car", "Green grass", "no colour here"])
    data = check_benchmark(m.SwatchBenchmark(make_swatches(tmp_path / "d")))
    assert data.images["binary"].tolist() == [
        int(sum(v) >= 2) for images in SWATCHES.values() for _, _, v, _ in images]


def test_example_reward_model_sees_the_image_as_opened(example_module):
    """A transparent pixel counts as white (as transformers' processors paste it), not as its
    hidden colour channels."""
    model = example_module.ColorReward()
    hidden_red = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    features = model.embed_images(np.stack([model.preprocess(hidden_red)]))
    np.testing.assert_allclose(features[0], [1.0, 1.0, 1.0], atol=1e-6)


def test_example_prompt_generator_keeps_case_and_whole_words(example_module):
    gen = example_module.ColorSwapGenerator(n=3)
    assert gen.generate(["A bored Red fox."]) == {
        "A bored Red fox.": ["A bored green fox.", "A bored blue fox.", "A bored yellow fox."]}


def test_example_benchmark_without_data_is_one_line_error(in_process, tmp_path):
    rc, _, err = in_process("leaderboard", "example-swatches", "--out", tmp_path / "r")
    assert rc == 2 and err.strip().splitlines() == [
        "Error: benchmark 'example-swatches' needs --data DIR, a folder with labels.csv"]


# -- a fresh virtual environment ------------------------------------------------------------------
@pytest.mark.slow
def test_example_installs_into_fresh_venv_and_every_kind_works(tmp_path, tia2_dir):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    py = bindir / "python"
    # Runtime dependencies come from this environment (a path entry, not a site dir: its .pth
    # files, such as this checkout's editable install, are not processed).
    site = Path(subprocess.check_output(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
    ).strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", str(REPO), str(EXAMPLE)],
        capture_output=True, text=True, timeout=600,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HARNESS_LOAD")}
    env["PYTHONPATH"] = ""
    env["HARNESS_STRICT_PLUGINS"] = "1"
    work = tmp_path / "work"
    work.mkdir()

    def harness(*args):
        done = subprocess.run([str(bindir / "harness"), *map(str, args)], capture_output=True,
                              text=True, env=env, cwd=work, timeout=300)
        return done.returncode, done.stdout, done.stderr

    where = subprocess.check_output([str(py), "-c", "import harness; print(harness.__file__)"],
                                    text=True, env=env, cwd=work)
    assert str(venv) in where  # the installed copy, not this checkout
    check_listed(harness, "t2i-harness-example", "0.1.0")
    check_score(harness, tmp_path / "score")
    check_leaderboard(harness, tmp_path / "leaderboard")
    check_finetune(harness, tmp_path / "finetune")
    # The non-editable install ships the built-in plugins' data: TIA2's card.
    ok(harness("leaderboard", "tia2", "--data", tia2_dir, "--subset", "counting",
               "--bootstrap", "10", "--no-plots", "--out", tmp_path / "tia2-run"))
