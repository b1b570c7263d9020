"""Tiny randomly initialised checkpoints of the real architectures, saved with save_pretrained.

Tests load them back through each plugin's real ``from_pretrained`` path. The CLIP tokenizer is
the real CLIP BPE vocabulary (49,408 tokens), taken from the open_clip_torch wheel on PyPI.
"""

from __future__ import annotations

import fcntl
import gzip
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

OPEN_CLIP_WHEEL = "open_clip_torch==3.3.0"
TEST_CACHE = Path(os.environ.get("HARNESS_TEST_CACHE", Path.home() / ".cache" / "t2i-harness-tests"))


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """``target`` in the shared test cache, built by ``build(tmp)`` at most once even when several
    test runs ask at the same time: an exclusive lock per artifact, a private temporary path,
    then one rename, so no run ever sees half an artifact."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
            if tmp.is_dir():
                shutil.rmtree(tmp)
            tmp.unlink(missing_ok=True)
            build(tmp)
            os.replace(tmp, target)
    return target


def wheel(requirement: str) -> Path:
    """The wheel of ``requirement`` (``name==version``), downloaded once with pip (no deps)."""
    def download(tmp: Path) -> None:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", requirement,
                        "-d", str(tmp)], check=True, timeout=600)

    folder = build_once(TEST_CACHE / "wheels" / requirement.replace("==", "-"), download)
    (found,) = folder.glob("*.whl")
    return found


def clip_bpe_merges() -> list[str]:
    """The merges of CLIP's BPE vocabulary, from the open_clip_torch wheel (downloaded once)."""
    def extract(tmp: Path) -> None:
        with zipfile.ZipFile(wheel(OPEN_CLIP_WHEEL)) as zf:
            tmp.write_bytes(zf.read("open_clip/bpe_simple_vocab_16e6.txt.gz"))

    target = build_once(TEST_CACHE / "bpe_simple_vocab_16e6.txt.gz", extract)
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


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=8, sample_size=16,
    )


def _smooth_images(n: int, generator):
    """16x16 images in [-1, 1]: a random overall level plus a smooth random colour field."""
    import torch
    import torch.nn.functional as F

    level = torch.rand(n, 1, 1, 1, generator=generator)
    field = torch.rand(n, 3, 4, 4, generator=generator)
    low = (0.8 * level + 0.5 * field).clamp(0, 1)
    return F.interpolate(low, size=16, mode="bilinear", align_corners=False) * 2 - 1


TRAINED_VAE_VERSION = 1


def trained_tiny_vae(steps: int = 300) -> Path:
    """A tiny AutoencoderKL trained as an autoencoder on smooth colour images (cached on disk).

    A randomly initialised decoder normalises its activations (GroupNorm) so thoroughly that an
    image's mean brightness barely depends on the latents (std 0.006 over N(0, 1) latents), so a
    reward on brightness gives fine-tuning almost nothing to learn. After ~15 s of training the
    decoder carries brightness the way a real VAE does (std 0.043; the brightness of
    reconstructions follows the input's with r = 0.999). ``scaling_factor`` is 1 / std of the
    latents, the way Stable Diffusion's 0.18215 was chosen.
    """
    import torch

    def train(tmp: Path) -> None:
        with torch.random.fork_rng():  # leave the caller's random state as it was
            torch.manual_seed(0)
            vae = _train_vae(steps)
        with torch.no_grad():
            latents = vae.encode(_smooth_images(256, torch.Generator().manual_seed(1))).latent_dist.sample(
                generator=torch.Generator().manual_seed(2))
        vae.register_to_config(scaling_factor=round(1 / float(latents.std()), 5))
        vae.save_pretrained(tmp)

    return build_once(TEST_CACHE / f"tiny-vae-trained-v{TRAINED_VAE_VERSION}-{steps}", train)


def _train_vae(steps: int):
    import torch
    import torch.nn.functional as F

    vae = _tiny_vae()
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = _smooth_images(32, g)
        posterior = vae.encode(x).latent_dist
        loss = F.mse_loss(vae.decode(posterior.sample()).sample, x) + 1e-3 * posterior.kl().mean() / x[0].numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return vae


def make_tiny_sd(path: Path, seed: int = 0, prediction_type: str = "epsilon",
                 trained_vae: bool = False) -> Path:
    """A tiny Stable-Diffusion-shaped pipeline (UNet2DConditionModel, AutoencoderKL,
    CLIPTextModel, the real CLIP tokenizer, DDIMScheduler), saved with save_pretrained.

    ``trained_vae=True`` swaps in :func:`trained_tiny_vae`, for tests whose reward must depend
    on the latents the UNet produces."""
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
    vae = _tiny_vae()  # drawn either way, so the text encoder's weights do not depend on the VAE
    if trained_vae:
        vae = AutoencoderKL.from_pretrained(trained_tiny_vae())
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


