"""VQAScore (Lin et al., ECCV 2024) on Qwen2.5-VL as a reward model, through transformers alone.

VQAScore asks a vision-language model whether the image shows the prompt and takes the
probability of the answer "Yes": ``P("Yes" | image, question)``, in (0, 1); higher means better
aligned. This is the score of ``t2v_metrics`` (``linzhiqiu/t2v_metrics``) for its ``qwen2.5-vl-*``
models, computed here without the package (its dependencies pull in torchvision, decord and
qwen-vl-utils):

- Question (option ``question``, ``{}`` stands for the prompt): by default
  ``Does this figure show "{}"? Please answer Yes or No.``, t2v_metrics' template for Qwen2.5-VL
  since its v3.1 source. Its PyPI release 3.0 asks ``Does this image show "{}"?``; its
  CLIP-FlanT5 models (the paper's) ``Does this figure show "{}"? Please answer yes or no.``. Pass
  either as ``question=`` to reproduce them. The prompt is inserted as it is: no truncation (the
  language model takes 128k tokens).
- Chat: one user turn, the image first and the question after it, rendered by the checkpoint's
  own chat template with the generation prompt (for Qwen2.5-VL this adds the default system turn
  "You are a helpful assistant.").
- Score: the softmax over the whole vocabulary of the logits of the first answer token, read at
  the answer's first token id (``answer``, default ``Yes``; only its first token counts, as in
  t2v_metrics). t2v_metrics takes these logits from ``generate(max_new_tokens=1, do_sample=False,
  output_scores=True)``, whose scores have passed the checkpoint's greedy logits processors: the
  repetition penalty of its generation config, if it sets one (Qwen's recommended decoding for
  these checkpoints uses 1.05), divides the positive logits, and multiplies the negative ones, of
  every token id in the input (the image placeholders included). The same penalty is applied
  here, in float32 as ``generate`` does (their temperature, top-p and top-k act only when
  sampling).
- Image (t2v_metrics' ``load_images`` then qwen-vl-utils' ``fetch_image``): ``convert("RGB")``
  of the image as opened (an alpha band is dropped, not composited), a resize with PIL's bicubic
  filter to the size qwen-vl-utils chooses (each side a multiple of 28 = patch 14 x merge 2, the
  area kept within ``min_pixels`` 3,136 and ``max_pixels`` 12,845,056, the aspect ratio as close
  as the rounding allows; sides rounded half to even, as Python's ``round``), then the
  checkpoint's image processor without its own resize (rescale, CLIP mean/std, patches). One
  deliberate difference: samples wider than 8 bits (16-bit greyscale) are first scaled to 8 bits
  (:func:`harness.images.as_8bit`) where ``convert("RGB")`` would clip them.

How it runs: t2v_metrics encodes the image again for every prompt and runs one pair per
``generate`` call. Here the part of the sequence before the question does not depend on the
prompt (system turn, user header, image tokens), so :meth:`VQAScore.embed_images` runs the vision
tower and the language model over that prefix once per image and keeps its key/value cache;
:meth:`VQAScore.score` then runs the language model over the question tokens only, for up to
``pair_batch_size`` (image, prompt) pairs per forward pass against the cached prefixes, with the
multimodal rotary positions continuing after the image as in a full pass.

Checkpoints: ``Qwen/Qwen2.5-VL-3B-Instruct`` (default) and ``Qwen/Qwen2.5-VL-7B-Instruct``
(``checkpoint=qwen2.5-vl-7b``), pinned by revision; any ``Qwen2_5_VLForConditionalGeneration``
checkpoint (hub id or folder) works. t2v_metrics loads them in bfloat16; the harness default is
float32 (pass ``dtype=bfloat16`` on a GPU).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from harness.errors import HarnessError
from harness.hookspecs import hookimpl
from harness.images import as_8bit
from harness.types import ModelCard, RewardModel

#: t2v_metrics' question for its Qwen2.5-VL models (source v3.1); ``{}`` is the prompt.
DEFAULT_QUESTION = 'Does this figure show "{}"? Please answer Yes or No.'
DEFAULT_ANSWER = "Yes"
#: qwen-vl-utils' default image area bounds: 4 and 16384 tokens of 28 x 28 pixels.
MIN_PIXELS = 4 * 28 * 28
MAX_PIXELS = 16384 * 28 * 28
#: qwen-vl-utils refuses images more elongated than this.
MAX_ASPECT_RATIO = 200

HUB_3B = "Qwen/Qwen2.5-VL-3B-Instruct"
HUB_7B = "Qwen/Qwen2.5-VL-7B-Instruct"
#: Pinned hub revisions of the checkpoints t2v_metrics names ``qwen2.5-vl-3b`` and ``-7b``.
REVISIONS = {
    HUB_3B: "66285546d2b821cf421d4f5eb2576359d3770cd3",
    HUB_7B: "cc594898137f460bfe9f0759e9844b3ce807cfb5",
}
#: t2v_metrics' model names, accepted as checkpoints.
ALIASES = {"qwen2.5-vl-3b": HUB_3B, "qwen2.5-vl-7b": HUB_7B}
ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"


@dataclass(frozen=True)
class QwenImage:
    """One preprocessed image: ``pixel_values`` float32 ``[patches, 3 * 2 * 14 * 14]`` (the
    processor's flattened patches) and its patch grid ``(t, h, w)``. Images of different sizes
    have different patch counts, so a batch of them is a list (the harness collates objects of
    this kind into a list); ``numpy.asarray`` gives the patches."""

    pixel_values: np.ndarray
    grid_thw: tuple[int, int, int]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self.pixel_values, dtype=dtype)


def resized_size(
    height: int, width: int, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """qwen-vl-utils' choice of size for an image: ``(height, width)``, each a multiple of
    ``factor``, area within ``[min_pixels, max_pixels]``, the aspect ratio kept as well as the
    rounding allows (a side that would round to 0 becomes ``factor``)."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"image of {width} x {height} pixels is more elongated than "
            f"{MAX_ASPECT_RATIO}:1, which Qwen2.5-VL's preprocessing refuses"
        )
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


