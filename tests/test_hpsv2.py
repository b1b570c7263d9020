"""The hpsv2 plugin against the original ``hpsv2`` package (PyPI hpsv2 1.2.0), on random weights.

A tiny ViT-H/14-shaped network is written in the ORIGINAL file layout (``HPS_v2.1_compressed.pt``
holding ``{"state_dict": ...}`` with open_clip's keys, float16), then loaded both by the plugin
(mapped onto transformers' CLIPModel) and by the package's own code: its vendored open_clip builds
the model (``create_model_and_transforms`` with ``light_augmentation=True``, as
``hpsv2.img_score.initialize_model`` does, from a tiny model config instead of the 4 GB ViT-H
download) and ``hpsv2.img_score.score`` itself loads the checkpoint, preprocesses, tokenises and
scores. The package is taken with ``pip download --no-deps`` into the shared test cache. Only what
its scoring path needs is provided: ftfy (its wheel), the CLIP BPE file its wheel forgot to ship
(from the open_clip_torch wheel), and stand-ins written here for the torchvision pieces it calls
(``ToTensor``, ``Normalize``, ``Compose``, ``functional.resize`` and ``functional.pad`` on tensors:
torchvision's bicubic antialiased tensor resize is ``torch.nn.functional.interpolate``) and for
``clint`` (a progress bar it imports but never uses here).
"""

from __future__ import annotations

import argparse
import enum
import json
import pickle
import shutil
import sys
import types
import warnings
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harness.errors import HarnessError

hp = pytest.importorskip("harness_plugins.hpsv2")
import tiny_models  # noqa: E402
from tiny_models import random_image  # noqa: E402

HPSV2_PACKAGE = "hpsv2==1.2.0"
FTFY = ("ftfy==6.3.1", "wcwidth==0.2.13")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIZE = tiny_models.TINY_HPSV2["image_size"]  # 56
LONG = " ".join(["a big red apple on the wooden table"] * 12)  # 96 words: past 77 tokens
PROMPTS = [
    "a red apple",
    "A  Photo of “two” DOGS’ &amp; ﬁsh, ＡＢＣ",  # what ftfy + html.unescape repair
    "<|startoftext|> literal markers, tab\x0bstop",
    LONG,
]


