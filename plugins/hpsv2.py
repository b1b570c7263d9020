"""HPSv2 and HPSv2.1 (Wu et al., 2023) as a reward model, without the ``hpsv2`` package.

Human Preference Score v2 is an open_clip ViT-H/14 fine-tuned on human choices between generated
images (HPD v2). Score: the cosine similarity of its image and prompt embeddings, exactly
``image_features @ text_features.T`` of normalised features as ``hpsv2.score`` computes it (no
``logit_scale``, no x100): in [-1, 1], typically 0.2-0.35 for generated images; higher means
people prefer the image for the prompt. HPSv2.1 (the default, trained on better data) is the
reward of DanceGRPO, MixGRPO, SRPO and DiffusionNFT.

Weights: ``HPS_v2_compressed.pt`` (v2.0) and ``HPS_v2.1_compressed.pt`` (v2.1) in the hub repo
``xswu/HPSv2`` (pinned at :data:`HUB_REVISION`), each a pickled ``{"state_dict": ...}`` of
open_clip's ``CLIP`` module in float16 (1.97 GB for 986M parameters). They are read with torch's safe loader only
(``weights_only=True``: tensors, no code; anything else is refused) or from a ``.safetensors``
file, and mapped onto transformers' :class:`~transformers.CLIPModel` by :func:`convert_state_dict`
(see its table). The architecture is read from the tensors' shapes, with ViT-H/14's head widths
(80 for the image tower, 64 for the text tower), so a smaller model of the same layout loads too.

Faithfulness notes (checked against the ``hpsv2`` 1.2.0 package: ``img_score.py`` and its
vendored ``src/open_clip``: ``transform.py``, ``model.py``, ``transformer.py``, ``tokenizer.py``):

- Image preprocessing is ``image_transform(..., resize_longest_max=True)``, not CLIP's resize and
  centre crop: convert to RGB, scale to [0, 1] floats, resize *the float tensor* so that its long
  side is 224 (short side ``round(short * 224 / long)``) with bicubic interpolation and
  antialiasing (what torchvision's ``resize`` does to a tensor since 0.17, where antialiasing
  became its default: ``torch.nn.functional.interpolate``), pad to a square with zeros
  (black; left/top get the smaller half), then normalise with the OpenAI CLIP mean/std. Done
  here with torch alone. Differences, each where the original breaks: an RGBA image keeps its
  alpha band in the original and its 3-channel ViT then refuses it, so RGBA is scored on its
  colour channels (``convert("RGB")`` drops alpha, as the original does for LA and PA); an image
  whose long side is already 224 but is not square is left unpadded by the original (a shape
  its ViT refuses) and is padded here; a side that would round to 0 pixels becomes 1; samples
  wider than 8 bits (16-bit greyscale) are first scaled to 8 bits (:func:`harness.images.as_8bit`)
  where ``convert("RGB")`` would clip them to white.
- Text: the CLIP BPE (the tokenizer of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, the same
  vocabulary and ids as open_clip's ``SimpleTokenizer``), truncated to 77 tokens the way
  open_clip does (start token, the first 75, end token). Before tokenising, prompts are cleaned
  as open_clip does with ``ftfy.fix_text`` and ``html.unescape``; ftfy is not a dependency, so
  :func:`clean_prompt` does the repairs ftfy makes to ordinary prompts (HTML entities, curly
  quotes, Latin ligatures, full-width characters, NFC) but not its mojibake detection.
- The original scores one (image, prompt) pair per forward pass, in float16 autocast on CUDA;
  here each image is encoded once and each distinct prompt once, in the dtype asked for
  (float32 by default, which the original's autocast does not match exactly on a GPU).
"""

from __future__ import annotations

import hashlib
import html
import re
import unicodedata
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from harness.errors import HarnessError
from harness.hookspecs import hookimpl
from harness.images import as_8bit
from harness.types import ModelCard, RewardModel

