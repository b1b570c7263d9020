"""The scoring engine: encode once, cache, resume, bad images, NaN, out-of-memory; the cache key;
executors; image modes as opened; plugins without a constructor; the conformance checks."""

import shutil
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import make_image_folder, make_tiny_clip

from harness.errors import HarnessError
from harness.scoring import (
    LocalExecutor,
    ScoreCache,
    load_reward_model,
    model_cache_key,
    parse_model_spec,
    score_images,
    score_models,
)

PROMPTS = ["a realistic photo of an airplane"] + [f"a realistic photo of {n} airplanes"
                                                 for n in ("two", "three", "four", "five", "six")]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture
def spec(ckpt):
    return parse_model_spec(f"clip:checkpoint={ckpt}")


@pytest.fixture
def model(spec):
    m = load_reward_model(spec, device="cpu")
    m.encode_calls = 0
    m.encoded = 0
    embed = m.embed_images

    def counting(batch):
        m.encode_calls += 1
        m.encoded += len(batch)
        return embed(batch)

    m.embed_images = counting
    return m


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return make_image_folder(root, 24, seed=5)


def prompt_lists(n, k=6):
    return [PROMPTS[:k] for _ in range(n)]


def test_one_encode_per_image_whatever_the_prompt_count(model, folder):
    run = score_images(model, folder, prompt_lists(len(folder)), batch_size=8)
    assert model.encoded == len(folder) == run.encoded_images
    assert model.encode_calls == 3
    assert run.computed == 6 * len(folder) and run.cached == 0
    assert all(s.shape == (6,) and s.dtype == np.float64 for s in run.scores)


def test_cache_computes_nothing_twice(model, folder, tmp_path):
    cache = ScoreCache(tmp_path / "scores.sqlite")
    first = score_images(model, folder, prompt_lists(len(folder)), cache=cache, batch_size=5)
    encoded = model.encoded
    second = score_images(model, folder, prompt_lists(len(folder)), cache=cache, batch_size=7)
    assert second.computed == 0 and second.cached == 6 * len(folder)
    assert model.encoded == encoded  # nothing re-encoded
    for a, b in zip(first.scores, second.scores, strict=True):
        np.testing.assert_array_equal(a, b)
    # The cache is keyed by image content, not path: a copy of an image is a cache hit.
    copy = tmp_path / "copy.jpg"
    shutil.copy(folder[0], copy)
    third = score_images(model, [copy], prompt_lists(1), cache=cache)
    assert third.computed == 0 and np.array_equal(third.scores[0], first.scores[0])
    # A new prompt for a cached image is computed.
    fourth = score_images(model, [folder[0]], [PROMPTS + ["a frog"]], cache=cache)
    assert fourth.computed == 7
    assert cache.count(model_cache_key(model)) == 6 * len(folder) + 1
    assert fourth.cache_key == model_cache_key(model)
    with sqlite3.connect(tmp_path / "scores.sqlite") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_resume_after_a_crash_gives_the_same_scores(model, folder, tmp_path):
    reference = score_images(model, folder, prompt_lists(len(folder)), batch_size=4)
    cache = ScoreCache(tmp_path / "scores.sqlite")
    embed = model.embed_images
    calls = {"n": 0}

    def dies_on_fourth_batch(batch):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # what a killed run looks like from the inside
        return embed(batch)

    model.embed_images = dies_on_fourth_batch
    with pytest.raises(KeyboardInterrupt):
        score_images(model, folder, prompt_lists(len(folder)), cache=cache, batch_size=4)
    assert cache.count() == 3 * 4 * 6  # three finished batches were kept
    model.embed_images = embed
    resumed = score_images(model, folder, prompt_lists(len(folder)), cache=cache, batch_size=4)
    assert resumed.cached == 3 * 4 * 6 and resumed.computed == (len(folder) - 12) * 6
    for a, b in zip(reference.scores, resumed.scores, strict=True):
        np.testing.assert_array_equal(a, b)


def test_workers_and_batch_size_do_not_change_scores(model, folder):
    a = score_images(model, folder, prompt_lists(len(folder)), batch_size=1)
    b = score_images(model, folder, prompt_lists(len(folder)), batch_size=16,
                     executor=LocalExecutor(num_workers=2))
    for x, y in zip(a.scores, b.scores, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)
    assert a.executor_info == {"name": "local", "options": {"num_workers": 0, "pin_memory": None}}
    assert b.executor_info["options"]["num_workers"] == 2


