"""Tiny randomly initialised checkpoints of the real architectures, saved with save_pretrained.

Tests load them back through each plugin's real ``from_pretrained`` path. The CLIP tokenizer is
the real CLIP BPE vocabulary (49,408 tokens), taken from the open_clip_torch wheel on PyPI.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

OPEN_CLIP_WHEEL = "open_clip_torch==3.3.0"
TEST_CACHE = Path(os.environ.get("HARNESS_TEST_CACHE", Path.home() / ".cache" / "t2i-harness-tests"))


def clip_bpe_merges() -> list[str]:
    """The merges of CLIP's BPE vocabulary, from the open_clip_torch wheel (downloaded once)."""
    target = TEST_CACHE / "bpe_simple_vocab_16e6.txt.gz"
    if not target.exists():
        wheels = TEST_CACHE / "wheels"
        wheels.mkdir(parents=True, exist_ok=True)
        found = list(wheels.glob("open_clip_torch-*.whl"))
        if not found:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "-q", OPEN_CLIP_WHEEL,
                 "-d", str(wheels)],
                check=True, timeout=300,
            )
            found = list(wheels.glob("open_clip_torch-*.whl"))
        with zipfile.ZipFile(found[0]) as zf:
            data = zf.read("open_clip/bpe_simple_vocab_16e6.txt.gz")
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(target)
    lines = gzip.decompress(target.read_bytes()).decode("utf-8").split("\n")
    return lines[1 : 49152 - 256 - 2 + 1]


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def clip_tokenizer():
    """The real CLIP tokenizer (same ids as openai/clip-vit-large-patch14)."""
    from transformers import CLIPTokenizer

    merges = clip_bpe_merges()
    vocab = list(_bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={t: i for i, t in enumerate(vocab)},
        merges=[tuple(m.split()) for m in merges],
        model_max_length=77,
    )


def make_tiny_clip(path: Path, seed: int = 0, image_size: int = 32, logit_scale: float | None = None) -> Path:
    """A tiny CLIPModel + real CLIP tokenizer + CLIPImageProcessor, saved in ``path``."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 37,
                     "num_hidden_layers": 2, "num_attention_heads": 2,
                     "max_position_embeddings": 77, "bos_token_id": 49406, "eos_token_id": 49407,
                     "pad_token_id": 49407},
        vision_config={"image_size": image_size, "patch_size": 8, "hidden_size": 32,
                       "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 2},
        projection_dim=16,
    )
    model = CLIPModel(config).eval()
    if logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(logit_scale)
    model.save_pretrained(path)
    clip_tokenizer().save_pretrained(path)
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(path)
    return path


def make_image_folder(root: Path, n: int, seed: int = 0, size: tuple[int, int] = (40, 48)) -> list[Path]:
    """``n`` random RGB JPEGs (distinct content) in ``root``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        path = root / f"img_{i:03d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj))


TINY_BERT_WORDS = (
    "a an the of and photo realistic cartoon drawing two three four five six cat cats dog dogs "
    "airplane airplanes apple apples car cars red blue green in on with frog ocean pond like"
).split()


def tiny_bert_tokenizer(path: Path):
    """A BERT WordPiece tokenizer over a small vocabulary (the real BertTokenizer class)."""
    from transformers import BertTokenizer

    path.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"]
    vocab = specials + TINY_BERT_WORDS + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"] + list(
        "abcdefghijklmnopqrstuvwxyz.,-"
    )
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizer(str(path / "vocab.txt"), model_max_length=512)


def make_tiny_blip2(path: Path, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny Blip2ForImageTextRetrieval + BERT tokenizer + BlipImageProcessor in ``path``."""
    import torch
    from transformers import Blip2Config, Blip2ForImageTextRetrieval, BlipImageProcessor

    tok = tiny_bert_tokenizer(path / "_vocab")
    torch.manual_seed(seed)
    config = Blip2Config(
        vision_config={"image_size": image_size, "patch_size": 8, "hidden_size": 32,
                       "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 2},
        qformer_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                        "intermediate_size": 37, "vocab_size": len(tok),
                        "encoder_hidden_size": 32, "cross_attention_frequency": 1,
                        "max_position_embeddings": 64, "pad_token_id": 0,
                        "use_qformer_text_input": True},
        num_query_tokens=4,
        image_text_hidden_size=16,
    )
    model = Blip2ForImageTextRetrieval(config).eval()
    # Random init leaves the ITM head and query tokens near zero: spread them so scores differ.
    with torch.no_grad():
        model.query_tokens.normal_(0, 1.0)
        model.itm_head.weight.normal_(0, 1.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    BlipImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path


def make_tiny_sd(path: Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """A tiny Stable-Diffusion-shaped pipeline (UNet2DConditionModel, AutoencoderKL,
    CLIPTextModel, the real CLIP tokenizer, DDIMScheduler), saved with save_pretrained."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=4, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=8, sample_size=16,
    )
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407,
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=clip_tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path
