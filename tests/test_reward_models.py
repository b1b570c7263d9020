"""The built-in reward models on tiny random checkpoints of their real architectures."""

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import make_image_folder, make_tiny_blip2, make_tiny_clip

from harness.errors import HarnessError, UnknownIdError
from harness.scoring.specs import load_reward_model, parse_model_spec
from harness.testing import check_reward_model

PROMPTS = [
    "a realistic photo of an airplane",
    "a realistic photo of two airplanes",
    "a cartoon drawing of three red apples",
    "a frog in the middle of the ocean",
]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "clip": make_tiny_clip(root / "clip", seed=0),
        "pickscore": make_tiny_clip(root / "pickscore", seed=1, logit_scale=4.6052),
        "blip2": make_tiny_blip2(root / "blip2", seed=2),
    }


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    paths = make_image_folder(tmp_path_factory.mktemp("img"), 18, seed=3)
    return [Image.open(p).convert("RGB") for p in paths]


SPECS = ["clip", "pickscore", "blip2", "blip2:mode=itc"]


@pytest.mark.parametrize("spec", SPECS)
def test_conformance(spec, ckpts, images):
    name = spec.split(":")[0]
    model = load_reward_model(f"{spec}{',' if ':' in spec else ':'}{_where(name, ckpts)}", device="cpu")
    prompts = [PROMPTS[: 1 + i % 4] for i in range(len(images))]
    scores = check_reward_model(model, images, prompts, atol=1e-5, batch_sizes=(1, 16))
    flat = np.concatenate(scores)
    assert flat.std() > 0  # not constant
    if spec == "blip2":
        assert ((flat >= 0) & (flat <= 1)).all()  # a probability
    elif name == "pickscore":  # exp(logit_scale) = 100 times a cosine: |score| <= 100, not <= 1
        assert (np.abs(flat) <= 100 * (1 + 1e-5)).all() and np.abs(flat).max() > 1
    else:  # a cosine
        assert ((flat >= -1) & (flat <= 1)).all()


def _where(name, ckpts):
    # PickScore's processor is a separate repository by default; point it at the tiny one.
    extra = f",processor={ckpts[name]}" if name == "pickscore" else ""
    return f"checkpoint={ckpts[name]}{extra}"


def _pixels(model, images):
    return torch.stack([model.preprocess(im) for im in images])


def test_clip_and_pickscore_match_the_transformers_forward(ckpts, images):
    from transformers import AutoTokenizer, CLIPModel

    for name, scale in (("clip", 1.0), ("pickscore", None)):
        model = load_reward_model(parse_model_spec(f"{name}:{_where(name, ckpts)}"), device="cpu")
        ref = CLIPModel.from_pretrained(ckpts[name]).eval()
        tok = AutoTokenizer.from_pretrained(ckpts[name])
        pix = _pixels(model, images[:5])
        ours = np.stack(model.score(model.embed_images(pix), [PROMPTS] * 5))
        with torch.no_grad():
            out = ref(pixel_values=pix, **tok(PROMPTS, padding=True, return_tensors="pt"))
        expected = out.logits_per_image.numpy()
        if scale is not None:  # CLIP reports the plain cosine
            expected = expected / ref.logit_scale.exp().item()
        else:
            assert ref.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-3)
        np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["itm", "itc"])
def test_blip2_matches_the_transformers_forward(mode, ckpts, images):
    model = load_reward_model(f"blip2:checkpoint={ckpts['blip2']},mode={mode}", device="cpu")
    pix = _pixels(model, images[:3])
    ours = np.stack(model.score(model.embed_images(pix), [PROMPTS] * 3))
    ref = np.zeros_like(ours)
    for i in range(3):
        for j, prompt in enumerate(PROMPTS):
            tok = model.tokenizer([prompt], return_tensors="pt", truncation=True, max_length=32)
            with torch.no_grad():
                out = model.model(pixel_values=pix[i : i + 1], input_ids=tok["input_ids"],
                                  attention_mask=tok["attention_mask"],
                                  use_image_text_matching_head=mode == "itm")
            logits = out.logits_per_image
            ref[i, j] = logits.softmax(-1)[0, 1] if mode == "itm" else logits.reshape(-1)[0]
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_real_clip_tokenizer_and_truncation_count(ckpts, images):
    model = load_reward_model(f"clip:checkpoint={ckpts['clip']}", device="cpu")
    ids = model.tokenizer("a realistic photo of two airplanes")["input_ids"]
    assert ids[0] == 49406 and ids[-1] == 49407 and len(ids) == 8
    long_prompt = " ".join(["a photo of a red apple and a blue car"] * 12)  # > 77 tokens
    feats = model.embed_images(_pixels(model, images[:2]))
    scores = model.score(feats, [[long_prompt, PROMPTS[0]], [long_prompt]])
    assert np.isfinite(np.concatenate(scores)).all()
    info = model.describe()
    assert info["truncated_prompts"] == 1 and info["max_text_tokens"] == 77
    assert len(info["checkpoint_sha256"]) == 64


def test_device_and_dtype_settings(ckpts, images):
    model = load_reward_model(f"clip:checkpoint={ckpts['clip']}", device="cpu", dtype="bfloat16")
    assert model.model.dtype == torch.bfloat16 and model.describe()["dtype"] == "bfloat16"
    s16 = np.concatenate(model.score(model.embed_images(_pixels(model, images[:4])), [PROMPTS] * 4))
    ref = load_reward_model(f"clip:checkpoint={ckpts['clip']}", device="cpu")
    s32 = np.concatenate(ref.score(ref.embed_images(_pixels(ref, images[:4])), [PROMPTS] * 4))
    assert s16.dtype == np.float32
    np.testing.assert_allclose(s16, s32, atol=0.05)
    if not torch.cuda.is_available():
        with pytest.raises(HarnessError, match="CUDA is not available"):
            load_reward_model(f"clip:checkpoint={ckpts['clip']}", device="cuda")


