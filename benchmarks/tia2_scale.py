"""TIA2 TextNorm workload shape on CPU: the harness end to end against a bare loop, side by side.

The shape of a full TIA2 TextNorm run: 27,500 images, each scored against its prompt and up to 32
contrastive prompts (1 + 8..32, shared by the images of one prompt), by 4 reward models. Images
are synthetic PNGs written here; the models are cheap stand-ins (a per-model resize, a random
linear image encoder, hashed text embeddings, a dot product: three declare themselves dual
encoders like CLIP, PickScore and HPSv2, one does not, like ImageReward), so the figure is the
harness's own overhead around the forward work, which is what limits a real run on a GPU.

Printed, all from one run (``--json`` writes the same keys):

- the run's shape: ``arch``, ``device``, ``dtype``, ``images``, ``models``, ``batch_size``,
  ``workers``, ``pairs_per_model`` (stored pairs per model), ``workload_seconds`` (writing the
  synthetic PNGs), ``rounds`` (``--repeat``).
- ``--repeat`` rounds; in each, the bare loop and every harness variant run back to back, in the
  order bare, harness, no cache, one worker, reversed every other round. The bare loop decodes
  each image once with the same decoder and runs the same preprocessing, encoders and scoring
  with no hashing, cache or bookkeeping; ``bare_seconds_best`` is its best time. The harness is
  ``score_models`` (one pass over the images for the 4 models) with the executor of
  ``--workers``; ``max_abs_diff_vs_bare`` checks its scores against the bare loop's
  (0.0 for the stand-ins). For each variant, three figures of bare time over harness time:
  ``<key>``, best bare over best harness (the figure printed before rounds were paired);
  ``<key>_median``, the median over the rounds of each round's own ratio; ``<key>_range``,
  the smallest and largest of those per-round ratios (on a noisy machine, read the median and
  the range):

  - ``harness_over_bare``: a fresh score cache and embedding store per run (the default);
    aim >= 0.9.
  - ``harness_no_cache_over_bare``: ``cache=False`` (no score cache, no embedding store): what
    the cache and the store cost on the scoring thread.
  - ``harness_workers1_over_bare``: with the cache, ``LocalExecutor(num_workers=1)`` (decoding
    in one DataLoader worker process, as on a machine with a core to spare); skipped with
    ``--no-workers1``.

- ``harness_pairs_per_s``: stored (model, image, prompt) scores per second of the best cached run.
- ``one_pass_decodes``, and with ``one_pass=False`` (each model decodes every image again, no
  cache; best of up to 2 runs, skipped with ``--no-per-model``) ``per_model_decodes`` and
  ``per_model_over_one_pass_time`` (its time over the best no-cache one-pass time).
- cache bytes per stored (model, image, prompt) score, embedding-store bytes per image row, and
  the score cache's insert rate (``put`` of the run's rows into a fresh file, timed alone until
  committed), beside the replaced SQLite store's (``benchmarks/score_store.py``'s
  ``LegacyScoreCache``), with both stores' bytes per pair, and beside them the rate of
  ``put_sets`` (one item per image: the path the scorer uses) on the same batches.
- peak resident memory (``ru_maxrss``; ``peak_gpu_mb`` on CUDA).

    python benchmarks/tia2_scale.py [--fraction 0.05] [--repeat 2] [--batch-size 64] [--workers 0]
        [--no-workers1] [--no-per-model] [--json out.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness.types import RewardModel, to_rgb  # noqa: E402

N_IMAGES = 27_500
IMAGES_PER_PROMPT = 10  # TIA2: ~10 generated images per prompt


# -- stand-in models ---------------------------------------------------------------------------
class _Resize:
    """Picklable preprocessing: RGB, resize to ``size`` x ``size``, float32 [3, S, S] in [0, 1]."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Any) -> np.ndarray:
        from PIL import Image

        im = to_rgb(image).resize((self.size, self.size), Image.BILINEAR)
        return np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0


