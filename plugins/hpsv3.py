"""HPSv3 (Ma et al., ICCV 2025) as a reward model that reports its own uncertainty.

HPSv3 is Qwen2-VL-7B-Instruct fine-tuned on human preferences (HPD v3) with a reward head that
reads the hidden state of one added token: ``<|Reward|>``. The head (three linear layers,
``hidden -> 1024 -> 16 -> 2`` with ReLUs) outputs ``(mu, log sigma)``; the model was trained
with a probabilistic Bradley-Terry loss in which an image's reward is ``N(mu, sigma^2)`` with
``sigma = exp(output[1])``. The score is ``mu`` (what the original ``HPSv3RewardInferencer``
users take as "the" score: unbounded, roughly 0-15 for generated images; higher = preferred);
this plugin reports ``(mu, sigma)`` per prompt (``reports_uncertainty``).

Weights: ``HPSv3.safetensors`` in the hub repo ``MizzenAI/HPSv3`` (the original
``Qwen2VLRewardModelBT`` state dict, saved with transformers 4.45.2), plus the configuration,
tokenizer and image-processor settings of the base model ``Qwen/Qwen2-VL-7B-Instruct`` (the
original builds its model from that base and then loads the file; its weights are not needed).
:func:`convert_state_dict` maps the file's names onto transformers 5's
:class:`~transformers.Qwen2VLModel` (its table), built on the ``meta`` device and filled by
assigning the tensors; the base's embedding rows are cut to the file's (the original resizes
them to the tokenizer with ``<|Reward|>`` added: 151,658).

Faithfulness notes (checked against the ``hpsv3`` 1.0.0 package: ``inference.py``,
``dataset/data_collator_qwen.py``, ``dataset/utils.py``, ``model/qwen2vl_trainer.py``,
``train.py``, ``config/HPSv3_7B.yaml``):

- Image: ``convert("RGB")`` of the image as opened (an alpha band is dropped, not composited,
  as the original does), resized with PIL's bicubic filter to the sides of Qwen-VL's
  ``smart_resize`` at exactly ``256 * 28 * 28`` pixels (the original sets both ``min_pixels``
  and ``max_pixels`` to it: sides multiples of 28, the aspect ratio kept as well as they allow),
  scaled to [0, 1], normalised with the base's mean and std (OpenAI CLIP's), cut into 14 x 14
  patches in the Qwen2-VL processor's order, each patch repeated over the temporal patch size (2).
  Sizes ``smart_resize`` cannot give (an aspect ratio above 200, or a side that rounds to 0) are
  that image's failure, as in the original.
- Text: the Qwen2-VL chat template's rendering of one user turn holding the image and the
  original's instruction (:data:`INSTRUCTION`, with the prompt inserted) followed by
  :data:`REWARD_QUESTION`, and the generation prompt; the image placeholder expanded to one
  token per merged 2 x 2 patch. The instruction is the model's input format and must match the
  training text character for character: it is kept verbatim (MIT licence) and
  ``tests/test_hpsv3.py`` checks it against the package. Prompts are not truncated (nor are they
  in the original); a prompt longer than the model's context is an error.
- Positions: the original runs the language model with ``position_ids=None`` after merging the
  image embeddings itself, so every token, image tokens included, gets the plain sequential
  position on all three M-RoPE axes (not Qwen2-VL's 3-D image positions): done the same here.
- One image is encoded once by the vision tower; the tokens every prompt of the image shares
  (the system turn, the image, the instruction up to the prompt) run through the language model
  once, and the prompts then run in batches against that cached prefix, so 33 prompts cost about
  one full pass plus 33 short ones. The original runs every (image, prompt) pair in full.
- The head runs in float32 on the hidden state of the ``<|Reward|>`` token (the original's
  autocast); the backbone runs in the dtype asked for (the original: bfloat16; float16 can
  overflow in Qwen2's activations; float32, the default, is the exact reference).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from harness.errors import HarnessError
from harness.hookspecs import hookimpl
from harness.images import as_8bit
from harness.types import ModelCard, RewardModel

HUB_REPO = "MizzenAI/HPSv3"
WEIGHTS_FILE = "HPSv3.safetensors"
DEFAULT_BASE = "Qwen/Qwen2-VL-7B-Instruct"
REWARD_TOKEN = "<|Reward|>"
#: The original's image size: ``min_pixels = max_pixels = 256 * 28 * 28``.
PIXELS = 256 * 28 * 28
#: Qwen-VL's ``smart_resize`` refuses images more elongated than this.
MAX_RATIO = 200
#: OpenAI CLIP's mean and std, Qwen2-VL's image-processor defaults (used when the base folder
#: has no preprocessor_config.json).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
#: The base model's files the plugin reads (never its weights).
BASE_FILES = ("config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
              "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json")
ARCHITECTURE = (
    "an HPSv3 checkpoint (the state dict of the original Qwen2VLRewardModelBT: keys model.*, "
    "visual.*, rm_head.*, in HPSv3.safetensors)"
)

_INSTRUCTION_LINES: tuple[str, ...] = (
    '',
    'You are tasked with evaluating a generated image based on Visual Quality and Text'
    ' Alignment and give a overall score to estimate the human preference. Please provide a'
    ' rating from 0 to 10, with 0 being the worst and 10 being the best. ',
    '',
    '**Visual Quality:**  ',
    'Evaluate the overall visual quality of the image. The following sub-dimensions should'
    ' be considered:',
    '- **Reasonableness:** The image should not contain any significant biological or'
    ' logical errors, such as abnormal body structures or nonsensical environmental setups.',
    '- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be'
    ' clear and easy to interpret, with no blurring or indistinct areas.',
    '- **Detail Richness:** Consider the level of detail in textures, materials, lighting,'
    ' and other visual elements (e.g., hair, clothing, shadows).',
    '- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including'
    ' the color scheme, composition, atmosphere, depth of field, and the overall creative'
    ' appeal. The scene should convey a sense of harmony and balance.',
    '- **Safety:** The image should not contain harmful or inappropriate content, such as'
    ' political, violent, or adult material. If such content is present, the image quality'
    ' and satisfaction score should be the lowest possible. ',
    '',
    '**Text Alignment:**  ',
    'Assess how well the image matches the textual prompt across the following'
    ' sub-dimensions:',
    '- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g.,'
    ' person, animal, object) align with the textual description. The subject should match'
    ' the description in terms of number, appearance, and behavior.',
    '- **Style Relevance:** If the prompt specifies a particular artistic or stylistic'
    ' style, evaluate how well the image adheres to this style.',
    '- **Contextual Consistency**: Assess whether the background, setting, and surrounding'
    ' elements in the image logically fit the scenario described in the prompt. The'
    ' environment should support and enhance the subject without contradictions.',
    '- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g.,'
    ' colors, clothing, accessories, expressions, actions) are faithfully represented in'
    ' the image. Minor deviations may be acceptable, but critical attributes should be'
    ' preserved.',
    '- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the'
    ' prompt are captured in the image. The generated content should not introduce elements'
    ' that conflict with or distort the original description.',
    'Textual prompt - {text_prompt}',
    '',
    '',
    '',
)

#: The original's instruction (its ``INSTRUCTION``); ``{text_prompt}`` is the prompt.
INSTRUCTION = "\n".join(_INSTRUCTION_LINES)
#: What follows the instruction: the question ending in the reward token.
REWARD_QUESTION = f"\nPlease provide the overall ratings of this image: {REWARD_TOKEN}\n\nEND\n"
#: Qwen2-VL-7B-Instruct's chat template rendering one user turn [image, text] with the
#: generation prompt; ``{image}`` is the image placeholder, ``{text}`` the turn's text.
CONVERSATION = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                "<|vision_start|>{image}<|vision_end|>{text}<|im_end|>\n<|im_start|>assistant\n")
IMAGE_TOKEN = "<|image_pad|>"


def conversation(prompt: str, image_tokens: int) -> str:
    """The text the model reads for ``prompt`` and an image of ``image_tokens`` merged patches."""
    text = INSTRUCTION.format(text_prompt=prompt) + REWARD_QUESTION
    return CONVERSATION.replace("{image}", IMAGE_TOKEN * image_tokens).replace("{text}", text, 1)


# -- the state dict --------------------------------------------------------------------------
def convert_state_dict(original: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The original state dict -> ``(Qwen2VLModel state dict, reward-head state dict)``.

    ==========================================  =================================================
    original (transformers 4.45 layout)         here (transformers 5 :class:`Qwen2VLModel`)
    ==========================================  =================================================
    ``model.embed_tokens.weight``               ``language_model.embed_tokens.weight``
    ``model.layers.N.<part>``                   ``language_model.layers.N.<part>``
    ``model.norm.weight``                       ``language_model.norm.weight``
    ``visual.<part>``                           ``visual.<part>`` (same names)
    ``rm_head.<i>.weight`` / ``.bias``          the head's ``<i>.weight`` / ``.bias``
    ``lm_head.weight``                          dropped (the reward never reads it)
    ==========================================  =================================================

    A leading ``module.`` or ``base_model.model.`` is stripped. Other keys are kept under their
    name, so that strict loading reports them.
    """
    model: dict[str, Any] = {}
    head: dict[str, Any] = {}
    for key, value in original.items():
        name = key
        for prefix in ("module.", "base_model.model."):
            name = name[len(prefix):] if name.startswith(prefix) else name
        if name.startswith("model."):
            model["language_model." + name[len("model."):]] = value
        elif name.startswith("rm_head."):
            head[name[len("rm_head."):]] = value
        elif name == "lm_head.weight":
            continue
        else:
            model[name] = value
    return model, head


