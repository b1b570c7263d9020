"""An example t2i-harness plugin distribution: one small plugin of every kind.

Everything here is about colours, so it needs no weights, no GPU and nothing beyond numpy and
Pillow, and every number can be checked by hand:

- ``example-color`` (:class:`ColorReward`, a reward model): minus the distance between an
  image's mean colour and the colour its prompt names;
- ``example-margin`` (:class:`MarginNormalizer`, a normalizer): the own prompt's score minus the
  best contrastive prompt's score;
- ``example-swap`` (:class:`ColorSwapGenerator`, a prompt-set generator): "a red square" ->
  "a green square", "a blue square", ...;
- ``example-rgb`` (:class:`ColorTuner`, a fine-tuner): improves a one-colour "generator" (three
  numbers) against any reward by random search;
- ``example-swatches`` (:class:`SwatchBenchmark`, a benchmark): human votes on images, read from
  ``labels.csv`` in its data folder;
- the command ``harness example-colors``.

Each class implements only what its contract in :mod:`harness.types` requires, plus the few
declarations it needs.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from harness import (
    Benchmark,
    BenchmarkData,
    FineTuner,
    FineTuneResult,
    FineTuneSettings,
    HarnessError,
    Normalizer,
    PromptSetGenerator,
    RewardModel,
    hookimpl,
)
from harness.types import to_rgb

#: colour word -> RGB in [0, 1]
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0), "green": (0.0, 0.5, 0.0), "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0), "black": (0.0, 0.0, 0.0), "white": (1.0, 1.0, 1.0),
    "orange": (1.0, 0.65, 0.0), "purple": (0.5, 0.0, 0.5), "pink": (1.0, 0.75, 0.8),
}


_WORD = re.compile(r"\b(" + "|".join(COLORS) + r")\b", re.IGNORECASE)


def color_word(prompt: str) -> re.Match | None:
    """Where the first colour word of ``prompt`` is ("A Red apple." -> "Red"), or None."""
    return _WORD.search(prompt)


# -- reward model ---------------------------------------------------------------------------------
class ColorReward(RewardModel):
    """Score in [-sqrt(3), 0]: minus the RGB distance between the image's mean colour and the
    prompt's first colour word; 0 for a prompt that names no colour.

    No ``__init__``: the base class's ``(checkpoint=None, device="cpu", dtype="float32")`` is
    all it needs (there is no checkpoint, so :meth:`files` is empty and the cache key is the
    class's source and :attr:`preprocessing_version`).
    """

    id = "example-color"
    preprocessing_version = "1"

    def preprocess(self, image):
        # The image comes as opened (P, L, RGBA, CMYK, ...): convert it the way transformers'
        # processors do (transparent pixels onto white), then shrink it.
        small = to_rgb(image).resize((32, 32))
        return np.asarray(small, dtype=np.float32).transpose(2, 0, 1) / 255.0  # [3, 32, 32]

    def embed_images(self, batch):
        return np.asarray(batch, dtype=np.float32).mean(axis=(2, 3))  # [B, 3] mean RGB

    def score(self, features, prompts):
        out = []
        for feature, image_prompts in zip(features, prompts, strict=True):
            scores = []
            for prompt in image_prompts:
                word = color_word(prompt)
                if word is None:
                    scores.append(0.0)
                    continue
                target = np.asarray(COLORS[word.group(1).lower()], dtype=np.float32)
                scores.append(-float(np.linalg.norm(feature - target)))
            out.append(np.asarray(scores, dtype=np.float32))
        return out


# -- normalizer -----------------------------------------------------------------------------------
class MarginNormalizer(Normalizer):
    """How much better the image fits its own prompt than the best contrastive prompt:
    ``score[:, 0] - max(score[:, 1:])``, summed over the reward models given.

    Only ``__call__``: no hyperparameters (nothing to tune), no batched fast path. Each image is
    normalised on its own, so it also works as a fine-tuning reward.
    """

    id = "example-margin"
    needs_contrastive = True  # columns 1..C must be there

    def __call__(self, scores):
        total = 0.0
        for values in scores.values():
            values = np.asarray(values, dtype=np.float64)  # [N, 1 + C]
            total = total + values[:, 0] - values[:, 1:].max(axis=1)
        return np.asarray(total, dtype=np.float64)  # [N]


# -- prompt-set generator -------------------------------------------------------------------------
class ColorSwapGenerator(PromptSetGenerator):
    """Contrastive prompts by swapping the first colour word for the others, in the order of
    :data:`COLORS`: "a red square" -> ["a green square", "a blue square", ...].

    :param n: keep at most ``n`` contrastive prompts per prompt (``harness prompts generate
        --n``); the core passes only the settings a constructor declares.
    """

    id = "example-swap"

    def __init__(self, n: int | None = None):
        if n is not None and n < 1:
            raise HarnessError(f"example-swap: n must be >= 1, got {n}")
        self.n = n

    def generate(self, prompts):
        out = {}
        for prompt in prompts:
            word = color_word(prompt)
            own = word.group(1).lower() if word else None
            swaps = [prompt[: word.start()] + other + prompt[word.end():]
                     for other in COLORS if word and other != own]
            out[prompt] = swaps[: self.n]
        return out


# -- fine-tuner -----------------------------------------------------------------------------------
@dataclass
class ColorTunerConfig(FineTuneSettings):
    """The fine-tuner's settings: the core's :class:`FineTuneSettings` plus its own."""

    reward: str | list[str] = "example-color"
    contrastive_prompts: str = "example-swap"
    output_dir: str = "runs/example-rgb"
    epochs: int = 5
    candidates: int = 8  #: colours tried per epoch
    step: float = 0.25  #: standard deviation of a try, in RGB units of [0, 1]
    size: int = 16  #: side of the generated images, in pixels

    def validate(self) -> None:
        super().validate()
        for key in ("epochs", "candidates", "size"):
            if getattr(self, key) < 1:
                raise HarnessError(f"config '{key}' must be >= 1, got {getattr(self, key)}")
        if self.step <= 0:
            raise HarnessError(f"config 'step' must be > 0, got {self.step}")


class ColorTuner(FineTuner):
    """Fine-tunes a "generator" that paints every prompt in one colour (three numbers).

    Each epoch draws ``candidates`` colours around the current one, paints one image per
    training prompt in each, and keeps the colour with the highest mean reward (the current
    colour is always a candidate, so the logged reward never falls). Every epoch writes
    ``epoch-K/color.json`` under ``output_dir`` and appends to ``log.jsonl``.
    """

    id = "example-rgb"
    config_class = ColorTunerConfig

    def train(self, config, reward, *, progress=False, on_checkpoint=None):
        from PIL import Image

        prompts = config.training_prompts()
        out = Path(config.output_dir).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(config.seed)
        color, first_epoch = np.full(3, 0.5), 1  # start from grey
        start = self._resume_point(config, out)
        if start is None:
            (out / "log.jsonl").unlink(missing_ok=True)
        else:
            state = json.loads((start / "color.json").read_text(encoding="utf-8"))
            color, first_epoch = np.asarray(state["color"]), state["epoch"] + 1
            rng = np.random.default_rng([config.seed, first_epoch])

        def mean_reward(c):
            rgb = tuple(int(round(255 * v)) for v in c)
            images = [Image.new("RGB", (config.size, config.size), rgb) for _ in prompts]
            return float(np.mean(reward(images, prompts)))

        result = FineTuneResult(output_dir=str(out))
        for epoch in range(first_epoch, first_epoch + config.epochs):
            tries = [color] + [np.clip(color + rng.normal(0, config.step, 3), 0, 1)
                               for _ in range(config.candidates)]
            rewards = [mean_reward(c) for c in tries]
            best = int(np.argmax(rewards))
            color = tries[best]
            record = {"epoch": epoch, "reward_mean": rewards[best], "color": color.tolist()}
            folder = out / f"epoch-{epoch}"
            folder.mkdir(exist_ok=True)
            (folder / "color.json").write_text(json.dumps(record))
            with open(out / "log.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            result.checkpoints.append(str(folder))
            result.log.append(record)
            if progress:
                click.echo(f"epoch {epoch}: reward {rewards[best]:.4f}", err=True)
            if on_checkpoint is not None:
                on_checkpoint(folder, record)
        return result

    @staticmethod
    def _resume_point(config, out: Path) -> Path | None:
        """The checkpoint folder ``resume_from`` names ("latest": the newest in ``out``)."""
        if not config.resume_from:
            return None
        if config.resume_from != "latest":
            folder = Path(config.resume_from).expanduser()
        else:
            done = sorted(out.glob("epoch-*"), key=lambda p: int(p.name.split("-")[1]))
            if not done:
                return None
            folder = done[-1]
        if not (folder / "color.json").is_file():
            raise HarnessError(f"config 'resume_from': no color.json in '{folder}'")
        return folder


# -- benchmark ------------------------------------------------------------------------------------
class SwatchBenchmark(Benchmark):
    """Colour swatches judged by three annotators.

    ``data_dir/labels.csv`` has the columns ``prompt_id, prompt, image, label_0, label_1,
    label_2`` (each annotator's vote: 1 the image shows the prompt, 0 it does not). ``graded`` is
    the mean vote, ``binary`` the majority. Images live in ``--images DIR`` as ``DIR/<image>``
    (:meth:`~harness.types.Benchmark.resolve_images` from the base class).
    """

    id = "example-swatches"
    subsets = ("colors",)
    description = "Solid-colour images voted on by three annotators (the example plugin)."
    protocol = "mean over prompts with both classes of the per-prompt metrics"
    LABELS = ("label_0", "label_1", "label_2")

    def _path(self) -> Path:
        if self.data_dir is None:
            raise HarnessError(f"benchmark '{self.id}' needs --data DIR, a folder with labels.csv")
        return Path(self.data_dir).expanduser() / "labels.csv"

    def load(self, subsets=None):
        import pandas as pd

        self.check_subsets(subsets)
        path = self._path()
        try:
            frame = pd.read_csv(path, dtype={"prompt_id": str, "prompt": str, "image": str})
        except OSError as exc:
            raise HarnessError(f"cannot read '{path}': {exc.strerror}") from exc
        absent = [c for c in ("prompt_id", "prompt", "image", *self.LABELS) if c not in frame]
        if absent:
            raise HarnessError(f"'{path}' lacks the columns {', '.join(absent)}")
        votes = frame[list(self.LABELS)].to_numpy(dtype=np.float64)
        frame.insert(0, "subset", "colors")
        frame["graded"] = votes.mean(axis=1)
        frame["binary"] = (frame["graded"] > 0.5).astype(np.int8)
        files = {"labels.csv": _sha256(path)}
        return BenchmarkData(self.id, frame, files=files, source=str(path.parent))

    def files_read(self):
        path = self._path()
        return {"labels.csv": _sha256(path)} if path.is_file() else {}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- registration ---------------------------------------------------------------------------------
@hookimpl
def register_reward_models(register):
    register(ColorReward, aliases=("color",))


@hookimpl
def register_normalizers(register):
    register(MarginNormalizer)


@hookimpl
def register_prompt_generators(register):
    register(ColorSwapGenerator)


@hookimpl
def register_finetuners(register):
    register(ColorTuner)


@hookimpl
def register_benchmarks(register):
    register(SwatchBenchmark)


@hookimpl
def register_commands(cli):
    @cli.command("example-colors")
    def example_colors():
        """List the colour words the example plugins understand."""
        click.echo(", ".join(sorted(COLORS)))
