"""Every GPU figure the project claims, from one run, into one JSON.

Runs the project's benchmark scripts one after another (each in its own process, so one's memory
does not weigh on the next; each measures its figures side by side, as ratios, in that run) and
collects what they print or write:

- ``reward_models``: images/s of the scoring engine against a bare batched forward loop of the same
  model, per architecture (``benchmarks/scoring.py``: CLIP ViT-L/14 and HPSv2's ViT-H/14 with
  random weights) and dtype (float16, bfloat16);
- ``tia2_scale``: the TIA2 TextNorm workload shape end to end (one pass, score cache, embedding
  store) with four real-size random-weight models against a bare loop (``benchmarks/tia2_scale.py
  --arch vit-l-14``, a ``--tia2-fraction`` slice);
- ``finetune``: SD 2.1-shaped fine-tuning, s/iter, sampling images/s and peak memory for DDPO and
  SFT beside a bare UNet loop (``benchmarks/finetune.py --arch sd21``);
- ``ray``: the local executor against Ray with 1 and 2 actors (``benchmarks/ray_scaling.py``).

Nothing comes from the network: random weights, synthetic images, the CLIP tokenizer the tests
build. ``--smoke`` runs every section with tiny shapes on CPU in well under a minute, to check
the script itself where no GPU is at hand; its numbers mean nothing.

    python benchmarks/gpu_suite.py --out gpu_figures.json                 # on a CUDA machine
    python benchmarks/gpu_suite.py --smoke --out /tmp/smoke.json          # anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"

#: (section, arch, dtypes) on CUDA, and the smoke run's tiny stand-ins on CPU.
SCORING = {"full": [("clip-vit-l-14", "vit-l-14", ["float16", "bfloat16"]),
                    ("hpsv2-vit-h-14", "hpsv2", ["float16", "bfloat16"])],
           "smoke": [("clip-small", "small", ["float32"])]}


def run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> tuple[int, str, float]:
    """Run one benchmark script; returns (exit status, stdout + stderr, seconds)."""
    t0 = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, *cmd], cwd=REPO, capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, **(env or {})})
        return done.returncode, done.stdout + done.stderr, time.perf_counter() - t0
    except subprocess.TimeoutExpired as exc:
        text = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return 124, text + f"\n(timed out after {timeout:.0f} s)", time.perf_counter() - t0


def _tail(text: str, n: int = 1500) -> str:
    return text[-n:]


def parse_scoring(text: str) -> dict[str, Any]:
    """benchmarks/scoring.py's printed figures."""
    out: dict[str, Any] = {}
    m = re.search(r"engine:\s+([\d.]+) s\s+([\d.]+) images/s", text)
    if m:
        out["engine_s"], out["engine_images_per_s"] = float(m[1]), float(m[2])
    m = re.search(r"bare batched:\s+([\d.]+) s\s+([\d.]+) images/s", text)
    if m:
        out["bare_s"], out["bare_images_per_s"] = float(m[1]), float(m[2])
    m = re.search(r"\(a\) engine vs naive per-pair loop:\s+([\d.]+)x", text)
    if m:
        out["engine_over_naive"] = float(m[1])
    m = re.search(r"\(b\) engine vs bare batched loop:\s+([\d.]+)", text)
    if m:
        out["engine_over_bare"] = float(m[1])
    return out


