"""Conformance checks for plugin authors, one per kind of plugin.

Use them in a plugin's own tests::

    from harness.testing import check_reward_model

    def test_my_model(tmp_path):
        model = MyReward(checkpoint=make_tiny_checkpoint(tmp_path))
        check_reward_model(model, images, prompts)

- :func:`check_reward_model`: a :class:`~harness.types.RewardModel` instance on PIL images;
- :func:`check_normalizer`: a :class:`~harness.types.Normalizer` class on random scores;
- :func:`check_prompt_generator`: a :class:`~harness.types.PromptSetGenerator` on prompts;
- :func:`check_benchmark`: a :class:`~harness.types.Benchmark` instance (it loads its data).

Each check raises ``AssertionError`` with a message saying which property failed.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from harness.images import as_8bit
from harness.scoring.batches import collate
from harness.types import (
    Benchmark,
    BenchmarkData,
    Hyperparameter,
    ImageFailure,
    Normalizer,
    PromptSetGenerator,
    RewardModel,
)

__all__ = ["check_benchmark", "check_normalizer", "check_prompt_generator", "check_reward_model",
           "image_modes", "write_image_modes"]


# -- reward models ------------------------------------------------------------------------------
def _as_arrays(scores: Sequence[Any]) -> list[np.ndarray]:
    out = []
    for s in scores:
        assert not isinstance(s, ImageFailure), f"score could not score an image: {s.reason}"
        if hasattr(s, "detach"):
            s = s.detach().cpu().numpy()
        out.append(np.asarray(s))
    return out


def _as_array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def image_modes(image: Any) -> dict[str, Any]:
    """``image`` (PIL) in every mode image files come in, keyed by a label (the mode, or the
    mode and what is special about it); each image's ``mode`` is its PIL mode.

    ``1``, ``L``, ``LA`` and ``RGBA`` (a real alpha gradient), ``P`` (adaptive palette),
    ``P-transparent`` (a palette entry marked transparent), ``PA``, ``CMYK``, ``YCbCr``,
    ``LAB``, ``HSV``, ``I`` and ``F`` (holding the 8-bit grey values), ``I;16`` and ``I;16B``
    (16-bit greyscale: the 8-bit grey times 257), ``I-16bit`` and ``F-16bit`` (the same 16-bit
    values held in the 32-bit modes). The decoder (:func:`harness.images.as_8bit`) turns the four
    16-bit ones back into the 8-bit grey; for the others ``convert("RGB")`` is right.
    """
    from PIL import Image

    rgb = image.convert("RGB")
    w, h = rgb.size
    alpha = Image.linear_gradient("L").resize((w, h))
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    grey = rgb.convert("L")
    la = grey.copy()
    la.putalpha(alpha)
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    transparent = palette.copy()
    transparent.info["transparency"] = transparent.getpixel((0, 0))
    pa = palette.convert("PA")
    pa.putalpha(alpha)
    wide = np.asarray(grey, dtype=np.uint16) * np.uint16(257)
    return {
        "1": rgb.convert("1"),
        "L": grey,
        "LA": la,
        "P": palette,
        "P-transparent": transparent,
        "PA": pa,
        "RGBA": rgba,
        "CMYK": rgb.convert("CMYK"),
        "YCbCr": rgb.convert("YCbCr"),
        "LAB": rgb.convert("LAB"),
        "HSV": rgb.convert("HSV"),
        "I": grey.convert("I"),
        "F": grey.convert("F"),
        "I;16": Image.fromarray(wide),
        "I;16B": Image.frombytes("I;16B", (w, h), wide.astype(">u2").tobytes()),
        "I-16bit": Image.fromarray(wide.astype(np.int32)),
        "F-16bit": Image.fromarray(wide.astype(np.float32)),
    }


#: Labels of :func:`image_modes` that PNG stores in their own mode; TIFF stores the others but HSV.
_PNG_MODES = frozenset({"1", "L", "LA", "P", "P-transparent", "RGBA", "I;16"})


def write_image_modes(image: Any, folder: str | Path) -> dict[str, Path]:
    """Write each of :func:`image_modes` to ``folder`` in a format that reopens in the same mode
    (PNG, else TIFF) -> ``{label: path}``. HSV is left out: no image format stores it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for label, im in image_modes(image).items():
        if label == "HSV":
            continue
        paths[label] = folder / f"{label}.{'png' if label in _PNG_MODES else 'tif'}"
        im.save(paths[label])
    return paths