HUB_REPO = "xswu/HPSv2"
#: The commit of xswu/HPSv2 that added both compressed checkpoints.
HUB_REVISION = "697403c78157020a1ae59d23f111aa58ced35b0a"
VERSIONS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
#: sha256 of the files at :data:`HUB_REVISION` (their git-lfs object ids).
VERSION_SHA256 = {
    "v2.0": "07cb0d20626232204ca3a6ec53ff5984e7e53212a8a7b0e0ec2bac1bdaf125a1",
    "v2.1": "c57a38fb4a2f7e7c15bf00da2ea377cdf165448b4dd1052a484c215a998c9837",
}
DEFAULT_VERSION = "v2.1"
#: The CLIP BPE tokenizer open_clip uses for ViT-H-14, as a transformers tokenizer.
DEFAULT_TOKENIZER = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
#: open_clip's ViT-H-14: vision ``head_width`` 80 (1280 / 16 heads), text 1024 / 16 heads.
VISION_HEAD_WIDTH = 80
TEXT_HEAD_WIDTH = 64
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which open_clip keeps
#: open_clip's OPENAI_DATASET_MEAN / OPENAI_DATASET_STD.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")

ARCHITECTURE = (
    "an HPSv2 checkpoint (open_clip ViT-H/14 CLIP state dict: keys visual.*, transformer.*, "
    "token_embedding.weight, ln_final.*, text_projection, in HPS_v2.1_compressed.pt or a "
    ".safetensors file)"
)

_BLOCK_RE = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_BLOCK_RENAMES = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_RENAMES = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}


def convert_state_dict(original: Mapping[str, Any]) -> dict[str, Any]:
    """An open_clip CLIP state dict -> :class:`~transformers.CLIPModel` names and layouts.

    ==============================================  ==============================================
    original (open_clip ``CLIP``)                   here (transformers ``CLIPModel``)
    ==============================================  ==============================================
    ``visual.conv1.weight``                         ``vision_model.embeddings.patch_embedding.weight``
    ``visual.class_embedding``                      ``vision_model.embeddings.class_embedding``
    ``visual.positional_embedding``                 ``vision_model.embeddings.position_embedding.weight``
    ``visual.ln_pre.*`` / ``visual.ln_post.*``      ``vision_model.pre_layrnorm.*`` / ``.post_layernorm.*``
    ``visual.proj`` ``[width, embed]``              ``visual_projection.weight`` (transposed)
    ``visual.transformer.resblocks.N.<part>``       ``vision_model.encoder.layers.N.<part>``
    ``token_embedding.weight``                      ``text_model.embeddings.token_embedding.weight``
    ``positional_embedding``                        ``text_model.embeddings.position_embedding.weight``
    ``transformer.resblocks.N.<part>``              ``text_model.encoder.layers.N.<part>``
    ``ln_final.*``                                  ``text_model.final_layer_norm.*``
    ``text_projection`` ``[width, embed]``          ``text_projection.weight`` (transposed)
    ``logit_scale``                                 ``logit_scale`` (kept; the score does not use it)
    ==============================================  ==============================================

    with, inside a block: ``ln_1``/``ln_2`` -> ``layer_norm1``/``layer_norm2``,
    ``attn.in_proj_weight`` ``[3 * width, width]`` and ``attn.in_proj_bias`` split in three, in
    order, into ``self_attn.q_proj``/``k_proj``/``v_proj`` (``nn.MultiheadAttention``'s packing),
    ``attn.out_proj`` -> ``self_attn.out_proj``, ``mlp.c_fc``/``mlp.c_proj`` -> ``mlp.fc1``/``fc2``.
    A leading ``module.`` (DataParallel) is stripped. Keys that match no rule are kept under their
    original name, so that strict loading reports them as unexpected.
    """
    converted: dict[str, Any] = {}
    for key, value in original.items():
        name = key[len("module.") :] if key.startswith("module.") else key
        if name in _RENAMES:
            converted[_RENAMES[name]] = value
        elif name in _TRANSPOSED:
            converted[_TRANSPOSED[name]] = value.t()
        elif m := _BLOCK_RE.match(name):
            tower = "vision_model" if m.group(1) else "text_model"
            prefix, part = f"{tower}.encoder.layers.{m.group(2)}.", m.group(3)
            if part in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = part.rsplit("_", 1)[1]
                for proj, chunk in zip(("q", "k", "v"), value.chunk(3, dim=0), strict=True):
                    converted[f"{prefix}self_attn.{proj}_proj.{kind}"] = chunk
            elif part in _BLOCK_RENAMES:
                converted[prefix + _BLOCK_RENAMES[part]] = value
            else:
                converted[name] = value
        else:
            converted[name] = value
    return converted


