"""ImageReward-v1.0 (Xu et al., NeurIPS 2023) as a reward model, without the ``image-reward`` package.

ImageReward scores how well an image matches a prompt and how much people would like it. The
network is BLIP's: a ViT-L/16 image encoder (224 px), a BERT text encoder whose layers also
cross-attend to the image tokens (BLIP's "med" BertModel, configured by ``med_config.json``), and
an MLP head on the text encoder's first ([CLS]) token. The head's output is standardised with the
constants published in THUDM/ImageReward ``ImageReward/ImageReward.py``:
``(reward - 0.16717362830052426) / 1.0333394966054072``. Higher is better.

This module runs the original weights (``ImageReward.pt`` + ``med_config.json`` from the hub repo
``THUDM/ImageReward``) on maintained transformers modules: :class:`~transformers.BlipVisionModel`
for the ViT and :class:`~transformers.BlipTextModel` (BERT with cross-attention) for the text
encoder. :func:`convert_state_dict` maps the original parameter names onto them (see its docstring
for the table); loading is strict apart from the unused entries listed in
:data:`IGNORED_KEYS`.

Faithfulness notes (checked against ``ImageReward/ImageReward.py`` and ``models/BLIP/*.py``):

- Image preprocessing, in the original's order (``Resize``, ``CenterCrop``, then
  ``_convert_image_to_rgb``): resize the short side to 224 with PIL bicubic (long side
  ``int(224 * long / short)``) on the image in its own mode (PIL resizes palette and 1-bit images
  with nearest neighbour, and RGBA with premultiplied alpha), centre crop 224 (offsets rounded
  like torchvision), only then ``convert("RGB")`` (no compositing: an RGBA image loses its
  alpha), scale to [0, 1], normalise with the CLIP mean/std. Implemented with PIL + numpy (no
  torchvision). One deliberate difference: an image with samples wider than 8 bits (a 16-bit
  greyscale PNG) is first scaled to 8 bits as a viewer shows it (:func:`harness.images.as_8bit`),
  where the original's ``convert("RGB")`` would clip it to near white.
- Text: bert-base-uncased tokenizer with ``[DEC]`` (bos) and ``[ENC]`` added (vocabulary 30524),
  truncated to 35 tokens. The original pads to 35; padding to the longest prompt of a batch gives
  the same numbers because padding is masked. As in the original ``score``, the sequence starts
  with ``[CLS]``: ImageReward does not substitute ``[ENC]`` for the first token.
- The cross-attention keys/values come from all ``1 + 196`` image tokens (no image mask).

Each image is encoded once (:meth:`ImageReward.embed_images`); :meth:`ImageReward.score` runs the
text encoder over all (image, prompt) pairs of a batch together, ``batch_size`` pairs per forward.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from harness.errors import HarnessError
from harness.hookspecs import hookimpl
from harness.images import as_8bit
from harness.types import ModelCard, RewardModel

HUB_REPO = "THUDM/ImageReward"
CHECKPOINT_FILE = "ImageReward.pt"
CONFIG_FILE = "med_config.json"
DEFAULT_TOKENIZER = "bert-base-uncased"
#: Checkpoint names that mean "the published weights in THUDM/ImageReward".
HUB_ALIASES = ("ImageReward-v1.0", HUB_REPO)

#: Published standardisation of the raw head output (ImageReward/ImageReward.py).
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_TEXT_TOKENS = 35
#: CLIP normalisation used by ImageReward's ``_transform``.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

#: BLIP ``create_vit('large', 224)``: timm-style ViT-L/16, LayerNorm eps 1e-6, mlp_ratio 4.
DEFAULT_VISION_CONFIG: dict[str, Any] = {
    "image_size": 224,
    "patch_size": 16,
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-6,
}
#: Widths of the MLP head after the text hidden size (``MLP(768)`` in the original).
HEAD_WIDTHS = (1024, 128, 64, 16, 1)
#: Indices of the Linear layers inside the original ``mlp.layers`` nn.Sequential
#: (Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear).
HEAD_LINEAR_INDICES = (0, 2, 4, 6, 7)

ARCHITECTURE = (
    "ImageReward-v1.0 (BLIP ViT-L/16 image encoder + BERT text encoder with cross-attention + "
    f"MLP head; a folder with {CHECKPOINT_FILE} and {CONFIG_FILE})"
)

#: Entries of the original checkpoint that ImageReward's scoring never uses and that are dropped:
#: BLIP's contrastive projections and the text embeddings' ``position_ids`` buffer.
IGNORED_KEYS = (
    "blip.vision_proj.weight",
    "blip.vision_proj.bias",
    "blip.text_proj.weight",
    "blip.text_proj.bias",
    "blip.text_encoder.embeddings.position_ids",
)

_VISION_RENAMES = (
    # (original suffix under blip.visual_encoder., transformers name under vision_model.)
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj.weight", "embeddings.patch_embedding.weight"),
    ("patch_embed.proj.bias", "embeddings.patch_embedding.bias"),
    ("norm.weight", "post_layernorm.weight"),
    ("norm.bias", "post_layernorm.bias"),
)
_VISION_BLOCK_RENAMES = {
    "norm1": "layer_norm1",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "norm2": "layer_norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_BLOCK_RE = re.compile(
    r"^blocks\.(\d+)\.(norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)$"
)
_HEAD_RE = re.compile(r"^mlp\.layers\.(\d+)\.(weight|bias)$")


def convert_state_dict(original: Mapping[str, Any]) -> dict[str, Any]:
    """Rename an original ImageReward state dict to this module's network (no tensor changes).

    ================================================  ==================================================
    original (``ImageReward.pt``)                     here (``vision_model`` = BlipVisionModel,
                                                      ``text_model`` = BlipTextModel, ``head``)
    ================================================  ==================================================
    ``blip.visual_encoder.cls_token``                 ``vision_model.embeddings.class_embedding``
    ``blip.visual_encoder.pos_embed``                 ``vision_model.embeddings.position_embedding``
    ``blip.visual_encoder.patch_embed.proj.*``        ``vision_model.embeddings.patch_embedding.*``
    ``blip.visual_encoder.blocks.N.norm1.*``          ``vision_model.encoder.layers.N.layer_norm1.*``
    ``blip.visual_encoder.blocks.N.attn.qkv.*``       ``vision_model.encoder.layers.N.self_attn.qkv.*``
    ``blip.visual_encoder.blocks.N.attn.proj.*``      ``vision_model.encoder.layers.N.self_attn.projection.*``
    ``blip.visual_encoder.blocks.N.norm2.*``          ``vision_model.encoder.layers.N.layer_norm2.*``
    ``blip.visual_encoder.blocks.N.mlp.fc1/fc2.*``    ``vision_model.encoder.layers.N.mlp.fc1/fc2.*``
    ``blip.visual_encoder.norm.*``                    ``vision_model.post_layernorm.*``
    ``blip.text_encoder.<rest>``                      ``text_model.<rest>`` (same BERT names: embeddings,
                                                      ``encoder.layer.N.attention/crossattention/...``)
    ``mlp.layers.{0,2,4,6,7}.*``                      ``head.{0,2,4,6,7}.*``
    ================================================  ==================================================

    The fused ``qkv`` projection needs no split: timm's ``Attention`` and transformers'
    ``BlipAttention`` both read its output as ``[3, heads, head_dim]``. A leading ``module.``
    (DataParallel) is stripped. :data:`IGNORED_KEYS` are dropped. Keys that match no rule are kept
    under their original name, so that strict loading reports them as unexpected.
    """
    converted: dict[str, Any] = {}
    for key, value in original.items():
        name = key[len("module.") :] if key.startswith("module.") else key
        if name in IGNORED_KEYS:
            continue
        converted[_convert_key(name)] = value
    return converted


def _convert_key(name: str) -> str:
    if name.startswith("blip.visual_encoder."):
        rest = name[len("blip.visual_encoder.") :]
        for old, new in _VISION_RENAMES:
            if rest == old:
                return "vision_model." + new
        m = _BLOCK_RE.match(rest)
        if m:
            block, part, kind = m.groups()
            return f"vision_model.encoder.layers.{block}.{_VISION_BLOCK_RENAMES[part]}.{kind}"
        return name
    if name.startswith("blip.text_encoder."):
        return "text_model." + name[len("blip.text_encoder.") :]
    m = _HEAD_RE.match(name)
    if m and int(m.group(1)) in HEAD_LINEAR_INDICES:
        return f"head.{m.group(1)}.{m.group(2)}"
    return name


def vision_config_from(med_config: Mapping[str, Any]) -> dict[str, Any]:
    """The ViT settings: :data:`DEFAULT_VISION_CONFIG` updated by ``med_config["vision_config"]``.

    The published ``med_config.json`` has no ``vision_config`` (the original hard-codes ViT-L/16 at
    224 px); the entry exists so that tests and variants can describe a smaller ViT.
    """
    vision = dict(DEFAULT_VISION_CONFIG)
    extra = med_config.get("vision_config") or {}
    if not isinstance(extra, Mapping):
        raise HarnessError(
            f"{CONFIG_FILE}: 'vision_config' must be an object, got {type(extra).__name__}"
        )
    vision.update(extra)
    if "intermediate_size" not in extra and "hidden_size" in extra:
        vision["intermediate_size"] = 4 * int(vision["hidden_size"])
    return vision


class ImageRewardPreprocess:
    """ImageReward's image transform with PIL + numpy: PIL image -> float32 ``[3, S, S]``.

    A small picklable object (no model inside), so DataLoader workers can receive it cheaply.
    """

    def __init__(
        self, size: int = 224, mean: Sequence[float] = IMAGE_MEAN, std: Sequence[float] = IMAGE_STD
    ):
        self.size = int(size)
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)

    def __call__(self, image: Any) -> Any:
        import torch
        from PIL import Image

        size = self.size
        # As opened: resized and cropped in its own mode, converted last; only samples wider
        # than 8 bits are scaled first, since convert("RGB") would clip them to white.
        img = as_8bit(image)
        w, h = img.size
        # torchvision Resize(int): the short side becomes `size`, the long side int(size * long / short)
        if w <= h:
            new_w, new_h = size, int(size * h / w)
        else:
            new_w, new_h = int(size * w / h), size
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        # torchvision CenterCrop: offsets int(round((dim - size) / 2))
        top = int(round((new_h - size) / 2.0))
        left = int(round((new_w - size) / 2.0))
        img = img.crop((left, top, left + size, top + size)).convert("RGB")
        pixels = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0)
        pixels = (pixels - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _resolve_files(checkpoint: str, revision: str | None) -> tuple[Path, Path, Path | None]:
    """-> (ImageReward.pt, med_config.json, local folder or None for hub downloads)."""
    path = Path(checkpoint).expanduser()
    looks_local = (
        path.exists() or checkpoint.startswith((".", "/", "~")) or checkpoint.count("/") != 1
    )
    if checkpoint in HUB_ALIASES or not looks_local:
        repo = HUB_REPO if checkpoint in HUB_ALIASES else checkpoint
        try:
            from huggingface_hub import hf_hub_download

            weights = Path(
                hf_hub_download(repo_id=repo, filename=CHECKPOINT_FILE, revision=revision)
            )
            config = Path(hf_hub_download(repo_id=repo, filename=CONFIG_FILE, revision=revision))
        except Exception as exc:  # noqa: BLE001 - offline, missing repo or file, network errors
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise HarnessError(
                f"cannot get {CHECKPOINT_FILE} and {CONFIG_FILE} from the hub repo '{repo}' "
                f"(expected {ARCHITECTURE}): {type(exc).__name__}: {first}. Download them and pass "
                "the folder as the checkpoint"
            ) from exc
        return weights, config, None
    if path.is_file() and path.name.endswith(".pt"):
        folder, weights = path.parent, path
    elif path.is_dir():
        folder, weights = path, path / CHECKPOINT_FILE
    else:
        raise HarnessError(
            f"ImageReward checkpoint '{checkpoint}' not found (expected {ARCHITECTURE})"
        )
    config = folder / CONFIG_FILE
    missing = [p.name for p in (weights, config) if not p.is_file()]
    if missing:
        raise HarnessError(
            f"ImageReward checkpoint folder '{folder}' lacks {' and '.join(missing)} "
            f"(expected {ARCHITECTURE})"
        )
    return weights, config, folder


def _read_med_config(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HarnessError(
            f"cannot read {path}: {exc} (expected the BLIP med_config.json of {ARCHITECTURE})"
        ) from exc
    if not isinstance(config, dict):
        raise HarnessError(
            f"{path} is not a JSON object (expected the BLIP med_config.json of {ARCHITECTURE})"
        )
    required = (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
    )
    absent = [k for k in required if k not in config]
    if absent:
        raise HarnessError(
            f"{path} lacks {', '.join(absent)} (expected the BLIP med_config.json of {ARCHITECTURE})"
        )
    if not config.get("add_cross_attention", True):
        raise HarnessError(
            f"{path} sets add_cross_attention=false; ImageReward's text encoder cross-attends to the image"
        )
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise HarnessError(
            f"{path}: position_embedding_type {config['position_embedding_type']!r} is not supported"
        )
    return config


def _build_network(med_config: Mapping[str, Any], device: str = "meta") -> Any:
    """The network: ``vision_model`` (BlipVisionModel), ``text_model`` (BlipTextModel), ``head``.

    Built on the ``meta`` device by default (no memory, no random initialisation: seconds saved
    for ViT-L); :func:`_load_weights` then assigns the checkpoint's tensors.
    """
    import torch
    from torch import nn
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    vision = vision_config_from(med_config)
    vision_config = BlipVisionConfig(
        hidden_size=int(vision["hidden_size"]),
        intermediate_size=int(vision["intermediate_size"]),
        num_hidden_layers=int(vision["num_hidden_layers"]),
        num_attention_heads=int(vision["num_attention_heads"]),
        image_size=int(vision["image_size"]),
        patch_size=int(vision["patch_size"]),
        hidden_act="gelu",
        layer_norm_eps=float(vision["layer_norm_eps"]),
        attention_dropout=0.0,
    )
    text_config = BlipTextConfig(
        vocab_size=int(med_config["vocab_size"]),
        hidden_size=int(med_config["hidden_size"]),
        # The original overrides med_config's encoder_width with the ViT width (1024 for ViT-L).
        encoder_hidden_size=int(vision["hidden_size"]),
        intermediate_size=int(med_config["intermediate_size"]),
        num_hidden_layers=int(med_config["num_hidden_layers"]),
        num_attention_heads=int(med_config["num_attention_heads"]),
        max_position_embeddings=int(med_config.get("max_position_embeddings", 512)),
        hidden_act=med_config.get("hidden_act", "gelu"),
        layer_norm_eps=float(med_config.get("layer_norm_eps", 1e-12)),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=int(med_config.get("pad_token_id", 0)),
        bos_token_id=None,
        eos_token_id=None,
        sep_token_id=None,
        # is_decoder=True makes BlipTextModel build the cross-attention blocks; the forward pass
        # below runs it as a bidirectional encoder (is_decoder=False), as ImageReward does.
        is_decoder=True,
        use_cache=False,
    )
    vision_config._attn_implementation = "eager"
    text_config._attn_implementation = "eager"

    sizes = (int(med_config["hidden_size"]), *HEAD_WIDTHS)
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        if i < 3:
            layers.append(nn.Dropout(0.0))  # keeps the original indices 0, 2, 4, 6, 7

    with torch.device(device):
        net = nn.Module()
        net.vision_model = BlipVisionModel(vision_config)
        net.text_model = BlipTextModel(text_config, add_pooling_layer=False)
        net.head = nn.Sequential(*layers)
    assert (
        tuple(i for i, m in enumerate(net.head) if isinstance(m, nn.Linear)) == HEAD_LINEAR_INDICES
    )
    return net.to(torch.float32).eval()


def _load_weights(net: Any, original: Mapping[str, Any], where: Path) -> None:
    """Strictly load an original-layout state dict into ``net``; HarnessError on any mismatch.

    The tensors are assigned (``assign=True``), which also materialises a ``meta``-built network;
    the one non-persistent buffer (the text embeddings' ``position_ids``) is then recreated.
    """
    import torch

    converted = convert_state_dict(original)
    try:
        result = net.load_state_dict(converted, strict=False, assign=True)
    except RuntimeError as exc:  # shape mismatches
        detail = "; ".join(line.strip() for line in str(exc).splitlines()[1:4] if line.strip())
        raise HarnessError(
            f"{where} does not fit the architecture described by its {CONFIG_FILE} "
            f"(expected {ARCHITECTURE}): {detail or exc}"
        ) from exc
    if result.missing_keys or result.unexpected_keys:

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")

        parts = []
        if result.missing_keys:
            parts.append(f"{len(result.missing_keys)} missing ({show(result.missing_keys)})")
        if result.unexpected_keys:
            parts.append(
                f"{len(result.unexpected_keys)} unexpected ({show(result.unexpected_keys)})"
            )
        raise HarnessError(
            f"{where} is not an ImageReward state dict: {'; '.join(parts)} parameters after mapping "
            f"the original names (expected {ARCHITECTURE}, keys blip.visual_encoder.*, "
            "blip.text_encoder.*, mlp.layers.*)"
        )
    embeddings = net.text_model.embeddings
    positions = torch.arange(embeddings.position_embeddings.num_embeddings).expand((1, -1))
    embeddings.register_buffer("position_ids", positions, persistent=False)
    net.requires_grad_(False)
    left = [name for name, t in (*net.named_parameters(), *net.named_buffers()) if t.is_meta]
    if left:  # pragma: no cover - only if transformers adds state that no checkpoint holds
        raise HarnessError(
            f"{where}: no values for {', '.join(left[:5])} (expected {ARCHITECTURE})"
        )


def _read_state_dict(path: Path) -> Mapping[str, Any]:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated file, not a torch file, pickle refused
        from harness.hf import unpickling_refusal

        refused = unpickling_refusal(exc)  # torch's message would advise unpickling it anyway
        if refused is not None:
            raise HarnessError(
                f"cannot read {path} (expected the state dict of {ARCHITECTURE}): it is {refused}, "
                "which harness does not unpickle (unpickling can run arbitrary code); pass the "
                "original ImageReward.pt, or keep only the tensors of this one where you trust it "
                "(torch.save of its state dict)"
            ) from exc
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise HarnessError(
            f"cannot read {path} (expected the state dict of {ARCHITECTURE}): {first}"
        ) from exc
    if (
        isinstance(state, Mapping)
        and "state_dict" in state
        and isinstance(state["state_dict"], Mapping)
    ):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise HarnessError(
            f"{path} holds a {type(state).__name__}, not a state dict (expected {ARCHITECTURE})"
        )
    return state


class ImageReward(RewardModel):
    """ImageReward-v1.0: standardised human-preference reward of an image for a prompt."""

    id: ClassVar[str] = "imagereward"
    default_checkpoint: ClassVar[str] = "ImageReward-v1.0"
    card: ClassVar[ModelCard] = ModelCard(
        checkpoint="THUDM/ImageReward (ImageReward.pt)",
        license="Apache-2.0",
        score_range="unbounded, standardised: about N(0, 1) over its training prompts",
        meaning="BLIP ViT-L image-text features through ImageReward's MLP head, minus its mean, "
                "divided by its standard deviation (as ImageReward.score returns it)",
        paper="Xu et al., ImageReward (NeurIPS 2023)",
        source="https://github.com/THUDM/ImageReward (PyPI image-reward)",
    )
    #: 2: images are resized and cropped in their own mode and converted to RGB last.
    #: 3: samples wider than 8 bits (16-bit greyscale PNGs) scaled to 8 bits first, not clipped.
    preprocessing_version: ClassVar[str] = "3"
    max_text_tokens: ClassVar[int] = MAX_TEXT_TOKENS
    reward_mean: ClassVar[float] = REWARD_MEAN
    reward_std: ClassVar[float] = REWARD_STD

    def __init__(
        self,
        checkpoint: str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        batch_size: int = 32,
        tokenizer: str | None = None,
        revision: str | None = None,
    ):
        """Load ImageReward.

        :param checkpoint: ``"ImageReward-v1.0"`` (default; hub repo ``THUDM/ImageReward``), another
            hub repo id with the same files, a local folder with ``ImageReward.pt`` and
            ``med_config.json``, or the path of an ``ImageReward.pt`` with ``med_config.json`` beside.
        :param dtype: ``float32``, ``float16`` or ``bfloat16`` for the two encoders (the MLP head
            always runs in float32, on the float32 [CLS] feature, like the original).
        :param batch_size: (image, prompt) pairs per text-encoder forward pass in :meth:`score`.
        :param tokenizer: tokenizer folder or hub id. Default: a tokenizer saved in the checkpoint
            folder (``tokenizer/`` or files beside the weights), else ``bert-base-uncased``.
            ``[DEC]`` and ``[ENC]`` are added when missing, as BLIP's ``init_tokenizer`` does.
        :param revision: hub revision for hub checkpoints.
        """
        import torch

        from harness.hf import check_device, local_tokenizer, torch_dtype

        if batch_size < 1:
            raise HarnessError(f"batch size must be >= 1, got {batch_size}")
        super().__init__(checkpoint, check_device(device), dtype)
        self.checkpoint = str(self.checkpoint)
        self.batch_size = int(batch_size)
        self.revision = revision
        self.truncated_prompts = 0
        self._truncated: set[str] = set()
        self._checkpoint_sha256: str | None = None
        self._torch = torch
        model_dtype = torch_dtype(dtype)

        self.weights_path, self.config_path, folder = _resolve_files(self.checkpoint, revision)
        self.med_config = _read_med_config(self.config_path)
        self.vision_config = vision_config_from(self.med_config)
        self.image_size = int(self.vision_config["image_size"])

        self.tokenizer_source = tokenizer or local_tokenizer(folder) or DEFAULT_TOKENIZER
        self.tokenizer = self._load_tokenizer(self.tokenizer_source)
        vocab = int(self.med_config["vocab_size"])
        if len(self.tokenizer) > vocab:
            raise HarnessError(
                f"tokenizer '{self.tokenizer_source}' has {len(self.tokenizer)} tokens but "
                f"{self.config_path} has vocab_size {vocab}; ImageReward expects bert-base-uncased "
                "plus [DEC] and [ENC]"
            )
        # The tokenizer is checked first: it fails fast, the 1.7 GB of weights do not.
        net = _build_network(self.med_config)
        _load_weights(net, _read_state_dict(self.weights_path), self.weights_path)
        net.vision_model.to(self.device, dtype=model_dtype)
        net.text_model.to(self.device, dtype=model_dtype)
        net.head.to(self.device, dtype=torch.float32)
        self.net = net.eval()

        # A picklable stand-in for the bound method, so that DataLoader workers do not receive
        # (and, with the spawn start method, pickle) the whole model.
        self.preprocess = ImageRewardPreprocess(self.image_size)

    # -- loading helpers -------------------------------------------------------------------
    @staticmethod
    def _load_tokenizer(source: str) -> Any:
        from harness.hf import load_tokenizer

        tokenizer = load_tokenizer(
            source, "the ImageReward tokenizer",
            "save a bert-base-uncased tokenizer into the checkpoint folder's tokenizer/ or pass tokenizer=")
        present = set(tokenizer.get_vocab())
        if "[DEC]" not in present or tokenizer.bos_token != "[DEC]":
            tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        if "[ENC]" not in present or "[ENC]" not in tokenizer.all_special_tokens:
            tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        return tokenizer

    # -- the RewardModel contract ----------------------------------------------------------
    def preprocess(self, image: Any) -> Any:  # replaced per instance by ImageRewardPreprocess
        """PIL image as opened -> float32 ``[3, 224, 224]`` (resize, centre crop, CLIP normalisation)."""
        return ImageRewardPreprocess(self.image_size)(image)

    def embed_images(self, batch: Any) -> Any:
        """``[B, 3, 224, 224]`` -> image tokens ``[B, 1 + 196, 1024]`` (after the ViT's final norm)."""
        torch = self._torch
        vision = self.net.vision_model
        with torch.inference_mode():
            pixels = torch.as_tensor(batch).to(self.device, dtype=vision.dtype, non_blocking=True)
            return vision(pixel_values=pixels).last_hidden_state

    def score(self, features: Any, prompts: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """Image tokens of ``B`` images x prompts per image -> ``B`` float32 arrays of rewards."""
        torch = self._torch
        if len(features) != len(prompts):
            raise ValueError(f"{len(features)} images but {len(prompts)} prompt lists")
        owners = [i for i, ps in enumerate(prompts) for _ in ps]
        texts = [str(p) for ps in prompts for p in ps]
        rewards = np.zeros(len(texts), dtype=np.float32)
        if texts:
            self._count_truncated(texts)
            tokens = self.tokenizer(
                texts,
                padding=True,
                truncation=True,
                max_length=self.max_text_tokens,
                return_tensors="pt",
            )
            ids = tokens["input_ids"].to(self.device)
            mask = tokens["attention_mask"].to(self.device)
            owner = torch.as_tensor(owners, dtype=torch.long, device=self.device)
            text_model, head = self.net.text_model, self.net.head
            with torch.inference_mode():
                feats = torch.as_tensor(features).to(self.device, dtype=text_model.dtype)
                for lo in range(0, len(texts), self.batch_size):
                    hi = min(lo + self.batch_size, len(texts))
                    image_tokens = feats.index_select(0, owner[lo:hi])
                    image_mask = torch.ones(
                        image_tokens.shape[:2], dtype=torch.long, device=self.device
                    )
                    out = text_model(
                        input_ids=ids[lo:hi],
                        attention_mask=mask[lo:hi],
                        encoder_hidden_states=image_tokens,
                        encoder_attention_mask=image_mask,
                        is_decoder=False,
                    )
                    raw = head(out.last_hidden_state[:, 0, :].float()).squeeze(-1)
                    rewards[lo:hi] = ((raw - self.reward_mean) / self.reward_std).cpu().numpy()
        out_arrays, start = [], 0
        for ps in prompts:
            out_arrays.append(rewards[start : start + len(ps)].copy())
            start += len(ps)
        return out_arrays

    def _count_truncated(self, texts: list[str]) -> None:
        fresh = [t for t in dict.fromkeys(texts) if t not in self._truncated]
        if fresh:
            lengths = self.tokenizer(fresh, truncation=False)["input_ids"]
            self._truncated.update(
                t for t, ids in zip(fresh, lengths, strict=True) if len(ids) > self.max_text_tokens
            )
        self.truncated_prompts = len(self._truncated)

    def files(self) -> list[Path]:
        """ImageReward.pt, med_config.json and the tokenizer's files."""
        from harness.hf import checkpoint_files

        found = [self.weights_path, self.config_path]
        found += [p for p in checkpoint_files(self.tokenizer_source) if p not in found]
        return found

    # -- manifest --------------------------------------------------------------------------
    @property
    def checkpoint_sha256(self) -> str:
        if self._checkpoint_sha256 is None:
            self._checkpoint_sha256 = _sha256(self.weights_path)
        return self._checkpoint_sha256

    def describe(self) -> dict[str, Any]:
        """Checkpoint, sha256 of ImageReward.pt, tokenizer, truncation length and count."""
        return {
            "id": self.id,
            "checkpoint": self.checkpoint,
            "revision": self.revision,
            "checkpoint_sha256": self.checkpoint_sha256,
            "tokenizer": self.tokenizer_source,
            "preprocessing_version": self.preprocessing_version,
            "image_size": self.image_size,
            "dtype": self.dtype,
            "score": "standardized reward (raw - 0.16717362830052426) / 1.0333394966054072",
            "max_text_tokens": self.max_text_tokens,
            "truncated_prompts": self.truncated_prompts,
        }


@hookimpl
def register_reward_models(register):
    register(ImageReward)
