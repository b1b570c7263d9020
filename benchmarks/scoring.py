"""Scoring-engine throughput, measured side by side in one run.

(a) engine vs a naive loop that runs one full forward pass per (image, prompt) pair, as
    ImageReward's and HPSv2's ``score()`` do, on a TextNorm workload (1 + 15 prompts per image);
    target: at least 8x.
(b) engine vs a bare batched forward loop of the same model on the same images (decode,
    preprocess, encode images and prompts, matmul; no cache, no workers); target: at least 0.9.

Models are CLIP-architecture checkpoints with random weights built here (no download):
``--arch small`` (default, CPU friendly) or ``--arch vit-l-14`` (the real openai/clip-vit-large-patch14
shapes; use with --device cuda --dtype float16). ``--arch hpsv2`` scores with the ``hpsv2`` plugin
a random checkpoint in the original HPSv2 file layout with the real open_clip ViT-H/14 shapes
(986M parameters; a 2 GB file is written; for a GPU), ``--arch hpsv2-small`` the same layout with
two narrow layers per tower at 224 pixels (CPU friendly). The tokenizer is the real CLIP BPE
vocabulary.

``--arch vlm_judge`` measures the judge's client instead, against a local stand-in server that
answers after ``--judge-latency`` seconds (``--concurrency`` requests at once).

``--arch hpsv3`` scores with the ``hpsv3`` plugin a random checkpoint in the original HPSv3 file
layout with the real Qwen2-VL-7B shapes (8.3B parameters, built in bfloat16 on ``--device``, a
17 GB file is written; for a GPU, with --dtype bfloat16), ``--arch hpsv3-small`` the same layout
with two narrow layers per tower (CPU friendly); images are 512 x 512 (256 image tokens at the
original's 448 x 448). It compares the engine (one vision pass and one shared-prefix language-model
pass per image, then the 16 prompts in batches against the cached prefix) with a naive loop that
runs the full sequence once per (image, prompt) pair, as the original does.

``--arch vqascore`` scores with the ``vqascore`` plugin a random Qwen2_5_VLForConditionalGeneration
with Qwen/Qwen2.5-VL-3B-Instruct's shapes (3.8B parameters, built in ``--dtype`` on ``--device``;
for a GPU, with --dtype bfloat16), ``--arch vqascore-7b`` the 7B's, ``--arch vqascore-small`` and
``vqascore-tiny`` narrow ones (CPU friendly), with the real Qwen tokenizer; 512 x 512 images become
504 x 504 (324 image tokens). It compares the engine (the vision tower and the prefix up to the
image once per image, then the prompts' question tokens in batches against the cached prefix) with
t2v_metrics' way: the whole sequence, image included, once per (image, prompt) pair.

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
    # HPSv2 (plugin hpsv2): open_clip state dicts, sizes as tiny_models.hpsv2_state_dict takes
    "hpsv2": dict(plugin="hpsv2", sizes={"vision_width": 1280, "vision_layers": 32, "text_width": 1024,
                                         "text_layers": 24, "embed_dim": 1024, "image_size": 224}),
    "hpsv2-small": dict(plugin="hpsv2", sizes={"image_size": 224}),
    # vlm_judge: no weights here; a local OpenAI-compatible server stands in (judge_benchmark)
    "vlm_judge": dict(plugin="vlm_judge"),
    # HPSv3 (plugin hpsv3): Qwen2-VL-7B-Instruct's shapes, or tiny widths (hpsv3_benchmark)
    "hpsv3": dict(plugin="hpsv3", real=True),
    "hpsv3-small": dict(plugin="hpsv3", sizes={"hidden": 64, "layers": 2, "vision_depth": 2}),
    # VQAScore (plugin vqascore): Qwen2.5-VL widths as tiny_models.make_tiny_qwen2_5_vl takes them
    "vqascore": dict(plugin="vqascore", text={
        "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
        "num_attention_heads": 16, "num_key_value_heads": 2, "max_position_embeddings": 128000,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}}, vision={
        "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
        "out_hidden_size": 2048, "fullatt_block_indexes": [7, 15, 23, 31]}),
    "vqascore-7b": dict(plugin="vqascore", text={
        "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 128000,
        "tie_word_embeddings": False, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}},
        vision={"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                "out_hidden_size": 3584, "fullatt_block_indexes": [7, 15, 23, 31]}),
    "vqascore-small": dict(plugin="vqascore", text={
        "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2,
        "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]}}, vision={
        "depth": 4, "hidden_size": 128, "intermediate_size": 512, "num_heads": 2,
        "out_hidden_size": 256, "fullatt_block_indexes": [1, 3]}),
    "vqascore-tiny": dict(plugin="vqascore", text={}, vision={}),
}


def qwen2_vl_7b_config():
    """Qwen/Qwen2-VL-7B-Instruct's shapes (text 3584 wide, 28 layers, 28 heads, 4 KV heads;
    vision 1280 wide, 32 blocks), random weights."""
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig(
        text_config={"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
                     "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                     "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                         "mrope_section": [16, 24, 24]}, "pad_token_id": 151643},
        vision_config={"depth": 32, "embed_dim": 1280, "hidden_size": 3584, "num_heads": 16,
                       "mlp_ratio": 4, "patch_size": 14, "spatial_merge_size": 2,
                       "temporal_patch_size": 2},
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
        vision_end_token_id=151653)


def hpsv3_benchmark(args: argparse.Namespace) -> None:
    """``--arch hpsv3`` / ``hpsv3-small``: the engine against one full pass per (image, prompt)."""
    import torch
    from tiny_models import make_tiny_hpsv3

    from harness.scoring import LocalExecutor, load_reward_model, parse_model_spec, score_images
    from harness.scoring.batches import collate

    spec_arch = ARCHS[args.arch]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if spec_arch.get("real"):
            dtype = getattr(torch, args.dtype)
            base, weights = make_tiny_hpsv3(tmp / "ckpt", config=qwen2_vl_7b_config(), dtype=dtype,
                                            device=args.device)
        else:
            base, weights = make_tiny_hpsv3(tmp / "ckpt", **spec_arch["sizes"])
        paths, prompts = workload(tmp / "images", args.images)
        spec = parse_model_spec(f"hpsv3:checkpoint={weights},base={base},batch_size={args.batch_size}")
        model = load_reward_model(spec, device=args.device, dtype=args.dtype)
        score_images(model, paths[:2], prompts[:2], batch_size=2)  # warm-up
        timed = timer(args.device)

        def naive(paths, prompts):  # the original's way: every pair from the image up, in full
            from PIL import Image

            out = []
            for path, ps in zip(paths, prompts, strict=True):
                rows = []
                for p in ps:
                    with Image.open(path) as im:
                        x = collate([model.preprocess(im)])
                    rows.append(model.score(model.embed_images(x), [[p]])[0][0])
                out.append(np.stack(rows))
            return out

        runs = [timed(lambda: score_images(model, paths, prompts, spec=spec, batch_size=args.batch_size,
                                           executor=LocalExecutor(num_workers=args.workers)))
                for _ in range(args.repeat)]
        t_engine, run = min(runs, key=lambda x: x[0])
        n_naive = min(args.naive_images, len(paths))
        t_naive, slow = timed(lambda: naive(paths[:n_naive], prompts[:n_naive]))
        tol = 1e-4 if args.dtype == "float32" else 5e-2
        for i in range(n_naive):
            np.testing.assert_allclose(run.scores[i], slow[i][:, 0], atol=tol)
            np.testing.assert_allclose(run.uncertainty[i], slow[i][:, 1], atol=tol)
        per_naive = t_naive / n_naive
        print(f"workload: {len(paths)} images x {len(prompts[0])} prompts (1 + 15 contrastive), "
              f"arch={args.arch}, device={args.device}, dtype={args.dtype}, prompts per pass="
              f"{args.batch_size}, workers={args.workers}")
        print(f"engine:       {t_engine:8.3f} s  {len(paths) / t_engine:8.2f} images/s  "
              f"{len(paths) * len(prompts[0]) / t_engine:8.1f} pairs/s (best of {args.repeat})")
        print(f"naive pairs:  {per_naive * len(paths):8.3f} s  {1 / per_naive:8.2f} images/s "
              f"(measured on {n_naive} images)")
        print(f"engine vs naive per-pair loop: {per_naive * len(paths) / t_engine:6.1f}x")


def build_hpsv2(path: Path, sizes: dict) -> Path:
    """A random HPSv2 checkpoint in the original layout (HPS_v2.1_compressed.pt) + tokenizer."""
    import torch
    from tiny_models import clip_tokenizer, hpsv2_state_dict

    path.mkdir(parents=True)
    torch.save({"state_dict": hpsv2_state_dict(seed=0, **sizes)}, path / "HPS_v2.1_compressed.pt")
    clip_tokenizer().save_pretrained(path)
    return path


def build_checkpoint(path: Path, arch: str) -> Path:
    import torch
    from tiny_models import clip_tokenizer
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    spec = ARCHS[arch]
    if spec.get("plugin") == "hpsv2":
        return build_hpsv2(path, spec["sizes"])
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


def timer(device: str, before=None):
    """``timed(fn) -> (seconds, fn())``, synchronising CUDA around the call on a GPU and calling
    ``before()`` (e.g. clearing a text cache) first."""
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def timed(fn):
        if before is not None:
            before()
        sync()
        t0 = time.perf_counter()
        result = fn()
        sync()
        return time.perf_counter() - t0, result

    return timed


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


def _stand_in_server(latency: float, urls: object, stop: object) -> None:
    """A child process serving fixed log-probabilities after ``latency`` seconds, so the server's
    JSON decoding does not share the client's interpreter lock."""
    import json

    from llm_server import ChatServer, Reply, logprob_completion

    server = ChatServer()
    answer = json.dumps(logprob_completion([("Yes", -0.2), ("No", -1.7), (" yes", -4.0)]))
    server.respond = lambda body: Reply(200, answer)
    server.delay = latency
    urls.put(server.url)
    stop.wait()
    server.close()