def check_reward_model(
    model: RewardModel,
    images: Sequence[Any],
    prompts: Sequence[Sequence[str]],
    atol: float = 1e-5,
    batch_sizes: tuple[int, ...] = (1, 16),
) -> list[np.ndarray]:
    """Check the contract on PIL ``images`` with ``prompts[i]`` for image ``i``.

    - the class takes the default constructor ``(checkpoint=None, device="cpu", dtype="float32")``;
    - ``score`` returns one float32 array per image, of length ``len(prompts[i])``, all finite
      (``[len(prompts[i]), 2]`` for a model that ``reports_uncertainty``: score and standard
      deviation, the deviation ``>= 0``; every check below covers both columns);
    - deterministic: the same inputs give the same scores;
    - batch-size invariant: scoring in batches of each of ``batch_sizes`` agrees within ``atol``;
    - cached features: scoring an image's prompts together equals scoring each one alone;
    - ``preprocessor()`` computes what ``preprocess`` does;
    - every image mode of :func:`image_modes` (1, L, LA, P, PA, RGBA, CMYK, YCbCr, LAB, HSV, I,
      F, 16-bit greyscale), as the decoder hands it over (:func:`harness.images.as_8bit`), is
      accepted and scores finitely;
    - a dual encoder (``embedding_kind = "dual"``): one row per image, scores from stored rows
      (``features_from_embeddings``) equal to fresh ones, and ``text_rows`` (if offered) giving
      the held prompts' float32 rows;
    - ``files()`` lists existing files.

    :returns: the scores (from the first batch size).
    """
    assert len(images) == len(prompts), "one prompt list per image"
    assert images, "give at least one image"
    cls = type(model)
    try:
        inspect.signature(cls).bind(checkpoint=None, device="cpu", dtype="float32")
    except TypeError as exc:
        raise AssertionError(
            f"{cls.__qualname__} does not accept the default constructor "
            f"(checkpoint=None, device='cpu', dtype='float32'): {exc}"
        ) from None
    uncertain = bool(getattr(cls, "reports_uncertainty", False))

    def expected(n: int) -> tuple[int, ...]:
        return (n, 2) if uncertain else (n,)

    inputs = [model.preprocess(im) for im in images]

    def run(batch_size: int, inputs: list[Any] = inputs) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for lo in range(0, len(inputs), batch_size):
            feats = model.embed_images(collate(inputs[lo : lo + batch_size]))
            out += _as_arrays(model.score(feats, [list(p) for p in prompts[lo : lo + batch_size]]))
        return out

    first = run(batch_sizes[0])
    assert len(first) == len(images), f"score returned {len(first)} arrays for {len(images)} images"
    for i, (s, ps) in enumerate(zip(first, prompts, strict=True)):
        assert s.shape == expected(len(ps)), (
            f"image {i}: scores of shape {s.shape}, expected {expected(len(ps))}"
            + (" (reports_uncertainty: score and standard deviation per prompt)" if uncertain else "")
        )
        assert s.dtype == np.float32, f"image {i}: scores of dtype {s.dtype}, expected float32"
        assert np.isfinite(s).all(), f"image {i}: non-finite scores {s}"
        if uncertain:
            assert (s[:, 1] >= 0).all(), f"image {i}: negative standard deviations {s[:, 1]}"
    again = run(batch_sizes[0])
    for i, (a, b) in enumerate(zip(first, again, strict=True)):
        assert np.array_equal(a, b), f"image {i}: not deterministic ({a} vs {b})"
    for bs in batch_sizes[1:]:
        other = run(bs)
        for i, (a, b) in enumerate(zip(first, other, strict=True)):
            np.testing.assert_allclose(
                a, b, atol=atol, rtol=0,
                err_msg=f"image {i}: batch size {batch_sizes[0]} and {bs} disagree",
            )
    # One image encode, many prompts == one prompt at a time.
    feats = model.embed_images(collate(inputs[:1]))
    together = _as_arrays(model.score(feats, [list(prompts[0])]))[0]
    alone = np.array([_as_arrays(model.score(feats, [[p]]))[0][0] for p in prompts[0]])
    np.testing.assert_allclose(together, alone, atol=atol, rtol=0,
                               err_msg="scoring prompts together differs from one at a time")
    # The picklable preprocessor sent to data-loading processes does what preprocess does.
    shipped = model.preprocessor()(images[0])
    np.testing.assert_allclose(_as_array(shipped), _as_array(inputs[0]), atol=1e-6, rtol=0,
                               err_msg="preprocessor() differs from preprocess")
    # Images as opened, in other modes: accepted, same input shape, finite scores.
    shape = np.shape(_as_array(inputs[0]))
    for mode, im in image_modes(images[0]).items():
        try:
            x = model.preprocess(as_8bit(im))
        except Exception as exc:  # noqa: BLE001 - report which mode failed and why
            raise AssertionError(f"preprocess fails on a mode {mode} image: "
                                 f"{type(exc).__name__}: {exc} (images arrive in their own mode; "
                                 "convert('RGB') accepts every one)") from exc
        assert np.shape(_as_array(x)) == shape, (
            f"mode {mode} image preprocessed to shape {np.shape(_as_array(x))}, RGB to {shape}"
        )
        s = _as_arrays(model.score(model.embed_images(collate([x])), [list(prompts[0])]))[0]
        assert np.isfinite(s).all() and s.shape == expected(len(prompts[0])), (
            f"mode {mode} image: scores {s}"
        )
    if getattr(cls, "embedding_kind", None) == "dual":
        _check_dual(model, inputs[0], list(prompts[0]), together)
    for path in model.files():
        assert Path(path).is_file(), f"files() lists {path}, which is not a file"
    return first