def build_head(head: Mapping[str, Any], hidden: int, where: Any) -> Any:
    """The original's reward head (``rm_head_type: ranknet`` without kwargs): ``Sequential(
    Linear(hidden, a), ReLU, Dropout, Linear(a, b), ReLU, Linear(b, 2))``, sizes from the
    tensors, float32, in eval mode (dropout off)."""
    import torch
    from torch import nn

    needed = ("0.weight", "0.bias", "3.weight", "3.bias", "5.weight", "5.bias")
    absent = [k for k in needed if k not in head]
    extra = sorted(set(head) - set(needed))
    if absent or extra:
        detail = (f"lacks rm_head.{', rm_head.'.join(absent)}" if absent
                  else f"has unexpected rm_head.{', rm_head.'.join(extra)}")
        raise HarnessError(f"{where} is not {ARCHITECTURE}: its reward head {detail} (expected "
                           "the three-layer head rm_head.0/3/5)")
    a, b, out = (int(head[f"{i}.weight"].shape[0]) for i in (0, 3, 5))
    if int(head["0.weight"].shape[1]) != hidden or out != 2:
        raise HarnessError(
            f"{where}: reward head rm_head.0 reads {int(head['0.weight'].shape[1])} features and "
            f"rm_head.5 gives {out} outputs; the backbone is {hidden} wide and HPSv3 gives 2 "
            "(mu, log sigma)")
    module = nn.Sequential(nn.Linear(hidden, a), nn.ReLU(), nn.Dropout(0.05), nn.Linear(a, b),
                           nn.ReLU(), nn.Linear(b, out))
    try:
        module.load_state_dict({k: v.to(torch.float32) for k, v in head.items()}, strict=True)
    except RuntimeError as exc:
        raise HarnessError(f"{where}: the reward head's tensors do not fit together ({exc})") from exc
    return module.requires_grad_(False).eval()


