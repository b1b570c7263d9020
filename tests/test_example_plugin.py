"""The example plugin distribution under examples/, as a plugin author would ship it."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "t2i-harness-example"


@pytest.fixture
def example_module(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    import t2i_harness_example

    return t2i_harness_example


def test_example_reward_model_contract(example_module):
    model = example_module.ExampleColorReward()
    red = model.preprocess(Image.new("RGB", (64, 48), (250, 10, 10)))
    blue = model.preprocess(Image.new("RGB", (64, 48), (10, 10, 250)))
    assert red.shape == (3, 32, 32) and red.dtype == np.float32
    features = model.embed_images(np.stack([red, blue]))
    assert features.shape == (2, 3)
    prompts = [["a red car", "a blue car", "a car"], ["a red car", "a blue car"]]
    scores = model.score(features, prompts)
    assert [s.shape for s in scores] == [(3,), (2,)]
    assert scores[0][0] > scores[0][1] and scores[0][2] == 0.0
    assert scores[1][1] > scores[1][0]


@pytest.mark.slow
def test_example_installs_into_fresh_venv_and_is_listed(tmp_path, tia2_dir):
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
    listed = subprocess.run([str(bindir / "harness"), "plugins", "--json"], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=120)
    assert listed.returncode == 0, listed.stderr
    plugins = {p["name"]: p for p in json.loads(listed.stdout)}
    assert plugins["t2i-harness-example"] == {
        "name": "t2i-harness-example",
        "version": "0.1.0",
        "hooks": ["register_commands", "register_reward_models"],
        "registered": {"reward_models": ["example-color"]},
    }
    cmd = subprocess.run([str(bindir / "harness"), "example-colors"], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=120)
    assert cmd.returncode == 0 and "red" in cmd.stdout
    # The non-editable install ships the registry data: the leaderboard runs from it.
    run = subprocess.run(
        [str(bindir / "harness"), "leaderboard", "tia2", "--data", str(tia2_dir), "--subset",
         "counting", "--bootstrap", "10", "--no-plots", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    where = subprocess.check_output([str(py), "-c", "import harness; print(harness.__file__)"],
                                    text=True, env=env, cwd=tmp_path)
    assert str(venv) in where  # the installed copy, not this checkout
