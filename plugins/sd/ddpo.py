"""DDPO fine-tuning of Stable Diffusion against any reward (Black et al., 2023).

Each epoch samples ``sample_num_batches_per_epoch`` batches of images with the DDIM sampler at
``eta`` > 0, recording every step's log-probability; rewards are standardised per prompt (a
rolling per-prompt buffer, as trl's ``PerPromptStatTracker``) into advantages, clipped to
``train_adv_clip_max``; then ``train_num_inner_epochs`` passes of the PPO-clipped objective over a
random ``train_timestep_fraction`` of each chain's steps update the LoRA adapters. trl removed its
``DDPOTrainer`` in v0.24; this loop keeps its config names, and its DDIM log-probability and
clipped loss agree with trl 0.23.1 (tested).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from harness.errors import HarnessError
from harness_plugins.sd.config import DDPOConfig
from harness_plugins.sd.trainer import RewardTrainer, TrainerFineTuner, seeded


class DDPOTrainer(RewardTrainer):
    kind = "ddpo"

    def __init__(self, config: DDPOConfig, **kwargs: Any):
        from harness_plugins.sd.diffusion import PerPromptStatTracker

        self.tracker = PerPromptStatTracker(config.per_prompt_stat_tracking_buffer_size,
                                            config.per_prompt_stat_tracking_min_count)
        super().__init__(config, **kwargs)

    def state(self) -> dict[str, Any]:
        return {"tracker": self.tracker.state_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state.get("tracker", {}))

    def sample(self, e: int) -> dict[str, Any]:
        import torch

        from harness_plugins.sd.diffusion import encode_prompts, sample_with_logprob, to_pil

        c = self.config
        batches = []
        for b in self.mine(range(c.sample_num_batches_per_epoch)):
            g = seeded(c.seed, e, b)
            idx = torch.randint(len(self.prompts), (c.sample_batch_size,), generator=g).tolist()
            prompts = [self.prompts[i] for i in idx]
            pos, neg = encode_prompts(self.pipe, prompts)
            self.pipe.unet.eval()
            with self.autocast():
                out = sample_with_logprob(self.pipe, pos, neg, num_steps=c.sample_num_steps,
                                          guidance=c.sample_guidance_scale, eta=c.sample_eta,
                                          generator=g, resolution=c.resolution)
            self.check_samples(out, e)
            rewards = self.rewards_for(to_pil(out["images"]), prompts, e)
            batches.append({"prompts": prompts, "pos": pos, "neg": neg, "rewards": rewards,
                            "latents": out["latents"], "log_probs": out["log_probs"],
                            "timesteps": out["timesteps"]})
        cat = {k: torch.cat([b[k] for b in batches]) for k in ("pos", "neg", "latents", "log_probs", "timesteps")}
        cat["prompts"] = [p for b in batches for p in b["prompts"]]
        cat["rewards"] = np.concatenate([b["rewards"] for b in batches])
        return cat

    def epoch(self, e: int) -> dict[str, Any]:
        import torch

        from harness_plugins.sd.diffusion import ddim_step_with_logprob, ppo_loss, unet_guided

        c = self.config
        s = self.sample(e)
        # Advantages from every worker's rewards, so that all workers see the same statistics.
        shared = self.gather((s["prompts"], s["rewards"].tolist()))
        all_prompts = [p for prompts, _ in shared for p in prompts]
        all_rewards = np.array([r for _, rewards in shared for r in rewards])
        with np.errstate(over="ignore", invalid="ignore"):  # checked below
            if c.per_prompt_stat_tracking:
                adv_all = self.tracker.update(all_prompts, all_rewards)
            else:
                adv_all = (all_rewards - all_rewards.mean()) / (all_rewards.std() + 1e-8)
        if not np.isfinite(adv_all).all():  # finite rewards whose squares overflow
            raise self.stopped(e, f"reward '{self.reward_name}' values up to "
                                  f"{np.abs(all_rewards).max():.3g} are too large to standardise",
                               "Rescale the reward (e.g. a normalizer such as textnorm)")
        start = sum(len(prompts) for prompts, _ in shared[: self.rank])
        adv = adv_all[start : start + len(s["prompts"])]
        rewards = all_rewards
        advantages = torch.as_tensor(adv, dtype=torch.float32)
        n, T = s["log_probs"].shape  # this worker's samples
        n_train = max(1, int(T * c.train_timestep_fraction))
        losses, kls, clipfracs = [], [], []
        self.pipe.unet.train()
        for inner in range(c.train_num_inner_epochs):
            g = seeded(c.seed, e, 10_000 + inner)
            order = torch.randperm(n, generator=g)
            steps = torch.stack([torch.randperm(T, generator=g) for _ in range(n)])[:, :n_train]
            accumulated = 0
            for lo in range(0, n, c.train_batch_size):
                ids = order[lo: lo + c.train_batch_size]
                for j in range(n_train):
                    col = steps[ids, j]
                    lat = s["latents"][ids, col]
                    nxt = s["latents"][ids, col + 1]
                    t = s["timesteps"][ids, col]
                    old = s["log_probs"][ids, col]
                    with self.autocast():
                        if c.train_cfg:
                            pred = unet_guided(self.pipe, lat, t, s["pos"][ids], s["neg"][ids],
                                               c.sample_guidance_scale)
                        else:
                            pred = self.pipe.unet(lat, t, encoder_hidden_states=s["pos"][ids]).sample
                    _, log_prob = ddim_step_with_logprob(self.pipe.scheduler, pred.float(), t,
                                                         lat.float(), c.sample_eta, prev_sample=nxt.float())
                    a = torch.clamp(advantages[ids], -c.train_adv_clip_max, c.train_adv_clip_max)
                    ratio = torch.exp(log_prob - old.float())
                    loss = ppo_loss(a, ratio, c.train_clip_range)
                    (loss / (n_train * c.train_gradient_accumulation_steps)).backward()
                    losses.append(self.record_loss(loss))
                    kls.append(float(0.5 * torch.mean((log_prob.detach() - old) ** 2)))
                    clipfracs.append(float(torch.mean((torch.abs(ratio.detach() - 1.0) > c.train_clip_range).float())))
                accumulated += 1
                if accumulated % c.train_gradient_accumulation_steps == 0 or lo + c.train_batch_size >= n:
                    self.optimizer_step()
        return {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
                "loss": float(np.mean(losses)), "approx_kl": float(np.mean(kls)),
                "clipfrac": float(np.mean(clipfracs)), "images": int(len(all_rewards))}


class SDDDPO(TrainerFineTuner):
    """DDPO (PPO over the DDIM chain) of Stable Diffusion with LoRA, against any reward."""

    id: ClassVar[str] = "sd_ddpo"
    config_class = DDPOConfig
    trainer_class = DDPOTrainer

    def check_workers(self, config: DDPOConfig, workers: int) -> None:
        """Every worker samples as many of an epoch's batches: they must divide evenly."""
        if config.sample_num_batches_per_epoch % workers:
            raise HarnessError(
                f"sample_num_batches_per_epoch ({config.sample_num_batches_per_epoch}) must be a "
                f"multiple of --workers ({workers}) so that every worker takes as many steps"
            )