class VQAScorePreprocess:
    """Picklable ``PIL image as opened -> QwenImage`` (what DataLoader workers receive)."""

    def __init__(self, image_processor: Any, min_pixels: int, max_pixels: int):
        self.image_processor = image_processor
        self.min_pixels = int(min_pixels)
        self.max_pixels = int(max_pixels)
        self.factor = int(image_processor.patch_size) * int(image_processor.merge_size)

    def __call__(self, image: Any) -> QwenImage:
        from PIL import Image

        rgb = as_8bit(image).convert("RGB")
        h, w = resized_size(rgb.height, rgb.width, self.factor, self.min_pixels, self.max_pixels)
        rgb = rgb.resize((w, h), Image.Resampling.BICUBIC)
        out = self.image_processor(images=[rgb], do_resize=False, return_tensors="np")
        grid = tuple(int(x) for x in np.asarray(out["image_grid_thw"])[0])
        return QwenImage(np.asarray(out["pixel_values"], dtype=np.float32), grid)  # type: ignore[arg-type]


@dataclass
class ImagePrefix:
    """What :meth:`VQAScore.embed_images` keeps of one image: the language model's key/value
    cache over the prompt-independent start of the sequence (``length`` tokens, one
    ``[kv_heads, length, head_dim]`` pair per layer), its token ids (``[length]``, for the
    repetition penalty) and the rotary position the question starts at."""

    keys: list[Any]
    values: list[Any]
    token_ids: Any
    next_position: int

    @property
    def length(self) -> int:
        return int(self.token_ids.shape[0])


