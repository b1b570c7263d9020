"""Conformance checks for plugin authors: ``check_reward_model`` and friends.

Use them in a reward-model plugin's own tests::

    from harness.testing import check_reward_model

    def test_my_model(tmp_path):
        model = MyReward(checkpoint=make_tiny_checkpoint(tmp_path))
        check_reward_model(model, images, prompts)

Each check raises ``AssertionError`` with a message saying which property failed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from harness.types import RewardModel


def _collate(items: list[Any]) -> Any:
    first = items[0]
    if hasattr(first, "shape") and type(first).__module__.startswith("torch"):
        import torch

        return torch.stack(items)
    if isinstance(first, np.ndarray):
        return np.stack(items)
    return items


def _slice(features: Any, lo: int, hi: int) -> Any:
    if isinstance(features, dict):
        return {k: v[lo:hi] for k, v in features.items()}
    return features[lo:hi]


def _as_arrays(scores: Sequence[Any]) -> list[np.ndarray]:
    out = []
    for s in scores:
        if hasattr(s, "detach"):
            s = s.detach().cpu().numpy()
        out.append(np.asarray(s))
    return out


def check_reward_model(
    model: RewardModel,
    images: Sequence[Any],
    prompts: Sequence[Sequence[str]],
    atol: float = 1e-5,
    batch_sizes: tuple[int, ...] = (1, 16),
) -> list[np.ndarray]:
    """Check the contract on PIL ``images`` with ``prompts[i]`` for image ``i``.

    - ``score`` returns one float32 array per image, of length ``len(prompts[i])``, all finite;
    - deterministic: the same inputs give the same scores;
    - batch-size invariant: scoring in batches of each of ``batch_sizes`` agrees within ``atol``;
    - cached features: scoring an image's prompts together equals scoring each one alone.

    :returns: the scores (from the first batch size).
    """
    assert len(images) == len(prompts), "one prompt list per image"
    inputs = [model.preprocess(im) for im in images]

    def run(batch_size: int) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for lo in range(0, len(inputs), batch_size):
            feats = model.embed_images(_collate(inputs[lo : lo + batch_size]))
            out += _as_arrays(model.score(feats, [list(p) for p in prompts[lo : lo + batch_size]]))
        return out

    first = run(batch_sizes[0])
    assert len(first) == len(images), f"score returned {len(first)} arrays for {len(images)} images"
    for i, (s, ps) in enumerate(zip(first, prompts, strict=True)):
        assert s.shape == (len(ps),), f"image {i}: scores of shape {s.shape}, expected ({len(ps)},)"
        assert s.dtype == np.float32, f"image {i}: scores of dtype {s.dtype}, expected float32"
        assert np.isfinite(s).all(), f"image {i}: non-finite scores {s}"
    again = run(batch_sizes[0])
    for i, (a, b) in enumerate(zip(first, again, strict=True)):
        assert np.array_equal(a, b), f"image {i}: not deterministic ({a} vs {b})"
    for bs in batch_sizes[1:]:
        other = run(bs)
        for i, (a, b) in enumerate(zip(first, other, strict=True)):
            np.testing.assert_allclose(
                a, b, atol=atol, rtol=0,
                err_msg=f"image {i}: batch size {batch_sizes[0]} and {bs} disagree",
            )
    # One image encode, many prompts == one prompt at a time.
    feats = model.embed_images(_collate(inputs[:1]))
    together = _as_arrays(model.score(feats, [list(prompts[0])]))[0]
    alone = np.array([_as_arrays(model.score(feats, [[p]]))[0][0] for p in prompts[0]])
    np.testing.assert_allclose(together, alone, atol=atol, rtol=0,
                               err_msg="scoring prompts together differs from one at a time")
    return first