def architecture_from(original: Mapping[str, Any], where: Any = "checkpoint") -> dict[str, Any]:
    """The sizes of the network an open_clip CLIP state dict holds, read from its shapes.

    Heads are not stored: they follow from ViT-H/14's head widths (:data:`VISION_HEAD_WIDTH`,
    :data:`TEXT_HEAD_WIDTH`). HarnessError naming the first missing or odd tensor.
    """
    sd = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in original.items()}
    needed = ("visual.conv1.weight", "visual.positional_embedding", "visual.proj",
              "token_embedding.weight", "positional_embedding", "ln_final.weight",
              "text_projection", "visual.transformer.resblocks.0.mlp.c_fc.weight",
              "transformer.resblocks.0.mlp.c_fc.weight")
    absent = [k for k in needed if k not in sd]
    if absent:
        shown = ", ".join(absent[:4]) + (f" and {len(absent) - 4} more" if len(absent) > 4 else "")
        raise HarnessError(f"{where} is not {ARCHITECTURE}: it lacks {shown}")
    conv = tuple(sd["visual.conv1.weight"].shape)
    width, patch = conv[0], conv[-1]
    if len(conv) != 4 or conv[1] != 3 or conv[2] != conv[3]:
        raise HarnessError(f"{where}: visual.conv1.weight has shape {list(conv)}, expected "
                           f"[width, 3, patch, patch] ({ARCHITECTURE})")
    tokens = int(sd["visual.positional_embedding"].shape[0]) - 1
    grid = int(round(tokens**0.5))
    if grid * grid != tokens:
        raise HarnessError(f"{where}: visual.positional_embedding holds {tokens} patch positions, "
                           "not a square grid")
    text_width = int(sd["ln_final.weight"].shape[0])
    towers = (("image", width, VISION_HEAD_WIDTH), ("text", text_width, TEXT_HEAD_WIDTH))
    for tower, w, head in towers:
        if w % head:
            raise HarnessError(f"{where}: the {tower} tower is {w} wide, not a multiple of "
                               f"ViT-H/14's head width {head}")

    def layers(prefix: str) -> int:
        return len({k.split(".")[prefix.count(".")] for k in sd if k.startswith(prefix)})

    return {
        "embed_dim": int(sd["visual.proj"].shape[1]),
        "image_size": grid * patch,
        "patch_size": patch,
        "vision_width": width,
        "vision_layers": layers("visual.transformer.resblocks."),
        "vision_heads": width // VISION_HEAD_WIDTH,
        "vision_mlp": int(sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        "context_length": int(sd["positional_embedding"].shape[0]),
        "vocab_size": int(sd["token_embedding.weight"].shape[0]),
        "text_width": text_width,
        "text_layers": layers("transformer.resblocks."),
        "text_heads": text_width // TEXT_HEAD_WIDTH,
        "text_mlp": int(sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
    }


def clip_config(arch: Mapping[str, Any]) -> Any:
    """A :class:`~transformers.CLIPConfig` for :func:`architecture_from`'s sizes (exact GELU,
    LayerNorm eps 1e-5, as open_clip's non-OpenAI ViTs)."""
    from transformers import CLIPConfig

    config = CLIPConfig(
        text_config={
            "vocab_size": arch["vocab_size"], "hidden_size": arch["text_width"],
            "intermediate_size": arch["text_mlp"], "num_hidden_layers": arch["text_layers"],
            "num_attention_heads": arch["text_heads"],
            "max_position_embeddings": arch["context_length"], "hidden_act": "gelu",
            "layer_norm_eps": LAYER_NORM_EPS, "attention_dropout": 0.0,
            "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407,
            "projection_dim": arch["embed_dim"],
        },
        vision_config={
            "hidden_size": arch["vision_width"], "intermediate_size": arch["vision_mlp"],
            "num_hidden_layers": arch["vision_layers"], "num_attention_heads": arch["vision_heads"],
            "image_size": arch["image_size"], "patch_size": arch["patch_size"], "num_channels": 3,
            "hidden_act": "gelu", "layer_norm_eps": LAYER_NORM_EPS, "attention_dropout": 0.0,
            "projection_dim": arch["embed_dim"],
        },
        projection_dim=arch["embed_dim"],
    )
    config._attn_implementation = "sdpa"
    config.text_config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    return config


def load_clip(original: Mapping[str, Any], where: Any, dtype: Any) -> Any:
    """A :class:`~transformers.CLIPModel` holding an open_clip state dict, in ``dtype`` on CPU.

    Built on the ``meta`` device (no random initialisation of a billion parameters) and filled by
    assigning the converted tensors; strict: every parameter from the file, nothing left over.
    """
    import torch
    from transformers import CLIPModel

    arch = architecture_from(original, where)
    converted = {k: v.to(dtype=dtype).contiguous() for k, v in convert_state_dict(original).items()}
    with torch.device("meta"):
        model = CLIPModel(clip_config(arch))
    try:
        result = model.load_state_dict(converted, strict=False, assign=True)
    except RuntimeError as exc:  # shapes that disagree with the ones read from the same file
        detail = "; ".join(line.strip() for line in str(exc).splitlines()[1:4] if line.strip())
        raise HarnessError(f"{where} is not {ARCHITECTURE}: {detail or exc}") from exc
    if result.missing_keys or result.unexpected_keys:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")

        parts = []
        if result.missing_keys:
            parts.append(f"{len(result.missing_keys)} missing ({show(result.missing_keys)})")
        if result.unexpected_keys:
            extra = result.unexpected_keys
            parts.append(f"{len(extra)} unexpected ({show(extra)})")
        raise HarnessError(f"{where} is not {ARCHITECTURE}: {'; '.join(parts)} parameters after "
                           "mapping the open_clip names")
    for tower in (model.text_model, model.vision_model):  # buffers no checkpoint holds
        n = tower.embeddings.position_embedding.num_embeddings
        tower.embeddings.register_buffer("position_ids", torch.arange(n).expand((1, -1)),
                                         persistent=False)
    left = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:  # pragma: no cover - only if transformers adds state that no checkpoint holds
        raise HarnessError(f"{where}: no values for {', '.join(left[:5])} ({ARCHITECTURE})")
    return model.requires_grad_(False).eval()


def read_state_dict(path: Path) -> Mapping[str, Any]:
    """The tensors of an HPSv2 file: ``.safetensors``, or a torch pickle read with
    ``weights_only=True`` (``{"state_dict": {...}}`` or the dict itself). Pickles holding more
    than tensors, dicts and numbers are refused, not unpickled."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except Exception as exc:  # noqa: BLE001 - truncated file, not a torch file, pickle refused
        from harness.hf import unpickling_refusal

        refused = unpickling_refusal(exc)
        if refused is not None:
            raise HarnessError(
                f"cannot read {path} (expected {ARCHITECTURE}): it is {refused}, which harness "
                "does not unpickle (unpickling can run arbitrary code); pass the original "
                "HPSv2 file, or save only its tensors where you trust it "
                "(safetensors.torch.save_file(state_dict, 'hpsv2.safetensors'))"
            ) from exc
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise HarnessError(f"cannot read {path} (expected {ARCHITECTURE}): {first}") from exc
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    tensors = isinstance(state, Mapping) and all(isinstance(v, torch.Tensor) for v in state.values())
    if not tensors:
        raise HarnessError(f"{path} holds a {type(state).__name__} that is not a state dict of "
                           f"tensors (expected {ARCHITECTURE})")
    return state


# -- text ------------------------------------------------------------------------------------
def _ftfy_table() -> dict[int, str | None]:
    table = {c: "'" for c in (0x02BC, 0x2018, 0x2019, 0x201A, 0x201B)}
    table.update({c: '"' for c in range(0x201C, 0x2020)})
    table.update({c: unicodedata.normalize("NFKC", chr(c)) for c in range(0xFB00, 0xFB07)})
    # half- and full-width forms (Latin, katakana, Hangul, symbols) -> their usual width
    for c in range(0xFF01, 0xFFF0):
        if unicodedata.normalize("NFKC", chr(c)) != chr(c):
            table[c] = unicodedata.normalize("NFKC", chr(c))
    table[0x3000] = " "
    # control characters nobody means to type: C0 other than tab, newline, form feed and
    # carriage return; DEL; deprecated Arabic format controls; the byte-order mark;
    # interlinear annotations and the object replacement character
    for c in (*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070),
              0xFEFF, *range(0xFFF9, 0xFFFD)):
        table[c] = None
    return table


_FTFY_TABLE = _ftfy_table()


def clean_prompt(text: str) -> str:
    """open_clip's text cleaning (``ftfy.fix_text``, then ``html.unescape`` twice, strip) for
    ordinary prompts, without ftfy: HTML entities when the text has no ``<`` (ftfy's "auto"),
    curly quotes -> straight, Latin ligatures and half/full-width forms -> plain, stray control
    characters removed, NFC. ftfy's mojibake repair (text decoded with the wrong codec) is not
    reproduced. Case and whitespace
    are left to the tokenizer, which lower-cases and collapses them as open_clip does."""
    if "<" not in text:
        text = html.unescape(text)
    text = unicodedata.normalize("NFC", text.translate(_FTFY_TABLE))
    return html.unescape(html.unescape(text)).strip()


# -- images ----------------------------------------------------------------------------------
class HPSv2Preprocess:
    """HPSv2's evaluation transform with torch: PIL image -> float32 ``[3, S, S]``.

    A small picklable object (no model inside), so data-loader workers receive it cheaply.
    """

    def __init__(self, size: int = 224, mean: Sequence[float] = IMAGE_MEAN,
                 std: Sequence[float] = IMAGE_STD):
        self.size = int(size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def __call__(self, image: Any) -> Any:
        import torch
        import torch.nn.functional as F

        rgb = as_8bit(image).convert("RGB")
        x = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
        height, width = x.shape[1:]
        scale = self.size / float(max(height, width))
        if scale != 1.0:
            # open_clip's ResizeMaxSize: Python's round() on each side of the float tensor
            new = [max(1, round(dim * scale)) for dim in (height, width)]
            x = F.interpolate(x[None], size=new, mode="bicubic", align_corners=False,
                              antialias=True)[0]
            height, width = new
        pad_h, pad_w = self.size - height, self.size - width
        if pad_h or pad_w:
            left, top = pad_w // 2, pad_h // 2
            x = F.pad(x, (left, pad_w - left, top, pad_h - top), value=0.0)
        mean = torch.tensor(self.mean, dtype=x.dtype).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(3, 1, 1)
        return ((x - mean) / std).contiguous()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _is_weights(path: Path) -> bool:
    return path.is_file() and path.name.endswith(WEIGHT_SUFFIXES)


class HPSv2(RewardModel):
    """HPSv2 / HPSv2.1: cosine similarity of a preference-tuned open_clip ViT-H/14 (in [-1, 1])."""

    id: ClassVar[str] = "hpsv2"
    default_checkpoint: ClassVar[str] = HUB_REPO
    preprocessing_version: ClassVar[str] = "1"
    text_cache_size: ClassVar[int] = 65536
    #: image embeddings [B, D] meet text embeddings in score(): the core stores the image rows
    embedding_kind: ClassVar[str | None] = "dual"
    card: ClassVar[ModelCard] = ModelCard(
        checkpoint=f"{HUB_REPO} ({VERSIONS[DEFAULT_VERSION]})",
        revision=HUB_REVISION,
        license="Apache-2.0",
        score_range="[-1, 1] (typically 0.2-0.35)",
        meaning=("cosine similarity of HPSv2's image and prompt embeddings, as hpsv2.score "
                 "returns it (no logit scale): higher = more preferred by people"),
        paper=("Wu et al., Human Preference Score v2: A Solid Benchmark for Evaluating Human "
               "Preferences of Text-to-Image Synthesis, arXiv:2306.09341 (2023)"),
        source="https://github.com/tgxs002/HPSv2 (PyPI hpsv2 1.2.0)",
        variants={v: f"{HUB_REPO}/{f} (version={v}, sha256 {VERSION_SHA256[v][:12]}...)"
                  for v, f in VERSIONS.items()},
    )

    def __init__(
        self,
        checkpoint: str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        version: str = DEFAULT_VERSION,
        revision: str | None = None,
        batch_size: int = 32,
        tokenizer: str | None = None,
    ):
        """Load HPSv2.

        :param checkpoint: the hub repo ``xswu/HPSv2`` (default) or another with the same files,
            a local ``.pt``/``.safetensors`` file, or a folder holding ``HPS_v2.1_compressed.pt``
            (or ``HPS_v2_compressed.pt`` for v2.0, or a single weights file).
        :param version: ``v2.1`` (default) or ``v2.0``: which file of a hub repo or folder.
        :param revision: hub revision; default :data:`HUB_REVISION` for ``xswu/HPSv2``.
        :param batch_size: images per forward pass of the image tower (bounds memory).
        :param tokenizer: a CLIP tokenizer folder or hub id. Default: one saved beside a local
            checkpoint (``tokenizer/`` or the folder itself), else :data:`DEFAULT_TOKENIZER`.
        """
        import torch

        from harness.hf import check_device, local_tokenizer, torch_dtype

        version = str(version).strip().lower()
        version = version if version.startswith("v") else f"v{version}"
        if version not in VERSIONS:
            raise HarnessError(f"unknown HPSv2 version '{version}'; choose {' or '.join(VERSIONS)}")
        if int(batch_size) < 1:
            raise HarnessError(f"batch size must be >= 1, got {batch_size}")
        super().__init__(checkpoint, check_device(device), dtype)
        self.checkpoint = str(self.checkpoint)
        self.version = version
        self.batch_size = int(batch_size)
        self.truncated_prompts = 0
        self._truncated: set[str] = set()
        self._text: OrderedDict[str, Any] = OrderedDict()
        self._checkpoint_sha256: str | None = None
        self._torch = torch
        model_dtype = torch_dtype(dtype)

        self.weights_path, folder, self.revision = self._resolve(self.checkpoint, version, revision)
        self.tokenizer_source = tokenizer or local_tokenizer(folder) or DEFAULT_TOKENIZER
        self.tokenizer = self._load_tokenizer(self.tokenizer_source)
        state = read_state_dict(self.weights_path)
        self.architecture = architecture_from(state, self.weights_path)
        if len(self.tokenizer) > self.architecture["vocab_size"]:
            raise HarnessError(
                f"tokenizer '{self.tokenizer_source}' has {len(self.tokenizer)} tokens but "
                f"{self.weights_path} embeds {self.architecture['vocab_size']}; HPSv2 expects the "
                f"CLIP BPE tokenizer ({DEFAULT_TOKENIZER})"
            )
        self.model = load_clip(state, self.weights_path, model_dtype).to(self.device)
        del state
        self.image_size = int(self.architecture["image_size"])
        self.max_text_tokens = int(self.architecture["context_length"])
        # A picklable stand-in for the bound method: DataLoader workers get the transform only.
        self.preprocess = HPSv2Preprocess(self.image_size)

    # -- loading helpers -------------------------------------------------------------------
    @staticmethod
    def _resolve(
        checkpoint: str, version: str, revision: str | None
    ) -> tuple[Path, Path | None, str | None]:
        """-> (weights file, local folder or None for hub files, hub revision or None)."""
        filename = VERSIONS[version]
        path = Path(checkpoint).expanduser()
        looks_local = (
            path.exists() or checkpoint.startswith((".", "/", "~")) or checkpoint.count("/") != 1
        )
        if not looks_local:
            revision = revision or (HUB_REVISION if checkpoint == HUB_REPO else None)
            try:
                from huggingface_hub import hf_hub_download

                weights = hf_hub_download(repo_id=checkpoint, filename=filename, revision=revision)
            except Exception as exc:  # noqa: BLE001 - offline, missing repo or file, network
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
                raise HarnessError(
                    f"cannot get {filename} (HPSv2 {version}) from the hub repo '{checkpoint}': "
                    f"{type(exc).__name__}: {first}. Download it and pass its path as the "
                    "checkpoint"
                ) from exc
            return Path(weights), None, revision
        if _is_weights(path):
            return path, path.parent, None
        if path.is_dir():
            if (path / filename).is_file():
                return path / filename, path, None
            found = sorted(p for p in path.iterdir() if _is_weights(p))
            if len(found) == 1:
                return found[0], path, None
            listed = ", ".join(p.name for p in found) or "none"
            raise HarnessError(
                f"HPSv2 checkpoint folder '{path}' has no {filename} (version={version}) and "
                f"{'several' if found else 'no'} other weights files ({listed}); pass the file "
                "itself"
            )
        raise HarnessError(f"HPSv2 checkpoint '{checkpoint}' not found (expected {ARCHITECTURE})")

    @staticmethod
    def _load_tokenizer(source: str) -> Any:
        from harness.hf import load_tokenizer

        tokenizer = load_tokenizer(source, "the HPSv2 tokenizer",
                                   f"pass tokenizer= a folder holding a CLIP tokenizer (e.g. {DEFAULT_TOKENIZER}'s)")
        if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
            raise HarnessError(f"tokenizer '{source}' has no start/end tokens; HPSv2 expects the "
                               f"CLIP BPE tokenizer ({DEFAULT_TOKENIZER})")
        return tokenizer

    # -- the RewardModel contract ----------------------------------------------------------
    def preprocess(self, image: Any) -> Any:  # replaced per instance by HPSv2Preprocess
        """PIL image as opened -> float32 ``[3, 224, 224]`` (long side to 224, zero-pad to a
        square, CLIP normalisation)."""
        return HPSv2Preprocess(self.image_size)(image)

    def embed_images(self, batch: Any) -> Any:
        """``[B, 3, S, S]`` -> unit-norm float32 image embeddings ``[B, D]``."""
        torch = self._torch
        pixels = torch.as_tensor(batch)
        out = []
        with torch.inference_mode():
            for lo in range(0, len(pixels), self.batch_size):
                chunk = pixels[lo : lo + self.batch_size].to(self.device, dtype=self.model.dtype)
                feats = self.model.get_image_features(pixel_values=chunk)
                feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
                out.append(torch.nn.functional.normalize(feats.float(), dim=-1))
        if not out:
            return torch.zeros((0, self.architecture["embed_dim"]), device=self.device)
        return torch.cat(out)

    def score(self, features: Any, prompts: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """Image embeddings ``[B, D]`` x prompts per image -> ``B`` float32 arrays of cosines."""
        if len(features) != len(prompts):
            raise ValueError(f"{len(features)} images but {len(prompts)} prompt lists")
        distinct = list(dict.fromkeys(str(p) for ps in prompts for p in ps))
        if not distinct:
            return [np.zeros(0, dtype=np.float32) for _ in prompts]
        # an elementwise product and sum, not a matrix product: a pair's score is then the same
        # bits whichever other prompts are scored beside it (GEMM blocking varies with shape)
        text = self.text_embeddings(distinct)
        sims = (features.float()[:, None, :] * text[None, :, :]).sum(-1).cpu().numpy()
        col = {p: j for j, p in enumerate(distinct)}
        return [
            sims[i, [col[str(p)] for p in ps]].astype(np.float32) for i, ps in enumerate(prompts)
        ]

    def text_embeddings(self, prompts: list[str]) -> Any:
        """Unit-norm float32 text embeddings ``[T, D]``, one forward pass per distinct prompt at
        its own length (no padding), so a prompt's embedding is the same bits whatever else is
        scored with it; kept in a bounded in-memory cache."""
        torch = self._torch
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text]
        for p in missing:
            text = clean_prompt(p)
            # split_special_tokens: "<|endoftext|>" typed in a prompt is text, as in open_clip
            full = self.tokenizer(text, verbose=False, split_special_tokens=True)["input_ids"]
            if len(full) > self.max_text_tokens:
                self._truncated.add(p)
            tok = self.tokenizer([text], truncation=True, max_length=self.max_text_tokens,
                                 split_special_tokens=True, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                out = self.model.get_text_features(input_ids=tok["input_ids"])
                feats = out.pooler_output if hasattr(out, "pooler_output") else out
                self._text[p] = torch.nn.functional.normalize(feats.float(), dim=-1)[0]
        self.truncated_prompts = len(self._truncated)
        for p in prompts:
            self._text.move_to_end(p)
        while len(self._text) > self.text_cache_size:
            self._text.popitem(last=False)
        return torch.stack([self._text[p] for p in prompts])

    def text_rows(self, prompts: Sequence[str]) -> tuple[list[str], Any]:
        """The text embeddings held in the in-memory cache (see :meth:`text_embeddings`)."""
        from harness.hf import held_text_rows

        return held_text_rows(self._text, [str(p) for p in prompts])

    def load_text_rows(self, prompts: Sequence[str], rows: Any) -> None:
        """Stored text embeddings into the in-memory cache (truncated prompts still counted)."""
        from harness.hf import load_text_rows_into

        added = load_text_rows_into(self._text, [str(p) for p in prompts], rows, self.device,
                                    self.text_cache_size)
        for p in added:
            full = self.tokenizer(clean_prompt(p), verbose=False,
                                  split_special_tokens=True)["input_ids"]
            if len(full) > self.max_text_tokens:
                self._truncated.add(p)
        self.truncated_prompts = len(self._truncated)

    def files(self) -> list[Path]:
        """The weights file and the tokenizer's files."""
        from harness.hf import checkpoint_files

        found = [self.weights_path]
        found += [p for p in checkpoint_files(self.tokenizer_source) if p not in found]
        return found

    # -- manifest --------------------------------------------------------------------------
    @property
    def checkpoint_sha256(self) -> str:
        if self._checkpoint_sha256 is None:
            self._checkpoint_sha256 = _sha256(self.weights_path)
        return self._checkpoint_sha256

    def describe(self) -> dict[str, Any]:
        """Checkpoint, version, revision, sha256 of the weights file, tokenizer, truncation."""
        return {
            "id": self.id,
            "checkpoint": self.checkpoint,
            "version": self.version,
            "revision": self.revision,
            "weights_file": self.weights_path.name,
            "checkpoint_sha256": self.checkpoint_sha256,
            "tokenizer": self.tokenizer_source,
            "preprocessing_version": self.preprocessing_version,
            "image_size": self.image_size,
            "dtype": self.dtype,
            "score": "cosine similarity (image_features @ text_features.T, normalised)",
            "max_text_tokens": self.max_text_tokens,
            "truncated_prompts": self.truncated_prompts,
        }


@hookimpl
def register_reward_models(register):
    register(HPSv2)