#: A ViT-H/14-shaped HPSv2 network, small: ViT-H's patch size and head widths (80 image, 64
#: text), two layers per tower, a 56-pixel image (4 x 4 patches), the real 49,408-token vocabulary
#: and 77-token context.
TINY_HPSV2 = {"embed_dim": 64, "image_size": 56, "patch_size": 14, "vision_width": 160,
              "vision_layers": 2, "text_width": 128, "text_layers": 2, "context_length": 77,
              "vocab_size": 49408}


def hpsv2_state_dict(seed: int = 0, dtype=None, **sizes) -> dict:
    """Random weights in the layout of open_clip's ``CLIP`` (the keys and shapes HPSv2's
    ``HPS_v2*_compressed.pt`` hold under ``state_dict``), float16 by default as those files are.

    Every tensor is drawn at a scale that keeps a two-layer network's features varied (LayerNorm
    weights around 1), so a mapping that swaps two tensors changes the scores. ``sizes`` override
    :data:`TINY_HPSV2`."""
    import torch

    dims = {**TINY_HPSV2, **sizes}
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.2, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    def blocks(prefix: str, width: int, layers: int) -> dict:
        out = {}
        for i in range(layers):
            b = f"{prefix}transformer.resblocks.{i}."
            out[b + "ln_1.weight"], out[b + "ln_1.bias"] = rnd(width, mean=1.0), rnd(width)
            out[b + "attn.in_proj_weight"] = rnd(3 * width, width, std=width**-0.5)
            out[b + "attn.in_proj_bias"] = rnd(3 * width)
            out[b + "attn.out_proj.weight"] = rnd(width, width, std=width**-0.5)
            out[b + "attn.out_proj.bias"] = rnd(width)
            out[b + "ln_2.weight"], out[b + "ln_2.bias"] = rnd(width, mean=1.0), rnd(width)
            out[b + "mlp.c_fc.weight"] = rnd(4 * width, width, std=width**-0.5)
            out[b + "mlp.c_fc.bias"] = rnd(4 * width)
            out[b + "mlp.c_proj.weight"] = rnd(width, 4 * width, std=(4 * width) ** -0.5)
            out[b + "mlp.c_proj.bias"] = rnd(width)
        return out

    w, t, e, p = dims["vision_width"], dims["text_width"], dims["embed_dim"], dims["patch_size"]
    grid = dims["image_size"] // p
    sd = {
        "visual.class_embedding": rnd(w, std=w**-0.5),
        "visual.positional_embedding": rnd(grid * grid + 1, w, std=w**-0.5),
        "visual.proj": rnd(w, e, std=w**-0.5),
        "visual.conv1.weight": rnd(w, 3, p, p, std=(3 * p * p) ** -0.5),
        "visual.ln_pre.weight": rnd(w, mean=1.0), "visual.ln_pre.bias": rnd(w),
        **blocks("visual.", w, dims["vision_layers"]),
        "visual.ln_post.weight": rnd(w, mean=1.0), "visual.ln_post.bias": rnd(w),
        "token_embedding.weight": rnd(dims["vocab_size"], t, std=1.0),
        "positional_embedding": rnd(dims["context_length"], t, std=0.5),
        **blocks("", t, dims["text_layers"]),
        "ln_final.weight": rnd(t, mean=1.0), "ln_final.bias": rnd(t),
        "text_projection": rnd(t, e, std=t**-0.5),
        "logit_scale": torch.tensor(4.6052),
    }
    dtype = torch.float16 if dtype is None else dtype
    return {k: v.to(dtype) for k, v in sd.items()}


def make_tiny_hpsv2(path: Path, version: str = "v2.1", seed: int = 0) -> Path:
    """A folder like a download of xswu/HPSv2: ``HPS_v2.1_compressed.pt`` (v2.0:
    ``HPS_v2_compressed.pt``) holding ``{"state_dict": hpsv2_state_dict(seed)}``, plus the real
    CLIP tokenizer."""
    import torch

    path.mkdir(parents=True, exist_ok=True)
    name = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}[version]
    torch.save({"state_dict": hpsv2_state_dict(seed)}, path / name)
    clip_tokenizer().save_pretrained(path)
    return path