def parse_ray(text: str) -> dict[str, Any]:
    """benchmarks/ray_scaling.py's table: images -> local, 1 and 2 actors (images/s, ratios)."""
    rows = {}
    for m in re.finditer(r"^\s*(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$",
                         text, flags=re.M):
        rows[m[1]] = {"local_images_per_s": float(m[2]), "ray1_images_per_s": float(m[3]),
                      "ray1_over_local": float(m[4]), "ray2_images_per_s": float(m[5]),
                      "ray2_over_local": float(m[6])}
    out: dict[str, Any] = {"by_images": rows}
    m = re.search(r"break-even: (.*)", text)
    if m:
        out["break_even"] = m[1].strip()
    m = re.search(r"two models on Ray, (\d+) images: one pass ([\d.]+) img/s, one model at a "
                  r"time ([\d.]+) img/s, ratio ([\d.]+); images decoded (\d+) vs (\d+)", text)
    if m:
        out["two_models"] = {"images": int(m[1]), "one_pass_images_per_s": float(m[2]),
                             "per_model_images_per_s": float(m[3]),
                             "one_pass_over_per_model": float(m[4]),
                             "decoded_one_pass": int(m[5]), "decoded_per_model": int(m[6])}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("gpu_figures.json"))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the script")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    ap.add_argument("--sections", nargs="+", default=["reward_models", "tia2_scale", "finetune", "ray"],
                    choices=["reward_models", "tia2_scale", "finetune", "ray"])
    ap.add_argument("--images", type=int, default=None, help="reward_models: images per run")
    ap.add_argument("--tia2-fraction", type=float, default=None)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per script")
    args = ap.parse_args()
    smoke = args.smoke
    device = args.device or ("cpu" if smoke else "cuda")
    figures: dict[str, Any] = {"smoke": smoke, "device": device, "sections": {}}
    try:
        import torch

        figures["torch"] = torch.__version__
        if torch.cuda.is_available():
            figures["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:  # pragma: no cover
        pass
    if device.startswith("cuda") and "gpu" not in figures:
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --smoke for the CPU check")
    env = {"HF_HUB_OFFLINE": "1", "HARNESS_LOAD_PLUGINS": ""}
    sections = figures["sections"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        if "reward_models" in args.sections:
            part: dict[str, Any] = {}
            images = args.images or (4 if smoke else 512)
            for name, arch, dtypes in SCORING["smoke" if smoke else "full"]:
                for dtype in dtypes:
                    cmd = [str(BENCH / "scoring.py"), "--arch", arch, "--device", device,
                           "--dtype", dtype, "--images", str(images), "--batch-size",
                           str(4 if smoke else 64), "--workers", str(0 if smoke else 8),
                           "--repeat", str(1 if smoke else 3), "--naive-images",
                           str(2 if smoke else 16)]
                    rc, text, secs = run(cmd, args.timeout, env)
                    part[f"{name}/{dtype}"] = {"rc": rc, "seconds": round(secs, 1),
                                               **parse_scoring(text)}
                    if rc:
                        part[f"{name}/{dtype}"]["log"] = _tail(text)
            sections["reward_models"] = part
        if "tia2_scale" in args.sections:
            fraction = args.tia2_fraction or (0.0004 if smoke else 0.1)
            json_out = tmp_path / "tia2.json"
            cmd = [str(BENCH / "tia2_scale.py"), "--arch", "tiny" if smoke else "vit-l-14",
                   "--device", device, "--fraction", str(fraction), "--repeat", "1",
                   "--batch-size", str(4 if smoke else 128), "--size", str(64 if smoke else 512),
                   "--workers", str(0 if smoke else 8), "--no-per-model", "--json", str(json_out)]
            if not smoke:
                cmd += ["--dtype", "float16"]
            rc, text, secs = run(cmd, args.timeout, env)
            sections["tia2_scale"] = {"rc": rc, "seconds": round(secs, 1),
                                      **(json.loads(json_out.read_text()) if json_out.exists() else {})}
            if rc:
                sections["tia2_scale"]["log"] = _tail(text)
        if "finetune" in args.sections:
            json_out = tmp_path / "finetune.json"
            cmd = [str(BENCH / "finetune.py"), "--device", device, "--json", str(json_out)]
            cmd += (["--arch", "tiny", "--steps", "2", "--batch", "2", "--iters", "1"] if smoke
                    else ["--arch", "sd21", "--precision", "fp16", "--iters", "2"])
            rc, text, secs = run(cmd, args.timeout, env)
            sections["finetune"] = {"rc": rc, "seconds": round(secs, 1),
                                    **(json.loads(json_out.read_text()) if json_out.exists() else {})}
            if rc:
                sections["finetune"]["log"] = _tail(text)
        if "ray" in args.sections:
            cmd = [str(BENCH / "ray_scaling.py"), "--arch", "tiny" if smoke else "vit-l-14",
                   "--sizes", *(["8"] if smoke else ["128", "512", "2048"]),
                   "--gpus", "0" if smoke else "0.5"]
            if smoke:
                cmd += ["--cpus", "2"]
            rc, text, secs = run(cmd, args.timeout, env)
            sections["ray"] = {"rc": rc, "seconds": round(secs, 1), **parse_ray(text)}
            if rc:
                sections["ray"]["log"] = _tail(text)
    figures["ok"] = all(part.get("rc", 0) == 0 for s in sections.values()
                        for part in ([s] if "rc" in s else s.values()))
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    if not figures["ok"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