def test_corrupt_and_missing_images_are_named_and_the_rest_scored(model, folder, tmp_path):
    bad = tmp_path / "truncated.jpg"
    bad.write_bytes(folder[0].read_bytes()[:200])
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    paths = [folder[1], bad, folder[2], text, tmp_path / "gone.jpg"]
    run = score_images(model, paths, prompt_lists(len(paths), 2), batch_size=2)
    assert set(run.failed) == {str(bad), str(text), str(tmp_path / "gone.jpg")}
    assert "FileNotFoundError" in run.failed[str(tmp_path / "gone.jpg")]
    assert run.scores[0] is not None and run.scores[2] is not None
    assert run.scores[1] is None and run.scores[3] is None
    assert run.encoded_images == 2


def test_nan_score_is_rejected_naming_model_image_and_prompt(model, folder, tmp_path):
    cache = ScoreCache(tmp_path / "scores.sqlite")
    score = model.score
    seen = {"n": 0}

    def nan_in_second_batch(features, prompts):
        out = score(features, prompts)
        seen["n"] += 1
        if seen["n"] == 2:
            out[1][2] = np.nan
        return out

    model.score = nan_in_second_batch
    with pytest.raises(HarnessError) as info:
        score_images(model, folder[:8], prompt_lists(8, 3), cache=cache, batch_size=4)
    msg = str(info.value)
    assert "reward model 'clip' returned a non-finite score (nan)" in msg
    assert str(folder[5]) in msg and repr(PROMPTS[2]) in msg
    assert cache.count() == 4 * 3  # the first batch stays cached


def test_out_of_memory_halves_the_batch(model, folder):
    reference = score_images(model, folder[:8], prompt_lists(8), batch_size=8)
    embed = model.embed_images
    sizes = []

    def small_gpu(batch):
        sizes.append(len(batch))
        if len(batch) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return embed(batch)

    model.embed_images = small_gpu
    run = score_images(model, folder[:8], prompt_lists(8), batch_size=8)
    assert sizes[:3] == [8, 4, 2]
    for a, b in zip(reference.scores, run.scores, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_numpy_plugin_runs_through_the_engine(folder, monkeypatch):
    import importlib

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "examples" / "t2i-harness-example"))
    example = importlib.import_module("t2i_harness_example")
    run = score_images(example.ColorReward(), folder[:3], [["a red car", "a car"]] * 3, batch_size=2)
    red = np.asarray(example.COLORS["red"], dtype=np.float64)
    for path, s in zip(folder[:3], run.scores, strict=True):
        with Image.open(path) as im:
            mean = (np.asarray(im.convert("RGB").resize((32, 32)), dtype=np.float64) / 255).mean((0, 1))
        assert s.shape == (2,) and s[1] == 0.0
        assert s[0] == pytest.approx(-np.linalg.norm(mean - red), abs=1e-5)


# -- the cache key ------------------------------------------------------------------------------
def test_editing_a_checkpoint_file_in_place_recomputes(ckpt, folder, tmp_path):
    local = tmp_path / "clip"
    shutil.copytree(ckpt, local)
    spec = parse_model_spec(f"clip:checkpoint={local}")
    cache = ScoreCache(tmp_path / "scores.sqlite")
    first = score_images(load_reward_model(spec, device="cpu"), folder[:4], prompt_lists(4, 2),
                         spec=spec, cache=cache)
    same = score_images(load_reward_model(spec, device="cpu"), folder[:4], prompt_lists(4, 2),
                        spec=spec, cache=cache)
    assert first.computed == 8 and same.computed == 0 and same.cached == 8
    config = local / "preprocessor_config.json"
    config.write_text(config.read_text().replace("0.48145466", "0.3"))  # image_mean[0]
    edited = score_images(load_reward_model(spec, device="cpu"), folder[:4], prompt_lists(4, 2),
                          spec=spec, cache=cache)
    assert edited.computed == 8 and edited.cached == 0
    assert edited.cache_key != first.cache_key
    assert not np.allclose(np.stack(edited.scores), np.stack(first.scores), atol=1e-6)