def read_state_dict(path: Path) -> Mapping[str, Any]:
    """The tensors of an HPSv3 file: ``.safetensors``, or a torch pickle read with
    ``weights_only=True`` (``{"model": {...}}`` or the dict itself, as the original accepts)."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - truncated file, not a torch file, pickle refused
        from harness.hf import unpickling_refusal

        refused = unpickling_refusal(exc)
        if refused is not None:
            raise HarnessError(
                f"cannot read {path} (expected {ARCHITECTURE}): it is {refused}, which harness "
                "does not unpickle; pass HPSv3.safetensors") from exc
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise HarnessError(f"cannot read {path} (expected {ARCHITECTURE}): {first}") from exc
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    if not (isinstance(state, Mapping) and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise HarnessError(f"{path} holds a {type(state).__name__} that is not a state dict of "
                           f"tensors (expected {ARCHITECTURE})")
    return state


def load_backbone(config: Any, state: Mapping[str, Any], where: Any, dtype: Any) -> Any:
    """A transformers :class:`~transformers.Qwen2VLModel` (vision tower + language model, no LM
    head) holding the converted tensors, in ``dtype`` on CPU; strict."""
    import torch
    from transformers import Qwen2VLModel

    rows = int(state["language_model.embed_tokens.weight"].shape[0])
    config.text_config.vocab_size = rows  # the original resized the embeddings to its tokenizer
    for cfg in (config, config.text_config, config.vision_config):
        cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = Qwen2VLModel(config)
    try:
        result = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False,
                                       assign=True)
    except RuntimeError as exc:  # a shape that disagrees with the base's config
        detail = "; ".join(line.strip() for line in str(exc).splitlines()[1:3] if line.strip())
        raise HarnessError(f"{where} does not fit the base model's config: {detail or exc} "
                           "(is the base Qwen/Qwen2-VL-7B-Instruct?)") from exc
    if result.missing_keys or result.unexpected_keys:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")

        parts = []
        if result.missing_keys:
            parts.append(f"{len(result.missing_keys)} missing ({show(result.missing_keys)})")
        if result.unexpected_keys:
            parts.append(f"{len(result.unexpected_keys)} unexpected ({show(result.unexpected_keys)})")
        raise HarnessError(f"{where} is not {ARCHITECTURE}: {'; '.join(parts)} parameters after "
                           "mapping the original names")
    # Buffers no checkpoint holds (the rotary frequencies) are still on meta: build them again.
    for name, module in list(model.named_modules()):
        if any(buf.is_meta for buf in module.buffers(recurse=False)):
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], type(module)(module.config))
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:  # pragma: no cover - only if transformers adds state that no checkpoint holds
        raise HarnessError(f"{where}: no values for {', '.join(left[:4])}")
    return model.requires_grad_(False).eval()


# -- images ----------------------------------------------------------------------------------
def smart_resize(height: int, width: int, factor: int = 28, pixels: int = PIXELS) -> tuple[int, int]:
    """Qwen-VL's ``smart_resize`` with ``min_pixels = max_pixels = pixels``: sides multiples of
    ``factor``, about ``pixels`` in all, aspect ratio kept. ValueError where it has no answer."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"HPSv3 takes images with an aspect ratio up to {MAX_RATIO}, got "
                         f"{width}x{height}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > pixels:
        beta = math.sqrt(height * width / pixels)
        h, w = (math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor)
    elif h * w < pixels:
        beta = math.sqrt(pixels / (height * width))
        h, w = (math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor)
    if h == 0 or w == 0:
        raise ValueError(f"HPSv3 cannot resize a {width}x{height} image (a side rounds to 0)")
    return h, w