def _check_dual(model: RewardModel, x: Any, prompts: list[str], expected: np.ndarray) -> None:
    """A dual encoder: one float32 row per image, stored rows score exactly as fresh features;
    text rows (when offered) are the held prompts' float32 rows."""
    from harness.scoring.embeddings import features_to_rows

    rows = features_to_rows(model.embed_images(collate([x])))
    assert rows.shape[0] == 1, f"embed_images gave {rows.shape[0]} rows for 1 image"
    stored = _as_arrays(model.score(model.features_from_embeddings(rows.copy()), [prompts]))[0]
    np.testing.assert_array_equal(
        stored, expected, err_msg="scores from stored embedding rows (features_from_embeddings) "
        "differ from scores of fresh features: the embedding store would change the numbers")
    if getattr(type(model), "text_rows", None) is RewardModel.text_rows:
        return
    held, text = model.text_rows(prompts)
    assert set(held) == set(prompts), (
        f"text_rows right after scoring {prompts} held {held}: it must give the rows the model "
        "holds")
    text = np.asarray(text)
    assert text.dtype == np.float32 and text.ndim == 2 and len(text) == len(held), (
        f"text_rows gave {text.dtype} rows of shape {list(text.shape)} for {len(held)} prompts")
    model.load_text_rows(held, text)  # already held: nothing changes
    again = _as_arrays(model.score(model.features_from_embeddings(rows.copy()), [prompts]))[0]
    np.testing.assert_array_equal(again, expected, err_msg="load_text_rows changed the scores")


# -- normalizers --------------------------------------------------------------------------------
def _random_scores(rng: np.random.Generator, models: Sequence[str], n: int, width: int
                   ) -> dict[str, np.ndarray]:
    return {m: rng.normal(0.25 + 0.1 * k, 0.1 + 0.05 * k, size=(n, width))
            for k, m in enumerate(models)}


def _check_output(out: Any, n: int, what: str) -> np.ndarray:
    arr = np.asarray(out)
    assert arr.shape == (n,), f"{what}: output of shape {arr.shape}, expected ({n},)"
    assert np.issubdtype(arr.dtype, np.floating), f"{what}: output of dtype {arr.dtype}, expected float"
    assert np.isfinite(arr).all(), f"{what}: non-finite output {arr}"
    return arr.astype(np.float64)


