"""What the SFT and DDPO fine-tuners share: set-up, checkpoints, exact resume, logs, monitor.

Determinism: every random draw of epoch ``e`` comes from generators seeded with
``(seed, e, ...)``, and a checkpoint holds the adapters (or UNet), the optimizer state and the
trainer state (epoch, step, per-prompt reward statistics), so a run resumed from a checkpoint
continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from harness.errors import HarnessError
from harness.io import write_json, write_text
from harness.types import FineTuner, FineTuneResult, FineTuneSettings
from harness_plugins.sd.config import FineTuneConfig

log = logging.getLogger("harness.finetune")


def _world() -> tuple[int, int]:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:  # pragma: no cover
        pass
    return 0, 1


def seeded(*parts: int) -> Any:
    """A CPU torch.Generator seeded deterministically from integers."""
    import torch

    seed = int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])
    return torch.Generator().manual_seed(seed)


class RewardTrainer:
    """Base of the fine-tuners: subclasses implement :meth:`epoch`."""

    kind = "base"

    def __init__(self, config: FineTuneConfig, reward: Callable[..., Any] | None = None,
                 pipeline: Any = None, heldout: dict[str, Callable[..., Any]] | None = None,
                 progress: bool = False):
        """``reward``: a callable ``(images, prompts) -> [B]`` (None: the one the config's
        reward settings describe); ``pipeline``: an already loaded pipeline (tests)."""
        import torch

        from harness.finetune.reward import reward_from_settings, reward_label
        from harness_plugins.sd.diffusion import add_lora, load_pipeline

        config.validate()
        self.config = config
        self.prompts = config.training_prompts()
        self.device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.on_gpu = self.device.startswith("cuda")
        dtype = {"fp16": "float16", "bf16": "bfloat16"}.get(config.mixed_precision, "float32")
        self.dtype = dtype if self.on_gpu else "float32"
        self.out = Path(config.output_dir).expanduser()
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(config.seed)
        self.pipe = pipeline if pipeline is not None else load_pipeline(
            config.base_model, config.revision, self.device, self.dtype)
        if reward is None:
            reward = reward_from_settings(config, device=self.device)
        if not callable(reward):
            raise HarnessError(f"reward must be a callable (images, prompts) -> scores, got {reward!r}")
        self.reward = reward
        self.reward_name = reward_label(reward)
        unet = self.pipe.unet
        if config.use_lora:
            self.params = add_lora(unet, config.lora_rank, config.lora_alpha)
        else:
            unet.requires_grad_(True)
            self.params = list(unet.parameters())
        self.optimizer = torch.optim.AdamW(
            self.params, lr=config.train_learning_rate,
            betas=(config.train_adam_beta1, config.train_adam_beta2),
            weight_decay=config.train_adam_weight_decay, eps=config.train_adam_epsilon,
        )
        self.epoch_done = 0
        self.global_step = 0
        self.history: list[dict[str, Any]] = []
        self.monitor = None
        if config.eval_prompts and config.eval_freq:
            from harness.finetune.reward import RewardFunction
            from harness_plugins.sd.monitor import OveroptimizationMonitor

            rewards = {self.reward_name: self.reward}
            for spec in config.heldout_rewards:
                rewards[spec] = RewardFunction(spec, device=self.device)
            rewards.update(heldout or {})
            self.monitor = OveroptimizationMonitor(
                config.eval_prompts, config.eval_images_per_prompt, config.eval_seed, rewards,
                self.out, self.reward_name)
        self.progress = progress
        self.rank, self.world = _world()
        #: called with each checkpoint folder after it is written (Ray Train reports it)
        self.on_checkpoint: Callable[[Path | None, dict[str, Any]], None] | None = None
        if config.resume_from:
            self.resume(config.resume_from)

    # -- hooks for subclasses ---------------------------------------------------------------
    def epoch(self, e: int) -> dict[str, Any]:
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        return {}

    def after_epoch(self, saved: Path | None, logs: dict[str, Any]) -> None:
        """After every epoch on every worker (``saved``: the checkpoint this worker wrote, if
        any): calls :attr:`on_checkpoint`. Tests override it to look inside the trainer."""
        if self.on_checkpoint is not None:
            self.on_checkpoint(saved, logs)

    def load_state(self, state: dict[str, Any]) -> None:
        pass

    # -- the loop ----------------------------------------------------------------------------
    def check_rewards(self, rewards: np.ndarray, prompts: list[str], epoch: int) -> np.ndarray:
        rewards = np.asarray(rewards, dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(rewards))
        if bad.size:
            last = self.latest_checkpoint()
            raise HarnessError(
                f"reward '{self.reward_name}' returned {rewards[bad[0]]} at epoch {epoch} "
                f"(step {self.global_step}) for prompt {prompts[bad[0]]!r}; stopped. "
                f"Last checkpoint: {last or 'none'}"
            )
        return rewards

    def autocast(self) -> Any:
        import contextlib

        import torch

        if not self.on_gpu or self.dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=getattr(torch, self.dtype))

    # -- data parallelism (torch.distributed, e.g. under Ray Train) ---------------------------
    def mine(self, items: range) -> list[int]:
        """This worker's share of ``items`` (all of them when not distributed)."""
        return [i for i in items if i % self.world == self.rank]

    def gather(self, obj: Any) -> list[Any]:
        """Every worker's ``obj``, in rank order."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def sync_gradients(self) -> None:
        """Average the trainable parameters' gradients over workers (what DDP does)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        for p in self.params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world

    def optimizer_step(self) -> None:
        """Average gradients over workers, clip them, step, and count the step."""
        import torch

        self.sync_gradients()
        torch.nn.utils.clip_grad_norm_(self.params, self.config.train_max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1

    def evaluate(self, epoch: int) -> None:
        if self.monitor is None or self.rank != 0:
            return
        c = self.config
        self.monitor.evaluate(self.pipe, epoch, num_steps=c.sample_num_steps,
                              guidance=c.sample_guidance_scale, eta=c.sample_eta,
                              resolution=c.resolution)

    def train(self) -> dict[str, Any]:
        """Run the remaining epochs; returns the log, checkpoints and the selected checkpoint."""
        c = self.config
        if self.epoch_done == 0 and self.monitor is not None:
            self.evaluate(0)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=c.num_epochs, initial=self.epoch_done, unit="epoch", desc=self.kind)
        try:
            for e in range(self.epoch_done + 1, c.num_epochs + 1):
                start = time.perf_counter()
                logs = self.epoch(e)
                logs.update({"epoch": e, "global_step": self.global_step,
                             "seconds": round(time.perf_counter() - start, 3)})
                self.history.append(logs)
                self.epoch_done = e
                if c.eval_freq and e % c.eval_freq == 0:
                    self.evaluate(e)
                saved = None
                if self.rank == 0:
                    if e % c.save_freq == 0 or e == c.num_epochs:
                        saved = self.save_checkpoint()
                    self.write_log()
                self.after_epoch(saved, logs)
                if bar is not None:
                    bar.set_postfix(reward=f"{logs.get('reward_mean', float('nan')):.4f}")
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        result = {"log": self.history, "checkpoints": [str(p) for p in self.checkpoints()]}
        if self.monitor is not None and self.rank == 0:
            epochs = [int(p.name.split("-")[1]) for p in self.checkpoints()]
            result["selected"] = self.monitor.select_checkpoint(epochs)
            write_json(self.out / "selected_checkpoint.json", result["selected"])
        return result

    def write_log(self) -> None:
        import pandas as pd

        write_text(self.out / "train_log.csv", pd.DataFrame(self.history).to_csv(index=False))

    # -- checkpoints -------------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        folder = self.out / "checkpoints"
        return sorted(folder.glob("epoch-*")) if folder.is_dir() else []

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def save_checkpoint(self) -> Path:
        import shutil

        import torch

        from harness_plugins.sd.diffusion import save_lora

        final = self.out / "checkpoints" / f"epoch-{self.epoch_done:04d}"
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if self.config.use_lora:
            save_lora(self.pipe.unet, tmp)
        else:
            self.pipe.unet.save_pretrained(tmp / "unet")
        torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        write_json(tmp / "trainer_state.json", {
            "epoch": self.epoch_done, "global_step": self.global_step, "kind": self.kind,
            "history": self.history, "state": self.state(),
            "config": {k: v for k, v in vars(self.config).items()},
        })
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)  # a checkpoint is complete or absent, never half-written
        return final

    def resume(self, where: str) -> None:
        import torch

        from harness_plugins.sd.diffusion import load_lora

        folder = self.latest_checkpoint() if where == "latest" else Path(where).expanduser()
        if folder is None:
            log.warning("resume_from=latest but no checkpoint in %s: starting fresh", self.out)
            return
        if not (folder / "trainer_state.json").is_file():
            raise HarnessError(f"'{folder}' is not a checkpoint (no trainer_state.json)")
        state = json.loads((folder / "trainer_state.json").read_text())
        if state.get("kind") != self.kind:
            raise HarnessError(f"checkpoint '{folder}' is from a {state.get('kind')} run, not {self.kind}")
        if self.config.use_lora:
            load_lora(self.pipe.unet, folder)
        else:
            from diffusers import UNet2DConditionModel

            loaded = UNet2DConditionModel.from_pretrained(folder / "unet")
            self.pipe.unet.load_state_dict(loaded.state_dict())
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
        self.epoch_done = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.history = list(state["history"])
        self.load_state(state.get("state", {}))


class TrainerFineTuner(FineTuner):
    """A FineTuner plugin backed by a :class:`RewardTrainer` subclass and its config class."""

    config_class: ClassVar[type[FineTuneConfig]] = FineTuneConfig
    trainer_class: ClassVar[type[RewardTrainer]] = RewardTrainer

    def train(
        self,
        config: FineTuneSettings,
        reward: Callable[[Sequence[Any], Sequence[str]], Any],
        *,
        progress: bool = False,
        on_checkpoint: Callable[[Path | None, dict[str, Any]], None] | None = None,
    ) -> FineTuneResult:
        if not isinstance(config, self.config_class):
            raise HarnessError(f"fine-tuner '{self.id}' needs a {self.config_class.__name__}, "
                               f"got a {type(config).__name__}")
        trainer = self.trainer_class(config, reward=reward, progress=progress)
        trainer.on_checkpoint = on_checkpoint
        out = trainer.train()
        return FineTuneResult(output_dir=str(trainer.out), checkpoints=out["checkpoints"],
                              log=out["log"], selected=out.get("selected"))