# ---------------------------------------------------------------------------------------------
# The original package, imported with stand-ins for what its scoring path does not need
# ---------------------------------------------------------------------------------------------
def _torchvision_standin() -> dict[str, types.ModuleType]:
    """torchvision's transforms as HPSv2's evaluation transform uses them, on float tensors."""

    class InterpolationMode(enum.Enum):
        NEAREST = "nearest"
        BILINEAR = "bilinear"
        BICUBIC = "bicubic"

    class ToTensor:  # PIL (uint8) -> float [C, H, W] in [0, 1]
        def __call__(self, pic):
            arr = np.array(pic, dtype=np.uint8)
            arr = arr[:, :, None] if arr.ndim == 2 else arr
            return torch.from_numpy(arr).permute(2, 0, 1).contiguous().float().div(255)

    class Normalize(torch.nn.Module):
        def __init__(self, mean, std):
            super().__init__()
            self.mean, self.std = mean, std

        def forward(self, t):
            mean = torch.as_tensor(self.mean, dtype=t.dtype).view(-1, 1, 1)
            std = torch.as_tensor(self.std, dtype=t.dtype).view(-1, 1, 1)
            return (t - mean) / std

    class Compose:
        def __init__(self, transforms):
            self.transforms = transforms

        def __call__(self, x):
            for t in self.transforms:
                x = t(x)
            return x

    def resize(img, size, interpolation=InterpolationMode.BILINEAR, antialias=True):
        assert isinstance(img, torch.Tensor) and img.is_floating_point()
        return F.interpolate(img[None], size=list(size), mode=interpolation.value,
                             align_corners=False, antialias=antialias)[0]

    def pad(img, padding, fill=0):
        left, top, right, bottom = padding
        return F.pad(img, (left, right, top, bottom), value=float(fill))

    def not_on_the_scoring_path(*args, **kwargs):
        raise AssertionError("not on HPSv2's scoring path")

    tv, tvt, tvf = (types.ModuleType(n) for n in
                    ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"))
    ops, misc = types.ModuleType("torchvision.ops"), types.ModuleType("torchvision.ops.misc")
    tvf.resize, tvf.pad = resize, pad
    tvt.ToTensor, tvt.Normalize, tvt.Compose = ToTensor, Normalize, Compose
    tvt.InterpolationMode, tvt.functional = InterpolationMode, tvf
    tvt.RandomResizedCrop = tvt.Resize = tvt.CenterCrop = not_on_the_scoring_path
    misc.FrozenBatchNorm2d = type("FrozenBatchNorm2d", (torch.nn.Module,), {})
    tv.transforms, tv.ops, ops.misc = tvt, ops, misc
    clint, textui = types.ModuleType("clint"), types.ModuleType("clint.textui")
    textui.progress, clint.textui = None, textui
    return {"torchvision": tv, "torchvision.transforms": tvt,
            "torchvision.transforms.functional": tvf, "torchvision.ops": ops,
            "torchvision.ops.misc": misc, "clint": clint, "clint.textui": textui}


def _extract(tmp):
    tmp.mkdir(parents=True)
    for requirement in (HPSV2_PACKAGE, *FTFY):
        with zipfile.ZipFile(tiny_models.wheel(requirement)) as zf:
            zf.extractall(tmp)
    # hpsv2 1.2.0's wheel lacks the BPE file its tokenizer opens at import; it is open_clip's.
    tiny_models.clip_bpe_merges()
    shutil.copy(tiny_models.TEST_CACHE / "bpe_simple_vocab_16e6.txt.gz",
                tmp / "hpsv2" / "src" / "open_clip" / "bpe_simple_vocab_16e6.txt.gz")


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """``hpsv2.img_score`` and its open_clip, with a tiny model in place of ViT-H-14."""
    import transformers.utils

    folder = tiny_models.build_once(tiny_models.TEST_CACHE / "hpsv2-1.2.0-ftfy-6.3.1", _extract)
    transformers.utils.is_torchvision_available()  # answered (no) before the stand-ins exist
    standins = _torchvision_standin()
    sys.path.insert(0, str(folder))
    saved = {name: sys.modules.get(name) for name in standins}
    sys.modules.update(standins)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import hpsv2.img_score as img_score
            from hpsv2.src import open_clip
    finally:  # the stand-ins must not leak into other tests (transformers probes torchvision)
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        sys.path.remove(str(folder))
    dims = tiny_models.TINY_HPSV2
    config = tmp_path_factory.mktemp("open_clip_config") / "ViT-H-14-tiny.json"
    config.write_text(json.dumps({
        "embed_dim": dims["embed_dim"],
        "vision_cfg": {"image_size": SIZE, "layers": dims["vision_layers"],
                       "width": dims["vision_width"], "head_width": 80,
                       "patch_size": dims["patch_size"]},
        "text_cfg": {"context_length": 77, "vocab_size": dims["vocab_size"],
                     "width": dims["text_width"], "heads": dims["text_width"] // 64,
                     "layers": dims["text_layers"]},
    }))
    open_clip.add_model_config(config)
    # initialize_model's call, less the download of the pretrained ViT-H-14
    model, _, preprocess_val = open_clip.create_model_and_transforms(
        "ViT-H-14-tiny", None, precision="amp", device="cpu", jit=False, force_quick_gelu=False,
        force_custom_text=False, force_patch_dropout=False, force_image_size=None,
        pretrained_image=False, image_mean=None, image_std=None, light_augmentation=True,
        aug_cfg={}, output_dict=True, with_score_predictor=False, with_region_predictor=False)
    img_score.model_dict.update(model=model, preprocess_val=preprocess_val)
    return types.SimpleNamespace(img_score=img_score, open_clip=open_clip, model=model,
                                 preprocess=preprocess_val)


def original_score(upstream, image, prompt, ckpt, version="v2.1"):
    """``hpsv2.score`` itself: loads the checkpoint file, preprocesses, tokenises, scores."""
    name = hp.VERSIONS[version]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.cuda.amp.autocast() on a CPU
        return float(upstream.img_score.score(image, prompt, cp=str(ckpt / name),
                                              hps_version=version)[0])


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_models.make_tiny_hpsv2(tmp_path_factory.mktemp("hps") / "HPSv2-tiny")


@pytest.fixture(scope="module")
def model(ckpt):
    return hp.HPSv2(str(ckpt), batch_size=2)


@pytest.fixture(scope="module")
def images():
    # square, tall, wide, larger than 224 and smaller than the model's 56 pixels
    return [random_image(i, w, h) for i, (w, h) in enumerate([(56, 56), (40, 70), (300, 97),
                                                              (23, 31)])]


# ---------------------------------------------------------------------------------------------
# Parity with the original package
# ---------------------------------------------------------------------------------------------
def test_scores_equal_the_original_package_on_every_image_mode(upstream, model, ckpt, images):
    from harness.images import as_8bit
    from harness.testing import image_modes

    worst, compared = 0.0, 0
    for n, image in enumerate(images):
        modes = {"RGB": image, **image_modes(image)} if n < 2 else {"RGB": image}
        for mode, im in modes.items():
            im = as_8bit(im)  # what the core's decoder hands to both
            got = model.score(model.embed_images(model.preprocess(im)[None]), [PROMPTS])[0]
            if mode == "RGBA":
                continue  # below: the original's ViT refuses its 4-channel tensor
            want = [original_score(upstream, im, p, ckpt) for p in PROMPTS]
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=f"mode {mode}")
            worst, compared = max(worst, float(np.abs(got - np.array(want)).max())), compared + 1
    assert compared >= 30 and worst < 1e-5, worst
    print(f"max |plugin - hpsv2.score| over {compared} images x {len(PROMPTS)} prompts: "
          f"{worst:.2e}")