def _text_vector(prompt: str, dim: int, salt: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256((salt + prompt).encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


class StandIn(RewardModel):
    """A cheap reward model: linear image encoder on resized pixels, hashed text vectors."""

    id: ClassVar[str] = "standin"
    size: ClassVar[int] = 32
    dim: ClassVar[int] = 64

    def __init__(self, checkpoint: str | None = None, device: str = "cpu", dtype: str = "float32",
                 seed: int = 0):
        super().__init__(checkpoint, device, dtype)
        import torch

        self.seed = seed
        gen = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(3 * self.size * self.size, self.dim, generator=gen) / 64
        self._text: dict[str, Any] = {}

    def preprocess(self, image: Any) -> Any:
        return _Resize(self.size)(image)

    def preprocessor(self) -> Any:
        return _Resize(self.size)

    def embed_images(self, batch: Any) -> Any:
        import torch

        x = torch.as_tensor(np.asarray(batch)).reshape(len(batch), -1)
        return torch.nn.functional.normalize(x @ self.weight, dim=-1)

    def text_embeddings(self, prompts: list[str]) -> Any:
        import torch

        for p in prompts:
            if p not in self._text:
                self._text[p] = torch.from_numpy(_text_vector(p, self.dim, f"{self.id}{self.seed}"))
        return torch.stack([self._text[p] for p in prompts])

    def score(self, features: Any, prompts: Any) -> list[Any]:
        distinct = list(dict.fromkeys(p for ps in prompts for p in ps))
        sims = (features @ self.text_embeddings(distinct).T).numpy()
        col = {p: j for j, p in enumerate(distinct)}
        return [sims[i, [col[p] for p in ps]] for i, ps in enumerate(prompts)]

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "seed": self.seed}


class DualA(StandIn):
    id = "standin_a"
    size = 32
    embedding_kind = "dual"


class DualB(StandIn):
    id = "standin_b"
    size = 40
    embedding_kind = "dual"


class DualC(StandIn):
    id = "standin_c"
    size = 28
    embedding_kind = "dual"


class Single(StandIn):
    id = "standin_d"
    size = 36


MODELS = (DualA, DualB, DualC, Single)


def real_specs(root: Path, arch: str) -> list[str]:
    """Four real-architecture checkpoints with random weights (benchmarks/scoring.py's ARCHS;
    ``tiny``: tests/tiny_models.py's CLIP), each with its own seed: distinct cache keys."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    sys.path.insert(0, str(REPO / "tests"))
    import torch

    specs = []
    for seed in range(4):
        path = root / f"{arch}-{seed}"
        if arch == "tiny":
            from tiny_models import make_tiny_clip

            make_tiny_clip(path, seed=seed, image_size=224)
        else:
            import scoring

            manual_seed = torch.manual_seed
            # build_checkpoint seeds 0: each of the four gets its own seed instead
            torch.manual_seed = lambda _s, _seed=seed, _f=manual_seed: _f(_seed)
            try:
                scoring.build_checkpoint(path, arch)
            finally:
                torch.manual_seed = manual_seed
        plugin = "hpsv2" if arch.startswith("hpsv2") else "clip"
        specs.append(f"{plugin}:checkpoint={path},label={arch}-{seed}")
    return specs


def register() -> list[str]:
    from harness.plugins import Entry, get_plugins

    catalog = get_plugins().reward_models
    for cls in MODELS:
        if cls.id not in catalog._entries:
            catalog.add(Entry(cls.id, cls, "benchmark"))
    # A class registered by no installed plugin is looked up in every installed distribution's
    # file list once per process (~0.3 s, memoised); built-in and installed plugins skip that.
    from harness.scoring.plan import plugin_distribution

    plugin_distribution(MODELS[0])
    return [f"{cls.id}:seed={k}" for k, cls in enumerate(MODELS)]


# -- workload ----------------------------------------------------------------------------------
def workload(root: Path, n: int, size: int = 64) -> tuple[list[Path], list[list[str]]]:
    from PIL import Image

    rng = np.random.default_rng(0)
    paths, prompts = [], []
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        p = root / f"{i:06d}.png"
        pixels = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((size, size), Image.BILINEAR).save(p, compress_level=1)
        paths.append(p)
        g = i // IMAGES_PER_PROMPT
        k = 8 + (g * 7) % 25  # 8..32 contrastive prompts per prompt
        prompts.append([f"prompt {g}: a photo of {g % 9 + 1} objects"]
                       + [f"prompt {g}: contrastive variant {j}" for j in range(k)])
    return paths, prompts


def bare_loop(models: list[StandIn], paths: list[Path], prompts: list[list[str]],
              batch_size: int) -> list[list[np.ndarray]]:
    """Decode each image once (the harness's decoder, :func:`harness.images.open_image`), every
    model's preprocessing, collate, encode, score; no hashing, cache, store or bookkeeping."""
    import torch

    import harness.images
    from harness.scoring.batches import collate

    out: list[list[np.ndarray]] = [[] for _ in models]
    for lo in range(0, len(paths), batch_size):
        chunk = paths[lo:lo + batch_size]
        ps = prompts[lo:lo + batch_size]
        images = [harness.images.open_image(path) for path in chunk]
        for k, m in enumerate(models):
            pre = m.preprocessor()
            batch = collate([pre(im) for im in images])
            with torch.inference_mode():
                out[k] += m.score(m.embed_images(batch), ps)
    return out


def cache_bytes(folder: Path, exclude: str = "embeddings") -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and exclude not in f.name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fraction", type=float, default=1.0, help="run this slice of 27,500 images")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--size", type=int, default=64, help="synthetic image side in pixels")
    ap.add_argument("--repeat", type=int, default=2, help="rounds of bare loop and harness runs")
    ap.add_argument("--no-per-model", action="store_true", help="skip the one_pass=False run")
    ap.add_argument("--arch", default="standin",
                    help="standin (cheap CPU stand-ins), or four random-weight checkpoints of a "
                         "benchmarks/scoring.py arch (vit-l-14, small, hpsv2, ...) or tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--workers", type=int, default=0, help="harness DataLoader workers")
    ap.add_argument("--no-workers1", action="store_true",
                    help="skip the harness run with one DataLoader worker")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    import torch

    import harness.images
    from harness.scoring import LocalExecutor, load_reward_model, open_score_cache, score_models

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    n = max(IMAGES_PER_PROMPT, int(round(N_IMAGES * args.fraction)))
    workdir = tempfile.TemporaryDirectory()
    specs = (register() if args.arch == "standin"
             else real_specs(Path(workdir.name) / "models", args.arch))
    out: dict[str, Any] = {"arch": args.arch, "device": args.device, "dtype": args.dtype,
                           "images": n, "models": len(specs), "batch_size": args.batch_size,
                           "workers": args.workers}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    executor = LocalExecutor(num_workers=args.workers)
    decodes = {"n": 0}
    real_open = harness.images.open_image

    def counting(path: Any) -> Any:
        decodes["n"] += 1
        return real_open(path)

    harness.images.open_image = counting

    def folder_cache(folder: Path) -> Path:
        folder.mkdir()
        return folder / "scores.sqlite"

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        t0 = time.perf_counter()
        paths, prompts = workload(tmp_path / "images", n, args.size)
        pairs = sum(len(p) for p in prompts)
        out["pairs_per_model"] = pairs
        out["workload_seconds"] = round(time.perf_counter() - t0, 2)
        # Rounds: in each, the bare loop and every harness variant back to back, the order
        # reversed every other round, so the machine's load moves a round's runs alike; a
        # ratio is taken within each round (paired) and summarised over the rounds.
        variants = {"harness": (executor, folder_cache),
                    "no_cache": (executor, None)}
        if not args.no_workers1:
            variants["workers1"] = (LocalExecutor(num_workers=1), folder_cache)
        times: dict[str, list[float]] = {name: [] for name in ("bare", *variants)}
        ratios: dict[str, list[float]] = {name: [] for name in variants}
        for r in range(args.repeat):
            order = ["bare", *variants]
            if r % 2:
                order.reverse()
            took = {}
            for name in order:
                if name == "bare":
                    # cold text caches, like the harness's own models
                    models = [load_reward_model(s, device=args.device, dtype=args.dtype)
                              for s in specs]
                    sync()
                    t0 = time.perf_counter()
                    bare = bare_loop(models, paths, prompts, args.batch_size)
                    sync()
                    took[name] = time.perf_counter() - t0
                    del models
                    continue
                run_executor, make_cache = variants[name]
                cache = make_cache(tmp_path / f"{name}{r}") if make_cache else False
                decodes["n"] = 0
                t0 = time.perf_counter()
                got_runs = score_models(specs, paths, prompts, cache=cache,
                                        batch_size=args.batch_size, device=args.device,
                                        dtype=args.dtype, executor=run_executor)
                sync()
                took[name] = time.perf_counter() - t0
                if name == "harness":
                    runs, folder = got_runs, cache.parent
                    out["one_pass_decodes"] = decodes["n"]
            for name, seconds in took.items():
                times[name].append(seconds)
            for name in variants:
                ratios[name].append(took["bare"] / took[name])
        t_bare = min(times["bare"])
        t_harness = min(times["harness"])
        t_one = min(times["no_cache"])
        for k, r in enumerate(runs):  # same numbers as the bare loop
            got = np.concatenate(r.run.scores)
            want = np.concatenate([np.asarray(b, dtype=np.float64).reshape(-1) for b in bare[k]])
            out.setdefault("max_abs_diff_vs_bare", 0.0)
            out["max_abs_diff_vs_bare"] = max(out["max_abs_diff_vs_bare"],
                                              float(np.max(np.abs(got - want))))
        out["rounds"] = args.repeat
        for name, key in (("harness", "harness_over_bare"),
                          ("no_cache", "harness_no_cache_over_bare"),
                          ("workers1", "harness_workers1_over_bare")):
            if name not in variants:
                continue
            out[key] = round(t_bare / min(times[name]), 3)  # best of each
            out[f"{key}_median"] = round(float(np.median(ratios[name])), 3)
            out[f"{key}_range"] = [round(min(ratios[name]), 3), round(max(ratios[name]), 3)]
        out["bare_seconds_best"] = round(t_bare, 2)
        out["harness_pairs_per_s"] = round(len(specs) * pairs / t_harness)
        stored = len(specs) * pairs
        out["cache_bytes_per_pair"] = round(cache_bytes(folder) / stored, 1)
        emb = [f for f in folder.iterdir() if "embeddings" in f.name]
        if emb:
            from harness.scoring.embeddings import EmbeddingStore

            store = EmbeddingStore(folder / "scores.sqlite.embeddings.sqlite")
            rows_stored = store.count()
            store.close()
            out["embedding_bytes_per_image_row"] = round(
                sum(f.stat().st_size for f in emb) / max(1, rows_stored), 1)

        if not args.no_per_model:
            t_per = float("inf")
            for _ in range(min(args.repeat, 2)):
                decodes["n"] = 0
                t0 = time.perf_counter()
                score_models(specs, paths, prompts, cache=False, batch_size=args.batch_size,
                             device=args.device, dtype=args.dtype, executor=executor,
                             one_pass=False)
                t_per = min(t_per, time.perf_counter() - t0)
                out["per_model_decodes"] = decodes["n"]
            # against the best one-pass run without a cache above
            out["per_model_over_one_pass_time"] = round(t_per / t_one, 3)

        # insert rate of the score cache, timed alone on a fresh file, batches of --batch-size
        # images as the scorer writes them; beside the store it replaced when helper
        # benchmarks/score_store.py is there to provide it (LegacyScoreCache, measure)
        images = [f"{i:064x}" for i in range(len(prompts))]
        batches = [[(images[i], q, float(j)) for i in range(lo, min(lo + args.batch_size, n))
                    for j, q in enumerate(prompts[i])]
                   for lo in range(0, n, args.batch_size)]
        try:
            sys.path.insert(0, str(REPO / "benchmarks"))
            import score_store
        except ImportError:
            score_store = None
        if score_store is not None and hasattr(score_store, "measure"):
            from harness.scoring.cache import ScoreCache

            new, _ = score_store.measure(ScoreCache, tmp_path / "new" / "s.sqlite", "m:1",
                                         images, batches)
            old, _ = score_store.measure(score_store.LegacyScoreCache, tmp_path / "old" / "s.sqlite",
                                         "m:1", images, batches)
            out["cache_inserts_per_s"] = round(new["inserts_per_s"])
            out["old_store_inserts_per_s"] = round(old["inserts_per_s"])
            out["inserts_new_over_old"] = round(new["inserts_per_s"] / old["inserts_per_s"], 2)
            out["store_bytes_per_pair_new_vs_old"] = [round(new["bytes_per_pair"], 1),
                                                      round(old["bytes_per_pair"], 1)]
            if hasattr(ScoreCache, "put_sets"):  # the scorer's own path: one item per image
                sets = [[(images[i], prompts[i], np.arange(len(prompts[i]), dtype=np.float64))
                         for i in range(lo, min(lo + args.batch_size, n))]
                        for lo in range(0, n, args.batch_size)]
                t0 = time.perf_counter()
                with ScoreCache(tmp_path / "sets" / "s.sqlite") as store:
                    for items in sets:
                        store.put_sets("m:1", items)
                out["cache_put_sets_inserts_per_s"] = round(
                    sum(map(len, batches)) / (time.perf_counter() - t0))
        else:
            store = open_score_cache(tmp_path / "rate" / "scores.sqlite")
            t0 = time.perf_counter()
            for rows in batches:
                store.put("standin:rate", rows)
            store.close()
            out["cache_inserts_per_s"] = round(sum(map(len, batches)) / (time.perf_counter() - t0))
    harness.images.open_image = real_open
    workdir.cleanup()
    if args.device.startswith("cuda"):
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    for key, value in out.items():
        print(f"{key:34s} {value}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
