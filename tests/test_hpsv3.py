"""HPSv3 (plugins/hpsv3.py) on a tiny random Qwen2-VL, against the original ``hpsv3`` package.

Parity: the original's scoring path is taken from the ``hpsv3`` 1.0.0 wheel on PyPI (downloaded
once, not installed): its message building and image loading (``dataset/utils.py``,
``dataset/data_collator_qwen.py``: the instruction, ``fetch_image``/``smart_resize``), its
``HPSv3RewardInferencer.prepare_batch`` and its ``Qwen2VLRewardModelBT.forward`` (both read out of
the package's source with ``ast`` and run as they are; the modules around them import trl,
deepspeed and a training stack the scoring path does not use). What the package leaves to
transformers 4.45.2, which cannot be installed beside transformers 5, comes from transformers 5
here, in the 4.45 module layout the forward expects: the language model and vision tower
(``model.*`` / ``visual.*`` names, checked by loading the original-layout file strictly), the
Qwen2-VL processor with the PIL image processor and Qwen2-VL-7B-Instruct's chat template.
torchvision, which the package imports but whose functions its PIL path never calls, is a stub.
The reward head is built as the original's ``rm_head_type: ranknet`` default.
"""

from __future__ import annotations

import ast
import sys
import textwrap
import types
import zipfile

import numpy as np
import pytest
from PIL import Image
from tiny_models import QWEN2_VL_CHAT_TEMPLATE, make_tiny_hpsv3, wheel

from harness import HarnessError
from harness.images import as_8bit
from harness.testing import check_reward_model, image_modes

HPSV3_WHEEL = "hpsv3==1.0.0"
LONG_PROMPT = ", ".join(["a small red fox jumping over a sleeping brown dog near a river"] * 40)
PROMPTS = ["a cat", "two red birds on a snowy branch, watercolor", LONG_PROMPT]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_hpsv3(tmp_path_factory.mktemp("hpsv3"))


@pytest.fixture(scope="module")
def model(tiny):
    from harness_plugins.hpsv3 import HPSv3

    base, weights = tiny
    return HPSv3(checkpoint=str(weights), base=str(base))


def _images():
    rng = np.random.default_rng(0)
    out = []
    for size in ((40, 48), (64, 24), (30, 30)):
        pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        out.append(Image.fromarray(pixels))
    return out


# -- the original, from its package ------------------------------------------------------------
def _method(source: str, cls: str, name: str) -> str:
    tree = ast.parse(source)
    klass = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    fn = next(n for n in klass.body if isinstance(n, ast.FunctionDef) and n.name == name)
    return textwrap.dedent("\n".join(source.splitlines()[fn.lineno - 1 : fn.end_lineno]))


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """The package's scoring path: ``prepare_batch``, ``forward`` and the modules they use."""
    import typing
    from collections.abc import Mapping

    import torch

    root = tmp_path_factory.mktemp("hpsv3-package")
    with zipfile.ZipFile(wheel(HPSV3_WHEEL)) as zf:
        zf.extractall(root, [n for n in zf.namelist() if n.startswith("hpsv3/")])
    # torchvision: imported by dataset/utils.py and data_collator_qwen.py, called only for
    # tensors and videos; the PIL images used here never reach it.
    stubs = {name: types.ModuleType(name) for name in
             ("torchvision", "torchvision.io", "torchvision.transforms",
              "torchvision.transforms.functional")}
    stubs["torchvision"].__version__ = "0+stub"
    stubs["torchvision"].io = stubs["torchvision.io"]
    stubs["torchvision"].transforms = stubs["torchvision.transforms"]
    stubs["torchvision.transforms"].functional = stubs["torchvision.transforms.functional"]
    stubs["torchvision.transforms"].InterpolationMode = types.SimpleNamespace(BICUBIC="bicubic")
    package = types.ModuleType("hpsv3")
    package.__path__ = [str(root / "hpsv3")]  # not its __init__, which imports the trainer
    stubs["hpsv3"] = package
    # transformers decides once whether torchvision is there: before the stub exists.
    from transformers.utils.import_utils import is_torchvision_available

    is_torchvision_available()
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:  # the stubs live only while the two modules import
        import importlib

        utils = importlib.import_module("hpsv3.dataset.utils")
        collator = importlib.import_module("hpsv3.dataset.data_collator_qwen")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        for name in [n for n in sys.modules if n.startswith("hpsv3.")]:
            sys.modules.pop(name)
    trainer_src = (root / "hpsv3/model/qwen2vl_trainer.py").read_text()
    inference_src = (root / "hpsv3/inference.py").read_text()
    names = {"torch": torch, "Optional": typing.Optional, "List": list,
             "Mapping": Mapping, "process_vision_info": utils.process_vision_info,
             "INSTRUCTION": collator.INSTRUCTION,
             "prompt_with_special_token": collator.prompt_with_special_token,
             "prompt_without_special_token": collator.prompt_without_special_token}
    exec(_method(trainer_src, "Qwen2VLRewardModelBT", "forward"), names)  # noqa: S102
    methods = {}
    for name in ("prepare_batch", "_prepare_input", "_prepare_inputs"):
        exec(_method(inference_src, "HPSv3RewardInferencer", name), names)  # noqa: S102
        methods[name] = names[name]
    return types.SimpleNamespace(utils=utils, collator=collator, forward=names["forward"],
                                 methods=methods)