def test_rgba_is_scored_on_its_colour_channels(upstream, model, ckpt, images):
    from harness.testing import image_modes

    rgba = image_modes(images[1])["RGBA"]
    with pytest.raises(RuntimeError):  # the original keeps alpha; its 3-channel conv refuses it
        original_score(upstream, rgba, "a red apple", ckpt)
    pixels = upstream.preprocess(rgba)
    assert pixels.shape[0] == 4
    torch.testing.assert_close(model.preprocess(rgba), pixels[:3], atol=1e-6, rtol=0)
    # ... and its colour channels are the image's RGB conversion, which the original scores
    np.testing.assert_allclose(
        model.score(model.embed_images(model.preprocess(rgba)[None]), [["a red apple"]])[0],
        [original_score(upstream, rgba.convert("RGB"), "a red apple", ckpt)], atol=1e-5)


def test_tokens_equal_the_original_tokenizer(upstream, model):
    tokenize = upstream.open_clip.tokenize
    prompts = [*PROMPTS, "café naïve “Zoë”", "&rsquo;quoted&rsquo; &lt;tag&gt;", "ｶﾀｶﾅ　text",
               "emoji 🐶🎉", "1234 apples", "e\u0301 decomposed", "soft\u00adhyphen \ufeffbom"]
    for p in prompts:
        want = tokenize([p])[0]
        want = want[: int((want != 0).sum())].tolist()
        got = model.tokenizer([hp.clean_prompt(p)], truncation=True, max_length=77,
                              split_special_tokens=True)["input_ids"][0]
        assert got == want, p


