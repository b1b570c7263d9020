"""What the SFT and DDPO fine-tuners share: set-up, checkpoints, exact resume, logs, monitor.

Determinism: every random draw of epoch ``e`` comes from generators seeded with
``(seed, e, ...)``, and a checkpoint holds the adapters (or UNet), the optimizer state and the
trainer state (epoch, step, per-prompt reward statistics), so a run resumed from a checkpoint
continues exactly as an uninterrupted one.

Nothing non-finite is trained on or saved: a non-finite reward, sample, loss, gradient or
parameter stops the run with a :class:`HarnessError` naming the epoch and the optimizer step
(counted from 1 over the run, as ``global_step`` in ``train_log.csv``), before the optimizer step
or checkpoint it would spoil. A checkpoint is written into a hidden ``.tmp-*`` folder, its files
synced and listed with their sizes in ``trainer_state.json`` (written last), then renamed to
``epoch-NNNN``; a folder that is not complete by that record is never listed, selected or resumed
from, and ``resume_from: latest`` removes it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
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


STATE_FILE = "trainer_state.json"
_CHECKPOINT_NAME = re.compile(r"epoch-\d{4,}")


def is_partial_checkpoint(name: str) -> bool:
    """A checkpoint being written (``.tmp-epoch-NNNN-PID``, or ``epoch-NNNN.tmp`` of earlier
    versions): left behind only by a run killed or failed while saving."""
    return name.startswith(".tmp-epoch-") or (name.startswith("epoch-") and name.endswith(".tmp"))


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a complete checkpoint, or None when it is.

    Complete: ``trainer_state.json`` (written last) parses and every file it lists has the size
    it records. A checkpoint from before sizes were recorded needs its weights and optimizer state.
    """
    state_path = folder / STATE_FILE
    if not state_path.is_file():
        return f"no {STATE_FILE}"
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"unreadable {STATE_FILE}"
    if not isinstance(state, dict) or not isinstance(state.get("epoch"), int):
        return f"{STATE_FILE} records no epoch"
    files = state.get("files")
    if files is None:  # written before sizes were recorded
        weights = ("pytorch_lora_weights.safetensors", "unet/config.json")
        if not any((folder / w).is_file() for w in weights):
            return "no weights"
        files = {"optimizer.pt": None}
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        actual = path.stat().st_size
        if size is not None and actual != size:
            return f"{name} has {actual} bytes, not the {size} recorded (truncated)"
    return None


