"""Fine-tuning throughput on the Stable Diffusion 2.1 architecture, measured side by side in one run.

Builds a pipeline with SD 2.1's shapes and random weights (no download): the 865M-parameter
v-prediction UNet at 768 px, the SD VAE, the OpenCLIP ViT-H text encoder and the real CLIP BPE
tokenizer. It saves the pipeline and loads it back through the fine-tuners' ``load_pipeline``, then
measures, in one process:

(a) a bare UNet loop: the sampler's classifier-free-guided forward passes alone (no scheduler,
    no VAE, no log-probabilities, no reward), at the same batch, steps and dtype;
(b) DDPO (``sd_ddpo``): seconds per iteration (sampling + PPO training), sampling images/s and its
    ratio to (a), training seconds;
(c) SFT (``sd_sft``): seconds per round (generation + filtering + denoising-loss steps) and its
    generation images/s.

Peak GPU memory (``torch.cuda.max_memory_allocated``) is reported per phase. The reward is mean
brightness, so the figures are the fine-tuner's own cost; a reward model adds its scoring time.

    python benchmarks/finetune.py --arch sd21 --device cuda --precision fp16   # the real shapes
    python benchmarks/finetune.py                                              # tiny CPU smoke run
    python benchmarks/finetune.py --arch sd21 --resolution 256 --steps 2 --batch 1 --iters 1  # CPU check
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def build_sd21(path: Path) -> Path:
    """Stable Diffusion 2.1 (768-v) shapes with random weights, saved in fp16 with save_pretrained."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from tiny_models import clip_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=1024, use_linear_projection=True, upcast_attention=True,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2, sample_size=768,
    )
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
        num_attention_heads=16, projection_dim=512, hidden_act="gelu", max_position_embeddings=77,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type="v_prediction")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=clip_tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(path)
    return path


class Peak:
    """Peak GPU memory (GiB) over a block; None on CPU."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.gib = None

    def __enter__(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.gib = torch.cuda.max_memory_allocated() / 2**30


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bare_unet_loop(pipe, batch: int, steps: int, size: int, device: str, reps: int) -> float:
    """Seconds for ``steps`` guided UNet forward passes on a batch (best of ``reps``)."""
    import torch

    unet = pipe.unet
    lat = torch.randn(batch, unet.config.in_channels, size // pipe.vae_scale_factor,
                      size // pipe.vae_scale_factor, device=device, dtype=unet.dtype)
    ctx = torch.randn(2 * batch, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim,
                      device=device, dtype=unet.dtype)
    best = float("inf")
    with torch.no_grad():
        for _ in range(reps):
            sync(device)
            start = time.perf_counter()
            for t in torch.linspace(999, 1, steps).long():
                unet(torch.cat([lat, lat]), t.to(device), encoder_hidden_states=ctx)
            sync(device)
            best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=["tiny", "sd21"], default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=["fp16", "bf16", "no"], default="no")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: 50 sd21, 8 tiny)")
    ap.add_argument("--batch", type=int, default=None, help="sample and train batch (default: 2 sd21, 8 tiny)")
    ap.add_argument("--resolution", type=int, default=None, help="image size (default: the model's, 768 for sd21)")
    ap.add_argument("--iters", type=int, default=2, help="iterations per fine-tuner (the first is warm-up)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    import torch
    from brightness_reward import brightness  # the tests' planted reward (tests/ is on sys.path)

    from harness.config import load_config
    from harness_plugins.sd.config import DDPOConfig, SFTConfig
    from harness_plugins.sd.ddpo import DDPOTrainer
    from harness_plugins.sd.diffusion import load_pipeline
    from harness_plugins.sd.sft import SFTTrainer

    steps = args.steps or (50 if args.arch == "sd21" else 8)
    batch = args.batch or (2 if args.arch == "sd21" else 8)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        if args.arch == "sd21":
            model = build_sd21(Path(tmp) / "sd21")
        else:
            from tiny_models import make_tiny_sd

            model = make_tiny_sd(Path(tmp) / "tiny")
        print(f"built {args.arch} pipeline in {time.perf_counter() - t0:.0f} s", flush=True)
        dtype = {"fp16": "float16", "bf16": "bfloat16"}.get(args.precision, "float32")
        if not args.device.startswith("cuda"):
            dtype = "float32"
        pipe = load_pipeline(str(model), device=args.device, dtype=dtype)
        size = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
        n_unet = sum(p.numel() for p in pipe.unet.parameters())
        print(f"UNet {n_unet / 1e6:.2f}M parameters, {size} px, {steps} steps, batch {batch}, "
              f"{dtype} on {args.device}", flush=True)

        figures: dict[str, float | None] = {}
        with Peak(args.device) as peak:
            bare = bare_unet_loop(pipe, batch, steps, size, args.device, reps=2)
        figures.update(bare_s=bare, bare_images_per_s=batch / bare, bare_peak_gib=peak.gib)
        del pipe
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()

        common = dict(base_model=str(model), prompts=["a photo of a red car", "two cats on a sofa"],
                      sample_num_steps=steps, sample_batch_size=batch, train_batch_size=batch,
                      num_epochs=args.iters, mixed_precision=args.precision, device=args.device,
                      save_freq=10**6, eval_freq=0, resolution=args.resolution)
        for kind, cls, cfg_cls, extra in (
            ("ddpo", DDPOTrainer, DDPOConfig, dict(sample_num_batches_per_epoch=1, per_prompt_stat_tracking=False)),
            ("sft", SFTTrainer, SFTConfig, dict(images_per_prompt=batch, keep_fraction=0.5, train_steps_per_round=2)),
        ):
            with tempfile.TemporaryDirectory() as out:
                cfg = load_config(cfg_cls, dict(common, output_dir=out, **extra))
                trainer = cls(cfg, reward=brightness)
                gen_name = "sample" if kind == "ddpo" else "generate"
                inner = getattr(trainer, gen_name)
                gen_times: list[float] = []

                def timed(e, _inner=inner, _times=gen_times):
                    sync(args.device)
                    start = time.perf_counter()
                    result = _inner(e)
                    sync(args.device)
                    _times.append(time.perf_counter() - start)
                    return result

                setattr(trainer, gen_name, timed)
                with Peak(args.device) as peak:
                    log = trainer.train()["log"]
                n_images = batch if kind == "ddpo" else batch * len(common["prompts"])
                # The last iteration (the first includes warm-up).
                iter_s, gen_s = log[-1]["seconds"], gen_times[-1]
                figures.update({
                    f"{kind}_iter_s": iter_s, f"{kind}_sampling_images_per_s": n_images / gen_s,
                    f"{kind}_train_s": iter_s - gen_s, f"{kind}_peak_gib": peak.gib,
                    f"{kind}_sampling_vs_bare": (n_images / gen_s) / figures["bare_images_per_s"],
                })
                del trainer
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()

    def fmt(v):
        return "n/a" if v is None else f"{v:.3f}"

    print(f"bare UNet loop: {fmt(figures['bare_s'])} s per batch of {batch}, "
          f"{fmt(figures['bare_images_per_s'])} images/s, peak {fmt(figures['bare_peak_gib'])} GiB")
    for kind in ("ddpo", "sft"):
        print(f"{kind}: {fmt(figures[f'{kind}_iter_s'])} s/iter (training {fmt(figures[f'{kind}_train_s'])} s), "
              f"sampling {fmt(figures[f'{kind}_sampling_images_per_s'])} images/s "
              f"= {fmt(figures[f'{kind}_sampling_vs_bare'])}x the bare loop, "
              f"peak {fmt(figures[f'{kind}_peak_gib'])} GiB")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
