"""Reward models used only by the Ray tests (shipped to workers by value)."""

import os

import numpy as np

from harness.types import RewardModel


class OffsetColor(RewardModel):
    """Mean red channel, plus HARNESS_TEST_OFFSET from the actor's runtime_env."""

    id = "offset-color"
    ray_runtime_env = {"env_vars": {"HARNESS_TEST_OFFSET": "7"}}

    def preprocess(self, image):
        return np.asarray(image.convert("RGB").resize((8, 8)), dtype=np.float32).transpose(2, 0, 1) / 255.0

    def embed_images(self, batch):
        return np.asarray(batch)[:, 0].mean(axis=(1, 2))

    def score(self, features, prompts):
        offset = float(os.environ.get("HARNESS_TEST_OFFSET", "0"))
        return [np.full(len(p), f + offset, dtype=np.float32) for f, p in zip(features, prompts, strict=True)]


class BrokenEnv(OffsetColor):
    id = "broken-env"
    ray_runtime_env = {"pip": ["t2i-harness-no-such-package-anywhere==0.0.1"]}


class SlowColor(OffsetColor):
    """A light model that takes its time per batch, so every actor of a pool gets work."""

    id = "slow-color"
    ray_runtime_env = None

    def embed_images(self, batch):
        import time

        time.sleep(0.3)
        return super().embed_images(batch)