def vqascore_naive(model, paths, prompts):
    """t2v_metrics' way: for each (image, prompt), the whole chat with the image through the model
    (the one step of ``generate`` it takes), then P("Yes") of the penalised logits."""
    import inspect
    import math

    import torch
    from PIL import Image
    from transformers import RepetitionPenaltyLogitsProcessor

    net, pad = model.model, "<|image_pad|>"
    takes_types = "mm_token_type_ids" in inspect.signature(net.forward).parameters
    penalty = RepetitionPenaltyLogitsProcessor(model.repetition_penalty)
    out = []
    for path, ps in zip(paths, prompts, strict=True):
        row = []
        for p in ps:
            with Image.open(path) as im:
                x = model.preprocess(im)
            n = math.prod(x.grid_thw) // model.merge_size**2
            ids = model.tokenizer(model._render(p).replace(pad, pad * n), return_tensors="pt")
            ids = ids["input_ids"].to(model.device)
            extra = {"mm_token_type_ids": (ids == model.image_token_id).int()} if takes_types else {}
            with torch.inference_mode():
                logits = net(input_ids=ids, image_grid_thw=torch.tensor([x.grid_thw], device=model.device),
                             pixel_values=torch.as_tensor(x.pixel_values).to(model.device, net.dtype),
                             logits_to_keep=1, **extra).logits[:, -1].float()
                row.append(float(penalty(ids, logits).softmax(-1)[0, model.answer_token_id]))
        out.append(np.array(row))
    return out