def _check_hyperparameters(cls: type[Normalizer]) -> None:
    declared = cls.hyperparameters
    assert isinstance(declared, tuple), f"{cls.__qualname__}.hyperparameters must be a tuple"
    names = [h.name for h in declared]
    assert len(set(names)) == len(names), f"hyperparameter names repeat: {names}"
    for h in declared:
        assert isinstance(h, Hyperparameter), f"{h!r} is not a harness.types.Hyperparameter"
        assert h.name.isidentifier(), f"hyperparameter name {h.name!r} is not an identifier"
        assert h.grid and all(isinstance(v, int | float) and math.isfinite(v) for v in h.grid), (
            f"hyperparameter '{h.name}': grid {h.grid} must be finite numbers"
        )
        assert len(set(h.grid)) == len(h.grid), f"hyperparameter '{h.name}': grid repeats values"
        assert math.isfinite(h.default_value), f"hyperparameter '{h.name}': default not finite"


def check_normalizer(
    cls: type[Normalizer],
    *,
    models: Sequence[str] | None = None,
    contrastive: int = 4,
    seed: int = 0,
    atol: float = 1e-9,
) -> None:
    """Check a normalizer class on random scores of ``models`` (default: as many as it needs).

    - hyperparameters declared sanely (unique identifiers, finite non-empty grids) and every grid
      value accepted by the constructor, with finite results;
    - output: float ``[N]``, finite, for ``N`` from ``max(min_images, 1)`` up;
    - permuting a prompt's images permutes the output (images are treated alike);
    - per-prompt independence: ``batched`` (when it is provided) over prompts of different
      image and contrastive counts, padded, equals ``__call__`` prompt by prompt;
    - with ``uses_uncertainty``: the same with random standard deviations passed as
      ``uncertainty=`` (one model's all NaN: a model that reports none), and without them.
    """
    assert isinstance(cls, type) and issubclass(cls, Normalizer), f"{cls!r} is not a Normalizer class"
    _check_hyperparameters(cls)
    rng = np.random.default_rng(seed)
    if models is None:
        count = max(cls.min_models, 2 if cls.max_models is None or cls.max_models >= 2 else 1)
        if cls.max_models is not None:
            count = min(count, cls.max_models)
        models = [f"model{k}" for k in range(count)]
    models = list(models)
    width = 1 + max(contrastive, 1 if cls.needs_contrastive else 0)
    norm = cls()
    lo_images = max(cls.min_images, 1)

    for n in sorted({lo_images, lo_images + 1, 7}):
        scores = _random_scores(rng, models, n, width)
        out = _check_output(norm(scores), n, f"{cls.id} on {n} images")
        again = _check_output(norm({m: v.copy() for m, v in scores.items()}), n, cls.id)
        np.testing.assert_array_equal(out, again, err_msg=f"{cls.id}: not deterministic")
        perm = rng.permutation(n)
        permuted = _check_output(norm({m: v[perm] for m, v in scores.items()}), n, cls.id)
        np.testing.assert_allclose(permuted, out[perm], atol=atol, rtol=0,
                                   err_msg=f"{cls.id}: permuting the images changes their scores")

    for h in cls.hyperparameters:
        for value in h.grid:
            other = cls(**{h.name: value})
            _check_output(other(_random_scores(rng, models, 5, width)), 5,
                          f"{cls.id} with {h.name}={value}")

    # Prompts of different sizes, padded into one [P, N, K] block.
    sizes = [(lo_images + k % 3, width - (k % 2 if width > 2 else 0)) for k in range(5)]
    prompts = [_random_scores(rng, models, n, k) for n, k in sizes]
    one_by_one = [_check_output(norm(p), n, cls.id) for p, (n, _) in zip(prompts, sizes, strict=True)]
    big_n = max(n for n, _ in sizes)
    big_k = max(k for _, k in sizes)
    stacked = {m: np.full((len(prompts), big_n, big_k), 0.5) for m in models}
    column_mask = np.zeros((len(prompts), big_k), dtype=bool)
    image_mask = np.zeros((len(prompts), big_n), dtype=bool)
    for p, (scores, (n, k)) in enumerate(zip(prompts, sizes, strict=True)):
        for m in models:
            stacked[m][p, :n, :k] = scores[m]
        column_mask[p, :k] = True
        image_mask[p, :n] = True
    params = inspect.signature(norm.batched).parameters
    args: tuple[Any, ...] = (stacked, column_mask)
    if len(params) >= 3:
        args = (*args, image_mask)
    _check_batched(norm, args, {}, one_by_one, sizes, atol)
    if not cls.uses_uncertainty:
        return
    # The models' own standard deviations: random for all but the last model, which reports none.
    spreads = [{m: (np.full((n, k), np.nan) if j == len(models) - 1 and len(models) > 1
                    else rng.uniform(0.0, 0.2, size=(n, k))) for j, m in enumerate(models)}
               for n, k in sizes]
    with_std = [_check_output(norm(p, uncertainty=u), n, f"{cls.id} with uncertainty")
                for p, u, (n, _) in zip(prompts, spreads, sizes, strict=True)]
    stacked_std = {m: np.full((len(prompts), big_n, big_k), 0.1) for m in models}
    for p, (u, (n, k)) in enumerate(zip(spreads, sizes, strict=True)):
        for m in models:
            stacked_std[m][p, :n, :k] = u[m]
    _check_batched(norm, args, {"uncertainty": stacked_std}, with_std, sizes, atol)