PLUGIN_SOURCE = '''
import numpy as np
from harness.types import RewardModel

class SourceKeyed(RewardModel):
    id = "source-keyed"

    def preprocess(self, image):
        return np.asarray(image.convert("RGB").resize((4, 4)), dtype=np.float32) / 255.0

    def embed_images(self, batch):
        return np.asarray(batch).mean(axis=(1, 2, 3))

    def score(self, features, prompts):
        return [np.full(len(p), f * OFFSET, dtype=np.float32) for f, p in zip(features, prompts)]

OFFSET = {offset}
'''


def test_changing_a_plugin_modules_source_recomputes(folder, tmp_path, monkeypatch):
    import importlib

    from harness.scoring.plan import plugin_distribution

    root = tmp_path / "src"
    root.mkdir()
    module_file = root / "harness_test_source_keyed.py"
    module_file.write_text(PLUGIN_SOURCE.format(offset="1.0"))
    monkeypatch.syspath_prepend(str(root))
    module = importlib.import_module("harness_test_source_keyed")
    try:
        cache = ScoreCache(tmp_path / "scores.sqlite")
        first = score_images(module.SourceKeyed(), folder[:3], prompt_lists(3, 2), cache=cache)
        again = score_images(module.SourceKeyed(), folder[:3], prompt_lists(3, 2), cache=cache)
        assert first.computed == 6 and again.computed == 0 and again.cached == 6
        assert plugin_distribution(module.SourceKeyed) == ("unregistered", "")
        module_file.write_text(PLUGIN_SOURCE.format(offset="2.0"))  # an editable plugin edited
        module = importlib.reload(module)
        changed = score_images(module.SourceKeyed(), folder[:3], prompt_lists(3, 2), cache=cache)
        assert changed.computed == 6 and changed.cached == 0
        np.testing.assert_allclose(np.stack(changed.scores), 2 * np.stack(first.scores), rtol=1e-6)
    finally:
        sys.modules.pop("harness_test_source_keyed", None)


def test_cache_key_ignores_runtime_options_and_labels(ckpt):
    from harness.scoring.plan import key_parts

    model = load_reward_model(f"clip:checkpoint={ckpt}", device="cpu")
    plain = parse_model_spec(f"clip:checkpoint={ckpt}")
    busy = parse_model_spec(f"clip:checkpoint={ckpt},batch_size=4,device=cpu,label=mine")
    explicit = parse_model_spec(f"clip:checkpoint={ckpt},processor=None")
    assert model_cache_key(model, plain) == model_cache_key(model, busy)
    parts = key_parts(model, plain)
    assert parts["options"] == {"checkpoint": str(ckpt), "revision": None, "processor": None}
    assert parts["plugin"][0] == "t2i-harness" and parts["dtype"] == "float32"
    assert {"harness_plugins.clip", "harness.types"} <= set(parts["source"])
    names = [name for name, _ in parts["files"]]
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"} <= set(names)
    assert model_cache_key(model, explicit) != model_cache_key(model, plain)  # "None" is a string


def test_hub_cache_blobs_are_named_by_their_hash(tmp_path):
    from harness.scoring.plan import content_hash, file_sha256

    blob = tmp_path / "blobs" / ("ab" * 32)
    blob.parent.mkdir()
    blob.write_bytes(b"weights")
    link = tmp_path / "snapshots" / "main" / "model.safetensors"
    link.parent.mkdir(parents=True)
    link.symlink_to(blob)
    assert content_hash(link) == "ab" * 32  # not read: the hub named it by its content
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"weights")
    assert content_hash(plain) == file_sha256(plain)


# -- executors and score_models -------------------------------------------------------------------
def test_score_models_is_the_library_entry_point(ckpt, folder, tmp_path):
    from harness.scoring import Executor

    specs = [f"clip:checkpoint={ckpt}", f"clip:checkpoint={ckpt},label=again,batch_size=2"]
    cache = tmp_path / "scores.sqlite"
    results = score_models(specs, folder[:5], prompt_lists(5, 3), device="cpu", cache=cache)
    assert [r.label for r in results] == ["clip", "again"]
    assert results[0].run.computed == 15
    # Same resolved options (batch_size is a runtime option): the second model reads the first's.
    assert results[1].run.computed == 0 and results[1].run.cached == 15
    assert results[0].describe["checkpoint"] == str(ckpt)
    manifest = results[1].manifest()
    assert manifest["method"] == "again" and manifest["spec"] == specs[1]
    assert manifest["executor"]["name"] == "local"
    for r in results:
        np.testing.assert_array_equal(np.stack(r.run.scores), np.stack(results[0].run.scores))
    with pytest.raises(HarnessError, match="both named 'clip'"):
        score_models([specs[0], specs[0]], folder[:1], prompt_lists(1))
    assert isinstance(LocalExecutor(), Executor)