def vqascore_benchmark(args: argparse.Namespace) -> None:
    """``--arch vqascore*``: the engine against t2v_metrics' one full pass per (image, prompt)."""
    import torch
    from tiny_models import make_tiny_qwen2_5_vl

    from harness.scoring import LocalExecutor, load_reward_model, parse_model_spec, score_images

    arch = ARCHS[args.arch]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        ckpt = make_tiny_qwen2_5_vl(tmp / "ckpt", text=arch["text"], vision=arch["vision"],
                                    spread_answers=args.arch == "vqascore-tiny",
                                    dtype=getattr(torch, args.dtype), device=args.device)
        built = time.perf_counter() - t0
        paths, prompts = workload(tmp / "images", args.images)
        spec = parse_model_spec(f"vqascore:checkpoint={ckpt},pair_batch_size={args.pair_batch_size}")
        model = load_reward_model(spec, device=args.device, dtype=args.dtype)
        params = sum(p.numel() for p in model.model.parameters())
        score_images(model, paths[:2], prompts[:2], batch_size=2)  # warm-up
        timed = timer(args.device)

        runs = [timed(lambda: score_images(model, paths, prompts, spec=spec, batch_size=args.batch_size,
                                           executor=LocalExecutor(num_workers=args.workers)))
                for _ in range(args.repeat)]
        t_engine, run = min(runs, key=lambda x: x[0])
        n_naive = min(args.naive_images, len(paths))
        t_naive, slow = timed(lambda: vqascore_naive(model, paths[:n_naive], prompts[:n_naive]))
        tol = 1e-4 if args.dtype == "float32" else 5e-2
        worst = max(float(np.abs(run.scores[i] - slow[i]).max()) for i in range(n_naive))
        assert worst < tol, f"engine and full passes differ by {worst}"
        peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
    per_naive = t_naive / n_naive
    print(f"workload: {len(paths)} images (512 x 512 -> 324 image tokens) x {len(prompts[0])} prompts, "
          f"arch={args.arch} ({params / 1e6:,.0f}M parameters, built in {built:.0f} s), "
          f"device={args.device}, dtype={args.dtype}, batch={args.batch_size}, "
          f"pairs per pass={args.pair_batch_size}, workers={args.workers}")
    print(f"engine:           {t_engine:8.3f} s  {len(paths) / t_engine:8.2f} images/s  "
          f"{len(paths) * len(prompts[0]) / t_engine:8.1f} pairs/s"
          + (f"  (peak GPU memory {peak:.1f} GiB)" if peak is not None else ""))
    print(f"full pass a pair: {per_naive * len(paths):8.3f} s  {1 / per_naive:8.2f} images/s "
          f"(measured on {n_naive} images; max |difference| {worst:.1e})")
    print(f"engine vs one full pass per pair: {per_naive * len(paths) / t_engine:6.1f}x")


