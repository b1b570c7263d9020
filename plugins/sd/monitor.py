"""The overoptimization monitor and the paper's checkpoint-selection rule.

At the base model (epoch 0) and every ``eval_freq`` epochs, fixed evaluation prompts are sampled
with fixed seeds (the same noise at every evaluation) and scored by the training reward and by
held-out reward models. ``monitor.csv`` holds every score, ``monitor_summary.csv`` the mean per
epoch and reward, and ``monitor.png`` one curve per reward: the proxy reward rising while the
held-out ones fall is overoptimization.

Checkpoint selection (Kim et al.): the earliest checkpoint at which the number of evaluation
images scoring above the base model's image for the same prompt and seed is highest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.errors import HarnessError
from harness.io import atomic_path, write_text


class OveroptimizationMonitor:
    def __init__(self, prompts: Sequence[str], images_per_prompt: int, seed: int,
                 rewards: dict[str, Callable[..., Any]], out_dir: str | Path, training_reward: str):
        self.prompts = list(prompts)
        self.images_per_prompt = images_per_prompt
        self.seed = seed
        self.rewards = rewards
        self.out_dir = Path(out_dir)
        self.training_reward = training_reward
        self.rows: list[dict[str, Any]] = []

    def load(self, upto_epoch: int) -> None:
        """Resuming from the checkpoint of ``upto_epoch``: keep the evaluations written up to
        it (later ones belong to the interrupted run and are made again), read back exactly."""
        path = self.out_dir / "monitor.csv"
        if path.is_file():
            # pandas 3 reads floats back exactly by default (and deprecates the option); 2 needs it
            exact = {} if int(pd.__version__.split(".")[0]) >= 3 else {"float_precision": "round_trip"}
            frame = pd.read_csv(path, **exact)
            self.rows = frame[frame["epoch"] <= upto_epoch].to_dict(orient="records")

    def evaluate(self, pipe: Any, epoch: int, *, num_steps: int, guidance: float, eta: float,
                 resolution: int | None) -> pd.DataFrame:
        import torch

        from harness_plugins.sd.diffusion import encode_prompts, sample_with_logprob, to_pil

        self.rows = [r for r in self.rows if r["epoch"] != epoch]
        for p, prompt in enumerate(self.prompts):
            pos, neg = encode_prompts(pipe, [prompt] * self.images_per_prompt)
            images = []
            for k in range(self.images_per_prompt):
                g = torch.Generator().manual_seed(self.seed + 1000 * p + k)
                out = sample_with_logprob(pipe, pos[k:k + 1], neg[k:k + 1], num_steps=num_steps,
                                          guidance=guidance, eta=eta, generator=g, resolution=resolution)
                if not bool(torch.isfinite(out["images"]).all()):
                    raise HarnessError(
                        f"overoptimization monitor, epoch {epoch}: the model produced non-finite "
                        f"images for evaluation prompt {prompt!r}; set mixed_precision: bf16 or no, "
                        "or lower train_learning_rate")
                images += to_pil(out["images"])
            for name, fn in self.rewards.items():
                scores = np.asarray(fn(images, [prompt] * len(images)), dtype=np.float64)
                if scores.shape != (len(images),) or not np.isfinite(scores).all():
                    found = (f"{scores.size} values for {len(images)} images"
                             if scores.shape != (len(images),) else
                             f"{scores[~np.isfinite(scores)][0]}")
                    raise HarnessError(
                        f"overoptimization monitor, epoch {epoch}: reward '{name}' returned "
                        f"{found} for evaluation prompt {prompt!r}; fix or remove that reward "
                        "(heldout_rewards), then continue with --resume")
                for k, s in enumerate(scores):
                    self.rows.append({"epoch": epoch, "prompt": prompt, "seed_index": k,
                                      "reward": name, "score": float(s)})
        self.write()
        return self.summary()

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["epoch", "prompt", "seed_index", "reward", "score"])

    def summary(self) -> pd.DataFrame:
        return self.frame().groupby(["epoch", "reward"], as_index=False)["score"].mean()

    def write(self) -> None:
        frame = self.frame()
        write_text(self.out_dir / "monitor.csv", frame.to_csv(index=False))
        write_text(self.out_dir / "monitor_summary.csv", self.summary().to_csv(index=False))
        self.plot()

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt

        summary = self.summary()
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, g in summary.groupby("reward", sort=False):
            style = "-o" if name == self.training_reward else "--s"
            label = f"{name} (training)" if name == self.training_reward else f"{name} (held-out)"
            # Rewards live on different scales: plot the change from the base model.
            base = g[g["epoch"] == g["epoch"].min()]["score"].iloc[0]
            ax.plot(g["epoch"], g["score"] - base, style, label=label)
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xlabel("epoch")
        ax.set_ylabel("mean reward - base model's")
        ax.set_title("Overoptimization monitor (fixed prompts and seeds)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        with atomic_path(self.out_dir / "monitor.png") as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)

    def select_checkpoint(self, epochs: Sequence[int], reward: str | None = None) -> dict[str, Any]:
        """The earliest of ``epochs`` whose images beat the base model's most often."""
        reward = reward or self.training_reward
        frame = self.frame()
        frame = frame[frame["reward"] == reward]
        base_epoch = frame["epoch"].min()
        base = frame[frame["epoch"] == base_epoch].set_index(["prompt", "seed_index"])["score"]
        counts = {}
        for e in sorted(epochs):
            cur = frame[frame["epoch"] == e].set_index(["prompt", "seed_index"])["score"]
            if cur.empty:
                continue
            counts[int(e)] = int((cur > base.reindex(cur.index)).sum())
        if not counts:
            return {"epoch": None, "wins": {}, "reward": reward}
        best = max(counts.values())
        chosen = min(e for e, c in counts.items() if c == best)
        return {"epoch": chosen, "wins": counts, "reward": reward, "images": int(len(base))}