class SerialExecutor:
    """A third-party executor: one image at a time, in this process."""

    name = "serial"

    def describe(self):
        return {"name": self.name, "options": {}}

    def batches(self, model, plan, batch_size):
        from harness.scoring.batches import decode_and_preprocess, run_with_backoff

        for i in plan.todo:
            x, err = decode_and_preprocess(plan.paths[i], model.preprocessor())
            if err:
                yield [], [], [(i, err)]
            else:
                yield [i], run_with_backoff(model, x[None], [plan.prompts[i]]), []
        plan.run.executor_info["images"] = len(plan.todo)


def test_any_executor_honouring_the_protocol(model, folder, spec):
    reference = score_images(model, folder[:6], prompt_lists(6, 3), spec=spec)
    run = score_images(model, folder[:6], prompt_lists(6, 3), spec=spec, executor=SerialExecutor())
    assert run.executor_info == {"name": "serial", "options": {}, "images": 6}
    for a, b in zip(run.scores, reference.scores, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(HarnessError, match="is not an Executor"):
        score_images(model, folder[:1], prompt_lists(1), executor="ray")


def test_ray_needs_the_spec_as_a_value(model, folder):
    from harness.scoring import RayExecutor

    assert not hasattr(model, "harness_spec")  # nothing pinned on the instance
    with pytest.raises(HarnessError, match="pass its spec"):
        score_images(model, folder[:2], prompt_lists(2), executor=RayExecutor())


def test_scoring_package_imports_without_torch():
    import subprocess

    code = ("import sys, harness.scoring as s; s.ScoreRun; s.ModelSpec; s.LocalExecutor; "
            "s.RayOptions; assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


# -- image modes: images reach preprocess as opened ----------------------------------------------------
def _mode_files(root: Path, seed: int = 0) -> dict[str, Path]:
    from harness.testing import image_modes

    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (44, 52, 3), dtype=np.uint8))
    modes = image_modes(rgb)
    root.mkdir(parents=True, exist_ok=True)
    files = {"RGB": root / "rgb.png"}
    rgb.save(files["RGB"])
    for mode, suffix in (("L", "png"), ("P", "png"), ("RGBA", "png"), ("CMYK", "jpg")):
        files[mode] = root / f"{mode.lower()}.{suffix}"
        modes[mode].save(files[mode], quality=95) if suffix == "jpg" else modes[mode].save(files[mode])
    for mode, path in files.items():
        with Image.open(path) as im:
            assert im.mode == mode
    return files


