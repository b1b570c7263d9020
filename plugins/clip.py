"""CLIP as a reward model: cosine similarity of the projected image and text embeddings.

Default checkpoint ``openai/clip-vit-large-patch14``; any Hugging Face ``CLIPModel`` checkpoint
(hub id or local folder) works. Score: cosine similarity in [-1, 1] (typically 0.15-0.40 for
natural images; multiply by 100 for the "CLIPScore" scale some papers use). Text is truncated to
the model's 77 tokens; the number of truncated prompts is recorded in the manifest.

Each image is encoded once; text embeddings are computed once per distinct prompt and kept in a
small in-memory cache, so scoring an image against 1 + 32 contrastive prompts costs one image
encode and a [1 x D] @ [D x 33] product.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from harness.errors import HarnessError
from harness.hf import (
    check_device,
    checkpoint_files,
    commit_hash,
    held_text_rows,
    load_config,
    load_text_rows_into,
    quiet_transformers,
    torch_dtype,
    weights_fingerprint,
)
from harness.hookspecs import hookimpl
from harness.images import as_8bit
from harness.types import ModelCard, RewardModel


class CLIPReward(RewardModel):
    """Cosine similarity between CLIP image and text embeddings (range [-1, 1])."""

    id: ClassVar[str] = "clip"
    default_checkpoint: ClassVar[str] = "openai/clip-vit-large-patch14"
    card: ClassVar[ModelCard] = ModelCard(
        checkpoint="openai/clip-vit-large-patch14",
        license="MIT",
        score_range="[-1, 1] (typically 0.15-0.35 for natural images)",
        meaning="cosine similarity of CLIP's projected image and text embeddings",
        paper="Radford et al., Learning Transferable Visual Models From Natural Language Supervision (ICML 2021)",
        source="https://github.com/openai/CLIP (transformers CLIPModel)",
    )
    default_processor: ClassVar[str | None] = None  # None: the checkpoint's own processor
    #: 2: images reach the image processor as opened, which converts them itself (transparency
    #: composited onto white), as the original does. 3: samples wider than 8 bits (16-bit
    #: greyscale PNGs) scaled to 8 bits first (harness.images.as_8bit), not clipped.
    preprocessing_version: ClassVar[str] = "3"
    score_name: ClassVar[str] = "cosine"
    text_cache_size: ClassVar[int] = 65536
    #: image embeddings [B, D] meet text embeddings in score(): the core stores the image rows
    embedding_kind: ClassVar[str | None] = "dual"

    def __init__(
        self,
        checkpoint: str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        batch_size: int = 32,
        revision: str | None = None,
        processor: str | None = None,
    ):
        import torch
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        super().__init__(checkpoint, check_device(device), dtype)
        self.processor_source = processor or self.default_processor or self.checkpoint
        self.batch_size = batch_size
        self.revision = revision
        load_config(self.checkpoint, ("clip",), "CLIPModel", revision)
        with quiet_transformers():
            self.model = CLIPModel.from_pretrained(
                self.checkpoint, revision=revision, dtype=torch_dtype(dtype)
            ).to(self.device).eval()
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(self.processor_source)
                self.image_processor = AutoImageProcessor.from_pretrained(self.processor_source)
            except (OSError, ValueError) as exc:
                raise HarnessError(
                    f"cannot load the tokenizer and image processor of {self.id} from "
                    f"'{self.processor_source}' ({type(exc).__name__}); pass processor=PATH to a "
                    "folder holding them"
                ) from exc
        self.checkpoint_sha256 = weights_fingerprint(self.checkpoint)
        self.max_text_tokens = int(self.model.config.text_config.max_position_embeddings)
        self.truncated_prompts = 0
        self._text: OrderedDict[str, Any] = OrderedDict()
        self._torch = torch

    # -- the RewardModel contract ----------------------------------------------------------
    def preprocess(self, image: Any) -> Any:
        """PIL image as opened -> float32 ``[3, H, W]`` normalised pixels, through the
        checkpoint's image processor (which converts the mode itself, as the original does:
        transparency composited onto white), after :func:`harness.images.as_8bit` (16-bit
        greyscale scaled to 8 bits, where the processor would clip it to white)."""
        return self.image_processor(images=as_8bit(image), return_tensors="pt")["pixel_values"][0]

    def preprocessor(self) -> Any:
        from harness.hf import ImageProcessorCall

        return ImageProcessorCall(self.image_processor)

    def embed_images(self, batch: Any) -> Any:
        """``[B, 3, H, W]`` -> unit-norm float32 image embeddings ``[B, D]``."""
        torch = self._torch
        with torch.inference_mode():
            pixels = batch.to(self.device, dtype=self.model.dtype, non_blocking=True)
            out = self.model.get_image_features(pixel_values=pixels)
            feats = out.pooler_output if hasattr(out, "pooler_output") else out
            return torch.nn.functional.normalize(feats.float(), dim=-1)

    def score(self, features: Any, prompts: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """Image embeddings ``[B, D]`` x prompts per image -> B float32 arrays (scaled cosines)."""
        distinct = list(dict.fromkeys(p for ps in prompts for p in ps))
        text = self.text_embeddings(distinct)  # [T, D]
        sims = (features @ text.T) * self.logit_scale()  # [B, T]
        col = {p: j for j, p in enumerate(distinct)}
        sims = sims.cpu().numpy()
        return [sims[i, [col[p] for p in ps]].astype(np.float32) for i, ps in enumerate(prompts)]

    def files(self) -> list[Any]:
        """The checkpoint's files and, when they come from elsewhere, the processor's."""
        found = checkpoint_files(self.checkpoint, self.revision)
        if self.processor_source != self.checkpoint:
            found += checkpoint_files(self.processor_source)
        return found

    # -- helpers ---------------------------------------------------------------------------
    def logit_scale(self) -> float:
        return 1.0

    def text_embeddings(self, prompts: list[str]) -> Any:
        """Unit-norm float32 text embeddings ``[T, D]``, computed once per distinct prompt.

        Each prompt is encoded on its own, at its own token length (cut at the model's
        ``max_text_tokens``): a batch pads its prompts to the longest one and its matrix
        products change shape with its size, which moves the results by ~1e-7, so a prompt's
        embedding, and every score using it, would depend on which prompts happened to be
        encoded with it (and a resumed fine-tuning run would drift from an uninterrupted one).
        Alone, a prompt's embedding is the same bits whatever else is scored.
        """
        torch = self._torch
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text]
        if missing:
            full = self.tokenizer(missing, truncation=False)["input_ids"]
            self.truncated_prompts += sum(len(ids) > self.max_text_tokens for ids in full)
        for p in missing:
            tok = self.tokenizer([p], truncation=True, max_length=self.max_text_tokens,
                                 return_tensors="pt").to(self.device)
            with torch.inference_mode():
                out = self.model.get_text_features(**tok)
                feats = out.pooler_output if hasattr(out, "pooler_output") else out
                self._text[p] = torch.nn.functional.normalize(feats.float(), dim=-1)[0]
        for p in prompts:
            self._text.move_to_end(p)
        while len(self._text) > self.text_cache_size:
            self._text.popitem(last=False)
        return torch.stack([self._text[p] for p in prompts])

    def text_rows(self, prompts: Sequence[str]) -> tuple[list[str], Any]:
        """The text embeddings held in the in-memory cache (see :meth:`text_embeddings`)."""
        return held_text_rows(self._text, prompts)

    def load_text_rows(self, prompts: Sequence[str], rows: Any) -> None:
        """Stored text embeddings into the in-memory cache (truncated prompts still counted)."""
        added = load_text_rows_into(self._text, list(prompts), rows, self.device,
                                    self.text_cache_size)
        if added:
            full = self.tokenizer(added, truncation=False)["input_ids"]
            self.truncated_prompts += sum(len(ids) > self.max_text_tokens for ids in full)

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "checkpoint": self.checkpoint,
            "revision": self.revision or commit_hash(self.model),
            "checkpoint_sha256": self.checkpoint_sha256,
            "processor": self.processor_source,
            "preprocessing_version": self.preprocessing_version,
            "dtype": self.dtype,
            "score": self.score_name,
            "max_text_tokens": self.max_text_tokens,
            "truncated_prompts": self.truncated_prompts,
        }


@hookimpl
def register_reward_models(register):
    register(CLIPReward)
