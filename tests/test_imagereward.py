"""The ImageReward plugin against an independent plain-torch reference of the original network.

A tiny random checkpoint is written in the ORIGINAL file layout (``ImageReward.pt`` with
``blip.visual_encoder.*`` / ``blip.text_encoder.*`` / ``mlp.layers.*`` keys and a BLIP
``med_config.json``), so these tests check the key mapping and the forward pass, not just shapes.
Nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from harness.errors import HarnessError

ir = pytest.importorskip("harness_plugins.imagereward")

# Published constants, typed here from THUDM/ImageReward ImageReward/ImageReward.py.
MEAN, STD = 0.16717362830052426, 1.0333394966054072
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

WORDS = [
    "a",
    "an",
    "the",
    "red",
    "blue",
    "green",
    "apple",
    "dog",
    "cat",
    "on",
    "table",
    "photo",
    "of",
    "sitting",
    "under",
    "tree",
    "big",
    "small",
    "and",
    "with",
    "##s",
]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]", *WORDS]
TEXT = {"hidden": 32, "layers": 2, "heads": 2, "intermediate": 37, "max_pos": 64, "eps": 1e-12}
VISION = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
}
HEAD = (TEXT["hidden"], 1024, 128, 64, 16, 1)
LONG = " ".join(["a big red apple on the table"] * 8)  # 56 words -> truncated to 35 tokens


# ---------------------------------------------------------------------------------------------
# A tiny checkpoint in the original ImageReward layout
# ---------------------------------------------------------------------------------------------
def original_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.2, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    sd: dict[str, torch.Tensor] = {}
    d, p = VISION["hidden_size"], VISION["patch_size"]
    n = (VISION["image_size"] // p) ** 2
    v = "blip.visual_encoder."
    sd[v + "cls_token"] = rnd(1, 1, d)
    sd[v + "pos_embed"] = rnd(1, n + 1, d)
    sd[v + "patch_embed.proj.weight"] = rnd(d, 3, p, p, std=0.05)
    sd[v + "patch_embed.proj.bias"] = rnd(d)
    for i in range(VISION["num_hidden_layers"]):
        b = f"{v}blocks.{i}."
        sd[b + "norm1.weight"], sd[b + "norm1.bias"] = rnd(d, mean=1.0), rnd(d)
        sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"] = rnd(3 * d, d), rnd(3 * d)
        sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"] = rnd(d, d), rnd(d)
        sd[b + "norm2.weight"], sd[b + "norm2.bias"] = rnd(d, mean=1.0), rnd(d)
        sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"] = rnd(4 * d, d), rnd(4 * d)
        sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"] = rnd(d, 4 * d), rnd(d)
    sd[v + "norm.weight"], sd[v + "norm.bias"] = rnd(d, mean=1.0), rnd(d)

    h, m = TEXT["hidden"], TEXT["intermediate"]
    t = "blip.text_encoder."
    sd[t + "embeddings.position_ids"] = torch.arange(TEXT["max_pos"]).expand((1, -1))
    sd[t + "embeddings.word_embeddings.weight"] = rnd(len(VOCAB), h, std=1.0)
    sd[t + "embeddings.position_embeddings.weight"] = rnd(TEXT["max_pos"], h, std=0.5)
    sd[t + "embeddings.LayerNorm.weight"] = rnd(h, mean=1.0)
    sd[t + "embeddings.LayerNorm.bias"] = rnd(h)
    for i in range(TEXT["layers"]):
        b = f"{t}encoder.layer.{i}."
        for att, kv_in in (("attention", h), ("crossattention", d)):
            sd[f"{b}{att}.self.query.weight"], sd[f"{b}{att}.self.query.bias"] = rnd(h, h), rnd(h)
            sd[f"{b}{att}.self.key.weight"], sd[f"{b}{att}.self.key.bias"] = rnd(h, kv_in), rnd(h)
            sd[f"{b}{att}.self.value.weight"], sd[f"{b}{att}.self.value.bias"] = (
                rnd(h, kv_in),
                rnd(h),
            )
            sd[f"{b}{att}.output.dense.weight"], sd[f"{b}{att}.output.dense.bias"] = (
                rnd(h, h),
                rnd(h),
            )
            sd[f"{b}{att}.output.LayerNorm.weight"] = rnd(h, mean=1.0)
            sd[f"{b}{att}.output.LayerNorm.bias"] = rnd(h)
        sd[b + "intermediate.dense.weight"], sd[b + "intermediate.dense.bias"] = rnd(m, h), rnd(m)
        sd[b + "output.dense.weight"], sd[b + "output.dense.bias"] = rnd(h, m), rnd(h)
        sd[b + "output.LayerNorm.weight"], sd[b + "output.LayerNorm.bias"] = (
            rnd(h, mean=1.0),
            rnd(h),
        )
    # BLIP's contrastive projections: saved in the checkpoint, unused by ImageReward scoring.
    sd["blip.vision_proj.weight"], sd["blip.vision_proj.bias"] = rnd(16, d), rnd(16)
    sd["blip.text_proj.weight"], sd["blip.text_proj.bias"] = rnd(16, h), rnd(16)

    for idx, (n_in, n_out) in zip(
        (0, 2, 4, 6, 7), zip(HEAD[:-1], HEAD[1:], strict=True), strict=True
    ):
        sd[f"mlp.layers.{idx}.weight"] = rnd(n_out, n_in, std=1.0 / math.sqrt(n_in))
        sd[f"mlp.layers.{idx}.bias"] = rnd(n_out, std=0.1)
    return sd


def med_config() -> dict:
    return {
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": TEXT["hidden"],
        "initializer_range": 0.02,
        "intermediate_size": TEXT["intermediate"],
        "layer_norm_eps": TEXT["eps"],
        "max_position_embeddings": TEXT["max_pos"],
        "model_type": "bert",
        "num_attention_heads": TEXT["heads"],
        "num_hidden_layers": TEXT["layers"],
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "vocab_size": len(VOCAB),
        "encoder_width": 768,  # as published: the original overrides it with the ViT width
        "add_cross_attention": True,
        "vision_config": dict(VISION),
    }


def make_tokenizer(tmp_path):
    from transformers import BertTokenizer

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    tok = BertTokenizer(str(vocab))
    tok.add_special_tokens({"bos_token": "[DEC]"})  # as BLIP's init_tokenizer
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def write_checkpoint(folder, state_dict=None, config=None, tokenizer_dir="tokenizer"):
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(
        original_state_dict() if state_dict is None else state_dict, folder / "ImageReward.pt"
    )
    (folder / "med_config.json").write_text(json.dumps(med_config() if config is None else config))
    if tokenizer_dir is not None:
        make_tokenizer(folder.parent).save_pretrained(
            str(folder / tokenizer_dir) if tokenizer_dir else str(folder)
        )
    return folder


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ir") / "ImageReward-tiny")


@pytest.fixture(scope="module")
def model(ckpt):
    return ir.ImageReward(str(ckpt), batch_size=4)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    sizes = [(48, 40), (32, 32), (70, 33)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


# ---------------------------------------------------------------------------------------------
# Plain-torch reference of the original forward (timm ViT + BLIP med BertModel + MLP)
# ---------------------------------------------------------------------------------------------
def ref_vit(sd, x):
    v, d, heads = "blip.visual_encoder.", VISION["hidden_size"], VISION["num_attention_heads"]
    x = F.conv2d(
        x,
        sd[v + "patch_embed.proj.weight"],
        sd[v + "patch_embed.proj.bias"],
        stride=VISION["patch_size"],
    )
    x = x.flatten(2).transpose(1, 2)
    b, hd = x.shape[0], d // heads
    x = torch.cat([sd[v + "cls_token"].expand(b, -1, -1), x], dim=1) + sd[v + "pos_embed"]
    n = x.shape[1]
    for i in range(VISION["num_hidden_layers"]):
        p = f"{v}blocks.{i}."
        y = F.layer_norm(x, (d,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        qkv = F.linear(y, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
        q, k, val = qkv.reshape(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
        att = ((q @ k.transpose(-2, -1)) * hd**-0.5).softmax(dim=-1)
        y = (att @ val).transpose(1, 2).reshape(b, n, d)
        x = x + F.linear(y, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        y = F.layer_norm(x, (d,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        y = F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
        x = x + F.linear(y, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    return F.layer_norm(x, (d,), sd[v + "norm.weight"], sd[v + "norm.bias"], eps=1e-6)


def ref_attention(sd, p, x, kv, mask_add):
    heads, h = TEXT["heads"], TEXT["hidden"]
    hd = h // heads

    def split(t):
        return t.view(t.shape[0], t.shape[1], heads, hd).permute(0, 2, 1, 3)

    q = split(F.linear(x, sd[p + "self.query.weight"], sd[p + "self.query.bias"]))
    k = split(F.linear(kv, sd[p + "self.key.weight"], sd[p + "self.key.bias"]))
    val = split(F.linear(kv, sd[p + "self.value.weight"], sd[p + "self.value.bias"]))
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd) + mask_add
    ctx = (scores.softmax(dim=-1) @ val).permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], h)
    out = F.linear(ctx, sd[p + "output.dense.weight"], sd[p + "output.dense.bias"])
    return F.layer_norm(
        out + x,
        (h,),
        sd[p + "output.LayerNorm.weight"],
        sd[p + "output.LayerNorm.bias"],
        eps=TEXT["eps"],
    )


def ref_text_cls(sd, ids, mask, image_embeds):
    t, h = "blip.text_encoder.", TEXT["hidden"]
    x = (
        sd[t + "embeddings.word_embeddings.weight"][ids]
        + sd[t + "embeddings.position_embeddings.weight"][: ids.shape[1]]
    )
    x = F.layer_norm(
        x,
        (h,),
        sd[t + "embeddings.LayerNorm.weight"],
        sd[t + "embeddings.LayerNorm.bias"],
        eps=TEXT["eps"],
    )
    self_mask = (1.0 - mask[:, None, None, :].float()) * -10000.0  # med.get_extended_attention_mask
    cross_mask = torch.zeros(1)  # image_atts are all ones
    for i in range(TEXT["layers"]):
        p = f"{t}encoder.layer.{i}."
        x = ref_attention(sd, p + "attention.", x, x, self_mask)
        x = ref_attention(sd, p + "crossattention.", x, image_embeds, cross_mask)
        y = F.gelu(
            F.linear(x, sd[p + "intermediate.dense.weight"], sd[p + "intermediate.dense.bias"])
        )
        y = F.linear(y, sd[p + "output.dense.weight"], sd[p + "output.dense.bias"])
        x = F.layer_norm(
            y + x,
            (h,),
            sd[p + "output.LayerNorm.weight"],
            sd[p + "output.LayerNorm.bias"],
            eps=TEXT["eps"],
        )
    return x[:, 0, :]


def ref_reward(sd, tokenizer, pixels, prompt):
    """The original ImageReward.score for one image tensor [3, S, S] and one prompt."""
    tok = tokenizer(
        prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt"
    )
    cls = ref_text_cls(sd, tok["input_ids"], tok["attention_mask"], ref_vit(sd, pixels[None]))
    r = cls
    for idx in (0, 2, 4, 6, 7):  # Linear/Dropout stack without activations
        r = F.linear(r, sd[f"mlp.layers.{idx}.weight"], sd[f"mlp.layers.{idx}.bias"])
    return float((r.item() - MEAN) / STD)


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------
def test_preprocess_matches_the_original_transform_without_resampling():
    rng = np.random.default_rng(1)
    pre = ir.ImageRewardPreprocess(32)
    mean, std = np.array(CLIP_MEAN).reshape(3, 1, 1), np.array(CLIP_STD).reshape(3, 1, 1)
    # short side already 32: no resize; centre crop offsets int(round((W - 32) / 2)): 40 -> 4, 33 -> 0
    for width, left in ((40, 4), (33, 0), (32, 0)):
        arr = rng.integers(0, 256, (32, width, 3), dtype=np.uint8)
        out = pre(Image.fromarray(arr))
        want = (arr[:, left : left + 32].transpose(2, 0, 1) / 255.0 - mean) / std
        assert out.dtype == torch.float32 and tuple(out.shape) == (3, 32, 32)
        np.testing.assert_allclose(out.numpy(), want, atol=1e-5)
    # tall image: resize to (32, int(32 * 70 / 48) = 46) with PIL bicubic, then crop rows 7..39
    arr = rng.integers(0, 256, (70, 48, 3), dtype=np.uint8)
    resized = np.asarray(
        Image.fromarray(arr).resize((32, 46), Image.Resampling.BICUBIC), dtype=np.float64
    )
    want = (resized[7:39].transpose(2, 0, 1) / 255.0 - mean) / std
    np.testing.assert_allclose(pre(Image.fromarray(arr)).numpy(), want, atol=1e-5)
    # greyscale input is converted to RGB
    assert tuple(pre(Image.fromarray(arr[..., 0])).shape) == (3, 32, 32)


def test_preprocess_is_cheaply_picklable(model, images):
    blob = pickle.dumps(model.preprocess)
    assert len(blob) < 2000  # the transform only, not the network
    again = pickle.loads(blob)
    assert torch.equal(again(images[0]), model.preprocess(images[0]))
    assert tuple(model.preprocess(images[0]).shape) == (3, 32, 32)


def test_default_vision_config_is_vit_large_224():
    vision = ir.vision_config_from({})
    assert vision == {
        "image_size": 224,
        "patch_size": 16,
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
        "layer_norm_eps": 1e-6,
    }
    assert ir.ImageRewardPreprocess()(Image.new("RGB", (300, 250))).shape == (3, 224, 224)


def test_rewards_are_the_head_output_standardised_with_the_published_constants(ckpt, images):
    # The raw head output (mean 0, std 1 switched off), then the plugin's own standardisation:
    # it must subtract the published mean and divide by the published std, in that order.
    m = ir.ImageReward(str(ckpt))
    feats = m.embed_images(torch.stack([m.preprocess(im) for im in images]))
    prompts = [["a red apple", "cat"], ["the dog"], ["a blue tree", "small table", "a"]]
    standardised = np.concatenate(m.score(feats, prompts))
    m.reward_mean, m.reward_std = 0.0, 1.0
    raw = np.concatenate(m.score(feats, prompts))
    np.testing.assert_allclose(standardised, (raw - MEAN) / STD, atol=1e-6, rtol=0)
    assert np.abs(raw - standardised).min() > 1e-3  # the standardisation does change them
    assert m.max_text_tokens == 35


def test_convert_state_dict_maps_every_original_key():
    sd = original_state_dict()
    converted = ir.convert_state_dict(sd)
    assert "vision_model.embeddings.class_embedding" in converted
    assert "vision_model.encoder.layers.1.self_attn.qkv.weight" in converted
    assert "vision_model.encoder.layers.0.self_attn.projection.bias" in converted
    assert "vision_model.post_layernorm.weight" in converted
    assert "text_model.encoder.layer.1.crossattention.self.key.weight" in converted
    assert "head.7.bias" in converted
    assert not any(k.startswith(("blip.", "mlp.")) for k in converted)  # nothing left unmapped
    assert len(converted) == len(sd) - 5  # the two projections (x2) and position_ids dropped
    assert (
        converted["vision_model.embeddings.position_embedding"]
        is sd["blip.visual_encoder.pos_embed"]
    )
    prefixed = ir.convert_state_dict({"module." + k: val for k, val in sd.items()})
    assert prefixed.keys() == converted.keys()


def test_scores_equal_the_reference_forward(model, ckpt, images):
    sd = original_state_dict()
    tokenizer = make_tokenizer(ckpt.parent)
    pixels = torch.stack([model.preprocess(im) for im in images])
    feats = model.embed_images(pixels)
    assert feats.dtype == torch.float32 and tuple(feats.shape) == (3, 1 + 16, VISION["hidden_size"])
    torch.testing.assert_close(feats, ref_vit(sd, pixels), atol=1e-5, rtol=1e-5)

    prompts = [
        ["a red apple", "a blue dog on the table", "cat"],
        ["the small tree"],
        ["a photo of a big green cat sitting under a tree", LONG],
    ]
    scores = model.score(feats, prompts)
    assert [s.shape for s in scores] == [(3,), (1,), (2,)]
    assert all(s.dtype == np.float32 for s in scores)
    want = [[ref_reward(sd, tokenizer, pixels[i], p) for p in ps] for i, ps in enumerate(prompts)]
    for got, exp in zip(scores, want, strict=True):
        np.testing.assert_allclose(got, exp, atol=1e-5, rtol=1e-5)
    assert np.std(np.concatenate(scores)) > 1e-2  # the scores do depend on image and prompt


def test_deterministic_and_batch_size_invariant(model, images):
    pixels = torch.stack([model.preprocess(im) for im in images])
    prompts = [
        ["a red apple", "the dog", LONG],
        [],
        ["blue cat on a table", "a", "tree and apple s"],
    ]
    first = model.score(model.embed_images(pixels), prompts)
    again = model.score(model.embed_images(pixels), prompts)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert first[1].shape == (0,) and first[1].dtype == np.float32
    old = model.batch_size
    try:
        model.batch_size = 1
        one_pair = model.score(model.embed_images(pixels), prompts)
    finally:
        model.batch_size = old
    one_image = [
        model.score(model.embed_images(pixels[i : i + 1]), [ps])[0] for i, ps in enumerate(prompts)
    ]
    for a, b, c in zip(first, one_pair, one_image, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
        np.testing.assert_allclose(a, c, atol=1e-5)


def test_long_prompts_are_truncated_to_35_tokens_and_counted(ckpt, images):
    m = ir.ImageReward(str(ckpt))
    feats = m.embed_images(torch.stack([m.preprocess(images[0])]))
    assert m.describe()["truncated_prompts"] == 0
    m.score(feats, [["a red apple", "cat"]])
    assert m.truncated_prompts == 0
    longer = LONG + " and a dog"
    s = m.score(feats, [[LONG, LONG, longer]])[0]
    assert m.truncated_prompts == 2  # distinct prompts over 35 tokens
    # only the first 35 tokens count: text after token 35 does not change the score
    np.testing.assert_allclose(s[0], s[2], atol=1e-6)
    m.score(feats, [[LONG]])
    info = m.describe()
    assert info["truncated_prompts"] == 2 and info["max_text_tokens"] == 35


def test_describe(model, ckpt):
    import hashlib

    info = model.describe()
    assert info["id"] == "imagereward" and info["checkpoint"] == str(ckpt)
    assert (
        info["checkpoint_sha256"]
        == hashlib.sha256((ckpt / "ImageReward.pt").read_bytes()).hexdigest()
    )
    assert info["preprocessing_version"] == "3" and info["dtype"] == "float32"
    assert info["tokenizer"] == str(ckpt / "tokenizer")


def test_tokenizer_beside_the_weights_and_explicit_setting(tmp_path, images):
    beside = write_checkpoint(tmp_path / "beside", tokenizer_dir="")
    m = ir.ImageReward(str(beside / "ImageReward.pt"))
    assert m.describe()["tokenizer"] == str(beside)
    bare = write_checkpoint(tmp_path / "bare", tokenizer_dir=None)
    m2 = ir.ImageReward(str(bare), tokenizer=str(beside))
    pixels = torch.stack([m.preprocess(images[1])])
    np.testing.assert_allclose(
        m.score(m.embed_images(pixels), [["a red dog"]])[0],
        m2.score(m2.embed_images(pixels), [["a red dog"]])[0],
        atol=1e-6,
    )


def test_bfloat16_runs(ckpt, images):
    m = ir.ImageReward(str(ckpt), dtype="bfloat16")
    feats = m.embed_images(torch.stack([m.preprocess(im) for im in images[:2]]))
    assert feats.dtype == torch.bfloat16
    scores = m.score(feats, [["a red apple"], ["a cat", "the dog"]])
    assert [s.dtype for s in scores] == [np.float32, np.float32]
    assert all(np.isfinite(s).all() for s in scores)


def test_missing_checkpoint_is_a_harness_error(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(HarnessError) as info:
        ir.ImageReward(str(missing))
    assert str(missing) in str(info.value) and "ImageReward.pt" in str(info.value)
    assert "med_config.json" in str(info.value) and "ViT-L/16" in str(info.value)

    half = tmp_path / "half"
    half.mkdir()
    torch.save({}, half / "ImageReward.pt")
    with pytest.raises(HarnessError, match="lacks med_config.json") as info:
        ir.ImageReward(str(half))
    assert str(half) in str(info.value)


def test_unloadable_tokenizer_is_a_harness_error(ckpt, tmp_path):
    with pytest.raises(HarnessError, match="tokenizer") as info:
        ir.ImageReward(str(ckpt), tokenizer=str(tmp_path / "no-tokenizer"))
    assert str(tmp_path / "no-tokenizer") in str(info.value)


def test_hub_checkpoint_failure_is_a_harness_error(monkeypatch):
    import huggingface_hub

    calls = []

    def offline(repo_id, filename, revision=None, **kwargs):
        calls.append((repo_id, filename))
        raise OSError("offline mode is enabled")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(HarnessError, match="THUDM/ImageReward") as info:
        ir.ImageReward()
    assert calls == [("THUDM/ImageReward", "ImageReward.pt")]
    assert "offline mode is enabled" in str(info.value)


def test_wrong_keys_are_a_harness_error(tmp_path):
    sd = original_state_dict()
    sd["blip.visual_encoder.final_norm.weight"] = sd.pop("blip.visual_encoder.norm.weight")
    bad = write_checkpoint(tmp_path / "renamed", state_dict=sd)
    with pytest.raises(HarnessError) as info:
        ir.ImageReward(str(bad))
    msg = str(info.value)
    assert str(bad / "ImageReward.pt") in msg
    assert (
        "vision_model.post_layernorm.weight" in msg
        and "blip.visual_encoder.final_norm.weight" in msg
    )
    assert "ImageReward-v1.0" in msg

    # shapes that do not fit med_config.json
    config = med_config()
    config["hidden_size"] = 48
    bad = write_checkpoint(tmp_path / "shapes", config=config)
    with pytest.raises(HarnessError, match="does not fit") as info:
        ir.ImageReward(str(bad))
    assert str(bad / "ImageReward.pt") in str(info.value)

    # not a torch file
    junk = write_checkpoint(tmp_path / "junk")
    (junk / "ImageReward.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(HarnessError, match="cannot read"):
        ir.ImageReward(str(junk))


def test_registers_through_the_plugin_hook():
    import pluggy

    from harness import hookspecs
    from harness.plugins import BUILTIN_PLUGINS, Plugins
    from harness.types import RewardModel

    registered = []
    ir.register_reward_models(lambda cls, **kw: registered.append(cls))
    assert registered == [ir.ImageReward]
    assert issubclass(ir.ImageReward, RewardModel) and ir.ImageReward.id == "imagereward"
    assert ir.ImageReward.default_checkpoint == "ImageReward-v1.0"

    pm = pluggy.PluginManager("t2i_harness")
    pm.add_hookspecs(hookspecs)
    pm.register(ir)
    via_hook = []
    pm.hook.register_reward_models(register=lambda cls, **kw: via_hook.append(cls))
    assert via_hook == [ir.ImageReward]

    if "harness_plugins.imagereward" in BUILTIN_PLUGINS:
        assert Plugins(load_entry_points=False).reward_models.get("imagereward") is ir.ImageReward


def test_conformance_and_engine_with_workers(ckpt, images, tmp_path):
    from harness.scoring import LocalExecutor, score_images
    from harness.scoring.specs import load_reward_model
    from harness.testing import check_reward_model

    model = load_reward_model(f"imagereward:checkpoint={ckpt}", device="cpu")
    prompts = [["a red car", "two dogs", "a frog in the ocean"][: 1 + i % 3] for i in range(len(images))]
    direct = check_reward_model(model, images, prompts, atol=1e-5, batch_sizes=(1, 16))
    paths = []
    for i, im in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        im.save(paths[-1])
    run = score_images(model, paths, prompts, batch_size=2, executor=LocalExecutor(num_workers=2))
    for a, b in zip(run.scores, direct, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def ref_transform(image, size):
    """The original ``_transform`` (torchvision Resize(size, BICUBIC), CenterCrop(size),
    ``image.convert("RGB")``, ToTensor, Normalize(CLIP)), written out for PIL images: torchvision
    resizes a PIL image with ``Image.resize`` in the image's own mode."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    rgb = resized.crop((left, top, left + size, top + size)).convert("RGB")
    x = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