def test_clip_scores_every_mode_as_clipprocessor_does(ckpt, tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    files = _mode_files(tmp_path / "modes")
    prompts = PROMPTS[:3]
    spec = parse_model_spec(f"clip:checkpoint={ckpt}")
    run = score_images(load_reward_model(spec, device="cpu"), list(files.values()),
                       [prompts] * len(files), spec=spec)
    processor = CLIPProcessor.from_pretrained(ckpt)
    ref = CLIPModel.from_pretrained(ckpt).eval()
    for (mode, path), ours in zip(files.items(), run.scores, strict=True):
        with Image.open(path) as image:
            inputs = processor(text=prompts, images=image, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = ref(**inputs)
        cosine = out.logits_per_image[0].numpy() / ref.logit_scale.exp().item()
        np.testing.assert_allclose(ours, cosine, atol=1e-5, rtol=0, err_msg=f"mode {mode}")
    # Converting first (dropping alpha) would have scored the RGBA file differently.
    with Image.open(files["RGBA"]) as image:
        dropped = processor(text=prompts, images=image.convert("RGB"), return_tensors="pt",
                            padding=True)
    with torch.no_grad():
        wrong = ref(**dropped).logits_per_image[0].numpy() / ref.logit_scale.exp().item()
    assert np.abs(wrong - run.scores[list(files).index("RGBA")]).max() > 1e-3


def test_to_rgb_matches_the_transformers_conversion():
    from transformers.image_transforms import convert_to_rgb

    from harness.testing import image_modes
    from harness.types import to_rgb

    rng = np.random.default_rng(4)
    rgb = Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    keyed = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    keyed.info["transparency"] = 3
    for mode, image in {**image_modes(rgb), "P+transparency": keyed, "RGB": rgb}.items():
        want = np.asarray(convert_to_rgb(image, return_numpy=True))
        np.testing.assert_array_equal(np.asarray(to_rgb(image)), want, err_msg=mode)


# -- plugins as their authors write them ------------------------------------------------------------
README_PLUGIN = '''
import numpy as np

from harness.hookspecs import hookimpl
from harness.types import RewardModel


class MyReward(RewardModel):
    id = "my-reward"

    def preprocess(self, image):
        return np.asarray(image.convert("RGB").resize((8, 8)), dtype=np.float32) / 255.0

    def embed_images(self, batch):
        return np.asarray(batch)[..., 0].mean(axis=(1, 2))  # mean red

    def score(self, features, prompts):
        return [np.array([f * len(p) for p in ps], dtype=np.float32)
                for f, ps in zip(features, prompts)]


@hookimpl
def register_reward_models(register):
    register(MyReward, aliases=("mine",))
'''


def test_readme_plugin_without_a_constructor_scores_through_the_cli(folder, tmp_path, monkeypatch):
    import json
    from importlib.metadata import EntryPoint

    from click.testing import CliRunner

    import harness.plugins as plugins_module
    from harness.cli import cli
    from harness.scoring.plan import plugin_distribution

    root = tmp_path / "src"
    root.mkdir()
    (root / "t2i_harness_mine.py").write_text(README_PLUGIN)
    monkeypatch.syspath_prepend(str(root))
    eps = [EntryPoint(name="mine", value="t2i_harness_mine", group="t2i_harness")]
    monkeypatch.setattr(plugins_module, "entry_points", lambda group: eps)
    monkeypatch.setenv("HARNESS_LOAD_PLUGINS", "mine")
    plugins_module.reset_plugins()
    try:
        prompts = ["a red car", "two red cars in a row"]
        args = ["score", "--model", "mine", "--images", str(folder[0].parent), "--json",
                "--cache", str(tmp_path / "scores.sqlite"), *sum((["--prompt", p] for p in prompts), [])]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        records = json.loads(result.output)
        assert len(records) == len(folder) * 2
        for r in records[:6]:
            with Image.open(r["image"]) as im:
                red = np.asarray(im.convert("RGB").resize((8, 8)), dtype=np.float64)[..., 0] / 255
            assert r["model"] == "mine"
            assert r["score"] == pytest.approx(red.mean() * len(r["prompt"]), rel=1e-5)
        import t2i_harness_mine

        assert plugin_distribution(t2i_harness_mine.MyReward) == ("mine", "unknown")
        model = t2i_harness_mine.MyReward()
        assert (model.checkpoint, model.device, model.dtype) == (None, "cpu", "float32")
        bad = CliRunner().invoke(cli, ["score", "--model", "mine:mdoe=x", "--images",
                                       str(folder[0]), "--prompt", "x", "--no-cache"])
        assert bad.exit_code == 2 and "has no option 'mdoe'" in bad.output
    finally:
        sys.modules.pop("t2i_harness_mine", None)
        plugins_module.reset_plugins()


def test_pair_reward_model_through_the_engine(folder):
    from harness.testing import check_reward_model
    from harness.types import PairRewardModel

    class Brightness(PairRewardModel):
        """Mean brightness times the prompt's word count: an (image, prompt) cross-encoder."""

        id = "pair-brightness"
        pair_batch_size = 3

        def preprocess(self, image):  # via RGB: PIL cannot convert a LAB image to L directly
            grey = image.convert("RGB").convert("L")
            return np.asarray(grey.resize((6, 6)), dtype=np.float32) / 255.0

        def score_pairs(self, images, prompts):
            assert len(images) == len(prompts) <= 3
            words = np.array([len(p.split()) for p in prompts], dtype=np.float32)
            return torch.from_numpy(np.asarray(images).mean(axis=(1, 2)) * words)

    prompts = [PROMPTS[: 1 + i % 4] for i in range(7)]
    run = score_images(Brightness(), folder[:7], prompts, batch_size=4)
    for path, ps, got in zip(folder[:7], prompts, run.scores, strict=True):
        with Image.open(path) as im:
            level = (np.asarray(im.convert("L").resize((6, 6)), dtype=np.float64) / 255).mean()
        np.testing.assert_allclose(got, [level * len(p.split()) for p in ps], rtol=1e-5)
    images = [Image.open(p).convert("RGB") for p in folder[:5]]
    check_reward_model(Brightness(), images, prompts[:5], batch_sizes=(1, 3))


# -- the conformance checks (harness.testing) on the built-ins and on broken plugins ----------
def test_check_normalizer_on_every_builtin():
    from harness.plugins import get_plugins
    from harness.testing import check_normalizer

    catalog = get_plugins().normalizers
    assert {"textnorm", "mean", "ur", "identity", "zscore"} <= set(catalog.ids())
    for entry in catalog:
        check_normalizer(entry.cls)


def test_check_normalizer_catches_a_broken_one():
    from harness.testing import check_normalizer
    from harness.types import Hyperparameter, Normalizer

    class RankByPosition(Normalizer):
        id = "by-position"

        def __call__(self, scores):
            n = len(next(iter(scores.values())))
            return np.arange(n, dtype=np.float64)  # ignores the scores: order-dependent

    with pytest.raises(AssertionError, match="permuting the images"):
        check_normalizer(RankByPosition)

    class LeakyBatched(Normalizer):
        id = "leaky"

        def __call__(self, scores):
            return np.asarray(next(iter(scores.values())), dtype=np.float64)[:, 0]

        def batched(self, scores, column_mask, image_mask=None):
            raw = np.asarray(next(iter(scores.values())), dtype=np.float64)[:, :, 0]
            return raw - raw.mean()  # mixes prompts together

    with pytest.raises(AssertionError, match="batched differs from __call__"):
        check_normalizer(LeakyBatched)

    class EmptyGrid(LeakyBatched):
        id = "bad-grid"
        hyperparameters = (Hyperparameter("s", (1.0, float("nan"))),)

    with pytest.raises(AssertionError, match="finite"):
        check_normalizer(EmptyGrid)


def test_check_prompt_generator_on_rules_and_a_broken_one():
    from harness.plugins import get_plugins
    from harness.testing import check_prompt_generator
    from harness.types import PromptSetGenerator

    rules = get_plugins().prompt_generators.get("rules")()
    prompts = ["a realistic photo of three cats", "a red car", "a photo of an apple and a dog"]
    sets = check_prompt_generator(rules, prompts)
    assert "a realistic photo of two cats" in sets[prompts[0]]

    class Echo(PromptSetGenerator):
        id = "echo"

        def generate(self, prompts):
            return {p: [p, p + "!"] for p in prompts[1:]}

    with pytest.raises(AssertionError, match="left out 1 prompts"):
        check_prompt_generator(Echo(), ["a", "b"])

    class Same(Echo):
        def generate(self, prompts):
            return {p: [p + "!", p] for p in prompts}

    with pytest.raises(AssertionError, match="equals the prompt itself"):
        check_prompt_generator(Same(), ["a"])


def test_check_benchmark_on_tia2_and_a_broken_one(tia2_dir):
    import dataclasses

    from harness.testing import check_benchmark
    from harness_plugins.tia2 import TIA2

    data = check_benchmark(TIA2(tia2_dir), ["counting"])
    assert set(data.images["subset"].astype(str)) == {"counting"}

    class TextLabels(TIA2):
        def load(self, subsets=None):
            loaded = super().load(subsets)
            images = loaded.images.assign(binary=loaded.images["binary"].astype(str))
            return dataclasses.replace(loaded, images=images)

    with pytest.raises(AssertionError, match="expected int8"):
        check_benchmark(TextLabels(tia2_dir), ["counting"])

    class MissingBinary(TIA2):  # its protocol's AUROC needs a binary label on every image
        def load(self, subsets=None):
            loaded = super().load(subsets)
            images = loaded.images.assign(binary=loaded.images["binary"].astype("float64"))
            images.loc[images.index[0], "binary"] = float("nan")
            return dataclasses.replace(loaded, images=images)

    with pytest.raises(AssertionError, match="need a binary label on every image"):
        check_benchmark(MissingBinary(tia2_dir), ["counting"])
