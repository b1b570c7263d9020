"""The suite itself on a loaded 2-core machine: torch threads pinned, shared test caches built once
even when two test runs build them at the same time."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_torch_threads_are_pinned():
    import torch

    assert torch.get_num_threads() == 1
    assert os.environ["OMP_NUM_THREADS"] == "1"


def test_two_runs_building_one_shared_artifact_build_it_once(tmp_path):
    script = textwrap.dedent(f"""
        import os, sys, time
        from pathlib import Path
        sys.path.insert(0, {str(TESTS)!r})
        from tiny_models import build_once

        def build(tmp):
            with open({str(tmp_path / "builds.log")!r}, "a") as log:
                log.write(f"{{os.getpid()}}\\n")
            tmp.mkdir()
            for i in range(20):  # slow and in pieces: a reader must never see half of it
                (tmp / f"part{{i}}").write_text("x" * 1000)
                time.sleep(0.02)

        target = build_once(Path({str(tmp_path / "artifact")!r}), build)
        parts = sorted(p.name for p in target.iterdir())
        assert len(parts) == 20, parts
        print("ok")
    """)
    runs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(3)]
    outs = [r.communicate(timeout=120) for r in runs]
    assert [r.returncode for r in runs] == [0, 0, 0], outs
    assert len((tmp_path / "builds.log").read_text().split()) == 1
    assert sorted(p.name for p in tmp_path.iterdir() if ".tmp" in p.name) == []