class VQAScore(RewardModel):
    """VQAScore on Qwen2.5-VL: P("Yes") that the image shows the prompt, in (0, 1)."""

    id: ClassVar[str] = "vqascore"
    default_checkpoint: ClassVar[str] = HUB_3B
    preprocessing_version: ClassVar[str] = "1"
    #: How many pairs share a forward pass does not change the numbers.
    runtime_options: ClassVar[frozenset[str]] = frozenset(
        {"device", "batch_size", "pair_batch_size"}
    )
    score_is_probability: ClassVar[bool] = True
    card: ClassVar[ModelCard] = ModelCard(
        checkpoint=HUB_3B,
        revision=REVISIONS[HUB_3B],
        license="qwen-research (Qwen Research License: non-commercial); the 7b variant is Apache-2.0",
        score_range="(0, 1)",
        meaning=(
            'P("Yes") of Qwen2.5-VL asked \'Does this figure show "{prompt}"? Please answer '
            "Yes or No.': the probability that the image shows the prompt"
        ),
        paper=(
            "Lin et al., Evaluating Text-to-Visual Generation with Image-to-Text Generation, "
            "ECCV 2024 (arXiv:2404.01291)"
        ),
        source="https://github.com/linzhiqiu/t2v_metrics (PyPI t2v_metrics, qwen2vl_model.py)",
        variants={"qwen2.5-vl-7b": f"{HUB_7B}@{REVISIONS[HUB_7B]}"},
    )

    def __init__(
        self,
        checkpoint: str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        revision: str | None = None,
        question: str = DEFAULT_QUESTION,
        answer: str = DEFAULT_ANSWER,
        min_pixels: int = MIN_PIXELS,
        max_pixels: int = MAX_PIXELS,
        pair_batch_size: int = 16,
        batch_size: int = 16,
    ):
        """Load Qwen2.5-VL.

        :param checkpoint: a hub id or a folder saved with ``save_pretrained``
            (``Qwen2_5_VLForConditionalGeneration`` with its tokenizer and image processor), or
            t2v_metrics' names ``qwen2.5-vl-3b`` (default) and ``qwen2.5-vl-7b``.
        :param revision: hub revision; default the pinned one for the two Qwen checkpoints.
        :param question: the question, ``{}`` standing for the prompt.
        :param answer: the answer whose first token's probability is the score.
        :param min_pixels: smallest image area after resizing (pixels).
        :param max_pixels: largest image area after resizing (pixels; bounds the image tokens).
        :param pair_batch_size: (image, prompt) pairs per language-model pass in :meth:`score`.
        :param batch_size: images per vision-tower and prefix pass in :meth:`embed_images`.
        """
        import inspect

        import torch

        from harness.hf import check_device, load_config, quiet_transformers, torch_dtype

        question, answer = str(question), str(answer)
        try:
            placed = question.format("\x00").count("\x00")
        except (IndexError, KeyError, ValueError):
            placed = 0
        if placed != 1:
            raise HarnessError(
                f"question {question!r} must contain {{}} once, where the prompt "
                "goes (other braces doubled: {{ }})"
            )
        if not answer.strip():
            raise HarnessError(
                "answer is empty; give the answer whose probability is the score (default Yes)"
            )
        if not 0 < int(min_pixels) <= int(max_pixels):
            raise HarnessError(
                f"need 0 < min_pixels <= max_pixels, got min_pixels={min_pixels}, "
                f"max_pixels={max_pixels}"
            )
        for name, value in (("pair_batch_size", pair_batch_size), ("batch_size", batch_size)):
            if int(value) < 1:
                raise HarnessError(f"{name} must be >= 1, got {value}")
        checkpoint = ALIASES.get(str(checkpoint).lower(), checkpoint) if checkpoint else None
        super().__init__(checkpoint, check_device(device), dtype)
        self.checkpoint = str(self.checkpoint)
        self.revision = revision or REVISIONS.get(self.checkpoint)
        self.question, self.answer = question, answer
        self.min_pixels, self.max_pixels = int(min_pixels), int(max_pixels)
        self.pair_batch_size, self.batch_size = int(pair_batch_size), int(batch_size)
        self._torch = torch

        load_config(self.checkpoint, ("qwen2_5_vl",), ARCHITECTURE, self.revision)
        from transformers import (
            AutoImageProcessor,
            AutoTokenizer,
            Qwen2_5_VLForConditionalGeneration,
        )

        with quiet_transformers():
            self.model = (
                Qwen2_5_VLForConditionalGeneration.from_pretrained(
                    self.checkpoint, revision=self.revision, dtype=torch_dtype(dtype)
                )
                .to(self.device)
                .eval()
            )
            self.tokenizer = AutoTokenizer.from_pretrained(self.checkpoint, revision=self.revision)
            # The PIL backend whether or not torchvision is installed: the same numbers everywhere.
            image_processor = AutoImageProcessor.from_pretrained(
                self.checkpoint, revision=self.revision, backend="pil"
            )
        self.chat_template = self._chat_template()
        config = self.model.config
        self.image_token_id = int(config.image_token_id)
        self.merge_size = int(config.vision_config.spatial_merge_size)
        ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
        if not ids:
            raise HarnessError(f"answer {answer!r} has no tokens in the checkpoint's tokenizer")
        self.answer_token_id = int(ids[0])
        self.repetition_penalty = float(
            getattr(self.model.generation_config, "repetition_penalty", None) or 1.0
        )
        self.prefix_text = self._split(self._render("x"))[0]
        # transformers 5.x renamed the language model's past_key_values argument to cache
        forward = inspect.signature(self.model.model.language_model.forward).parameters
        self._cache_argument = "cache" if "cache" in forward else "past_key_values"
        self._suffix_ids: dict[str, list[int]] = {}
        # A picklable stand-in for the bound method: DataLoader workers get the transform only.
        self.preprocess = VQAScorePreprocess(image_processor, self.min_pixels, self.max_pixels)

    # -- loading helpers -------------------------------------------------------------------
    def _chat_template(self) -> str:
        """The processor's chat template (``chat_template.jinja``, else ``chat_template.json``),
        else the tokenizer's: what ``AutoProcessor(...).apply_chat_template`` renders."""
        import json

        from transformers.utils import cached_file

        for name in ("chat_template.jinja", "chat_template.json"):
            try:
                path = cached_file(
                    self.checkpoint,
                    name,
                    revision=self.revision,
                    _raise_exceptions_for_missing_entries=False,
                    _raise_exceptions_for_connection_errors=False,
                )
            except OSError:
                path = None
            if path:
                with open(path, encoding="utf-8") as fh:
                    text = fh.read()
                return json.loads(text)["chat_template"] if name.endswith(".json") else text
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.chat_template
        raise HarnessError(
            f"checkpoint '{self.checkpoint}' has no chat template (expected "
            "chat_template.jinja or chat_template.json, as Qwen2.5-VL ships)"
        )

    def _render(self, prompt: str) -> str:
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "text", "text": self.question.format(prompt)},
                ],
            }
        ]
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
        )

    def _split(self, text: str) -> tuple[str, str]:
        """A rendered chat -> (text before the image placeholder, text after it)."""
        placeholder = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        if text.count(placeholder) != 1:
            raise HarnessError(
                f"the chat template of '{self.checkpoint}' renders {text.count(placeholder)} "
                f"image placeholders ({placeholder}) for one image; expected one"
            )
        before, _, after = text.partition(placeholder)
        return before, after

    def _question_ids(self, prompt: str) -> list[int]:
        """Token ids of everything after the image for ``prompt`` (kept per distinct prompt)."""
        ids = self._suffix_ids.get(prompt)
        if ids is None:
            placeholder = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
            if placeholder in prompt:
                raise HarnessError(
                    f"prompt {prompt[:80]!r} contains the image placeholder "
                    f"{placeholder}; remove it from the prompt"
                )
            before, after = self._split(self._render(prompt))
            if before != self.prefix_text:  # the prompt would change the cached prefix
                raise HarnessError(
                    f"the chat template of '{self.checkpoint}' puts text that "
                    "depends on the prompt before the image; VQAScore needs the "
                    "image first"
                )
            ids = self.tokenizer(after, add_special_tokens=False)["input_ids"]
            if len(self._suffix_ids) >= 65536:
                self._suffix_ids.clear()
            self._suffix_ids[prompt] = ids
        return ids

    # -- the RewardModel contract ----------------------------------------------------------
    def preprocess(self, image: Any) -> QwenImage:  # replaced per instance by VQAScorePreprocess
        """PIL image as opened -> :class:`QwenImage` (RGB, resized to multiples of 28, patches)."""
        return self.preprocess(image)

    def files(self) -> list[Any]:
        from harness.hf import checkpoint_files

        return checkpoint_files(self.checkpoint, self.revision)

    def embed_images(self, batch: Sequence[QwenImage]) -> list[ImagePrefix]:
        """``B`` images -> ``B`` :class:`ImagePrefix`, ``batch_size`` images at a time: the
        vision tower over them at once, then the language model over each image's prefix
        (images of one size together)."""
        images = list(batch)
        return [
            p
            for lo in range(0, len(images), self.batch_size)
            for p in self._embed(images[lo : lo + self.batch_size])
        ]

    def _embed(self, images: list[QwenImage]) -> list[ImagePrefix]:
        torch = self._torch
        model = self.model.model
        lm = model.language_model
        start = self.tokenizer(self.prefix_text)["input_ids"]
        with torch.inference_mode():
            pixels = torch.cat([torch.as_tensor(im.pixel_values) for im in images])
            pixels = pixels.to(self.device, dtype=model.visual.dtype)
            grids = torch.tensor([im.grid_thw for im in images], device=self.device)
            out = model.get_image_features(pixel_values=pixels, image_grid_thw=grids)
            embeds = getattr(out, "pooler_output", out)  # one [tokens, D] tensor per image
            by_grid: dict[tuple[int, int, int], list[int]] = {}
            for i, im in enumerate(images):
                by_grid.setdefault(im.grid_thw, []).append(i)
            prefixes: list[ImagePrefix | None] = [None] * len(images)
            for grid, members in by_grid.items():
                n_tokens = math.prod(grid) // self.merge_size**2
                ids = torch.tensor(start + [self.image_token_id] * n_tokens, device=self.device)
                batch_ids = ids[None].expand(len(members), -1)
                positions = self._rope_index(batch_ids, grids[members])
                hidden = lm.embed_tokens(batch_ids).clone()
                picture = ids == self.image_token_id
                hidden[:, picture] = torch.stack([embeds[i] for i in members]).to(hidden.dtype)
                out = lm(inputs_embeds=hidden, position_ids=positions, use_cache=True)
                cache = getattr(out, "cache", None)
                cache = out.past_key_values if cache is None else cache
                layers = [(layer.keys, layer.values) for layer in cache.layers]
                for row, i in enumerate(members):
                    prefixes[i] = ImagePrefix(
                        keys=[k[row] for k, _ in layers],
                        values=[v[row] for _, v in layers],
                        token_ids=ids,
                        next_position=int(positions[:, row].max()) + 1,
                    )
        return prefixes  # type: ignore[return-value]

    def _rope_index(self, ids: Any, grids: Any) -> Any:
        """Qwen2.5-VL's multimodal rotary positions ``[3, B, L]`` of image-bearing ``ids``."""
        import inspect

        get = self.model.model.get_rope_index
        kwargs = {"image_grid_thw": grids}
        if "mm_token_type_ids" in inspect.signature(get).parameters:
            kwargs["mm_token_type_ids"] = (ids == self.image_token_id).int()
        return get(ids, **kwargs)[0]

    def score(
        self, features: Sequence[ImagePrefix], prompts: Sequence[Sequence[str]]
    ) -> list[np.ndarray]:
        """``B`` image prefixes x prompts per image -> ``B`` float32 arrays of P(answer)."""
        if len(features) != len(prompts):
            raise ValueError(f"{len(features)} images but {len(prompts)} prompt lists")
        pairs = [(i, str(p)) for i, ps in enumerate(prompts) for p in ps]
        flat = np.zeros(len(pairs), dtype=np.float32)
        by_length: dict[int, list[int]] = {}
        for k, (i, _) in enumerate(pairs):
            by_length.setdefault(features[i].length, []).append(k)
        for members in by_length.values():
            for lo in range(0, len(members), self.pair_batch_size):
                chunk = members[lo : lo + self.pair_batch_size]
                owners = [pairs[k][0] for k in chunk]
                questions = [self._question_ids(pairs[k][1]) for k in chunk]
                flat[chunk] = self._answer_probability([features[i] for i in owners], questions)
        bounds = np.cumsum([0, *(len(ps) for ps in prompts)])
        return [flat[bounds[i] : bounds[i + 1]].copy() for i in range(len(prompts))]

    def _answer_probability(
        self, prefixes: list[ImagePrefix], questions: list[list[int]]
    ) -> np.ndarray:
        """One language-model pass over ``questions`` (token ids after the image), each against
        its image's cached prefix (all of one length) -> P(answer token) per pair."""
        torch = self._torch
        from transformers import DynamicCache, RepetitionPenaltyLogitsProcessor

        lm = self.model.model.language_model
        n, width = len(questions), max(len(q) for q in questions)
        lengths = torch.tensor([len(q) for q in questions], device=self.device)
        # Right padding: attention is causal, so the padding after a question is never seen
        # by its tokens, and each row is read at its own last token.
        ids = torch.tensor([q + [q[0]] * (width - len(q)) for q in questions], device=self.device)
        steps = torch.arange(width, device=self.device)
        positions = torch.stack([p.next_position + steps for p in prefixes])[None].expand(3, -1, -1)
        same = all(p is prefixes[0] for p in prefixes)
        layers = []
        for layer in range(len(prefixes[0].keys)):
            if same:  # one image, many prompts: no copy until the cache appends
                k = prefixes[0].keys[layer][None].expand(n, -1, -1, -1)
                v = prefixes[0].values[layer][None].expand(n, -1, -1, -1)
            else:
                k = torch.stack([p.keys[layer] for p in prefixes])
                v = torch.stack([p.values[layer] for p in prefixes])
            layers.append((k, v))
        cache = DynamicCache(ddp_cache_data=layers)
        with torch.inference_mode():
            out = lm(
                inputs_embeds=lm.embed_tokens(ids),
                position_ids=positions,
                use_cache=True,
                **{self._cache_argument: cache},
            )
            last = out.last_hidden_state[torch.arange(n, device=self.device), lengths - 1]
            # generate() casts the next-token logits to float32 before its logits processors
            logits = self.model.lm_head(last).float()
            if self.repetition_penalty != 1.0:
                seen = torch.cat([torch.stack([p.token_ids for p in prefixes]), ids], dim=1)
                logits = RepetitionPenaltyLogitsProcessor(self.repetition_penalty)(seen, logits)
            probs = torch.nn.functional.softmax(logits, dim=-1)[:, self.answer_token_id]
        return probs.cpu().numpy().astype(np.float32)

    def describe(self) -> dict[str, Any]:
        from harness.hf import commit_hash, weights_fingerprint

        if not hasattr(self, "_checkpoint_sha256"):  # hashing a local 3B checkpoint takes seconds
            self._checkpoint_sha256 = weights_fingerprint(self.checkpoint)
        return {
            "id": self.id,
            "checkpoint": self.checkpoint,
            "revision": self.revision or commit_hash(self.model),
            "checkpoint_sha256": self._checkpoint_sha256,
            "preprocessing_version": self.preprocessing_version,
            "dtype": self.dtype,
            "question": self.question,
            "answer": self.answer,
            "answer_token_id": self.answer_token_id,
            "repetition_penalty": self.repetition_penalty,
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "score": f'P("{self.answer}") at the first answer token (softmax over the vocabulary)',
        }


@hookimpl
def register_reward_models(register):
    register(VQAScore)
