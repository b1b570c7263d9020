"""Reward-filtered supervised fine-tuning of Stable Diffusion (the paper's SFT baseline).

Each round (epoch) generates ``images_per_prompt`` images for every training prompt with the
current model, scores them with the reward, keeps the top ``keep_fraction`` (10%) and trains the
LoRA adapters on them with the denoising loss: the target is the noise for an epsilon-prediction
model and the velocity for a v-prediction one (SD 2.1 at 768 px), read from the scheduler config.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from harness.errors import HarnessError
from harness_plugins.sd.config import SFTConfig
from harness_plugins.sd.trainer import RewardTrainer, TrainerFineTuner, seeded


class SFTTrainer(RewardTrainer):
    kind = "sft"

    def generate(self, e: int) -> dict[str, Any]:
        import torch

        from harness_plugins.sd.diffusion import encode_prompts, sample_with_logprob, to_pil

        c = self.config
        images, prompts, rewards = [], [], []
        self.pipe.unet.eval()
        for p in self.mine(range(len(self.prompts))):
            prompt = self.prompts[p]
            for lo in range(0, c.images_per_prompt, c.sample_batch_size):
                k = min(c.sample_batch_size, c.images_per_prompt - lo)
                pos, neg = encode_prompts(self.pipe, [prompt] * k)
                with self.autocast():
                    out = sample_with_logprob(self.pipe, pos, neg, num_steps=c.sample_num_steps,
                                              guidance=c.sample_guidance_scale, eta=c.sample_eta,
                                              generator=seeded(c.seed, e, p, lo), resolution=c.resolution)
                self.check_samples(out, e)
                batch = to_pil(out["images"])
                r = self.rewards_for(batch, [prompt] * k, e)
                images.append(out["images"].float())
                prompts += [prompt] * k
                rewards.append(r)
        return {"images": torch.cat(images), "prompts": prompts, "rewards": np.concatenate(rewards)}

    def epoch(self, e: int) -> dict[str, Any]:
        import torch

        from harness_plugins.sd.diffusion import encode_prompts

        c = self.config
        gen = self.generate(e)
        rewards = gen["rewards"]
        keep = max(1, math.ceil(len(rewards) * c.keep_fraction))
        top = np.argsort(-rewards, kind="stable")[:keep]
        images = gen["images"][torch.as_tensor(top)]
        prompts = [gen["prompts"][i] for i in top]
        pipe = self.pipe
        with torch.no_grad():
            pixels = (images * 2 - 1).to(pipe.device, pipe.vae.dtype)
            latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
            pos, _ = encode_prompts(pipe, prompts)
        kind = pipe.scheduler.config.prediction_type
        n_train = pipe.scheduler.config.num_train_timesteps
        pipe.unet.train()
        losses = []
        for step in range(c.train_steps_per_round):
            g = seeded(c.seed, e, 20_000 + step)
            ids = torch.randperm(len(prompts), generator=g)[: c.train_batch_size]
            x0 = latents[ids].float()
            noise = torch.randn(x0.shape, generator=g).to(x0.device)
            t = torch.randint(0, n_train, (len(ids),), generator=g).to(x0.device)
            noisy = pipe.scheduler.add_noise(x0, noise, t)
            target = pipe.scheduler.get_velocity(x0, noise, t) if kind == "v_prediction" else noise
            with self.autocast():
                pred = pipe.unet(noisy.to(pipe.unet.dtype), t, encoder_hidden_states=pos[ids]).sample
            loss = torch.nn.functional.mse_loss(pred.float(), target.float())
            loss.backward()
            losses.append(self.record_loss(loss))
            self.optimizer_step()
        return {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
                "kept_reward_mean": float(rewards[top].mean()), "kept": int(keep),
                "loss": float(np.mean(losses)), "prediction_type": kind, "images": int(len(rewards))}


class SDSFT(TrainerFineTuner):
    """Generate, keep the top 10% by reward, LoRA denoising-loss training (rounds)."""

    id: ClassVar[str] = "sd_sft"
    config_class = SFTConfig
    trainer_class = SFTTrainer

    def check_workers(self, config: SFTConfig, workers: int) -> None:
        """Workers split the training prompts: each needs at least one."""
        if len(config.training_prompts()) < workers:
            raise HarnessError(f"SFT with {workers} workers needs at least {workers} prompts")