def test_bad_checkpoints(ckpts, tmp_path):
    with pytest.raises(HarnessError, match="cannot load the tokenizer and image processor of pickscore"):
        load_reward_model(f"pickscore:checkpoint={ckpts['pickscore']}", device="cpu")
    with pytest.raises(HarnessError, match=r"checkpoint '.*nope' not found .*expected a CLIPModel"):
        load_reward_model(f"clip:checkpoint={tmp_path / 'nope'}", device="cpu")
    with pytest.raises(HarnessError, match=r"is a 'blip-2' model, expected a CLIPModel"):
        load_reward_model(f"clip:checkpoint={ckpts['blip2']}", device="cpu")
    with pytest.raises(HarnessError, match=r"is a 'clip' model, expected a Blip2ForImageTextRetrieval"):
        load_reward_model(f"blip2:checkpoint={ckpts['clip']}", device="cpu")


def test_model_specs():
    spec = parse_model_spec("blip2:mode=itc,checkpoint=/x,batch_size=8")
    assert spec.options == {"mode": "itc", "checkpoint": "/x", "batch_size": 8}
    assert spec.label == "blip2[mode=itc]"
    with pytest.raises(UnknownIdError, match="Did you mean 'clip'"):
        load_reward_model("clipp")
    with pytest.raises(HarnessError, match="has no option 'mdoe'. Did you mean 'mode'"):
        load_reward_model("blip2:mdoe=itc")
    with pytest.raises(HarnessError, match="unknown BLIP-2 mode 'xyz'"):
        load_reward_model("blip2:mode=xyz,checkpoint=/nonexistent")
    with pytest.raises(HarnessError, match="expected key=value"):
        parse_model_spec("clip:checkpoint")
    # Two models under one name would be mixed in tables and ensembles.
    from harness.scoring.specs import check_unique_labels

    with pytest.raises(HarnessError, match="both named 'clip'; add label=NAME"):
        check_unique_labels([parse_model_spec("clip"), parse_model_spec("clip:checkpoint=/b32")])
    named = parse_model_spec("clip:checkpoint=/b32,label=clip-b32")
    check_unique_labels([parse_model_spec("clip"), named])
    assert named.label == "clip-b32"


def test_cache_key_covers_every_setting(ckpts):
    from harness.scoring.plan import key_parts, model_cache_key

    specs = [parse_model_spec(f"blip2:checkpoint={ckpts['blip2']}{extra}")
             for extra in ("", ",max_text_tokens=64,label=b", ",mode=itc", ",mode=itm,pair_batch_size=8")]
    models = [load_reward_model(spec, device="cpu") for spec in specs]
    keys = [model_cache_key(m, spec) for m, spec in zip(models, specs, strict=True)]
    assert len(set(keys[:3])) == 3
    # mode=itm is the default, and pair_batch_size is one of BLIP-2's runtime options.
    assert keys[3] == keys[0]
    parts = key_parts(models[0], specs[0])
    assert parts["options"]["mode"] == "itm" and parts["options"]["max_text_tokens"] == 32
    assert "device" not in parts["options"] and "batch_size" not in parts["options"]
    half = load_reward_model(specs[0], device="cpu", dtype="bfloat16")
    assert model_cache_key(half, specs[0]) != keys[0]
    assert not hasattr(models[0], "harness_spec") and not hasattr(models[0], "harness_dtype")


def test_files_list_what_the_models_load(ckpts):
    clip = load_reward_model(f"clip:checkpoint={ckpts['clip']}", device="cpu")
    assert {p.name for p in clip.files()} == {p.name for p in ckpts["clip"].iterdir()}
    pick = load_reward_model(f"pickscore:{_where('pickscore', ckpts)}", device="cpu")
    assert len(pick.files()) == len(clip.files())  # processor == checkpoint: listed once
    mixed = load_reward_model(f"pickscore:checkpoint={ckpts['pickscore']},processor={ckpts['clip']}",
                              device="cpu")
    assert {p.parent for p in mixed.files()} == {ckpts["pickscore"], ckpts["clip"]}
    blip = load_reward_model(f"blip2:checkpoint={ckpts['blip2']}", device="cpu")
    assert ckpts["blip2"] / "_vocab" / "vocab.txt" in blip.files()
    assert ckpts["blip2"] / "model.safetensors" in blip.files()


def test_hub_ids_list_their_snapshot_files(tmp_path, monkeypatch):
    from harness.hf import checkpoint_files

    snapshot = tmp_path / "hub" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_text(name)
    (snapshot / ".gitattributes").write_text("x")
    calls = []

    def fake_snapshot_download(repo_id, revision=None, local_files_only=False, **kw):
        calls.append((repo_id, revision, local_files_only))
        if repo_id != "org/model":
            raise FileNotFoundError(repo_id)
        return str(snapshot)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert [p.name for p in checkpoint_files("org/model", "v1")] == ["config.json", "model.safetensors"]
    assert calls == [("org/model", "v1", True)]  # never downloads
    assert checkpoint_files("org/missing") == []
