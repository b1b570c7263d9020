"""What a scoring run must compute: :class:`ScorePlan`, its result :class:`ScoreRun`, and the
score-cache key.

The cache key is the core's, not the plugin's: it is built from what makes a reward model's
numbers what they are, whatever the plugin reports in ``describe()``:

- the model's id and class;
- the spec's constructor options, resolved with the constructor's defaults
  (``inspect.signature(cls).bind``), less the class's ``runtime_options`` (where it runs, how it
  batches) and ``label``;
- the dtype it runs in;
- the plugin's distribution name and version (``t2i-harness`` for built-ins);
- the sha256 of the source files of the modules defining the class and its bases, so editing a
  plugin's code (even in an editable install) never returns old scores;
- the content hash of every file in :meth:`~harness.types.RewardModel.files` (weights, configs,
  tokenizer, processor), memoised per ``(path, size, mtime_ns)``; a file in a Hugging Face hub
  cache's ``blobs/`` folder is named by its content hash already, so it is not read;
- the class's ``preprocessing_version``, and the core decoder's
  (:data:`harness.images.DECODER_VERSION`).

A model that reports uncertainty (``reports_uncertainty``: ``score`` gives ``[P, 2]`` per image,
the score and its standard deviation) keeps its standard deviations in the same cache under the
model key ``<key>#std`` (:func:`std_key`); an image counts as cached only when both are there.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from harness.errors import HarnessError
from harness.images import DECODER_VERSION
from harness.types import ImageFailure, RewardModel

if TYPE_CHECKING:
    from harness.scoring.cache import ScoreCache
    from harness.scoring.embeddings import EmbeddingStore
    from harness.scoring.specs import ModelSpec

#: Spec options that never reach the key: the row's name, and the dtype (keyed on its own).
_NOT_OPTIONS = frozenset({"label", "device", "dtype"})
#: ``describe()`` entries that count things in a run rather than identify the numbers.
_COUNTERS = frozenset({"truncated_prompts"})


@dataclass
class ScoreRun:
    """Result of :func:`~harness.scoring.score_images`: ``scores[i]`` is float64
    ``[len(prompts[i])]``, or None for an image in ``failed``.

    ``uncertainty[i]`` (aligned with ``scores``) is the standard deviation the model predicts for
    each of those scores, float64 ``[len(prompts[i])]``, ``>= 0``, for a model that reports
    uncertainty (:attr:`~harness.types.RewardModel.reports_uncertainty`); None otherwise.
    """

    scores: list[np.ndarray | None]
    failed: dict[str, str] = field(default_factory=dict)
    computed: int = 0  #: (image, prompt) pairs scored by the model in this run
    cached: int = 0  #: pairs read from the cache
    encoded_images: int = 0  #: images passed through ``embed_images``
    seconds: float = 0.0
    #: The executor's name, options and facts of the run (Ray: ``placement`` actor -> GPUs).
    executor_info: dict[str, Any] = field(default_factory=dict)
    cache_key: str = ""  #: the model's key in the score cache
    uncertainty: list[np.ndarray | None] = field(default_factory=list)
    reports_uncertainty: bool = False  #: the model declared ``reports_uncertainty``

    def __post_init__(self) -> None:
        if len(self.uncertainty) != len(self.scores):
            self.uncertainty = [None] * len(self.scores)


# -- content hashes ---------------------------------------------------------------------------
_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, or of an image inside a container (``archive.zip::member``)."""
    from harness.images import read_image_bytes, split_member

    if split_member(path) is not None:
        return hashlib.sha256(read_image_bytes(path)).hexdigest()
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def content_hash(path: str | Path) -> str:
    """The sha256 of a file, memoised in this process per ``(path, size, mtime_ns)``.

    A file that resolves into a Hugging Face hub cache's ``blobs/`` folder is named by its
    content hash (sha256 for LFS files, the git blob id otherwise): the name is returned unread.
    """
    real = Path(path).resolve()
    if real.parent.name == "blobs" and len(real.name) >= 40:
        return real.name
    stat = real.stat()
    key = (str(real), stat.st_size, stat.st_mtime_ns)
    found = _HASHES.get(key)
    if found is None:
        found = file_sha256(real)
        # A file modified within the file system's timestamp granularity could change again
        # under the same mtime ("racy" in git's words): memoise only files older than that.
        if time.time_ns() - stat.st_mtime_ns > 2_000_000_000:
            _HASHES[key] = found
    return found