class Processor:
    """What transformers 4.45's ``Qwen2VLProcessor`` does for images and text (transformers 5's
    needs a torchvision video processor): the image processor's ``pixel_values`` and
    ``image_grid_thw``, each image placeholder expanded to ``t * h * w / merge**2`` tokens, the
    tokenizer with padding; the chat template is the tokenizer's."""

    def __init__(self, image_processor, tokenizer):
        self.image_processor, self.tokenizer = image_processor, tokenizer

    def apply_chat_template(self, conversations, **kwargs):
        return self.tokenizer.apply_chat_template(conversations, **kwargs)

    def __call__(self, text, images, padding, return_tensors, videos_kwargs=None):
        vision = self.image_processor(images=images, return_tensors=return_tensors)
        merge = self.image_processor.merge_size ** 2
        counts = iter(int(g.prod()) // merge for g in vision["image_grid_thw"])
        expanded = []
        for t in text:
            while "<|image_pad|>" in t:
                t = t.replace("<|image_pad|>", "<|placeholder|>" * next(counts), 1)
            expanded.append(t.replace("<|placeholder|>", "<|image_pad|>"))
        out = self.tokenizer(expanded, padding=padding, return_tensors=return_tensors)
        return {**out, **vision}


@pytest.fixture(scope="module")
def original(tiny, upstream):
    """``score(images, prompts) -> (mu, sigma)`` the way ``HPSv3RewardInferencer.reward`` does,
    one (image, prompt) pair per row, on the tiny weights."""
    import torch
    from safetensors.torch import load_file
    from torch import nn
    from transformers import (
        AutoConfig,
        AutoTokenizer,
        Qwen2VLImageProcessorPil,
        Qwen2VLTextModel,
    )
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    base, weights = tiny
    state = load_file(str(weights))
    rows, hidden = state["model.embed_tokens.weight"].shape
    config = AutoConfig.from_pretrained(base)
    config.text_config.vocab_size = int(rows)
    for cfg in (config.text_config, config.vision_config):
        cfg._attn_implementation = "sdpa"

    class Visual(Qwen2VisionTransformerPretrainedModel):  # 4.45's tower returned the merged tokens
        def forward(self, hidden_states, grid_thw):
            return super().forward(hidden_states, grid_thw=grid_thw).pooler_output

    # As create_model_and_processor: the base's processor, right padding, <|Reward|> added.
    tokenizer = AutoTokenizer.from_pretrained(base, padding_side="right")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|Reward|>"]})
    tokenizer.chat_template = QWEN2_VL_CHAT_TEMPLATE
    processor = Processor(Qwen2VLImageProcessorPil.from_pretrained(base), tokenizer)

    class Qwen2VLRewardModelBT(nn.Module):
        forward = upstream.forward

        def __init__(self):
            super().__init__()
            self.model = Qwen2VLTextModel(config.text_config)
            self.visual = Visual(config.vision_config)
            self.lm_head = nn.Linear(hidden, rows, bias=False)
            self.rm_head = nn.Sequential(nn.Linear(hidden, 1024), nn.ReLU(), nn.Dropout(0.05),
                                         nn.Linear(1024, 16), nn.ReLU(), nn.Linear(16, 2))
            self.reward_token = "special"
            self.special_token_ids = tokenizer.convert_tokens_to_ids(["<|Reward|>"])
            self.config = types.SimpleNamespace(
                pad_token_id=tokenizer.pad_token_id, image_token_id=config.image_token_id,
                video_token_id=config.video_token_id, output_attentions=False,
                output_hidden_states=False, use_return_dict=True)

    net = Qwen2VLRewardModelBT()
    net.load_state_dict(state, strict=True)  # the original's names, every tensor used
    net.eval()
    inferencer = types.SimpleNamespace(processor=processor, use_special_tokens=True, device="cpu")
    for name, fn in upstream.methods.items():
        setattr(inferencer, name, types.MethodType(fn, inferencer))

    def score(images, prompts):
        with torch.no_grad():
            batch = inferencer.prepare_batch(list(images), list(prompts))
            wanted = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
            out = net(return_dict=True, **{k: batch[k] for k in wanted})["logits"]
        return out[:, 0].numpy(), torch.exp(out[:, 1]).numpy()

    return score


# -- parity ------------------------------------------------------------------------------------
def test_instruction_and_resize_are_the_originals(upstream):
    from harness_plugins.hpsv3 import INSTRUCTION, REWARD_QUESTION, smart_resize

    assert INSTRUCTION == upstream.collator.INSTRUCTION
    assert REWARD_QUESTION == upstream.collator.prompt_with_special_token
    rng = np.random.default_rng(0)
    sizes = [(1, 1), (40, 48), (448, 448), (1024, 768), (3000, 20), (7, 1300), (20, 3999)]
    sizes += [tuple(int(v) for v in rng.integers(1, 5000, 2)) for _ in range(300)]
    for h, w in sizes:
        try:
            theirs = upstream.utils.smart_resize(h, w, 28, 200704, 200704)
        except ValueError:
            with pytest.raises(ValueError):
                smart_resize(h, w)
            continue
        if 0 in theirs:
            with pytest.raises(ValueError, match="rounds to 0"):
                smart_resize(h, w)
        else:
            assert smart_resize(h, w) == theirs, (h, w)


def test_parity_with_the_original_on_every_mode(model, original):
    """mu and sigma equal the original's to 1e-4 on images in every mode and prompts short and
    long (the original does not truncate; LONG_PROMPT is ~500 tokens)."""
    from harness.scoring.batches import collate

    image = _images()[0]
    modes = {"RGB": image, **{label: as_8bit(im) for label, im in image_modes(image).items()}}
    worst = 0.0
    for label, im in modes.items():
        prompts = PROMPTS if label in ("RGB", "L", "P", "RGBA", "CMYK") else PROMPTS[:1]
        mu, sigma = original([im] * len(prompts), prompts)
        ours = model.score(model.embed_images(collate([model.preprocess(im)])), [prompts])[0]
        np.testing.assert_allclose(ours[:, 0], mu, atol=1e-4, rtol=0, err_msg=f"mu, mode {label}")
        np.testing.assert_allclose(ours[:, 1], sigma, atol=1e-4, rtol=0, err_msg=f"sigma, mode {label}")
        worst = max(worst, float(np.abs(ours[:, 0] - mu).max()), float(np.abs(ours[:, 1] - sigma).max()))
    print(f"HPSv3 parity: max |diff| {worst:.2e} over {len(modes)} modes")
    # Scores really depend on the image and the prompt (not a constant the check would pass on).
    batch = collate([model.preprocess(im) for im in _images()])
    spread = np.stack(model.score(model.embed_images(batch), [PROMPTS] * 3))
    assert np.ptp(spread[:, :, 0], axis=0).min() > 100 * 1e-4
    assert np.ptp(spread[:, :, 0], axis=1).min() > 100 * 1e-4


def test_parity_in_batches_of_mixed_images(model, original):
    """Several images of different sizes in one call of each, as the original pads them."""
    from harness.scoring.batches import collate

    images = _images()
    prompts = [PROMPTS[1], PROMPTS[0], PROMPTS[1]]
    mu, sigma = original(images, prompts)
    ours = model.score(model.embed_images(collate([model.preprocess(im) for im in images])),
                       [[p] for p in prompts])
    np.testing.assert_allclose(np.concatenate(ours)[:, 0], mu, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.concatenate(ours)[:, 1], sigma, atol=1e-4, rtol=0)


# -- the contract ------------------------------------------------------------------------------
def test_contract(model):
    images = _images()
    scores = check_reward_model(model, images, [PROMPTS[:2]] * len(images), atol=1e-5,
                                batch_sizes=(1, 3))
    assert all(s.shape == (2, 2) and (s[:, 1] > 0).all() for s in scores)
    assert type(model).reports_uncertainty
    names = {p.name for p in model.files()}
    assert {"HPSv3.safetensors", "config.json", "tokenizer.json", "preprocessor_config.json"} <= names
    info = model.describe()
    assert info["base"] == str(model.base) and len(info["checkpoint_sha256"]) == 64


def test_card_and_registration():
    from harness.plugins import get_plugins
    from harness_plugins.hpsv3 import HPSv3

    assert get_plugins().reward_models.get("hpsv3") is HPSv3
    card = HPSv3.card
    assert card.checkpoint.startswith("MizzenAI/HPSv3") and "MIT" in card.license
    assert "2508.03789" in card.paper


def test_bad_input(tiny, tmp_path):
    from tiny_models import make_tiny_clip

    from harness.scoring.specs import load_reward_model
    from harness_plugins.hpsv3 import HPSv3

    base, weights = tiny
    with pytest.raises(HarnessError, match=r"cannot get HPSv3.safetensors from the hub repo 'MizzenAI/HPSv3'"):
        HPSv3()  # offline in the tests: the default needs the hub
    with pytest.raises(HarnessError, match="not found"):
        HPSv3(checkpoint=str(tmp_path / "nope.safetensors"), base=str(base))
    clip = make_tiny_clip(tmp_path / "clip")
    with pytest.raises(HarnessError, match="is a 'clip' model, expected a Qwen2-VL base"):
        HPSv3(checkpoint=str(weights), base=str(clip))
    from safetensors.torch import load_file, save_file

    state = load_file(str(weights))
    del state["rm_head.5.weight"]
    save_file(state, str(tmp_path / "nohead.safetensors"))
    with pytest.raises(HarnessError, match=r"reward head lacks rm_head\.5\.weight"):
        HPSv3(checkpoint=str(tmp_path / "nohead.safetensors"), base=str(base))
    with pytest.raises(HarnessError, match="batch size must be >= 1"):
        HPSv3(checkpoint=str(weights), base=str(base), batch_size=0)
    with pytest.raises(HarnessError, match="hpsv3.*pixels"):
        load_reward_model(f"hpsv3:checkpoint={weights},base={base},pixels=3")
    from harness_plugins.hpsv3 import HPSv3Preprocess

    with pytest.raises(ValueError, match="aspect ratio up to 200"):
        HPSv3Preprocess()(Image.new("RGB", (4000, 10)))  # the image's failure, as in the original


# -- uncertainty end to end --------------------------------------------------------------------
def test_uncertainty_through_cache_leaderboard_and_ur_self(tiny, tmp_path):
    from typing import ClassVar

    import pandas as pd

    from harness import Benchmark, BenchmarkData, LeaderboardConfig, run_leaderboard
    from harness.plugins import Entry, get_plugins
    from harness.scoring import ScoreCache, parse_model_spec, score_images
    from harness.scoring.specs import load_reward_model

    base, weights = tiny
    spec_text = f"hpsv3:checkpoint={weights},base={base},label=hpsv3"
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for p in range(3):
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (28, 36, 3), dtype=np.uint8)).save(folder / f"{p}-{i}.png")
    paths = sorted(folder.glob("*.png"))
    prompts = [["a cat", "a dog"]] * len(paths)
    spec = parse_model_spec(spec_text)
    cache = ScoreCache(tmp_path / "scores.sqlite")
    first = score_images(load_reward_model(spec), paths, prompts, spec=spec, cache=cache)
    again = score_images(load_reward_model(spec), paths, prompts, spec=spec, cache=cache)
    assert first.computed == 2 * len(paths) and again.cached == 2 * len(paths) and again.computed == 0
    for a, b in zip(first.uncertainty, again.uncertainty, strict=True):
        np.testing.assert_array_equal(a, b)
        assert (a > 0).all()
    cache.close()

    class Tiny(Benchmark):
        id: ClassVar[str] = "tiny-hps"
        subsets: ClassVar[tuple[str, ...]] = ("all",)

        def load(self, subsets=None):
            rows = [{"subset": "all", "prompt_id": p, "prompt": f"prompt {p}", "image": f"{p}-{i}.png",
                     "binary": int(i % 2), "graded": float(i % 2)} for p in range(3) for i in range(4)]
            sets = {("all", f"prompt {p}"): [f"other {p}", f"else {p}"] for p in range(3)}
            return BenchmarkData(self.id, pd.DataFrame(rows), contrastive=sets)

    get_plugins().benchmarks.add(Entry("tiny-hps", Tiny, "test-plugin"))
    result = run_leaderboard(LeaderboardConfig.from_dict({
        "data": {"benchmark": "tiny-hps", "images": str(folder)},
        "scoring": {"models": [spec_text], "cache": str(tmp_path / "scores.sqlite")},
        "calibration": {"normalizers": ["ur_self", "textnorm"], "folds": 3},
        "report": {"bootstrap": 10, "plots": False}}))
    rows = result.rows.set_index(["method", "source"])
    own = result.scores[result.scores["column"] == 0]["uncertainty"]
    assert rows.loc[("hpsv3", "scored"), "uncertainty_mean"] == pytest.approx(own.mean(), rel=1e-9)
    assert ("ur_self(hpsv3)", "scored") in rows.index
    assert np.isnan(rows.loc[("textnorm(hpsv3)", "scored"), "uncertainty_mean"])
    assert not any("report no uncertainty" in n for n in result.notes)