def _fsync(path: Path) -> None:
    """Flush a file to disk (a full disk can surface only here), or a folder's entries (where
    the file system allows it), so a checkpoint renamed complete survives a crash."""
    folder = path.is_dir()
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if folder:  # pragma: no cover - platforms that cannot open folders
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not folder:
            raise
    finally:
        os.close(fd)


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
        self.rank, self.world = _world()
        #: under torch.distributed (Ray Train) restarts are Ray's: it picks the checkpoint
        import torch.distributed as dist

        self.distributed = dist.is_available() and dist.is_initialized()
        if not config.resume_from and not self.distributed:
            self.check_fresh_start()
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
        #: parameter names for error messages
        self.param_names = {id(p): name for name, p in unet.named_parameters()}
        #: the epoch being trained, and the first non-finite loss since the last optimizer step
        self.current_epoch = 0
        self._bad_loss: float | None = None
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
    def stopped(self, epoch: int, what: str, fix: str, step: int | None = None) -> HarnessError:
        """The one-line error that stops the run in ``epoch`` at optimizer ``step`` (default:
        the next one, ``global_step + 1``); nothing of the epoch is saved, earlier checkpoints
        are kept."""
        last = self.latest_checkpoint()
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        step = self.global_step + 1 if step is None else step
        return HarnessError(f"stopped at epoch {epoch}, step {step}: {what}; "
                            f"nothing of this epoch was saved and {kept}. {fix}")

    def divergence_fix(self) -> str:
        """What to change when training diverges (the settings that cause it, with their values)."""
        c = self.config
        fix = f"Lower train_learning_rate (now {c.train_learning_rate:g})"
        if self.dtype == "float16":
            fix += " or set mixed_precision: bf16 or no (float16 overflows)"
        elif self.dtype == "bfloat16":
            fix += " or set mixed_precision: no"
        if self.latest_checkpoint() is None:
            return fix + ", then run again"
        return fix + ", then continue from the last good checkpoint with --resume"

    def rewards_for(self, images: list[Any], prompts: list[str], epoch: int) -> np.ndarray:
        """The reward of each image as float64 ``[B]``; a reward that fails (a HarnessError, e.g.
        a reward model's NaN) or returns a wrong shape, NaN or infinity stops the run."""
        try:
            rewards = self.reward(images, prompts)
        except HarnessError as exc:
            raise self.stopped(epoch, str(exc).rstrip("."), "Fix the reward, then continue with "
                                                            "--resume") from exc
        return self.check_rewards(rewards, prompts, epoch)

    def check_rewards(self, rewards: Any, prompts: list[str], epoch: int) -> np.ndarray:
        """``rewards`` as float64 ``[B]``; a wrong shape, NaN or infinity stops the run."""
        values = np.asarray(rewards, dtype=np.float64)
        if values.shape != (len(prompts),):
            raise self.stopped(epoch, f"reward '{self.reward_name}' returned an array of shape "
                                      f"{values.shape} for {len(prompts)} images",
                               "The reward must return one number per image")
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise self.stopped(
                epoch, f"reward '{self.reward_name}' returned {values[bad[0]]} for prompt "
                       f"{prompts[bad[0]]!r} ({bad.size} of {values.size} images non-finite)",
                "Fix the reward (or the images it cannot score), then continue with --resume")
        return values

    def check_samples(self, out: dict[str, Any], epoch: int) -> None:
        """Stop when sampling produced NaN or infinite latents, log-probabilities or images."""
        import torch

        for key in ("latents", "log_probs", "images"):
            if key in out and not bool(torch.isfinite(out[key]).all()):
                if self.dtype == "float16":
                    fix = "Set mixed_precision: bf16 or no (the UNet or VAE overflows in float16)"
                elif self.global_step == 0:
                    fix = ("The base model itself produces them: check base_model "
                           f"({self.config.base_model})")
                else:
                    fix = self.divergence_fix()
                raise self.stopped(epoch, f"sampling produced non-finite {key}", fix)

    def record_loss(self, loss: Any) -> float:
        """A training loss as a float; a non-finite one stops the run at the next optimizer step
        (on every worker at once)."""
        value = float(loss.detach())
        if not math.isfinite(value) and self._bad_loss is None:
            self._bad_loss = value
        return value

    def nonfinite(self, grads: bool = False) -> tuple[int, int, str]:
        """``(bad, of, first)``: how many trainable parameter tensors (or, with ``grads``, their
        gradients) hold a NaN or infinity, out of how many, and the first one's name."""
        import torch

        params = [p for p in self.params if not grads or p.grad is not None]
        if not params:
            return 0, 0, ""
        finite = torch.stack([torch.isfinite(p.grad if grads else p).all() for p in params])
        bad = [i for i, ok in enumerate(finite.cpu().tolist()) if not ok]
        name = self.param_names.get(id(params[bad[0]]), "?") if bad else ""
        return len(bad), len(params), name

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

    def check_losses(self) -> None:
        """Stop every worker when any worker recorded a non-finite loss since the last step."""
        bad, self._bad_loss = self._bad_loss, None
        anywhere = bad is not None
        if self.world > 1:
            import torch
            import torch.distributed as dist

            flag = torch.tensor([float(anywhere)], device=self.params[0].device)
            dist.all_reduce(flag)
            anywhere = bool(flag.item() > 0)
        if anywhere:
            value = f"the loss is {bad}" if bad is not None else "another worker's loss is non-finite"
            raise self.stopped(self.current_epoch, value, self.divergence_fix())

    def optimizer_step(self) -> None:
        """Average gradients over workers, clip them, step, and count the step.

        Stops the run, before the step, on a non-finite loss or gradient, and, before any
        checkpoint could hold them, on parameters the step made non-finite."""
        import torch

        self.check_losses()
        self.sync_gradients()
        # clip_grad_norm_ in its two halves, to look at the gradients before a NaN norm scales
        # them all to NaN
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if not math.isfinite(float(norm)):
            bad, of, first = self.nonfinite(grads=True)
            what = (f"non-finite gradient (NaN or infinity in {bad} of {of} tensors, first {first})"
                    if bad else "the gradient norm overflowed (gradients above ~1e19)")
            raise self.stopped(self.current_epoch, what, self.divergence_fix())
        torch.nn.utils.clip_grads_with_norm_(self.params, self.config.train_max_grad_norm, norm)
        try:
            self.optimizer.step()
        except RuntimeError as exc:  # "value cannot be converted to type float without overflow"
            if "overflow" not in str(exc):
                raise
            raise self.stopped(self.current_epoch, "the optimizer's update overflowed float32",
                               self.divergence_fix()) from exc
        self.optimizer.zero_grad(set_to_none=True)
        bad, of, first = self.nonfinite()
        if bad:
            raise self.stopped(self.current_epoch, f"the optimizer step made {bad} of {of} "
                                                   f"parameter tensors non-finite (first {first})",
                               self.divergence_fix())
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
                self.current_epoch = e
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
        except HarnessError:
            self.select()  # among the good checkpoints written before the stop
            raise
        finally:
            if bar is not None:
                bar.close()
        result = {"log": self.history, "checkpoints": [str(p) for p in self.checkpoints()]}
        selected = self.select()
        if selected is not None:
            result["selected"] = selected
        return result

    def select(self) -> dict[str, Any] | None:
        """Apply the checkpoint-selection rule to the checkpoints written so far and record it in
        ``selected_checkpoint.json`` (rank 0, with a monitor); None otherwise."""
        if self.monitor is None or self.rank != 0:
            return None
        epochs = [int(p.name.split("-")[1]) for p in self.checkpoints()]
        selected = self.monitor.select_checkpoint(epochs)
        try:
            write_json(self.out / "selected_checkpoint.json", selected)
        except OSError as exc:
            raise HarnessError(f"cannot write {self.out / 'selected_checkpoint.json'}: "
                               f"{exc.strerror or exc}") from exc
        return selected

    def write_log(self) -> None:
        import pandas as pd

        write_text(self.out / "train_log.csv", pd.DataFrame(self.history).to_csv(index=False))

    # -- checkpoints -------------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        """The complete checkpoints in ``output_dir/checkpoints``, oldest first."""
        return complete_checkpoints(self.out)

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def clean_checkpoints(self) -> list[str]:
        """Remove what a run killed (or failed on a full disk) while saving left behind: partial
        folders and ``epoch-NNNN`` folders that are not complete. Returns what was removed."""
        folder = self.out / "checkpoints"
        removed = []
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            if not path.is_dir():
                continue
            if is_partial_checkpoint(path.name):
                why = "a checkpoint being written when the run stopped"
            elif _CHECKPOINT_NAME.fullmatch(path.name):
                why = checkpoint_problem(path)
                if why is None:
                    continue
            else:
                continue
            log.warning("removing incomplete checkpoint %s (%s)", path, why)
            shutil.rmtree(path)
            removed.append(f"{path.name} ({why})")
        return removed

    def check_fresh_start(self) -> None:
        """A run that does not resume must not mix its checkpoints with an earlier run's."""
        found = self.checkpoints()
        if found:
            raise HarnessError(
                f"output_dir '{self.out}' already holds checkpoints of a run ({found[0].name} to "
                f"{found[-1].name}): continue it with --resume (resume_from: latest), or choose "
                "another output_dir")

    def probe(self) -> bool:
        """Whether the UNet, as trained so far, gives a finite classifier-free-guided prediction
        for fixed noise and the first training prompt at the noisiest timestep: weights can be
        finite yet overflow every forward pass, and such weights are no good checkpoint. Draws
        no training randomness and changes no state."""
        import torch

        from harness_plugins.sd.diffusion import encode_prompts, unet_guided

        pipe, c = self.pipe, self.config
        scale = pipe.vae_scale_factor
        size = (c.resolution or pipe.unet.config.sample_size * scale) // scale
        noise = torch.randn((1, pipe.unet.config.in_channels, size, size),
                            generator=seeded(c.seed, 30_000))
        pos, neg = encode_prompts(pipe, self.prompts[:1])
        t = torch.tensor(pipe.scheduler.config.num_train_timesteps - 1, device=pipe.device)
        training = pipe.unet.training
        pipe.unet.eval()
        try:
            with torch.no_grad(), self.autocast():
                pred = unet_guided(pipe, noise.to(pipe.device, pos.dtype), t, pos, neg,
                                   c.sample_guidance_scale)
        finally:
            pipe.unet.train(training)
        return bool(torch.isfinite(pred).all())

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/epoch-NNNN`` whole or not at all: into ``.tmp-epoch-NNNN-PID``,
        every file synced and its size recorded in ``trainer_state.json`` (written last), then
        renamed. Non-finite weights or optimizer state are never written."""
        import torch

        from harness_plugins.sd.diffusion import save_lora

        bad, of, first = self.nonfinite()
        moments = [v for st in self.optimizer.state.values() for v in st.values()
                   if torch.is_tensor(v) and v.is_floating_point()]
        if bad or not all(bool(torch.isfinite(v).all()) for v in moments):
            what = (f"{bad} of {of} parameter tensors are non-finite (first {first})" if bad
                    else "the optimizer state is non-finite")
        elif not self.probe():
            what = "the weights after this step make the UNet's output non-finite"
        else:
            what = None
        if what is not None:
            raise self.stopped(self.epoch_done, what, self.divergence_fix(), step=self.global_step)
        folder = self.out / "checkpoints"
        final = folder / f"epoch-{self.epoch_done:04d}"
        tmp = folder / f".tmp-{final.name}-{os.getpid()}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            if self.config.use_lora:
                save_lora(self.pipe.unet, tmp)
            else:
                self.pipe.unet.save_pretrained(tmp / "unet")
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            files = {}
            for path in sorted(tmp.rglob("*")):
                if path.is_file():
                    _fsync(path)
                    files[path.relative_to(tmp).as_posix()] = path.stat().st_size
            write_json(tmp / STATE_FILE, {
                "epoch": self.epoch_done, "global_step": self.global_step, "kind": self.kind,
                "history": self.history, "state": self.state(), "files": files,
                "config": {k: v for k, v in vars(self.config).items()},
            })
            _fsync(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync(folder)
        except Exception as exc:
            from safetensors import SafetensorError

            if not isinstance(exc, (OSError, RuntimeError, SafetensorError)):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            last = self.latest_checkpoint()
            raise HarnessError(
                f"cannot write checkpoint {final}: {getattr(exc, 'strerror', None) or exc}; the "
                f"partial folder was removed and the last complete checkpoint is {last or 'none'}. "
                "Free disk space (or fix permissions), then continue with --resume") from exc
        return final

    def resume(self, where: str) -> None:
        """Continue from a checkpoint folder, or with ``latest`` from the newest complete one
        in ``output_dir`` (removing incomplete ones first; none: start fresh)."""
        import torch

        from harness_plugins.sd.diffusion import load_lora

        if where == "latest":
            self.clean_checkpoints()
            folder = self.latest_checkpoint()
            if folder is None:
                log.warning("resume_from=latest but no checkpoint in %s: starting fresh", self.out)
                return
        else:
            folder = Path(where).expanduser()
            problem = checkpoint_problem(folder) if folder.is_dir() else "not a folder"
            if problem:
                raise HarnessError(f"resume_from '{folder}' is not a complete checkpoint ({problem}): "
                                   "give an epoch-NNNN folder this fine-tuner wrote, or 'latest'")
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        if state.get("kind") != self.kind:
            raise HarnessError(f"checkpoint '{folder}' is from a {state.get('kind')} run, not {self.kind}")
        later = [p.name for p in self.checkpoints() if int(p.name.split("-")[1]) > state["epoch"]]
        if later and not self.distributed:
            raise HarnessError(
                f"output_dir '{self.out}' holds checkpoints after the one resumed from ({folder}): "
                f"{', '.join(later)}; resume into another output_dir, or remove them")
        try:
            if self.config.use_lora:
                load_lora(self.pipe.unet, folder)
            else:
                from diffusers import UNet2DConditionModel

                loaded = UNet2DConditionModel.from_pretrained(folder / "unet")
                self.pipe.unet.load_state_dict(loaded.state_dict())
            optimizer_state = torch.load(folder / "optimizer.pt", weights_only=True)
        except HarnessError:
            raise
        except Exception as exc:  # noqa: BLE001 - a damaged file, whatever the loader raises
            raise HarnessError(f"cannot load checkpoint '{folder}': {type(exc).__name__}: "
                               f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}; "
                               "resume from an earlier checkpoint folder") from exc
        self.optimizer.load_state_dict(optimizer_state)
        # The config's optimizer settings, not the checkpoint's, so that a run resumed with a
        # lower learning rate (after a divergence) uses it; unchanged settings change nothing.
        c = self.config
        for group in self.optimizer.param_groups:
            group.update(lr=c.train_learning_rate, betas=(c.train_adam_beta1, c.train_adam_beta2),
                         weight_decay=c.train_adam_weight_decay, eps=c.train_adam_epsilon)
        self.epoch_done = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.history = list(state["history"])
        self.load_state(state.get("state", {}))
        if self.monitor is not None:
            self.monitor.load(upto_epoch=self.epoch_done)


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """The complete checkpoints in ``output_dir/checkpoints``, oldest first."""
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _CHECKPOINT_NAME.fullmatch(p.name) and p.is_dir()]
    return sorted((p for p in found if checkpoint_problem(p) is None),
                  key=lambda p: int(p.name.split("-")[1]))


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

    def result(self, config: FineTuneSettings) -> FineTuneResult:
        """What rank 0 wrote: ``train_log.csv``, the complete ``checkpoints/epoch-*`` folders and
        ``selected_checkpoint.json``, if any."""
        import json

        import pandas as pd

        out = Path(config.output_dir).expanduser()
        log = out / "train_log.csv"
        selected = out / "selected_checkpoint.json"
        return FineTuneResult(
            output_dir=str(out),
            checkpoints=[str(p) for p in complete_checkpoints(out)],
            log=pd.read_csv(log).to_dict(orient="records") if log.is_file() else [],
            selected=json.loads(selected.read_text()) if selected.is_file() else None,
        )
