"""Stable Diffusion pieces for reward fine-tuning: loading, LoRA, sampling with log-probabilities.

:func:`ddim_step_with_logprob` is the DDIM update with noise (``eta > 0``) that also returns the
log-density of the sampled ``x_{t-1}`` under the Gaussian ``N(mean(x_t), sigma_t^2)``, averaged
over latent dimensions, as in DDPO (Black et al.) and trl <= 0.23; the tests check it against
trl 0.23.1 to 1e-5. :func:`ppo_loss` is the PPO-clipped objective on those log-probabilities.
"""

from __future__ import annotations

import math
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from harness.errors import HarnessError


def ddim_step_with_logprob(
    scheduler: Any,
    model_output: Any,
    timestep: Any,
    sample: Any,
    eta: float = 1.0,
    generator: Any = None,
    prev_sample: Any = None,
) -> tuple[Any, Any]:
    """One DDIM step ``x_t -> x_{t-1}`` and ``log p(x_{t-1} | x_t)``.

    :param scheduler: a diffusers ``DDIMScheduler`` after ``set_timesteps``.
    :param model_output: the UNet's prediction ``[B, C, h, w]`` (epsilon, v or sample, as the
        scheduler's ``prediction_type`` says).
    :param timestep: current timestep, a scalar or ``[B]`` long tensor.
    :param prev_sample: if given, its log-probability is computed instead of sampling a new one.
    :returns: ``(x_{t-1} [B, C, h, w], log_prob [B] float32)``.
    """
    import torch

    if scheduler.num_inference_steps is None:
        raise HarnessError("the scheduler has no timesteps: call set_timesteps first")
    if prev_sample is not None and generator is not None:
        raise ValueError("pass either generator or prev_sample, not both")
    cfg = scheduler.config
    timestep = torch.as_tensor(timestep, device="cpu").long()
    prev_t = (timestep - cfg.num_train_timesteps // scheduler.num_inference_steps).clamp(
        0, cfg.num_train_timesteps - 1
    )
    acp = scheduler.alphas_cumprod
    # prev_t is clamped to >= 0, so the "final alpha" branch of DDIM is never taken here (as trl).
    a_t = acp[timestep]
    a_prev = torch.where(prev_t >= 0, acp[prev_t], scheduler.final_alpha_cumprod)

    def bcast(x: Any) -> Any:
        x = x.reshape(x.shape + (1,) * (sample.ndim - x.ndim)) if x.ndim else x
        return x.to(sample.device)

    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    a_t, a_prev, std = bcast(a_t), bcast(a_prev), bcast(eta * variance.sqrt())
    b_t = 1 - a_t
    kind = cfg.prediction_type
    if kind == "epsilon":
        x0 = (sample - b_t.sqrt() * model_output) / a_t.sqrt()
        eps = model_output
    elif kind == "v_prediction":
        x0 = a_t.sqrt() * sample - b_t.sqrt() * model_output
        eps = a_t.sqrt() * model_output + b_t.sqrt() * sample
    elif kind == "sample":
        x0 = model_output
        eps = (sample - a_t.sqrt() * x0) / b_t.sqrt()
    else:
        raise HarnessError(f"unsupported prediction_type '{kind}'")
    if cfg.thresholding:
        x0 = scheduler._threshold_sample(x0)
    elif cfg.clip_sample:
        x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).sqrt() * eps
    if prev_sample is None:
        noise = torch.randn(model_output.shape, generator=generator, device="cpu" if generator is None
                            else generator.device, dtype=model_output.dtype).to(model_output.device)
        prev_sample = mean + std * noise
    log_prob = (
        -((prev_sample.detach() - mean) ** 2) / (2 * std**2)
        - torch.log(std)
        - math.log(math.sqrt(2 * math.pi))
    )
    return prev_sample.to(sample.dtype), log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def ppo_loss(advantages: Any, ratio: Any, clip_range: float) -> Any:
    """``mean(max(-A * r, -A * clip(r, 1 - eps, 1 + eps)))``: PPO's clipped surrogate, negated."""
    import torch

    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.mean(torch.maximum(unclipped, clipped))