def _check_batched(norm: Normalizer, args: tuple[Any, ...], kwargs: dict[str, Any],
                   one_by_one: list[np.ndarray], sizes: list[tuple[int, int]], atol: float) -> None:
    fast = norm.batched(*args, **kwargs)
    if fast is None:
        return
    fast = np.asarray(fast)
    expected = (len(sizes), args[0][next(iter(args[0]))].shape[1])
    assert fast.shape == expected, (
        f"{norm.id}.batched: output of shape {fast.shape}, expected {expected}"
    )
    for p, (n, _) in enumerate(sizes):
        np.testing.assert_allclose(
            fast[p, :n], one_by_one[p], atol=atol, rtol=0,
            err_msg=f"{norm.id}: batched differs from __call__ on prompt {p} (padded)"
                    + (" with uncertainty" if kwargs else ""),
        )


# -- prompt-set generators ------------------------------------------------------------------------
def check_prompt_generator(gen: PromptSetGenerator, prompts: Sequence[str]) -> dict[str, list[str]]:
    """Check ``gen.generate(prompts)``: a dict with every prompt as a key, each value a list of
    non-empty strings that differ from the prompt; returns it."""
    assert isinstance(gen, PromptSetGenerator), f"{gen!r} is not a PromptSetGenerator"
    out = gen.generate(list(prompts))
    assert isinstance(out, Mapping), f"generate returned a {type(out).__name__}, not a dict"
    missing = [p for p in prompts if p not in out]
    assert not missing, f"generate left out {len(missing)} prompts, e.g. {missing[0]!r}"
    for p in prompts:
        values = out[p]
        assert isinstance(values, list), f"{p!r}: a {type(values).__name__}, not a list"
        for v in values:
            assert isinstance(v, str) and v.strip(), f"{p!r}: contrastive prompt {v!r} is empty"
            assert v != p, f"{p!r}: a contrastive prompt equals the prompt itself"
    return dict(out)


# -- benchmarks -----------------------------------------------------------------------------------
REQUIRED_COLUMNS = ("subset", "prompt_id", "prompt", "image", "binary", "graded")


