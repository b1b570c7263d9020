"""PickScore (Kirstain et al., 2023) as a reward model.

A CLIP ViT-H/14 fine-tuned on Pick-a-Pic preferences: checkpoint ``yuvalkirstain/PickScore_v1``
with the processor (tokenizer and image preprocessing) of
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``. Score: ``logit_scale.exp() * cosine`` (the model's
learned scale, about 100, so scores are typically 15-25), exactly as the PickScore authors
compute it before their softmax over candidate images.
"""

from __future__ import annotations

from typing import ClassVar

from harness.hookspecs import hookimpl
from harness.types import ModelCard
from harness_plugins.clip import CLIPReward


class PickScore(CLIPReward):
    """``logit_scale.exp()`` x cosine similarity of PickScore's CLIP embeddings."""

    id: ClassVar[str] = "pickscore"
    default_checkpoint: ClassVar[str] = "yuvalkirstain/PickScore_v1"
    default_processor: ClassVar[str | None] = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    score_name: ClassVar[str] = "logit_scale * cosine"
    card: ClassVar[ModelCard] = ModelCard(
        checkpoint="yuvalkirstain/PickScore_v1 (processor laion/CLIP-ViT-H-14-laion2B-s32B-b79K)",
        license="MIT",
        score_range="[-100, 100] in principle (logit scale ~100 x cosine); typically 15-25",
        meaning="the learned logit scale times the cosine of PickScore's CLIP embeddings, before "
                "the softmax over candidate images the authors apply",
        paper="Kirstain et al., Pick-a-Pic (NeurIPS 2023)",
        source="https://github.com/yuvalkirstain/PickScore",
    )

    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().float().exp())


@hookimpl
def register_reward_models(register):
    register(PickScore)