def test_every_image_mode_scores_as_the_original_transform(ckpt, tmp_path):
    from harness.images import as_8bit
    from harness.scoring import LocalExecutor, parse_model_spec, score_images
    from harness.scoring.specs import load_reward_model
    from harness.testing import write_image_modes

    rng = np.random.default_rng(7)
    rgb = Image.fromarray(rng.integers(0, 256, (45, 38, 3), dtype=np.uint8))
    paths = {"RGB": tmp_path / "RGB.png"}
    rgb.save(paths["RGB"])
    paths.update({k: v for k, v in write_image_modes(rgb, tmp_path).items() if k != "LA"})
    prompts = ["a red apple", "a blue dog on the table"]
    spec = parse_model_spec(f"imagereward:checkpoint={ckpt}")
    model = load_reward_model(spec, device="cpu")
    run = score_images(model, list(paths.values()), [prompts] * len(paths), spec=spec,
                       executor=LocalExecutor(num_workers=1))
    sd = original_state_dict()
    tokenizer = make_tokenizer(ckpt.parent)
    for (mode, path), got in zip(paths.items(), run.scores, strict=True):
        with Image.open(path) as opened:
            assert opened.mode == mode.split("-")[0]  # "I-16bit": mode I holding 16-bit values
            # The one deliberate difference: samples wider than 8 bits are scaled (as_8bit),
            # where the original's convert("RGB") clips them to white.
            pixels = ref_transform(as_8bit(opened), VISION["image_size"])
        want = [ref_reward(sd, tokenizer, pixels, p) for p in prompts]
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=f"mode {mode}")
    # Converting to RGB before resizing (what the harness did before) scores palette images
    # differently: PIL resizes them with nearest neighbour.
    with Image.open(paths["P"]) as opened:
        early = ref_transform(opened.convert("RGB"), VISION["image_size"])
        late = ref_transform(opened, VISION["image_size"])
    assert (early - late).abs().max() > 1e-2