def source_hashes(cls: type) -> dict[str, str]:
    """``{module: sha256 of its source file}`` for the modules defining ``cls`` and its bases."""
    out: dict[str, str] = {}
    for klass in cls.__mro__:
        if klass is object or klass.__module__ in out or klass.__module__ in ("abc", "builtins"):
            continue
        module = sys.modules.get(klass.__module__)
        path = getattr(module, "__file__", None)
        if path and path.endswith((".pyc", ".pyo")):
            path = path[:-1]
        if path and os.path.isfile(path):
            out[klass.__module__] = content_hash(path)
        else:  # defined interactively or in a frozen module: the source text, if any
            try:
                text = inspect.getsource(klass)
            except (OSError, TypeError):
                text = f"{klass.__module__}.{klass.__qualname__}"
            out[klass.__module__ + ":" + klass.__qualname__] = hashlib.sha256(text.encode()).hexdigest()
    return out


def files_hashes(model: RewardModel) -> list[tuple[str, str]]:
    """``(file name, content hash)`` of every file the model says it loaded, sorted."""
    out = []
    for path in model.files():
        try:
            out.append((Path(path).name, content_hash(path)))
        except OSError as exc:
            raise HarnessError(
                f"reward model '{_model_name(model)}' lists the file {path} in files(), but it "
                f"cannot be read ({exc.strerror or exc}): fix the plugin's files()"
            ) from exc
    return sorted(out)


# -- who ships the class ----------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _packages_distributions() -> dict[str, list[str]]:
    from importlib.metadata import packages_distributions

    return packages_distributions()


def plugin_distribution(cls: type) -> tuple[str, str]:
    """``(distribution name, version)`` of the plugin that registered ``cls``.

    From the plugin registry (``t2i-harness`` and its version for built-ins); for a class that is
    not registered, the distribution that installs its top-level package, else ``unregistered``.
    """
    from harness import __version__
    from harness.plugins import get_plugins

    plugins = get_plugins()
    try:
        entry = plugins.reward_models.entry(getattr(cls, "id", ""))
    except HarnessError:
        entry = None
    if entry is not None and entry.cls is cls:
        info = plugins.infos.get(entry.plugin)
        if info is not None:
            if info.builtin:
                return "t2i-harness", __version__
            return info.name.split(":")[0], info.version
    from importlib.metadata import PackageNotFoundError, version

    top = cls.__module__.split(".")[0]
    for dist in _packages_distributions().get(top, []):
        try:
            return dist, version(dist)
        except PackageNotFoundError:  # pragma: no cover - a stale dist-info
            continue
    return "unregistered", ""


# -- the key ----------------------------------------------------------------------------------
def resolved_options(cls: type, options: dict[str, Any]) -> dict[str, Any]:
    """The constructor options of a spec with every default filled in, less runtime options."""
    given = {k: v for k, v in options.items() if k not in _NOT_OPTIONS}
    runtime = set(getattr(cls, "runtime_options", ()))
    try:
        bound = inspect.signature(cls).bind(**given)
        bound.apply_defaults()
        resolved: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            param = bound.signature.parameters[name]
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                resolved.update(value)
            elif param.kind is not inspect.Parameter.VAR_POSITIONAL:
                resolved[name] = value
    except TypeError:  # load_reward_model has already rejected bad options; be lenient here
        resolved = dict(given)
    if resolved.get("checkpoint") is None and getattr(cls, "default_checkpoint", None):
        resolved["checkpoint"] = cls.default_checkpoint
    return {k: v for k, v in resolved.items() if k not in runtime and k not in _NOT_OPTIONS}