class PerPromptStatTracker:
    """Standardise rewards per prompt over a rolling buffer (DDPO's per-prompt baseline).

    Prompts with fewer than ``min_count`` rewards seen use the batch's global mean and std.
    """

    def __init__(self, buffer_size: int = 16, min_count: int = 16):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.stats: dict[str, deque] = {}

    def update(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        rewards = np.asarray(rewards, dtype=np.float64)
        advantages = np.empty_like(rewards)
        for prompt in dict.fromkeys(prompts):
            mask = np.array([p == prompt for p in prompts])
            buffer = self.stats.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(rewards[mask].tolist())
            if len(buffer) < self.min_count:
                mean, std = rewards.mean(), rewards.std() + 1e-6
            else:
                mean, std = np.mean(buffer), np.std(buffer) + 1e-6
            advantages[mask] = (rewards[mask] - mean) / std
        return advantages

    def state_dict(self) -> dict[str, list[float]]:
        return {k: list(v) for k, v in self.stats.items()}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        self.stats = {k: deque(v, maxlen=self.buffer_size) for k, v in state.items()}


def load_pipeline(base_model: str, revision: str | None = None, device: str = "cpu",
                  dtype: str = "float32") -> Any:
    """A diffusers StableDiffusionPipeline with a DDIM scheduler (hub id or local folder)."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from harness.hf import quiet_transformers

    path = Path(base_model).expanduser()
    if (path.exists() or base_model.startswith((".", "/", "~"))) and not (path / "model_index.json").is_file():
        raise HarnessError(
            f"base model '{base_model}' not found or has no model_index.json "
            "(expected a StableDiffusionPipeline saved with save_pretrained)"
        )
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # "Loading pipeline components": noise on stderr
    try:
        with quiet_transformers():
            pipe = StableDiffusionPipeline.from_pretrained(
                str(path) if path.exists() else base_model, revision=revision,
                dtype=getattr(torch, dtype), safety_checker=None, requires_safety_checker=False,
            )
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HarnessError(f"cannot load base model '{base_model}' (a StableDiffusionPipeline): {first}") from exc
    finally:
        diffusers_logging.enable_progress_bar()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    pipe.unet.requires_grad_(False)
    return pipe.to(device)


LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def add_lora(unet: Any, rank: int = 4, alpha: float = 4.0) -> list[Any]:
    """Attach LoRA adapters (peft) to the UNet's attention projections; returns trainable params."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                target_modules=LORA_TARGETS))
    params = [p for n, p in unet.named_parameters() if "lora" in n]
    for p in params:
        p.requires_grad_(True)
        p.data = p.data.float()  # train adapters in fp32 even when the UNet runs in half precision
    return params


def save_lora(unet: Any, folder: str | Path) -> Path:
    """Write the UNet's LoRA weights (``pytorch_lora_weights.safetensors``, diffusers layout)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=state, safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors"


def load_lora(unet: Any, folder: str | Path) -> None:
    """Load LoRA weights written by :func:`save_lora` into a UNet that has adapters attached."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(folder) / "pytorch_lora_weights.safetensors"
    if not path.is_file():
        raise HarnessError(f"no LoRA weights at {path}")
    state = load_file(str(path))
    state = {k.removeprefix("unet."): v for k, v in state.items()}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(state))
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise HarnessError(f"LoRA weights at {path} do not fit this UNet: {unexpected[:3]}")


def encode_prompts(pipe: Any, prompts: list[str]) -> tuple[Any, Any]:
    """``(prompt_embeds [B, L, D], negative_embeds [B, L, D])`` with empty negative prompts."""
    import torch

    with torch.no_grad():
        pos, neg = pipe.encode_prompt(prompts, pipe.device, 1, True, [""] * len(prompts))
    return pos, neg


def unet_guided(pipe: Any, latents: Any, t: Any, pos: Any, neg: Any, guidance: float) -> Any:
    """Classifier-free guided UNet prediction for ``latents [B, C, h, w]`` at timestep ``t``."""
    import torch

    x = torch.cat([latents, latents])
    tt = torch.as_tensor(t, device=latents.device)
    tt = tt.repeat(2) if tt.ndim else tt
    x = pipe.scheduler.scale_model_input(x, t if not torch.is_tensor(t) or t.ndim == 0 else t[0])
    out = pipe.unet(x, tt, encoder_hidden_states=torch.cat([neg, pos])).sample
    uncond, text = out.chunk(2)
    return uncond + guidance * (text - uncond)


def sample_with_logprob(
    pipe: Any, pos: Any, neg: Any, *, num_steps: int, guidance: float, eta: float,
    generator: Any, resolution: int | None = None,
) -> dict[str, Any]:
    """Sample images recording the denoising chain.

    :returns: ``images`` float32 ``[B, 3, H, W]`` in [0, 1]; ``latents`` ``[B, T + 1, C, h, w]``;
        ``log_probs`` ``[B, T]``; ``timesteps`` ``[B, T]`` (long).
    """
    import torch

    size = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    pipe.scheduler.set_timesteps(num_steps, device=pipe.device)
    shape = (pos.shape[0], pipe.unet.config.in_channels, size // pipe.vae_scale_factor,
             size // pipe.vae_scale_factor)
    latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(pipe.device, pos.dtype)
    latents = latents * pipe.scheduler.init_noise_sigma
    chain, log_probs = [latents], []
    with torch.no_grad():
        for t in pipe.scheduler.timesteps:
            pred = unet_guided(pipe, latents, t, pos, neg, guidance)
            latents, log_prob = ddim_step_with_logprob(pipe.scheduler, pred, t, latents, eta,
                                                       generator=generator)
            chain.append(latents)
            log_probs.append(log_prob)
        images = decode(pipe, latents)
    timesteps = pipe.scheduler.timesteps.repeat(pos.shape[0], 1)
    return {"images": images, "latents": torch.stack(chain, dim=1),
            "log_probs": torch.stack(log_probs, dim=1), "timesteps": timesteps}


def decode(pipe: Any, latents: Any) -> Any:
    import torch

    with torch.no_grad():
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return ((image.float() + 1) / 2).clamp(0, 1)


def to_pil(images: Any) -> list[Any]:
    from PIL import Image

    arr = (images.detach().cpu().permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]
