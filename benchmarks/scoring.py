"""Scoring-engine throughput, measured side by side in one run.

(a) engine vs a naive loop that runs one full forward pass per (image, prompt) pair, as
    ImageReward's and HPSv2's ``score()`` do, on a TextNorm workload (1 + 15 prompts per image);
    target: at least 8x.
(b) engine vs a bare batched forward loop of the same model on the same images (decode,
    preprocess, encode images and prompts, matmul; no cache, no workers); target: at least 0.9.

Models are CLIP-architecture checkpoints with random weights built here (no download):
``--arch small`` (default, CPU friendly) or ``--arch vit-l-14`` (the real openai/clip-vit-large-patch14
shapes; use with --device cuda --dtype float16). The tokenizer is the real CLIP BPE vocabulary.

    python benchmarks/scoring.py [--images 64] [--arch small] [--device cpu] [--workers 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

ARCHS = {
    "small": dict(
        text={"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4},
        vision={"image_size": 224, "patch_size": 16, "hidden_size": 256, "intermediate_size": 1024,
                "num_hidden_layers": 4, "num_attention_heads": 4},
        projection_dim=256,
    ),
    "vit-l-14": dict(
        text={"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
        vision={"image_size": 224, "patch_size": 14, "hidden_size": 1024, "intermediate_size": 4096,
                "num_hidden_layers": 24, "num_attention_heads": 16},
        projection_dim=768,
    ),
}


def build_checkpoint(path: Path, arch: str) -> Path:
    import torch
    from tiny_models import clip_tokenizer
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    spec = ARCHS[arch]
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": 49408, "max_position_embeddings": 77, "bos_token_id": 49406,
                     "eos_token_id": 49407, "pad_token_id": 49407, **spec["text"]},
        vision_config=spec["vision"], projection_dim=spec["projection_dim"],
    )
    CLIPModel(config).save_pretrained(path)
    clip_tokenizer().save_pretrained(path)
    size = spec["vision"]["image_size"]
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(path)
    return path


def workload(root: Path, n_images: int, per_prompt: int = 16, n_contrastive: int = 15):
    from tiny_models import make_image_folder

    paths = make_image_folder(root, n_images, seed=0, size=(512, 512))
    prompts = []
    for i in range(n_images):
        p = i // per_prompt
        own = f"a realistic photo of {p + 1} airplanes"
        prompts.append([own] + [f"a realistic photo of {p + 1} airplanes variant {k}" for k in range(n_contrastive)])
    return paths, prompts


def naive_loop(model, paths, prompts):
    """One full forward (image encode + text encode) per (image, prompt) pair."""
    import torch
    from PIL import Image

    out = []
    for path, ps in zip(paths, prompts, strict=True):
        scores = []
        for p in ps:
            with Image.open(path) as im:
                pixels = model.preprocess(im.convert("RGB"))[None]
            with torch.inference_mode():
                tok = model.tokenizer([p], padding=True, truncation=True, max_length=77,
                                      return_tensors="pt").to(model.device)
                r = model.model(pixel_values=pixels.to(model.device, model.model.dtype), **tok)
            scale = float(model.model.logit_scale.detach().exp())
            scores.append(float(r.logits_per_image[0, 0]) / scale)
        out.append(np.array(scores))
    return out


def bare_batched(model, paths, prompts, batch_size):
    """Decode and preprocess in the main thread, encode a batch, encode its prompts, matmul."""
    import torch
    from PIL import Image

    out = []
    for lo in range(0, len(paths), batch_size):
        chunk = paths[lo : lo + batch_size]
        pixels = []
        for path in chunk:
            with Image.open(path) as im:
                pixels.append(model.preprocess(im.convert("RGB")))
        with torch.inference_mode():
            img = model.model.get_image_features(
                pixel_values=torch.stack(pixels).to(model.device, model.model.dtype)).pooler_output
            img = torch.nn.functional.normalize(img.float(), dim=-1)
            distinct = list(dict.fromkeys(p for ps in prompts[lo : lo + batch_size] for p in ps))
            tok = model.tokenizer(distinct, padding=True, truncation=True, max_length=77,
                                  return_tensors="pt").to(model.device)
            txt = torch.nn.functional.normalize(model.model.get_text_features(**tok).pooler_output.float(), dim=-1)
            sims = (img @ txt.T).cpu().numpy()
        col = {p: j for j, p in enumerate(distinct)}
        out += [sims[i, [col[p] for p in ps]] for i, ps in enumerate(prompts[lo : lo + batch_size])]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3, help="best of N runs for engine and bare loop")
    parser.add_argument("--arch", choices=sorted(ARCHS), default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--naive-images", type=int, default=16,
                        help="images for the naive loop (its time per image is extrapolated)")
    args = parser.parse_args()

    import torch

    from harness.scoring import LocalExecutor, load_reward_model, parse_model_spec, score_images

    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = build_checkpoint(tmp / "ckpt", args.arch)
        paths, prompts = workload(tmp / "images", args.images)
        spec = parse_model_spec(f"clip:checkpoint={ckpt}")
        model = load_reward_model(spec, device=args.device, dtype=args.dtype)
        sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

        # Warm-up (first-call allocations, kernel selection, text cache not reused across runs).
        score_images(model, paths[:4], prompts[:4], batch_size=4)
        bare_batched(model, paths[:4], prompts[:4], 4)

        def timed(fn):
            model._text.clear()
            sync()
            t0 = time.perf_counter()
            result = fn()
            sync()
            return time.perf_counter() - t0, result

        engine_runs, bare_runs = [], []
        for _ in range(args.repeat):  # interleaved, so both see the same machine load
            engine_runs.append(timed(lambda: score_images(
                model, paths, prompts, spec=spec, batch_size=args.batch_size,
                executor=LocalExecutor(num_workers=args.workers))))
            bare_runs.append(timed(lambda: bare_batched(model, paths, prompts, args.batch_size)))
        t_engine, run = min(engine_runs, key=lambda x: x[0])
        t_bare, bare = min(bare_runs, key=lambda x: x[0])
        n_naive = min(args.naive_images, len(paths))
        t_naive, naive = timed(lambda: naive_loop(model, paths[:n_naive], prompts[:n_naive]))

        engine_scores = [s for s in run.scores]
        for a, b in zip(engine_scores, bare, strict=True):
            np.testing.assert_allclose(a, b, atol=2e-3 if args.dtype != "float32" else 1e-5)
        for a, b in zip(engine_scores[:n_naive], naive, strict=True):
            np.testing.assert_allclose(a, b, atol=2e-3 if args.dtype != "float32" else 1e-4)

        per_naive = t_naive / n_naive
        print(f"workload: {len(paths)} images x {len(prompts[0])} prompts (1 + 15 contrastive), "
              f"arch={args.arch}, device={args.device}, dtype={args.dtype}, batch={args.batch_size}, "
              f"workers={args.workers}")
        print(f"best of {args.repeat} runs each")
        print(f"engine:        {t_engine:8.3f} s  {len(paths) / t_engine:8.1f} images/s")
        print(f"bare batched:  {t_bare:8.3f} s  {len(paths) / t_bare:8.1f} images/s")
        print(f"naive pairs:   {per_naive * len(paths):8.3f} s  {1 / per_naive:8.1f} images/s "
              f"(measured on {n_naive} images)")
        print(f"(a) engine vs naive per-pair loop: {per_naive * len(paths) / t_engine:6.1f}x  (target >= 8)")
        print(f"(b) engine vs bare batched loop:   {t_bare / t_engine:6.2f}   (target >= 0.9)")


if __name__ == "__main__":
    main()