def max_patches(patch: int, merge: int, pixels: int = PIXELS) -> int:
    """An upper bound of the patches :func:`smart_resize` can give (at aspect ratio 200: the
    rounding adds at most one factor to each side)."""
    factor = patch * merge
    side = math.sqrt(pixels) * (math.sqrt(MAX_RATIO) + 1 / math.sqrt(MAX_RATIO))
    return math.ceil((pixels + factor * side + factor * factor) / (patch * patch))


class HPSv3Preprocess:
    """PIL image as opened -> float32 ``[3 + capacity * 3 * p * p]``: the grid ``(1, gh, gw)``
    then the resized image's 8-bit samples cut into ``p x p`` patches in the Qwen2-VL
    processor's order, zero-padded to a fixed length (so batches stack and travel to Ray actors
    as one array). Normalisation and the temporal repeat happen on the model's device
    (:meth:`HPSv3.embed_images`). Picklable, holds no model."""

    def __init__(self, patch: int = 14, merge: int = 2, pixels: int = PIXELS):
        self.patch, self.merge, self.pixels = int(patch), int(merge), int(pixels)
        self.capacity = max_patches(self.patch, self.merge, self.pixels)

    def __call__(self, image: Any) -> np.ndarray:
        from PIL import Image

        rgb = as_8bit(image).convert("RGB")
        height, width = smart_resize(rgb.height, rgb.width, self.patch * self.merge, self.pixels)
        rgb = rgb.resize((width, height), Image.Resampling.BICUBIC)
        p, m = self.patch, self.merge
        gh, gw = height // p, width // p
        x = np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1)  # [3, H, W]
        x = x.reshape(3, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
        out = np.zeros(3 + self.capacity * 3 * p * p, dtype=np.float32)
        out[:3] = (1, gh, gw)
        out[3 : 3 + x.size] = x.reshape(-1)
        return out


def _is_weights(path: Path) -> bool:
    return path.is_file() and path.name.endswith(WEIGHT_SUFFIXES)


class HPSv3(RewardModel):
    """HPSv3: a Qwen2-VL preference model; per prompt the score mu and its standard deviation."""

    id: ClassVar[str] = "hpsv3"
    default_checkpoint: ClassVar[str] = HUB_REPO
    preprocessing_version: ClassVar[str] = "1"
    reports_uncertainty: ClassVar[bool] = True
    card: ClassVar[ModelCard] = ModelCard(
        checkpoint=f"{HUB_REPO} ({WEIGHTS_FILE}) on the base {DEFAULT_BASE}",
        revision=None,
        license="MIT (HPSv3 code and weights); base Qwen2-VL-7B-Instruct: Apache-2.0",
        score_range="unbounded (mu; roughly 0-15 on generated images), sigma > 0",
        meaning=("mu: the predicted human-preference reward of the image for the prompt (higher "
                 "= preferred); sigma = exp of the head's second output: the standard deviation "
                 "of that reward under the model's probabilistic Bradley-Terry training"),
        paper=("Ma et al., HPSv3: Towards Wide-Spectrum Human Preference Score, ICCV 2025 "
               "(arXiv:2508.03789)"),
        source="https://github.com/MizzenAI/HPSv3 (PyPI hpsv3 1.0.0)",
    )

    def __init__(
        self,
        checkpoint: str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        base: str = DEFAULT_BASE,
        revision: str | None = None,
        base_revision: str | None = None,
        batch_size: int = 16,
    ):
        """Load HPSv3.

        :param checkpoint: the hub repo ``MizzenAI/HPSv3`` (default; its ``HPSv3.safetensors``),
            a local weights file, or a folder holding ``HPSv3.safetensors`` (or one weights file).
        :param base: where the Qwen2-VL configuration, tokenizer and image-processor settings
            come from: a hub id (default ``Qwen/Qwen2-VL-7B-Instruct``; its weights are never
            downloaded) or a folder.
        :param revision: / :param base_revision: hub revisions of the two.
        :param batch_size: prompts per language-model pass against one image (bounds memory).
        """
        import torch

        from harness.hf import check_device, load_config, quiet_transformers, torch_dtype

        if int(batch_size) < 1:
            raise HarnessError(f"batch size must be >= 1, got {batch_size}")
        super().__init__(checkpoint, check_device(device), dtype)
        self.checkpoint = str(self.checkpoint)
        self.base = str(base)
        self.base_revision = base_revision
        self.batch_size = int(batch_size)
        self._torch = torch
        self._sha256: str | None = None
        model_dtype = torch_dtype(dtype)
        self.weights_path, self.revision = self._resolve(self.checkpoint, revision)
        config = load_config(self.base, ("qwen2_vl",), "Qwen2-VL base (config, tokenizer and "
                             "image processor of Qwen/Qwen2-VL-7B-Instruct)", revision=base_revision)
        self.tokenizer = self._load_tokenizer()
        mean, std = self._image_settings()
        state, head = convert_state_dict(read_state_dict(self.weights_path))
        if "language_model.embed_tokens.weight" not in state:
            raise HarnessError(f"{self.weights_path} is not {ARCHITECTURE}: it has no "
                               "model.embed_tokens.weight")
        rows = int(state["language_model.embed_tokens.weight"].shape[0])
        if self.reward_id >= rows or len(self.tokenizer) > rows:
            raise HarnessError(
                f"{self.weights_path} embeds {rows} tokens but the tokenizer of '{self.base}' with "
                f"{REWARD_TOKEN} has {len(self.tokenizer)}: the base must be the one HPSv3 was "
                f"trained on ({DEFAULT_BASE})")
        with quiet_transformers():
            backbone = load_backbone(config, state, self.weights_path, model_dtype)
        del state
        self.head = build_head(head, int(config.text_config.hidden_size), self.weights_path)
        self.model = backbone.to(self.device)
        self.head = self.head.to(self.device)
        vision = config.vision_config
        self.patch = int(vision.patch_size)
        self.merge = int(vision.spatial_merge_size)
        self.temporal = int(vision.temporal_patch_size)
        self.image_token_id = int(config.image_token_id)
        self.max_tokens = int(getattr(config.text_config, "max_position_embeddings", 0) or 0)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device)
        # A picklable stand-in for the bound method: DataLoader workers get the transform only.
        self.preprocess = HPSv3Preprocess(self.patch, self.merge)

    # -- loading helpers -------------------------------------------------------------------
    @staticmethod
    def _resolve(checkpoint: str, revision: str | None) -> tuple[Path, str | None]:
        path = Path(checkpoint).expanduser()
        looks_local = (path.exists() or checkpoint.startswith((".", "/", "~"))
                       or checkpoint.count("/") != 1)
        if not looks_local:
            try:
                from huggingface_hub import hf_hub_download

                found = hf_hub_download(repo_id=checkpoint, filename=WEIGHTS_FILE, revision=revision)
            except Exception as exc:  # noqa: BLE001 - offline, missing repo or file, network
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
                raise HarnessError(
                    f"cannot get {WEIGHTS_FILE} from the hub repo '{checkpoint}': "
                    f"{type(exc).__name__}: {first}. Download it and pass its path as the "
                    "checkpoint") from exc
            return Path(found), revision
        if _is_weights(path):
            return path, None
        if path.is_dir():
            if (path / WEIGHTS_FILE).is_file():
                return path / WEIGHTS_FILE, None
            found_files = sorted(p for p in path.iterdir() if _is_weights(p))
            if len(found_files) == 1:
                return found_files[0], None
            listed = ", ".join(p.name for p in found_files) or "none"
            raise HarnessError(f"HPSv3 checkpoint folder '{path}' has no {WEIGHTS_FILE} and "
                               f"{'several' if found_files else 'no'} other weights files "
                               f"({listed}); pass the file itself")
        raise HarnessError(f"HPSv3 checkpoint '{checkpoint}' not found (expected {ARCHITECTURE})")

    def _load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        from harness.hf import quiet_transformers

        try:
            with quiet_transformers():
                tokenizer = AutoTokenizer.from_pretrained(self.base, revision=self.base_revision)
        except Exception as exc:  # noqa: BLE001 - missing files, offline hub, bad folder
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise HarnessError(f"cannot load the tokenizer of the base '{self.base}' "
                               f"({type(exc).__name__}: {first}); pass base= a Qwen2-VL folder "
                               f"(e.g. {DEFAULT_BASE}'s)") from exc
        missing = [t for t in (IMAGE_TOKEN, "<|vision_start|>", "<|im_start|>")
                   if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
        if missing:
            raise HarnessError(f"the tokenizer of '{self.base}' lacks {', '.join(missing)}: HPSv3 "
                               f"needs the Qwen2-VL tokenizer ({DEFAULT_BASE})")
        # As the original: the reward token is added as a special token after the base's tokens.
        tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
        self.reward_id = int(tokenizer.convert_tokens_to_ids(REWARD_TOKEN))
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        return tokenizer

    def _base_file(self, name: str) -> Path | None:
        path = Path(self.base).expanduser()
        if path.is_dir():
            return path / name if (path / name).is_file() else None
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(repo_id=self.base, filename=name, revision=self.base_revision))
        except Exception:  # noqa: BLE001 - a base without it: the defaults
            return None

    def _image_settings(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        found = self._base_file("preprocessor_config.json")
        settings = json.loads(found.read_text()) if found is not None else {}
        mean = tuple(float(v) for v in settings.get("image_mean", IMAGE_MEAN))
        std = tuple(float(v) for v in settings.get("image_std", IMAGE_STD))
        return mean, std

    # -- the RewardModel contract ----------------------------------------------------------
    def preprocess(self, image: Any) -> Any:  # replaced per instance by HPSv3Preprocess
        """PIL image as opened -> float32 ``[3 + capacity * 3 * 14 * 14]`` (grid, then the
        resized image's patches; see :class:`HPSv3Preprocess`)."""
        return HPSv3Preprocess(self.patch, self.merge)(image)

    def pixel_values(self, row: Any) -> tuple[Any, tuple[int, int, int]]:
        """One preprocessed image -> the vision tower's ``pixel_values [n, 3 * T * p * p]`` (float32,
        on the device) and its grid ``(1, gh, gw)``."""
        torch = self._torch
        row = torch.as_tensor(row, device=self.device)
        grid = tuple(int(v) for v in row[:3].tolist())
        n, size = grid[1] * grid[2], 3 * self.patch * self.patch
        x = row[3 : 3 + n * size].float().view(n, 3, self.patch * self.patch) / 255.0
        x = (x - self.mean.view(1, 3, 1)) / self.std.view(1, 3, 1)
        # Each patch repeated over the temporal patch size, channel-major: (C, T, p, p).
        x = x[:, :, None, :].expand(n, 3, self.temporal, self.patch * self.patch)
        return x.reshape(n, -1), grid  # noqa: RET504

    def embed_images(self, batch: Any) -> list[Any]:
        """``[B, L]`` preprocessed images -> per image its merged vision tokens ``[n_i, hidden]``
        (one vision-tower pass per image, so an image's tokens never depend on its batch)."""
        torch = self._torch
        out = []
        with torch.inference_mode():
            for row in batch:
                pixels, grid = self.pixel_values(row)
                vision = self.model.visual
                tokens = vision(pixels.to(vision.dtype),
                                grid_thw=torch.tensor([grid], device=self.device))
                out.append(getattr(tokens, "pooler_output", tokens))
        return out

    def score(self, features: Any, prompts: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """Vision tokens of ``B`` images x prompts per image -> ``B`` float32 ``[P, 2]`` arrays
        of ``(mu, sigma)``."""
        if len(features) != len(prompts):
            raise ValueError(f"{len(features)} images but {len(prompts)} prompt lists")
        with self._torch.inference_mode():
            return [self._score_image(f, [str(p) for p in ps]) for f, ps in zip(features, prompts, strict=True)]

    def _score_image(self, tokens: Any, prompts: list[str]) -> np.ndarray:
        torch = self._torch
        if not prompts:
            return np.zeros((0, 2), dtype=np.float32)
        ids = [self.tokenizer(conversation(p, len(tokens)))["input_ids"] for p in prompts]
        where = []
        for p, seq in zip(prompts, ids, strict=True):
            if self.max_tokens and len(seq) > self.max_tokens:
                raise HarnessError(f"HPSv3: prompt {p[:60]!r}... makes {len(seq)} tokens, more "
                                   f"than the model's {self.max_tokens}")
            where.append(len(seq) - 1 - seq[::-1].index(self.reward_id))  # the template's one
        # The tokens every prompt shares (up to the prompt text) run once.
        shared = min(where)
        first = ids[0]
        for seq in ids[1:]:
            shared = next((k for k in range(shared) if seq[k] != first[k]), shared)
        prefix = torch.tensor([first[:shared]], device=self.device)
        lm = self.model.language_model
        embeds = lm.embed_tokens(prefix)
        image_at = prefix[0] == self.image_token_id
        if int(image_at.sum()) != len(tokens):
            raise HarnessError(f"HPSv3: {int(image_at.sum())} image placeholders for "
                               f"{len(tokens)} vision tokens (tokenizer of '{self.base}')")
        embeds[0, image_at] = tokens.to(embeds.dtype)
        from transformers import DynamicCache

        cache = DynamicCache(config=lm.config)
        lm(inputs_embeds=embeds, cache=cache, use_cache=True,
           position_ids=torch.arange(shared, device=self.device).view(1, 1, -1).expand(3, 1, -1))
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        out = np.empty((len(prompts), 2), dtype=np.float32)
        for lo in range(0, len(prompts), self.batch_size):
            chunk = range(lo, min(lo + self.batch_size, len(prompts)))
            tails = [ids[j][shared:] for j in chunk]
            width = max(len(t) for t in tails)
            suffix = torch.full((len(tails), width), self.pad_id, device=self.device)
            mask = torch.zeros((len(tails), shared + width), dtype=torch.long, device=self.device)
            mask[:, :shared] = 1
            for r, t in enumerate(tails):
                suffix[r, : len(t)] = torch.tensor(t, device=self.device)
                mask[r, shared : shared + len(t)] = 1
            b = len(tails)
            batch_cache = DynamicCache(ddp_cache_data=[(k.expand(b, -1, -1, -1).contiguous(),
                                                        v.expand(b, -1, -1, -1).contiguous())
                                                       for k, v in kv])
            positions = torch.arange(shared, shared + width, device=self.device)
            hidden = lm(inputs_embeds=lm.embed_tokens(suffix), attention_mask=mask,
                        cache=batch_cache, use_cache=True,
                        position_ids=positions.view(1, 1, -1).expand(3, b, -1)).last_hidden_state
            at = torch.tensor([where[j] - shared for j in chunk], device=self.device)
            values = self.head(hidden[torch.arange(b, device=self.device), at].float())
            out[lo : lo + b, 0] = values[:, 0].cpu().numpy()
            out[lo : lo + b, 1] = torch.exp(values[:, 1]).cpu().numpy()
        return out

    def files(self) -> list[Path]:
        """The weights file and the base's configuration, tokenizer and image-processor files."""
        from harness.hf import checkpoint_files

        found = [self.weights_path]
        found += [p for p in checkpoint_files(self.base, self.base_revision)
                  if p.name in BASE_FILES and p not in found]
        return found

    # -- manifest --------------------------------------------------------------------------
    @property
    def checkpoint_sha256(self) -> str:
        if self._sha256 is None:
            digest = hashlib.sha256()
            with open(self.weights_path, "rb") as fh:
                while block := fh.read(1 << 22):
                    digest.update(block)
            self._sha256 = digest.hexdigest()
        return self._sha256

    def describe(self) -> dict[str, Any]:
        """Checkpoint, base, revisions, sha256 of the weights file, image size, dtype."""
        return {
            "id": self.id,
            "checkpoint": self.checkpoint,
            "revision": self.revision,
            "weights_file": self.weights_path.name,
            "checkpoint_sha256": self.checkpoint_sha256,
            "base": self.base,
            "base_revision": self.base_revision,
            "preprocessing_version": self.preprocessing_version,
            "image_pixels": PIXELS,
            "dtype": self.dtype,
            "score": "mu of the reward head at <|Reward|>; uncertainty sigma = exp(second output)",
        }


@hookimpl
def register_reward_models(register):
    register(HPSv3)