def key_parts(model: RewardModel, spec: ModelSpec | None = None) -> dict[str, Any]:
    """Everything the cache key is made of (readable; :func:`model_cache_key` hashes it).

    Without a ``spec`` (a model built by hand), the core cannot know the constructor options: the
    settings ``describe()`` reports stand in for them.
    """
    cls = type(model)
    if spec is not None:
        options: Any = resolved_options(cls, dict(spec.options))
    else:
        try:
            info = dict(model.describe())
        except Exception:  # noqa: BLE001 - a plugin whose describe() fails still scores
            info = {}
        options = {"describe": {k: info[k] for k in sorted(info)
                                if k not in _COUNTERS and info[k] is not None}}
    dist, version = plugin_distribution(cls)
    dtype = getattr(model, "dtype", None)
    return {
        "id": getattr(cls, "id", cls.__name__),
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "options": options,
        "dtype": None if dtype is None else str(dtype).removeprefix("torch."),
        "plugin": [dist, version],
        "source": source_hashes(cls),
        "files": files_hashes(model),
        "preprocessing_version": str(getattr(cls, "preprocessing_version", "")),
        "decoder_version": DECODER_VERSION,
    }


def model_cache_key(model: RewardModel, spec: ModelSpec | None = None) -> str:
    """``<id>:<sha256 of the key parts>``: the model column of the score cache."""
    parts = key_parts(model, spec)
    blob = json.dumps(parts, sort_keys=True, default=str)
    return f"{parts['id']}:{hashlib.sha256(blob.encode()).hexdigest()}"


def std_key(key: str) -> str:
    """The score-cache model key under which the standard deviations of ``key``'s scores live."""
    return f"{key}#std"


def _model_name(model: Any) -> str:
    return getattr(model, "id", type(model).__name__)


def hash_images(paths: Sequence[str]) -> list[tuple[str | None, str | None]]:
    """``(content hash, None)`` or ``(None, "ErrorType: why")`` per image file."""
    out: list[tuple[str | None, str | None]] = []
    for p in paths:
        try:
            out.append((file_sha256(p), None))
        except OSError as exc:
            out.append((None, f"{type(exc).__name__}: {exc.strerror or exc}"))
    return out


