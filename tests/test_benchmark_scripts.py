"""The benchmark scripts run (their figures are measured by running them, never in tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.slow
def test_tia2_scale_runs_a_slice_and_checks_its_scores(tmp_path):
    out = tmp_path / "tia2.json"
    done = _run(["benchmarks/tia2_scale.py", "--fraction", "0.002", "--repeat", "1",
                 "--json", str(out)], timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert figures["images"] == 55 and figures["models"] == 4
    assert figures["one_pass_decodes"] == 55  # one decode per image for all four models
    assert figures["per_model_decodes"] == 4 * 55
    assert figures["max_abs_diff_vs_bare"] == 0.0  # the harness's scores are the bare loop's
    assert figures["cache_bytes_per_pair"] > 0 and figures["peak_rss_mb"] > 0
    assert "harness_over_bare" in done.stdout


@pytest.mark.slow
def test_gpu_suite_smoke_mode_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    # Ray's section starts a Ray instance (~40 s on a small machine): it is left out here.
    done = _run(["benchmarks/gpu_suite.py", "--smoke", "--out", str(out), "--sections",
                 "reward_models", "tia2_scale", "finetune"], timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert figures["smoke"] is True and figures["ok"] is True
    sections = figures["sections"]
    clip = sections["reward_models"]["clip-small/float32"]
    assert clip["rc"] == 0 and clip["engine_images_per_s"] > 0 and clip["engine_over_bare"] > 0
    tia2 = sections["tia2_scale"]
    assert tia2["arch"] == "tiny" and tia2["one_pass_decodes"] == tia2["images"]
    assert tia2["max_abs_diff_vs_bare"] < 1e-5
    assert sections["finetune"]["ddpo_iter_s"] > 0 and sections["finetune"]["sft_iter_s"] > 0


def test_gpu_suite_refuses_to_run_without_cuda_unless_smoke(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    done = _run(["benchmarks/gpu_suite.py", "--out", str(tmp_path / "x.json"), "--sections",
                 "ray"], timeout=120)
    assert done.returncode != 0 and "no CUDA device" in done.stderr