def judge_benchmark(args: argparse.Namespace) -> None:
    """``--arch vlm_judge``: the engine and the judge's client (PNG encoding, a thread pool of
    ``--concurrency`` requests, JSON parsing) against a local OpenAI-compatible server (another
    process) that answers every request with fixed log-probabilities after ``--judge-latency``
    seconds: a stand-in for a VLM server, which bounds throughput at concurrency / latency pairs
    per second. Each request carries its image (a 512 x 512 noise PNG is about 1 MB in base64).
    """
    import multiprocessing
    import os

    from harness.scoring import LocalExecutor, load_reward_model, parse_model_spec, score_images

    os.environ.setdefault("OPENAI_API_KEY", "benchmark")
    context = multiprocessing.get_context("fork")
    urls, stop = context.Queue(), context.Event()
    child = context.Process(target=_stand_in_server, args=(args.judge_latency, urls, stop))
    child.start()
    try:
        url = urls.get(timeout=60)
        with tempfile.TemporaryDirectory() as tmp:
            paths, prompts = workload(Path(tmp) / "images", args.images)
            spec = parse_model_spec(f"vlm_judge:base_url={url},model=bench,cache=false,"
                                    f"concurrency={args.concurrency}")
            model = load_reward_model(spec, device="cpu")
            score_images(model, paths[:2], prompts[:2], batch_size=2)  # warm-up: connections
            runs = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                run = score_images(model, paths, prompts, spec=spec, batch_size=args.batch_size,
                                   executor=LocalExecutor(num_workers=args.workers))
                runs.append(time.perf_counter() - t0)
                assert not run.failed and all(abs(s[0] - 0.820851069) < 1e-6 for s in run.scores)
    finally:
        stop.set()
        child.join(timeout=30)
    best, pairs = min(runs), sum(len(p) for p in prompts)
    bound = args.concurrency / args.judge_latency if args.judge_latency else float("inf")
    print(f"workload: {len(paths)} images (512 x 512 PNG) x {len(prompts[0])} prompts, "
          f"arch=vlm_judge, server latency {args.judge_latency:g} s, concurrency "
          f"{args.concurrency}, batch={args.batch_size}, workers={args.workers}")
    print(f"best of {args.repeat} runs: {best:8.3f} s  {len(paths) / best:8.1f} images/s  "
          f"{pairs / best:8.1f} pairs/s  (server bound: {bound:.0f} pairs/s)")


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
    parser.add_argument("--concurrency", type=int, default=16, help="vlm_judge: requests at once")
    parser.add_argument("--pair-batch-size", type=int, default=16,
                        help="vqascore: (image, prompt) pairs per language-model pass")
    parser.add_argument("--judge-latency", type=float, default=0.05,
                        help="vlm_judge: seconds the stand-in server takes per request")
    args = parser.parse_args()
    if args.arch == "vlm_judge":
        return judge_benchmark(args)
    if ARCHS[args.arch].get("plugin") == "hpsv3":
        return hpsv3_benchmark(args)
    if ARCHS[args.arch].get("plugin") == "vqascore":
        return vqascore_benchmark(args)

    import torch

    from harness.scoring import LocalExecutor, load_reward_model, parse_model_spec, score_images

    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = build_checkpoint(tmp / "ckpt", args.arch)
        paths, prompts = workload(tmp / "images", args.images)
        spec = parse_model_spec(f"{ARCHS[args.arch].get('plugin', 'clip')}:checkpoint={ckpt}")
        model = load_reward_model(spec, device=args.device, dtype=args.dtype)

        # Warm-up (first-call allocations, kernel selection, text cache not reused across runs).
        score_images(model, paths[:4], prompts[:4], batch_size=4)
        bare_batched(model, paths[:4], prompts[:4], 4)
        timed = timer(args.device, before=model._text.clear)

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