# -- the plan ---------------------------------------------------------------------------------
class ScorePlan:
    """What a scoring run must compute, and the bookkeeping shared by every executor.

    Hashes the images, takes what the cache already has, and leaves the rest in ``todo``;
    :meth:`accept` validates a batch of results (shape, finiteness), stores it in the run and the
    cache, so executors only produce ``(indices, score arrays, failures)`` batches. ``spec`` and
    ``dtype`` say how to build the model again elsewhere (a Ray actor).
    """

    def __init__(self, model: RewardModel, paths: Sequence[str | Path],
                 prompts: Sequence[Sequence[str]], cache: ScoreCache | None,
                 spec: ModelSpec | None = None, *,
                 hashes: Sequence[tuple[str | None, str | None]] | None = None,
                 embeddings: EmbeddingStore | None = None):
        self.start = time.perf_counter()
        self.paths = [str(p) for p in paths]
        self.prompts = [list(p) for p in prompts]
        if len(self.paths) != len(self.prompts):
            raise ValueError(f"{len(self.paths)} images but {len(self.prompts)} prompt lists")
        self.cache = cache
        self.spec = spec
        dtype = getattr(model, "dtype", None)
        self.dtype = None if dtype is None else str(dtype).removeprefix("torch.")
        self.model_name = _model_name(model)
        self.key = model_cache_key(model, spec)
        self.reports_uncertainty = bool(getattr(type(model), "reports_uncertainty", False))
        self.run = ScoreRun(scores=[None] * len(self.paths), cache_key=self.key,
                            reports_uncertainty=self.reports_uncertainty)
        if hashes is None:
            hashes = hash_images(self.paths)
        if len(hashes) != len(self.paths):
            raise ValueError(f"{len(hashes)} image hashes for {len(self.paths)} images")
        self.hashes: list[str | None] = []
        for p, (h, err) in zip(self.paths, hashes, strict=True):
            self.hashes.append(h)
            if h is None:
                self.run.failed[p] = err or "OSError: unreadable"
        self.todo: list[int] = []
        self._accepted: set[int] = set()
        known = [h for h in self.hashes if h is not None]
        found = cache.get(self.key, known) if cache else {}
        spread = cache.get(std_key(self.key), known) if cache and self.reports_uncertainty else {}
        for i, h in enumerate(self.hashes):
            if h is None:
                continue
            if not found and self.prompts[i]:  # nothing cached: no per-pair look-ups
                self.todo.append(i)
                continue
            got = [found.get((h, q)) for q in self.prompts[i]]
            std = [spread.get((h, q)) for q in self.prompts[i]] if self.reports_uncertainty else []
            if all(v is not None for v in got) and all(v is not None for v in std):
                self.run.scores[i] = np.asarray(got, dtype=np.float64)
                if self.reports_uncertainty:
                    self.run.uncertainty[i] = np.asarray(std, dtype=np.float64)
                self.run.cached += len(got)
            else:
                self.todo.append(i)
        # A dual encoder whose image rows are stored scores those images without decoding them.
        self.embeddings = embeddings if getattr(type(model), "embedding_kind", None) == "dual" else None
        #: ``(index, stored embedding [D])`` of images in no need of decoding.
        self.stored: list[tuple[int, np.ndarray]] = []
        if self.embeddings is not None and self.todo:
            rows = self.embeddings.get(self.key, [self.hashes[i] for i in self.todo])
            self.stored = [(i, rows[self.hashes[i]]) for i in self.todo if self.hashes[i] in rows]
            if self.stored:
                kept = {i for i, _ in self.stored}
                self.todo = [i for i in self.todo if i not in kept]
        # A dual encoder that hands out its text rows: the stored ones are loaded into it, and
        # the rows of prompts it encodes are stored after each batch.
        self._text_model = model if self.embeddings is not None and \
            getattr(type(model), "text_rows", None) not in (None, RewardModel.text_rows) else None
        self._texts_seen: set[str] = set()
        if self._text_model is not None and (self.todo or self.stored):
            wanted = list(dict.fromkeys(p for i in [*self.todo, *(i for i, _ in self.stored)]
                                        for p in self.prompts[i]))
            found = self.embeddings.get_texts(self.key, wanted)
            if found:
                names = list(found)
                model.load_text_rows(names, np.stack([found[p] for p in names]))
                self._texts_seen.update(names)

    def feature_sink(self, ids: Sequence[int]) -> Any:
        """For the images ``ids`` of one batch: a ``(offset, features)`` callback storing their
        image embeddings (:func:`~harness.scoring.batches.run_with_backoff`), or None."""
        if self.embeddings is None:
            return None
        from harness.scoring.embeddings import features_to_rows

        store, key, ids = self.embeddings, self.key, list(ids)

        def sink(offset: int, features: Any) -> None:
            rows = features_to_rows(features)
            these = ids[offset:offset + len(rows)]
            if len(these) != len(rows):
                raise ValueError(f"{len(rows)} embedding rows for {len(these)} images")
            hashes = self.hashes
            if hasattr(store, "put_rows"):  # one copy of the batch; the writer makes the blobs
                store.put_rows(key, [hashes[i] for i in these], rows)
            else:
                store.put(key, [(hashes[i], row) for i, row in zip(these, rows, strict=True)])

        return sink

    def split(self, i: int, values: Any) -> tuple[np.ndarray, np.ndarray | None]:
        """One image's result -> ``(scores [P], standard deviations [P] or None)``, checked:
        ``[P]`` (or anything of ``P`` values) from a model without uncertainty, exactly
        ``[P, 2]`` from one that reports it; finite, and standard deviations ``>= 0``."""
        n = len(self.prompts[i])
        arr = np.asarray(values, dtype=np.float64)
        std = None
        if self.reports_uncertainty:
            if arr.shape != (n, 2):
                raise HarnessError(
                    f"reward model '{self.model_name}' reports uncertainty, so it must return "
                    f"[prompts, 2] (score, standard deviation) per image; it returned shape "
                    f"{list(arr.shape)} for the {n} prompts of image {self.paths[i]}"
                )
            arr, std = arr[:, 0].copy(), arr[:, 1].copy()
        else:
            arr = arr.reshape(-1)
            if arr.shape != (n,):
                raise HarnessError(
                    f"reward model '{self.model_name}' returned {arr.shape[0]} scores for "
                    f"{n} prompts of image {self.paths[i]}"
                )
        if std is None and np.isfinite(arr).all():  # the common case, checked in one call
            return arr, None
        for what, column in (("score", arr), ("standard deviation", std)):
            if column is None:
                continue
            wrong = ~np.isfinite(column)
            if column is std:
                wrong |= column < 0
            bad_at = np.flatnonzero(wrong)
            if bad_at.size:
                k = int(bad_at[0])
                kind = "non-finite" if not np.isfinite(column[k]) else "negative"
                raise HarnessError(
                    f"reward model '{self.model_name}' returned a {kind} {what} "
                    f"({column[k]}) for image {self.paths[i]} and prompt {self.prompts[i][k]!r}"
                )
        return arr, std

    def accept(self, ids: Sequence[int], results: Sequence[np.ndarray | ImageFailure],
               bad: Sequence[tuple[int, str]] = (), *, encoded: bool = True) -> None:
        """Record scores of images ``ids`` (indices into the run) and failures ``(index, why)``
        (an :class:`~harness.types.ImageFailure` in ``results`` is one too). A model that
        reports uncertainty gives ``[P, 2]`` per image (see :meth:`split`)."""
        for i, err in bad:
            if i not in self._accepted:  # a retried task may deliver an image twice
                self.run.failed[self.paths[i]] = err
        rows, std_rows, scored = [], [], []
        computed = 0
        for i, values in zip(ids, results, strict=True):
            if i in self._accepted:
                continue  # a retried batch delivered twice: keep the first
            if isinstance(values, ImageFailure):  # the model could not score it: no number
                self.run.failed[self.paths[i]] = values.reason
                continue
            values, std = self.split(i, values)
            self.run.scores[i] = values
            self.run.uncertainty[i] = std
            self._accepted.add(i)
            self.run.failed.pop(self.paths[i], None)
            scored.append(i)
            computed += len(values)
            if self.cache is not None:  # one item per image, no Python object per score
                rows.append((self.hashes[i], self.prompts[i], values))
                if std is not None:
                    std_rows.append((self.hashes[i], self.prompts[i], std))
            if encoded:  # not for images scored from stored embeddings
                self.run.encoded_images += 1
        if self.cache is not None and rows:
            # The deviations first: a run stopped between the two writes finds scores without
            # deviations, which do not count as cached, and computes both again.
            if std_rows:
                _put_sets(self.cache, std_key(self.key), std_rows)
            _put_sets(self.cache, self.key, rows)
        self.run.computed += computed
        if self._text_model is not None and scored:
            self._store_texts(scored)

    def _store_texts(self, ids: list[int]) -> None:
        """The text rows the model holds for the prompts of images ``ids`` that are not stored
        yet (a model scoring elsewhere, on Ray, holds none: nothing is stored)."""
        seen = self._texts_seen
        new = list(dict.fromkeys(p for i in ids for p in self.prompts[i] if p not in seen))
        if not new:
            return
        seen.update(new)  # asked once: held now, or never (evicted, or encoded elsewhere)
        held, rows = self._text_model.text_rows(new)
        if held:
            self.embeddings.put_texts(self.key, held, rows)

    def finish(self) -> ScoreRun:
        self.run.seconds = time.perf_counter() - self.start
        return self.run


def _put_sets(cache: Any, key: str, items: list[tuple[str, Sequence[str], Any]]) -> None:
    """Store ``(image hash, prompts, scores)`` per image: a cache's ``put_sets`` when it has one
    (the compact store's fast path), else its per-pair ``put``."""
    if hasattr(cache, "put_sets"):
        cache.put_sets(key, items)
    else:
        cache.put(key, [(h, p, float(v)) for h, ps, vs in items for p, v in zip(ps, vs, strict=True)])
