"""An example t2i-harness plugin: a reward model that checks the colour a prompt asks for.

``example-color`` scores an image against a prompt by how close the image's mean colour is to
the first colour word in the prompt ("a red apple" -> red). It needs no weights and no GPU, which
makes it a compact, complete illustration of the reward-model contract:
``preprocess`` (one PIL image, in data-loader workers) -> ``embed_images`` (once per image) ->
``score`` (cached features against any number of prompts).
"""

from __future__ import annotations

import click
import numpy as np

from harness.hookspecs import hookimpl
from harness.types import RewardModel

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0), "green": (0.0, 0.5, 0.0), "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0), "black": (0.0, 0.0, 0.0), "white": (1.0, 1.0, 1.0),
    "orange": (1.0, 0.65, 0.0), "purple": (0.5, 0.0, 0.5), "pink": (1.0, 0.75, 0.8),
}


class ExampleColorReward(RewardModel):
    """Score in [-sqrt(3), 0]: minus the RGB distance between the image's mean colour and the
    prompt's first colour word; 0 for prompts that name no colour."""

    id = "example-color"
    preprocessing_version = "1"

    def __init__(self, checkpoint: str | None = None, device: str = "cpu", dtype: str = "float32"):
        self.checkpoint = checkpoint  # nothing to load: the "model" is the colour table

    def preprocess(self, image):
        small = image.convert("RGB").resize((32, 32))
        return np.asarray(small, dtype=np.float32).transpose(2, 0, 1) / 255.0  # [3, 32, 32]

    def embed_images(self, batch):
        return np.asarray(batch, dtype=np.float32).mean(axis=(2, 3))  # [B, 3] mean RGB

    def score(self, features, prompts):
        out = []
        for feature, image_prompts in zip(features, prompts, strict=True):
            scores = []
            for prompt in image_prompts:
                words = [w.strip(".,!?").lower() for w in prompt.split()]
                color = next((COLORS[w] for w in words if w in COLORS), None)
                scores.append(0.0 if color is None else -float(np.linalg.norm(feature - color)))
            out.append(np.asarray(scores, dtype=np.float32))
        return out


@hookimpl
def register_reward_models(register):
    register(ExampleColorReward, aliases=("color",))


@hookimpl
def register_commands(cli):
    @cli.command("example-colors")
    def example_colors():
        """List the colour words the example-color reward model understands."""
        click.echo(", ".join(sorted(COLORS)))