def test_features_equal_the_original_encoders(upstream, model, ckpt, images):
    state = torch.load(ckpt / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"]
    upstream.model.load_state_dict(state)
    pixels = torch.stack([model.preprocess(im) for im in images])
    torch.testing.assert_close(pixels, torch.stack([upstream.preprocess(im) for im in images]),
                               atol=1e-6, rtol=0)
    with torch.no_grad():
        want = upstream.model.encode_image(pixels, normalize=True)
    torch.testing.assert_close(model.embed_images(pixels), want, atol=1e-5, rtol=0)
    with torch.no_grad():
        want = upstream.model.encode_text(upstream.open_clip.tokenize(PROMPTS), normalize=True)
    torch.testing.assert_close(model.text_embeddings(PROMPTS), want, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# The plugin on its own
# ---------------------------------------------------------------------------------------------
def ref_pad_resize(image, size):
    """HPSv2's evaluation transform written out from its description: RGB -> [0, 1] floats ->
    long side to ``size`` (bicubic, antialiased, short side ``round``ed) -> zero padding, the
    smaller half left/top -> CLIP normalisation."""
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
    h, w = x.shape[1:]
    if max(h, w) != size:
        scale = size / max(h, w)
        h, w = max(1, round(h * scale)), max(1, round(w * scale))  # 1, where the original fails
        x = F.interpolate(x[None], size=(h, w), mode="bicubic", antialias=True)[0]
    out = torch.zeros(3, size, size)
    top, left = (size - h) // 2, (size - w) // 2
    out[:, top : top + h, left : left + w] = x
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    return (out - mean) / std


def test_preprocess_pads_to_a_square_instead_of_cropping(model, images):
    pre = hp.HPSv2Preprocess(SIZE)
    for im in [*images, random_image(9, 30, 56), random_image(10, 3, 400)]:
        torch.testing.assert_close(pre(im), ref_pad_resize(im, SIZE), atol=1e-5, rtol=0)
    # a 30 x 56 image is already 56 high: no resize, 13 + 13 columns of black padding
    tall = random_image(9, 30, 56)
    out = pre(tall)
    mean, std = np.array(CLIP_MEAN).reshape(3, 1, 1), np.array(CLIP_STD).reshape(3, 1, 1)
    black = np.broadcast_to(-mean / std, (3, 56, 13))
    np.testing.assert_allclose(out[:, :, :13].numpy(), black, atol=1e-6)
    np.testing.assert_allclose(out[:, :, 43:].numpy(), black, atol=1e-6)
    want = (np.asarray(tall, dtype=np.float32).transpose(2, 0, 1) / 255 - mean) / std
    np.testing.assert_allclose(out[:, :, 13:43].numpy(), want, atol=1e-5)
    # what a centre-cropping CLIP processor would give instead: not the same input
    from transformers import CLIPImageProcessor

    crop = CLIPImageProcessor(size={"shortest_edge": SIZE},
                              crop_size={"height": SIZE, "width": SIZE})
    cropped = crop(images=images[1], return_tensors="pt")["pixel_values"][0]
    assert (cropped - pre(images[1])).abs().max() > 0.5
    # cheap to send to data-loader workers
    blob = pickle.dumps(model.preprocess)
    assert len(blob) < 1000
    assert torch.equal(pickle.loads(blob)(images[2]), model.preprocess(images[2]))
    assert tuple(hp.HPSv2Preprocess()(images[2]).shape) == (3, 224, 224)


def test_clean_prompt():
    assert hp.clean_prompt("  “Hi” it’s &amp;amp; ﬁne ＡＢＣ\x07 ") == '"Hi" it\'s & fine ABC'
    assert hp.clean_prompt("<b>&amp;</b>") == "<b>&</b>"
    assert hp.clean_prompt("e\u0301") == "\u00e9"


def test_long_prompts_are_truncated_to_77_tokens_and_counted(ckpt, images):
    m = hp.HPSv2(str(ckpt))
    feats = m.embed_images(m.preprocess(images[0])[None])
    m.score(feats, [["a red apple", "two cats"]])
    assert m.describe()["truncated_prompts"] == 0
    longer = LONG + " and a dog"
    s = m.score(feats, [[LONG, LONG, longer]])[0]
    assert m.truncated_prompts == 2 and m.describe()["max_text_tokens"] == 77
    assert s[0] == s[2]  # only the first 77 tokens count


def test_convert_state_dict_maps_every_original_key():
    sd = tiny_models.hpsv2_state_dict(dtype=torch.float32)
    converted = hp.convert_state_dict(sd)
    w, t = tiny_models.TINY_HPSV2["vision_width"], tiny_models.TINY_HPSV2["text_width"]
    q, k, v = sd["visual.transformer.resblocks.1.attn.in_proj_weight"].split(w)
    layer = "vision_model.encoder.layers.1.self_attn."
    assert torch.equal(converted[layer + "q_proj.weight"], q)
    assert torch.equal(converted[layer + "k_proj.weight"], k)
    assert torch.equal(converted[layer + "v_proj.weight"], v)
    bias = sd["transformer.resblocks.0.attn.in_proj_bias"]
    v_bias = converted["text_model.encoder.layers.0.self_attn.v_proj.bias"]
    assert torch.equal(v_bias, bias[2 * t :])
    assert torch.equal(converted["visual_projection.weight"], sd["visual.proj"].T)
    assert torch.equal(converted["text_projection.weight"], sd["text_projection"].T)
    assert converted["vision_model.pre_layrnorm.weight"] is sd["visual.ln_pre.weight"]
    assert converted["text_model.final_layer_norm.bias"] is sd["ln_final.bias"]
    # 2 in-projection tensors per block become 6
    assert len(converted) == len(sd) + 4 * (2 + 2)
    from transformers import CLIPModel

    with torch.device("meta"):
        expected = set(CLIPModel(hp.clip_config(hp.architecture_from(sd))).state_dict())
    assert set(converted) == expected - {"text_model.embeddings.position_ids",
                                         "vision_model.embeddings.position_ids"}
    prefixed = hp.convert_state_dict({"module." + key: val for key, val in sd.items()})
    assert prefixed.keys() == converted.keys()


def test_the_published_shapes_are_vit_h_14():
    big = {"vision_width": 1280, "vision_layers": 32, "text_width": 1024, "text_layers": 24,
           "embed_dim": 1024}
    arch = hp.architecture_from(_meta_vit_h(big))
    assert arch == {"embed_dim": 1024, "image_size": 224, "patch_size": 14, "vision_width": 1280,
                    "vision_layers": 32, "vision_heads": 16, "vision_mlp": 5120,
                    "context_length": 77, "vocab_size": 49408, "text_width": 1024,
                    "text_layers": 24, "text_heads": 16, "text_mlp": 4096}
    from transformers import CLIPModel

    with torch.device("meta"):
        n = sum(p.numel() for p in CLIPModel(hp.clip_config(arch)).parameters())
    assert 986e6 < n < 987e6  # open_clip ViT-H-14: 986.1M parameters


def _meta_vit_h(dims):
    """The keys and shapes of open_clip's ViT-H-14 on the meta device."""
    def e(*shape):
        return torch.empty(*shape, device="meta")

    w, t, d = dims["vision_width"], dims["text_width"], dims["embed_dim"]
    sd = {"visual.conv1.weight": e(w, 3, 14, 14), "visual.positional_embedding": e(257, w),
          "visual.proj": e(w, d), "token_embedding.weight": e(49408, t),
          "positional_embedding": e(77, t), "ln_final.weight": e(t), "text_projection": e(t, d)}
    towers = (("visual.", w, dims["vision_layers"]), ("", t, dims["text_layers"]))
    for prefix, width, layers in towers:
        for i in range(layers):
            sd[f"{prefix}transformer.resblocks.{i}.mlp.c_fc.weight"] = e(4 * width, width)
    return sd


def test_conformance_and_engine_with_workers(ckpt, images, tmp_path):
    from harness.scoring import LocalExecutor, score_images
    from harness.scoring.specs import load_reward_model
    from harness.testing import check_reward_model

    m = load_reward_model(f"hpsv2:checkpoint={ckpt},version=2.1", device="cpu")
    assert m.version == "v2.1"
    prompts = [["a red car", "two dogs", LONG][: 1 + i % 3] for i in range(len(images))]
    direct = check_reward_model(m, images, prompts, atol=1e-5, batch_sizes=(1, 3, 16))
    paths = []
    for i, im in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        im.save(paths[-1])
    run = score_images(m, paths, prompts, batch_size=3, executor=LocalExecutor(num_workers=2))
    for a, b in zip(run.scores, direct, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert {p.name for p in m.files()} >= {"HPS_v2.1_compressed.pt", "tokenizer.json"}


def test_bfloat16_runs(ckpt, images):
    m = hp.HPSv2(str(ckpt), dtype="bfloat16")
    assert m.model.dtype == torch.bfloat16
    feats = m.embed_images(torch.stack([m.preprocess(im) for im in images[:2]]))
    scores = m.score(feats, [["a red apple"], ["a cat", LONG]])
    assert [s.dtype for s in scores] == [np.float32, np.float32]
    assert all(np.isfinite(s).all() for s in scores)


def test_versions_folders_and_safetensors(ckpt, tmp_path, images):
    from safetensors.torch import save_file

    folder = tiny_models.make_tiny_hpsv2(tmp_path / "both", version="v2.0", seed=1)
    shutil.copy(ckpt / "HPS_v2.1_compressed.pt", folder)
    v20 = hp.HPSv2(str(folder), version="2.0")
    v21 = hp.HPSv2(str(folder))
    assert v20.weights_path.name == "HPS_v2_compressed.pt" and v21.version == "v2.1"
    pixels = v21.preprocess(images[0])[None]
    a = v20.score(v20.embed_images(pixels), [["a cat"]])[0]
    b = v21.score(v21.embed_images(pixels), [["a cat"]])[0]
    assert abs(float(a[0] - b[0])) > 1e-3  # two different files
    with pytest.raises(HarnessError, match="unknown HPSv2 version 'v3'.*v2.0 or v2.1"):
        hp.HPSv2(str(folder), version="3")
    # a .safetensors copy of the tensors scores the same
    flat = tmp_path / "flat"
    flat.mkdir()
    save_file(torch.load(ckpt / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"],
              str(flat / "hpsv2.safetensors"))
    c = hp.HPSv2(str(flat / "hpsv2.safetensors"), tokenizer=str(ckpt))
    np.testing.assert_array_equal(c.score(c.embed_images(pixels), [["a cat"]])[0], b)
    # a folder with one weights file of another name takes it; with none, says so
    d = hp.HPSv2(str(flat), tokenizer=str(ckpt))
    assert d.weights_path.name == "hpsv2.safetensors"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(HarnessError, match="no HPS_v2.1_compressed.pt") as info:
        hp.HPSv2(str(empty))
    assert str(empty) in str(info.value)
    with pytest.raises(HarnessError, match="not found"):
        hp.HPSv2(str(tmp_path / "nowhere"))


def test_bad_files_are_one_line_errors(ckpt, tmp_path):
    def write(name, obj):
        folder = tmp_path / name
        folder.mkdir()
        torch.save(obj, folder / "HPS_v2.1_compressed.pt")
        return folder

    sd = tiny_models.hpsv2_state_dict()
    # a pickle holding more than tensors is refused, never unpickled
    bad = write("pickled", {"state_dict": sd, "args": argparse.Namespace(lr=1e-5)})
    with pytest.raises(HarnessError, match="does not unpickle") as info:
        hp.HPSv2(str(bad), tokenizer=str(ckpt))
    assert "argparse.Namespace" in str(info.value) and "safetensors" in str(info.value)
    # a renamed tensor: named, with the mapped name the network expects
    renamed = dict(sd)
    renamed["visual.final_ln.weight"] = renamed.pop("visual.ln_post.weight")
    with pytest.raises(HarnessError, match="vision_model.post_layernorm.weight") as info:
        hp.HPSv2(str(write("renamed", {"state_dict": renamed})), tokenizer=str(ckpt))
    assert "visual.final_ln.weight" in str(info.value)
    # a transformers CLIPModel state dict is not an open_clip one
    clip_keys = {f"text_model.{k}": v for k, v in list(sd.items())[:3]}
    with pytest.raises(HarnessError, match="lacks visual.conv1.weight"):
        hp.HPSv2(str(write("hf", {"state_dict": clip_keys})), tokenizer=str(ckpt))
    # a vision tower whose width is no multiple of ViT-H's head width
    with pytest.raises(HarnessError, match="not a multiple of ViT-H/14's head width 80"):
        hp.HPSv2(str(write("narrow", tiny_models.hpsv2_state_dict(vision_width=96))),
                 tokenizer=str(ckpt))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(HarnessError, match="cannot read"):
        hp.HPSv2(str(junk), tokenizer=str(ckpt))
    with pytest.raises(HarnessError, match="HPSv2 tokenizer") as info:
        hp.HPSv2(str(ckpt), tokenizer=str(tmp_path / "no-tokenizer"))
    assert str(tmp_path / "no-tokenizer") in str(info.value)


def test_hub_download_failure_names_repo_file_and_pinned_revision(monkeypatch):
    import huggingface_hub

    calls = []

    def offline(repo_id, filename, revision=None, **kwargs):
        calls.append((repo_id, filename, revision))
        raise OSError("offline mode is enabled")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(HarnessError, match="xswu/HPSv2") as info:
        hp.HPSv2()
    assert calls == [("xswu/HPSv2", "HPS_v2.1_compressed.pt", hp.HUB_REVISION)]
    assert "offline mode is enabled" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(HarnessError, match="HPS_v2_compressed.pt"):
        hp.HPSv2(version="v2.0", revision="main")
    assert calls[-1] == ("xswu/HPSv2", "HPS_v2_compressed.pt", "main")


def test_describe_card_and_registration(model, ckpt):
    import hashlib

    from harness.plugins import BUILTIN_PLUGINS, Plugins
    from harness.types import ModelCard

    info = model.describe()
    assert info["id"] == "hpsv2" and info["version"] == "v2.1" and info["image_size"] == SIZE
    assert info["checkpoint_sha256"] == hashlib.sha256(
        (ckpt / "HPS_v2.1_compressed.pt").read_bytes()).hexdigest()
    assert info["tokenizer"] == str(ckpt) and info["revision"] is None
    card = hp.HPSv2.card
    assert isinstance(card, ModelCard) and card.revision == hp.HUB_REVISION
    assert set(card.variants) == {"v2.0", "v2.1"} and card.license == "Apache-2.0"
    registered = []
    hp.register_reward_models(lambda cls, **kw: registered.append(cls))
    assert registered == [hp.HPSv2]
    if "harness_plugins.hpsv2" in BUILTIN_PLUGINS:
        assert Plugins(load_entry_points=False).reward_models.get("hpsv2") is hp.HPSv2
