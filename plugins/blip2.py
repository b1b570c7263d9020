"""BLIP-2 (Li et al., 2023) image-text matching as a reward model.

Checkpoint ``Salesforce/blip2-itm-vit-g`` (any ``Blip2ForImageTextRetrieval`` checkpoint) through
transformers. Two scores (``mode``):

- ``itm`` (default): the probability, in [0, 1], that image and text match, from the ITM head
  over the Q-Former's query outputs with the text attending to the image (a per-pair pass over
  cached image features);
- ``itc``: the contrastive score, the highest cosine similarity in [-1, 1] between the text
  embedding and any of the image's query embeddings.

The ViT-g image encoder runs once per image; only the Q-Former (ITM) or a dot product (ITC) runs
per prompt. Text is cut at ``max_text_tokens`` (32, as in LAVIS's BLIP-2 retrieval models).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from harness.errors import HarnessError
from harness.hf import (
    check_device,
    checkpoint_files,
    commit_hash,
    load_config,
    quiet_transformers,
    torch_dtype,
    weights_fingerprint,
)
from harness.hookspecs import hookimpl
from harness.images import as_8bit
from harness.types import ModelCard, RewardModel

MODES = ("itm", "itc")


class BLIP2Reward(RewardModel):
    """BLIP-2 ITM match probability (default) or ITC cosine."""

    id: ClassVar[str] = "blip2"
    default_checkpoint: ClassVar[str] = "Salesforce/blip2-itm-vit-g"
    card: ClassVar[ModelCard] = ModelCard(
        checkpoint="Salesforce/blip2-itm-vit-g",
        license="MIT",
        score_range="mode=itm: [0, 1]; mode=itc: [-1, 1]",
        meaning="itm: the ITM head's probability that image and text match; itc: the highest cosine "
                "between the 32 query embeddings and the text embedding",
        paper="Li et al., BLIP-2 (ICML 2023)",
        source="https://github.com/salesforce/LAVIS (transformers Blip2ForImageTextRetrieval)",
    )
    #: 2: images reach the image processor as opened, which converts them itself (transparency
    #: composited onto white), as the original does. 3: samples wider than 8 bits (16-bit
    #: greyscale PNGs) scaled to 8 bits first (harness.images.as_8bit), not clipped.
    preprocessing_version: ClassVar[str] = "3"
    #: How many (image, prompt) pairs share an ITM forward pass does not change the numbers.
    runtime_options: ClassVar[frozenset[str]] = frozenset({"device", "batch_size", "pair_batch_size"})

    def __init__(
        self,
        checkpoint: str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        batch_size: int = 32,
        revision: str | None = None,
        mode: str = "itm",
        max_text_tokens: int = 32,
        pair_batch_size: int = 128,
    ):
        import torch
        from transformers import AutoImageProcessor, AutoTokenizer, Blip2ForImageTextRetrieval

        if mode not in MODES:
            raise HarnessError(f"unknown BLIP-2 mode '{mode}'; choose one of {', '.join(MODES)}")
        super().__init__(checkpoint, check_device(device), dtype)
        self.batch_size = batch_size
        self.revision = revision
        self.mode = mode
        self.score_is_probability = mode == "itm"  # the ITM head's match probability
        self.max_text_tokens = max_text_tokens
        self.pair_batch_size = pair_batch_size
        load_config(self.checkpoint, ("blip-2",), "Blip2ForImageTextRetrieval", revision)
        with quiet_transformers():
            self.model = Blip2ForImageTextRetrieval.from_pretrained(
                self.checkpoint, revision=revision, dtype=torch_dtype(dtype)
            ).to(self.device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(self.checkpoint, revision=revision)
            self.image_processor = AutoImageProcessor.from_pretrained(self.checkpoint, revision=revision)
        self.checkpoint_sha256 = weights_fingerprint(self.checkpoint)
        self.truncated_prompts = 0
        self._seen: set[str] = set()
        self._torch = torch

    def preprocess(self, image: Any) -> Any:
        """PIL image as opened -> float32 ``[3, H, W]`` (BLIP normalisation, 224 px for ViT-g),
        through the checkpoint's image processor, which converts the mode itself, after
        :func:`harness.images.as_8bit` (16-bit greyscale scaled to 8 bits, not clipped)."""
        return self.image_processor(images=as_8bit(image), return_tensors="pt")["pixel_values"][0]

    def preprocessor(self) -> Any:
        from harness.hf import ImageProcessorCall

        return ImageProcessorCall(self.image_processor)

    def files(self) -> list[Any]:
        return checkpoint_files(self.checkpoint, self.revision)

    def embed_images(self, batch: Any) -> Any:
        """``[B, 3, H, W]`` -> ``{"image_embeds": [B, 1 + patches, Dv]}`` (+ ``"query": [B, Q, D]``
        unit-norm projected query embeddings in ITC mode)."""
        torch = self._torch
        m = self.model
        with torch.inference_mode():
            pixels = batch.to(self.device, dtype=m.vision_model.dtype, non_blocking=True)
            image_embeds = m.vision_model(pixel_values=pixels, return_dict=True).last_hidden_state
            out = {"image_embeds": image_embeds}
            if self.mode == "itc":
                query = m.query_tokens.expand(image_embeds.shape[0], -1, -1)
                q = m.qformer(
                    query_embeds=query,
                    encoder_hidden_states=image_embeds,
                    encoder_attention_mask=self._ones(image_embeds),
                    return_dict=True,
                ).last_hidden_state
                q = q.to(m.vision_projection.weight.dtype)
                out["query"] = torch.nn.functional.normalize(m.vision_projection(q).float(), dim=-1)
        return out

    def _ones(self, embeds: Any) -> Any:
        return self._torch.ones(embeds.shape[:-1], dtype=self._torch.long, device=embeds.device)

    def _tokenize(self, prompts: list[str]) -> Any:
        new = [p for p in prompts if p not in self._seen]
        if new:
            full = self.tokenizer(new, truncation=False)["input_ids"]
            self.truncated_prompts += sum(len(ids) > self.max_text_tokens for ids in full)
            self._seen.update(new)
        return self.tokenizer(prompts, padding=True, truncation=True,
                              max_length=self.max_text_tokens, return_tensors="pt").to(self.device)

    def score(self, features: Any, prompts: Sequence[Sequence[str]]) -> list[np.ndarray]:
        if self.mode == "itc":
            return self._score_itc(features, prompts)
        return self._score_itm(features, prompts)

    def _score_itm(self, features: Any, prompts: Sequence[Sequence[str]]) -> list[np.ndarray]:
        torch = self._torch
        m = self.model
        image_embeds = features["image_embeds"]
        pairs = [(i, p) for i, ps in enumerate(prompts) for p in ps]
        probs = []
        with torch.inference_mode():
            for lo in range(0, len(pairs), self.pair_batch_size):
                chunk = pairs[lo : lo + self.pair_batch_size]
                img = image_embeds[[i for i, _ in chunk]]
                tok = self._tokenize([p for _, p in chunk])
                query = m.query_tokens.expand(len(chunk), -1, -1)
                n_query = query.shape[1]
                embeds = m.embeddings(input_ids=tok["input_ids"], query_embeds=query)
                mask = torch.cat([self._ones(query), tok["attention_mask"]], dim=1)
                hidden = m.qformer(
                    query_embeds=embeds,
                    query_length=n_query,
                    attention_mask=mask,
                    encoder_hidden_states=img,
                    encoder_attention_mask=self._ones(img),
                    return_dict=True,
                ).last_hidden_state
                hidden = hidden.to(m.itm_head.weight.dtype)
                logits = m.itm_head(hidden[:, :n_query, :]).mean(dim=1)
                probs.append(logits.float().softmax(dim=-1)[:, 1].cpu())
        flat = torch.cat(probs).numpy() if probs else np.zeros(0, dtype=np.float32)
        out, k = [], 0
        for ps in prompts:
            out.append(flat[k : k + len(ps)].astype(np.float32))
            k += len(ps)
        return out

    def _score_itc(self, features: Any, prompts: Sequence[Sequence[str]]) -> list[np.ndarray]:
        torch = self._torch
        m = self.model
        distinct = list(dict.fromkeys(p for ps in prompts for p in ps))
        with torch.inference_mode():
            tok = self._tokenize(distinct)
            embeds = m.embeddings(input_ids=tok["input_ids"])
            hidden = m.qformer(query_embeds=embeds, query_length=0,
                               attention_mask=tok["attention_mask"], return_dict=True).last_hidden_state
            hidden = hidden.to(m.text_projection.weight.dtype)
            text = torch.nn.functional.normalize(m.text_projection(hidden[:, 0, :]).float(), dim=-1)
            sims = torch.einsum("bqd,td->bqt", features["query"], text).max(dim=1).values.cpu().numpy()
        col = {p: j for j, p in enumerate(distinct)}
        return [sims[i, [col[p] for p in ps]].astype(np.float32) for i, ps in enumerate(prompts)]

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "score_is_probability": self.score_is_probability,
            "checkpoint": self.checkpoint,
            "revision": self.revision or commit_hash(self.model),
            "checkpoint_sha256": self.checkpoint_sha256,
            "preprocessing_version": self.preprocessing_version,
            "dtype": self.dtype,
            "variant": self.mode,
            "score": "ITM match probability" if self.mode == "itm" else "ITC max cosine",
            "max_text_tokens": self.max_text_tokens,
            "truncated_prompts": self.truncated_prompts,
        }


@hookimpl
def register_reward_models(register):
    register(BLIP2Reward)
