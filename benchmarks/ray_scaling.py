"""Local executor vs Ray with 1 and 2 actors on the same workload, from one run.

Prints throughput (images/s) and ratios against the local executor for several workload sizes,
and where Ray breaks even; then, on the largest size, two reward models scored on Ray in one
pass (one read stage decoding each image once, an actor pool per model) against one model at a
time (a pipeline per model, each decoding the images again), side by side, with the images each
decoded. Ray's start-up (the instance, then actors importing torch and
transformers and loading the model) is paid per run; on a small machine it dominates small
workloads. The Ray instance is started once, outside the timings; each timed Ray run includes
creating its actor pool, as a real `harness score --executor ray` call does.

    python benchmarks/ray_scaling.py [--sizes 32 128 512] [--arch small] [--gpus 0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--arch", default="small", choices=["tiny", "small", "vit-l-14"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--cpus", type=int, default=None, help="Ray CPUs (default: all)")
    parser.add_argument("--gpus", type=float, default=0, help="GPUs per actor (0: CPU actors)")
    args = parser.parse_args()

    import ray
    from scoring import build_checkpoint, workload
    from tiny_models import make_tiny_clip

    from harness.scoring import (
        LocalExecutor,
        RayExecutor,
        RayOptions,
        load_reward_model,
        parse_model_spec,
        score_images,
        score_models,
    )

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = make_tiny_clip(tmp / "ckpt", image_size=224) if args.arch == "tiny" else build_checkpoint(tmp / "ckpt", args.arch)
        paths, prompts = workload(tmp / "images", max(args.sizes))
        spec = parse_model_spec(f"clip:checkpoint={ckpt}")
        model = load_reward_model(spec, device="cpu")
        t0 = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        print(f"ray.init: {time.perf_counter() - t0:.1f} s (not counted below)")
        print(f"{'images':>7} {'local img/s':>12} {'ray x1 img/s':>13} {'ratio':>6} {'ray x2 img/s':>13} {'ratio':>6}")
        even = None
        for n in args.sizes:
            times = {}
            t = time.perf_counter()
            score_images(model, paths[:n], prompts[:n], spec=spec, batch_size=args.batch_size,
                         executor=LocalExecutor(num_workers=1))
            times["local"] = time.perf_counter() - t
            for actors in (1, 2):
                t = time.perf_counter()
                options = RayOptions(actors=actors, gpus_per_actor=args.gpus)
                score_images(model, paths[:n], prompts[:n], spec=spec, batch_size=args.batch_size,
                             executor=RayExecutor(options))
                times[actors] = time.perf_counter() - t
            rate = {k: n / v for k, v in times.items()}
            print(f"{n:7d} {rate['local']:12.1f} {rate[1]:13.1f} {rate[1] / rate['local']:6.2f} "
                  f"{rate[2]:13.1f} {rate[2] / rate['local']:6.2f}")
            if even is None and max(rate[1], rate[2]) >= rate["local"]:
                even = n
        print("break-even: " + (f"Ray matches the local executor from about {even} images"
                                if even else f"Ray did not reach the local executor up to {max(args.sizes)} images"))
        n = max(args.sizes)
        second = (make_tiny_clip(tmp / "ckpt2", seed=1, image_size=224) if args.arch == "tiny"
                  else _reseeded(build_checkpoint, tmp / "ckpt2", args.arch))
        specs = [f"clip:checkpoint={ckpt}", f"clip:checkpoint={second},label=second"]
        executor = RayExecutor(RayOptions(actors=1, gpus_per_actor=args.gpus / 2 if args.gpus else 0))
        times, decoded = {}, {}
        for one_pass in (True, False, True, False):  # alternating: best of two each
            t = time.perf_counter()
            runs = score_models(specs, paths[:n], prompts[:n], cache=False,
                                batch_size=args.batch_size, executor=executor, one_pass=one_pass)
            times[one_pass] = min(times.get(one_pass, float("inf")), time.perf_counter() - t)
            # one pass: every run counts the one read stage's images; else each its own
            counts = [r.run.executor_info["decoded_images"] for r in runs]
            decoded[one_pass] = counts[0] if one_pass else sum(counts)
        print(f"two models on Ray, {n} images: one pass {2 * n / times[True]:.1f} img/s, one model "
              f"at a time {2 * n / times[False]:.1f} img/s, ratio {times[False] / times[True]:.2f}; "
              f"images decoded {decoded[True]} vs {decoded[False]}")
        ray.shutdown()


def _reseeded(build: object, path: Path, arch: str) -> Path:
    """``build_checkpoint`` with seed 1 instead of its seed 0: a second, different model."""
    import torch

    manual_seed = torch.manual_seed
    torch.manual_seed = lambda _s: manual_seed(1)
    try:
        return build(path, arch)
    finally:
        torch.manual_seed = manual_seed


if __name__ == "__main__":
    main()