def check_benchmark(bench: Benchmark, subsets: Sequence[str] | None = None) -> BenchmarkData:
    """Load ``subsets`` (default: the first one) and check :class:`BenchmarkData`'s documented
    columns and dtypes, the subsets, the contrastive sets and ``reported()``; returns the data."""
    from harness.errors import HarnessError

    assert isinstance(bench, Benchmark), f"{bench!r} is not a Benchmark"
    declared = tuple(bench.subsets)
    assert declared and all(isinstance(s, str) and s for s in declared), (
        f"{bench.id}: subsets must be non-empty strings, got {declared}"
    )
    assert bench.check_subsets(None) == list(declared)
    try:
        bench.check_subsets(["no-such-subset"])
    except HarnessError:
        pass
    else:
        raise AssertionError(f"{bench.id}: an unknown subset is not refused")
    wanted = list(subsets) if subsets else [declared[0]]
    data = bench.load(wanted)
    assert isinstance(data, BenchmarkData), f"load returned a {type(data).__name__}"
    frame = data.images
    absent = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    assert not absent, f"{bench.id}: load() lacks the columns {absent}"
    assert len(frame), f"{bench.id}: no images in subsets {wanted}"
    found = set(frame["subset"].astype(str))
    assert found <= set(wanted), f"{bench.id}: asked for {wanted}, got rows of {sorted(found)}"
    protocol = bench.get_protocol()
    problems = protocol.problems()
    assert not problems, f"{bench.id}: inconsistent protocol: {problems[0]}"
    binary = frame["binary"]
    assert str(binary.dtype) in ("int8", "float64"), f"binary is {binary.dtype}, expected int8 (or float64 with NaN)"
    known = binary.dropna().to_numpy()
    assert set(np.unique(known)) <= {0, 1}, "binary holds values other than 0/1 (NaN: no label)"
    assert str(frame["graded"].dtype) == "float64", f"graded is {frame['graded'].dtype}, expected float64"
    graded = frame["graded"].dropna().to_numpy()
    assert ((graded >= 0) & (graded <= 1)).all(), "graded leaves [0, 1] (NaN: no label)"
    if protocol.family == "per_image":
        needs_binary = {"auroc", "auprc", "ap5", "ap10", "ap25"} & set(protocol.metrics)
        evaluated = frame[frame["split"] == "test"] if "split" in frame else frame
        if needs_binary:
            assert evaluated["binary"].notna().all(), (
                f"{bench.id}: its protocol's {sorted(needs_binary)} need a binary label on every image")
        if {"spearman", "kendall", "pearson", "pairwise_acc"} & set(protocol.metrics):
            assert evaluated["graded"].notna().all(), (
                f"{bench.id}: its protocol's correlations need a graded label on every image")
    else:
        pairs = data.pairs
        assert pairs is not None, f"{bench.id}: a preference benchmark must give pairs"
        absent = [c for c in ("subset", "prompt_id", "image_a", "image_b", "label") if c not in pairs.columns]
        assert not absent, f"{bench.id}: pairs lack the columns {absent}"
        assert set(np.unique(pairs["label"])) <= {0.0, 0.5, 1.0}, "pair labels must be 1, 0 or 0.5 (tie)"
        images = set(zip(frame["subset"].astype(str), frame["image"], strict=True))
        for side in ("image_a", "image_b"):
            unknown = [i for s, i in zip(pairs["subset"].astype(str), pairs[side], strict=True)
                       if (s, i) not in images]
            assert not unknown, f"{bench.id}: pairs name images not in images, e.g. {unknown[0]}"
        if protocol.tie_rule == "threshold":
            assert "split" in pairs and set(pairs["split"]) >= {"test", "validation"}, (
                f"{bench.id}: tie_rule threshold needs test and validation pairs")
    released = bench.reported_scores(wanted)
    absent = [c for c in ("subset", "image", "method", "score") if c not in released.columns]
    assert not absent, f"{bench.id}: reported_scores() lacks the columns {absent}"
    for col in ("prompt", "image"):
        assert all(isinstance(v, str) and v for v in frame[col]), f"{col}: empty or not strings"
    for col in (c for c in frame.columns if str(c).startswith("label_")):
        assert np.issubdtype(frame[col].dtype, np.number), f"{col} is not numeric"
    assert not frame.duplicated(["subset", "image"]).any(), "an image appears twice in a subset"
    for key, values in data.contrastive.items():
        assert isinstance(key, tuple) and len(key) == 2, f"contrastive key {key!r} is not (subset, prompt)"
        assert isinstance(values, list) and all(isinstance(v, str) and v for v in values), (
            f"contrastive prompts of {key!r} are not a list of strings"
        )
    reported = bench.reported(wanted)
    absent = [c for c in ("subset", "method", "prompt") if c not in reported.columns]
    assert not absent, f"{bench.id}: reported() lacks the columns {absent}"
    return data
