"""The contracts every plugin implements, as abstract base classes.

The core calls only what is declared here. Shapes use ``B`` for images in a batch, ``P`` for
prompts, ``N`` for images of one prompt, ``C`` for contrastive prompts and ``D`` for feature
dimensions. Scores are ``float32`` unless a docstring says otherwise. Nothing here imports torch:
reward models may return ``torch.Tensor`` or ``numpy.ndarray`` of the documented shape.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from harness.errors import HarnessError, did_you_mean

if TYPE_CHECKING:  # pandas and numpy are imported by the code that builds arrays and frames
    import numpy as np
    import pandas as pd


# -- reward models ------------------------------------------------------------------------------
def to_rgb(image: Any) -> Any:
    """A PIL image in any mode -> RGB, the way transformers' image processors convert it.

    Transparent images (an alpha band, or a ``transparency`` entry: RGBA, LA, PA, palette or L
    with a transparent colour) are composited onto white, so
    an RGBA file scores as it looks, not as its hidden colour channels; other modes go through
    ``Image.convert("RGB")``.
    """
    from PIL import Image

    if image.mode == "RGB" and image.info.get("transparency") is None:
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


@dataclass(frozen=True)
class ModelCard:
    """What a user must know about a reward model's default weights (``harness models ID``).

    :param checkpoint: the default checkpoint (a hub id or a URL of the original file).
    :param revision: the pinned hub revision (a 40-hex commit) or the file's sha256, if known.
    :param license: of the weights.
    :param score_range: e.g. "[-1, 1]" or "(0, 1)" or "unbounded, ~N(0, 1)".
    :param meaning: what a score means (e.g. "cosine similarity x 100", "P(yes)").
    :param paper: citation; :param source: the original implementation (repository or package).
    :param variants: other checkpoints the plugin takes, ``{name: checkpoint}``.
    """

    checkpoint: str
    license: str
    score_range: str
    meaning: str
    revision: str | None = None
    paper: str = ""
    source: str = ""
    variants: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ImageFailure:
    """What :meth:`RewardModel.score` returns in place of an image's scores when that image could
    not be scored (a remote judge gave no usable answer), never a made-up number.

    The core records the image in ``ScoreRun.failed`` with :attr:`reason`, caches nothing for it
    (a later run tries it again) and scores the others; a fine-tuning reward stops, naming it.
    """

    reason: str


class RewardModel(ABC):
    """Scores image-prompt pairs. Higher means better aligned.

    Construction loads a real checkpoint. Every reward model accepts at least
    ``Model(checkpoint=None, device="cpu", dtype="float32")`` (``checkpoint=None``: the class's
    :attr:`default_checkpoint`); more keyword options become ``NAME:key=value`` spec options.
    The base constructor stores the three; a subclass that needs none of its own may omit
    ``__init__``.

    Scoring is split in three so that an image scored against its prompt and 32 contrastive
    prompts costs one image encode:

    1. :meth:`preprocess` turns one image *as opened* (a ``PIL.Image`` in its own mode: RGB, L,
       P, RGBA, CMYK, ...; 16-bit samples already scaled to 8 bits by the core's decoder,
       :func:`harness.images.as_8bit`) into a model input, converting the mode the way the model's
       original implementation does (:func:`to_rgb` is what transformers processors do). It runs
       in data-loader workers, so it must be picklable and must not touch the GPU.
    2. :meth:`embed_images` encodes a collated batch once: ``B`` inputs -> features (any
       structure whose first dimension is ``B``).
    3. :meth:`score` scores features against prompts: ``B`` features and ``B`` prompt lists ->
       ``B`` float arrays, the ``i``-th of length ``len(prompts[i])``.

    Models that score an (image, prompt) pair in one forward pass can subclass
    :class:`PairRewardModel` and implement one method instead.

    Uncertainty: a model that predicts a standard deviation beside each score (HPSv3's reward
    head gives a mean and a sigma) sets :attr:`reports_uncertainty` and returns from
    :meth:`score`, for each image, a float array of shape ``[P, 2]`` instead of ``[P]``: column 0
    the score (the predicted mean), column 1 its standard deviation (finite, ``>= 0``, in the
    score's units). The core caches both, adds an ``uncertainty`` column to the leaderboard's
    scores and an ``uncertainty_mean`` to the model's rows, hands it to normalizers that declare
    :attr:`Normalizer.uses_uncertainty`, and uses column 0 as a fine-tuning reward.

    The score cache key is the core's (see :mod:`harness.scoring.plan`): the spec's resolved
    options (less :attr:`runtime_options`), the plugin's distribution and version, the source of
    the modules defining the class, the content hash of every file in :meth:`files`, and
    :attr:`preprocessing_version`.
    """

    id: ClassVar[str]
    #: Bump when :meth:`preprocess` changes numerically: it keys the score cache.
    preprocessing_version: ClassVar[str] = "1"
    default_checkpoint: ClassVar[str | None] = None
    #: Constructor options that do not change the numbers (where it runs, how it batches): left
    #: out of the cache key.
    runtime_options: ClassVar[frozenset[str]] = frozenset({"device", "batch_size"})
    #: A Ray runtime_env for this model's actors (pip requirements, env vars), so models with
    #: conflicting dependencies can run side by side on one cluster. None: the driver's env.
    ray_runtime_env: ClassVar[dict[str, Any] | None] = None
    #: The default weights' model card (None: none published).
    card: ClassVar[ModelCard | None] = None
    #: Its scores are probabilities that the image matches the prompt (BLIP-2 ITM, VQAScore): the
    #: leaderboard's calibration uses them as they are instead of fitting a mapping. An instance
    #: may set it (e.g. by mode).
    score_is_probability: ClassVar[bool] = False
    #: :meth:`score` returns ``[P, 2]`` per image (score, its standard deviation >= 0).
    reports_uncertainty: ClassVar[bool] = False
    #: ``"dual"``: a dual encoder (CLIP-like). :meth:`embed_images` returns one embedding row per
    #: image (``[B, D]``) and :meth:`score` needs nothing else of the image, so the core keeps
    #: the rows in an embedding store beside the score cache and scores new prompts against
    #: them without decoding the image again (:meth:`features_from_embeddings`). None: no store.
    embedding_kind: ClassVar[str | None] = None

    def __init__(self, checkpoint: str | None = None, device: str = "cpu", dtype: str = "float32"):
        self.checkpoint = checkpoint or self.default_checkpoint
        self.device = device
        self.dtype = dtype

    @abstractmethod
    def preprocess(self, image: Any) -> Any:
        """One ``PIL.Image.Image`` as opened (any mode) -> one model input (e.g. float32 ``[3, H, W]``)."""

    def preprocessor(self) -> Callable[[Any], Any]:
        """A picklable callable doing :meth:`preprocess` without the model's weights.

        Sent to data-loading processes (Ray's CPU stage); override when ``self.preprocess`` would
        drag the whole model along when pickled.
        """
        return self.preprocess

    @abstractmethod
    def embed_images(self, batch: Any) -> Any:
        """A collated batch of ``B`` preprocessed images -> features with leading dimension ``B``."""

    @abstractmethod
    def score(self, features: Any, prompts: Sequence[Sequence[str]]) -> list[Any]:
        """Features of ``B`` images and ``B`` prompt lists -> ``B`` float arrays of scores (an
        :class:`ImageFailure` in place of the array of an image that could not be scored):
        ``[P]`` each, or ``[P, 2]`` (score, standard deviation) when :attr:`reports_uncertainty`."""

    def features_from_embeddings(self, embeddings: Any) -> Any:
        """Stored image embeddings (float32 numpy ``[B, D]``, rows of :meth:`embed_images`) ->
        what :meth:`score` takes; dual encoders only. Default: a torch tensor on :attr:`device`."""
        import torch

        return torch.from_numpy(embeddings).to(self.device)

    def text_rows(self, prompts: Sequence[str]) -> tuple[list[str], Any]:
        """Dual encoders that keep text embeddings: the ones the model holds now for these
        prompts, as ``(prompts held, float32 numpy [T, D])`` (prompts it does not hold are left
        out). The core stores them in the embedding store, keyed by the model's cache key, so a
        later run (another process) loads them with :meth:`load_text_rows` instead of encoding
        the prompts again. Default: none (the core then stores no text rows for the model)."""
        return [], None

    def load_text_rows(self, prompts: Sequence[str], rows: Any) -> None:
        """Take text embeddings stored from :meth:`text_rows` of an earlier run (float32 numpy
        ``[T, D]``, one row per prompt): :meth:`score` then uses them as if it had just encoded
        those prompts. Only called on models that override :meth:`text_rows`."""
        raise NotImplementedError(
            f"reward model {type(self).__name__} overrides text_rows but not load_text_rows"
        )

    def files(self) -> list[Path]:
        """Every local file the model loaded (weights, configs, tokenizer, processor).

        Their content hashes key the score cache, so editing a checkpoint's files in place never
        returns old scores. Default: every file under :attr:`checkpoint` when it is a local
        folder (or the file itself), else nothing.
        """
        if not self.checkpoint:
            return []
        path = Path(str(self.checkpoint)).expanduser()
        if path.is_file():
            return [path]
        if path.is_dir():
            return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        return []

    def describe(self) -> dict[str, Any]:
        """What the run manifest records (checkpoint, revision, truncation counts, ...)."""
        return {"id": self.id, "checkpoint": self.checkpoint,
                "preprocessing_version": self.preprocessing_version, "dtype": self.dtype}


class PairRewardModel(RewardModel):
    """A reward model that scores flat (image, prompt) pairs: implement :meth:`score_pairs`.

    :meth:`embed_images` keeps the preprocessed batch as the features; :meth:`score` repeats each
    image once per prompt and calls :meth:`score_pairs` in chunks of :attr:`pair_batch_size`.
    Use it for cross-encoders (an ITM head, a VQA model) whose image and text meet in one pass.
    """

    pair_batch_size: ClassVar[int] = 64

    def embed_images(self, batch: Any) -> Any:
        return batch

    @abstractmethod
    def score_pairs(self, images: Any, prompts: Sequence[str]) -> Any:
        """``n`` preprocessed images (collated like a batch) and ``n`` prompts -> ``[n]`` scores."""

    def score(self, features: Any, prompts: Sequence[Sequence[str]]) -> list[Any]:
        import numpy as np

        owner = [i for i, ps in enumerate(prompts) for _ in ps]
        flat = [p for ps in prompts for p in ps]
        out = np.empty(len(flat), dtype=np.float32)
        for lo in range(0, len(flat), self.pair_batch_size):
            hi = min(lo + self.pair_batch_size, len(flat))
            index = owner[lo:hi]
            images = _take(features, index)
            values = self.score_pairs(images, flat[lo:hi])
            if hasattr(values, "detach"):
                values = values.detach().float().cpu().numpy()
            out[lo:hi] = np.asarray(values, dtype=np.float32).reshape(-1)
        bounds = np.cumsum([0, *(len(ps) for ps in prompts)])
        return [out[bounds[i]:bounds[i + 1]] for i in range(len(prompts))]


def _take(batch: Any, index: list[int]) -> Any:
    """Rows ``index`` of a collated batch (tensor, array, dict of them, or list)."""
    if isinstance(batch, Mapping):
        return {k: _take(v, index) for k, v in batch.items()}
    if isinstance(batch, list):
        return [batch[i] for i in index]
    if type(batch).__module__.startswith("torch"):
        import torch

        return batch[torch.as_tensor(index, device=batch.device)]
    return batch[index]


# -- normalizers --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hyperparameter:
    """A normalizer's tunable setting and the grid the calibration searches.

    :param per_model: one value per reward model (a TextNorm scale: raw rewards live on different
        scales), chosen for each model by running the normalizer on that model alone; other
        hyperparameters are chosen afterwards with those values fixed.
    :param default: the value used when nothing is tuned (default: the first grid value).
    :param simplest: the value preferred when grid points score the same (within rounding) in
        the search, e.g. 1 for a temperature, 0 for a penalty weight (default: ``default``);
        among tied points the one nearest to it wins.
    """

    name: str
    grid: tuple[float, ...]
    per_model: bool = False
    default: float | None = None
    simplest: float | None = None

    def __post_init__(self) -> None:
        if not self.grid:
            raise ValueError(f"hyperparameter '{self.name}' has an empty grid")

    @property
    def default_value(self) -> float:
        return self.grid[0] if self.default is None else self.default

    @property
    def simplest_value(self) -> float:
        return self.default_value if self.simplest is None else self.simplest

    def complexity(self, value: float) -> tuple[int, float]:
        """Sort key of a grid value: how many grid steps it is from the grid point nearest to
        :attr:`simplest_value` (then the smaller value first)."""
        grid = [float(v) for v in self.grid]
        home = min(range(len(grid)), key=lambda i: (abs(grid[i] - float(self.simplest_value)), i))
        where = grid.index(float(value)) if float(value) in grid else home
        return (abs(where - home), float(value))


class Normalizer(ABC):
    """Turns raw scores of one or more reward models into one calibrated score per image.

    Contract: :meth:`__call__` takes, for the ``N`` images of *one prompt*, ``{model: float
    [N, 1 + C]}`` (column 0: the image's own prompt; columns ``1..C``: its contrastive prompts)
    and returns float64 ``[N]``. That is all a plugin must implement.

    Optional declarations the core honours:

    - :attr:`hyperparameters`: what the leaderboard tunes (cross-validated over prompts) and
      their grids; none: nothing to tune. The constructor takes them as keyword arguments, a
      per-model one as a number or ``{model: number}``.
    - :attr:`needs_contrastive`: columns ``1..C`` are required (TextNorm).
    - :attr:`min_models` / :attr:`max_models`: how many reward models it combines.
    - :attr:`min_images`: images of one prompt it needs to mean anything (a per-prompt z-score
      needs 2); fine-tuning refuses normalizers with ``min_images > 1``.
    - :meth:`batched`: a vectorised fast path over many prompts at once.
    - :attr:`uses_uncertainty`: the core also passes the standard deviations reward models
      predict for their scores (:attr:`RewardModel.reports_uncertainty`), as the keyword
      ``uncertainty={model: float [N, 1 + C]}`` to :meth:`__call__` (``[P, N, K]`` to
      :meth:`batched`), aligned with the scores; NaN for a model that reports none.
    """

    id: ClassVar[str]
    hyperparameters: ClassVar[tuple[Hyperparameter, ...]] = ()
    needs_contrastive: ClassVar[bool] = False
    #: Its output is a probability in [0, 1] (TextNorm): calibration uses it as it is.
    outputs_probability: ClassVar[bool] = False
    #: Take ``uncertainty=`` (the models' own standard deviations) beside the scores.
    uses_uncertainty: ClassVar[bool] = False
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = None
    min_images: ClassVar[int] = 1

    def __init__(self, **values: Any):
        declared = {h.name: h for h in self.hyperparameters}
        for name in values:
            if name not in declared:
                known = ", ".join(declared) or "none"
                raise HarnessError(
                    f"normalizer '{self.id}' has no hyperparameter '{name}'."
                    f"{did_you_mean(name, declared)} Its hyperparameters: {known}"
                )
        self.values: dict[str, Any] = {h.name: h.default_value for h in self.hyperparameters}
        for name, value in values.items():
            if isinstance(value, Mapping):
                if not declared[name].per_model:
                    raise HarnessError(f"normalizer '{self.id}': '{name}' is one value, not one per model")
                self.values[name] = {str(k): float(v) for k, v in value.items()}
            else:
                self.values[name] = float(value)

    def value(self, name: str, model: str | None = None) -> float:
        """The hyperparameter ``name`` (for ``model`` when it is per model)."""
        v = self.values[name]
        if isinstance(v, Mapping):
            if model not in v:
                raise HarnessError(f"normalizer '{self.id}': no {name} given for model '{model}'")
            return float(v[model])
        return float(v)

    @abstractmethod
    def __call__(self, scores: Mapping[str, Any]) -> Any:
        """``{model: [N, 1 + C]}`` for the images of one prompt -> float64 ``[N]``."""

    def batched(self, scores: Mapping[str, np.ndarray], column_mask: np.ndarray,
                image_mask: np.ndarray) -> np.ndarray | None:
        """Optional fast path: ``{model: [P, N, K]}`` over ``P`` prompts -> float64 ``[P, N]``.

        Prompts are padded to ``N`` images and ``K = 1 + C`` columns: ``column_mask`` (bool
        ``[P, K]``) marks the columns each prompt really has (column 0 always) and ``image_mask``
        (bool ``[P, N]``) its real images; padding holds finite filler and its outputs are
        ignored. Must equal :meth:`__call__` prompt by prompt. Return None (the default) to let
        the core call :meth:`__call__` prompt by prompt. With :attr:`uses_uncertainty` the core
        adds the keyword ``uncertainty={model: [P, N, K]}``.
        """
        return None


# -- prompt sets ----------------------------------------------------------------------------------
class PromptSetGenerator(ABC):
    """Writes contrastive prompts: a prompt -> prompts that differ from it in one detail.

    The constructor takes the generator's settings as keyword arguments; the core passes only
    those the constructor declares (``data_dir`` for generators that read a benchmark's files).
    """

    id: ClassVar[str]

    @abstractmethod
    def generate(self, prompts: Sequence[str]) -> dict[str, list[str]]:
        """Prompts -> ``{prompt: [contrastive prompts]}``; every input prompt is a key."""


# -- fine-tuning ------------------------------------------------------------------------------------
@dataclass
class FineTuneSettings:
    """What the core reads from every fine-tuner's config (a fine-tuner's ``config_class``
    subclasses this dataclass and adds its own settings).

    The core composes the reward from these: ``reward`` (one reward-model spec, or a list for an
    ensemble), optionally calibrated by ``normalizer`` with ``normalizer_options`` (its
    hyperparameters) against ``contrastive_prompts`` (a generator id or a JSON file).
    """

    prompts: list[str] = field(default_factory=list)  #: training prompts (or prompts_file)
    prompts_file: str | None = None
    reward: str | list[str] = "pickscore"
    normalizer: str | None = None
    normalizer_options: dict[str, Any] = field(default_factory=dict)
    normalizer_scale: float | None = None  #: shorthand for normalizer_options: {scale: ...}
    contrastive_prompts: str = "rules"
    seed: int = 0
    output_dir: str = "runs/finetune"
    resume_from: str | None = None  #: a checkpoint folder, or "latest"
    device: str | None = None

    def validate(self) -> None:
        """Raise :class:`HarnessError` naming the key of any impossible value (a value of the
        wrong type first: ``prompts: a cat`` or ``use_lora: 'false'``)."""
        from harness.config import check_types

        check_types(self)
        if not self.prompts and not self.prompts_file:
            raise HarnessError("config needs training 'prompts' (a list) or a 'prompts_file'")

    def reward_specs(self) -> list[str]:
        return [self.reward] if isinstance(self.reward, str) else list(self.reward)

    def training_prompts(self) -> list[str]:
        prompts = list(self.prompts)
        if self.prompts_file:
            path = Path(self.prompts_file).expanduser()
            try:
                prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
            except OSError as exc:
                raise HarnessError(f"cannot read prompts_file '{path}': {exc.strerror}") from exc
        if not prompts:
            raise HarnessError("no training prompts (the prompt set is empty)")
        return prompts


@dataclass
class FineTuneResult:
    """What :meth:`FineTuner.train` returns."""

    output_dir: str
    checkpoints: list[str] = field(default_factory=list)  #: folders, oldest first
    log: list[dict[str, Any]] = field(default_factory=list)  #: one record per epoch
    selected: dict[str, Any] | None = None  #: a checkpoint-selection rule's choice, if any


class FineTuner(ABC):
    """Fine-tunes a text-to-image model against a reward.

    :attr:`config_class` is a :class:`FineTuneSettings` dataclass holding every setting; the core
    builds it from YAML (``harness finetune ID --config run.yaml``), builds the reward from it,
    and calls :meth:`train`. Under Ray Train every worker calls :meth:`train` inside an
    initialised ``torch.distributed`` group; a fine-tuner that shards work reads the rank there.
    """

    id: ClassVar[str]
    config_class: ClassVar[type[FineTuneSettings]] = FineTuneSettings

    @abstractmethod
    def train(
        self,
        config: FineTuneSettings,
        reward: Callable[[Sequence[Any], Sequence[str]], Any],
        *,
        progress: bool = False,
        on_checkpoint: Callable[[Path | None, dict[str, Any]], None] | None = None,
    ) -> FineTuneResult:
        """Train; ``reward(images, prompts) -> float64 [B]``.

        :param on_checkpoint: called after every epoch, on every worker, with the checkpoint
            folder this worker wrote for it (None when it wrote none) and the epoch's log (Ray
            Train reports it; under Ray every worker must call it for every epoch).
        """

    def check_workers(self, config: FineTuneSettings, workers: int) -> None:
        """Refuse a data-parallel run of ``workers`` workers this config cannot split (Ray Train).

        Default: any number of workers is fine."""
        return None

    def result(self, config: FineTuneSettings) -> FineTuneResult:
        """What a finished run left in ``config.output_dir`` (its log, checkpoints, selected
        checkpoint): the Ray Train launcher returns it, since the workers' own return values stay
        on the workers. Default: the output folder alone."""
        return FineTuneResult(output_dir=str(config.output_dir))


# -- benchmarks -------------------------------------------------------------------------------------
#: The label families a benchmark can have.
FAMILIES = ("per_image", "preference")
#: Per-image metrics per prompt (then the mean over prompts) -- the TIA2 family.
PROMPT_METRICS = ("auroc", "auprc", "ap5", "ap10", "ap25", "spearman", "kendall")
#: Per-image metrics over all images of a subset at once.
POOLED_METRICS = ("auroc", "auprc", "spearman", "kendall", "pearson", "pairwise_acc")
#: Preference metrics: accuracy under the protocol's tie rule, and with tied human pairs dropped.
PREFERENCE_METRICS = ("accuracy", "accuracy_ties_dropped")
#: How a preference benchmark's ``accuracy`` treats ties.
TIE_RULES = {
    "skip": "human ties skipped; a model tie counts as wrong; pooled over all pairs",
    "inversions": "per prompt 1 - discordant pairs / all pairs (human and model ties are never "
                  "discordant), then the mean over prompts",
    "threshold": "the model predicts a tie when |p_a - p_b| <= t (p: softmax of the two scores), "
                 "t chosen on the validation split; 1 for the right call, 1/2 when either side "
                 "is a tie, else 0",
}


@dataclass(frozen=True)
class Protocol:
    """How a benchmark's numbers are computed: printed next to every number, recorded in the
    run manifest.

    :param family: ``per_image`` (binary and/or graded labels per image, grouped by prompt) or
        ``preference`` (pairs of images of one prompt: which is better, or a tie).
    :param grouping: ``prompt``: each metric per prompt, then the unweighted mean over prompts
        (prompts where it is undefined are dropped); ``pooled``: over all images (per-image) or all
        pairs (preference) of a subset at once. Subsets are evaluated separately (e.g. SeeTRUE's
        sources).
    :param metrics: the columns of the rows, from :data:`PROMPT_METRICS` (grouping ``prompt``),
        :data:`POOLED_METRICS` (``pooled``) or :data:`PREFERENCE_METRICS`.
    :param headline: the metric of the cross-benchmark summary.
    :param tie_rule: preference only, a key of :data:`TIE_RULES`.
    :param thresholds: the grid of the ``threshold`` tie rule.
    :param note: anything else a reader must know (e.g. "upstream labels its Pearson Spearman").
    """

    family: str = "per_image"
    grouping: str = "prompt"
    metrics: tuple[str, ...] = PROMPT_METRICS
    headline: str = "auroc"
    tie_rule: str | None = None
    thresholds: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    note: str = ""

    def problems(self) -> list[str]:
        """What is inconsistent (empty: nothing)."""
        out = []
        if self.family not in FAMILIES:
            out.append(f"family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        if self.grouping not in ("prompt", "pooled"):
            out.append(f"grouping must be prompt or pooled, got {self.grouping!r}")
        known = (PREFERENCE_METRICS if self.family == "preference"
                 else PROMPT_METRICS if self.grouping == "prompt" else POOLED_METRICS)
        bad = [m for m in self.metrics if m not in known]
        if bad or not self.metrics:
            out.append(f"metrics {bad or '(none)'} are not {self.family}/{self.grouping} metrics: "
                       f"choose from {', '.join(known)}")
        if self.headline not in self.metrics:
            out.append(f"headline {self.headline!r} is not one of its metrics")
        if self.family == "preference" and self.tie_rule not in TIE_RULES:
            out.append(f"tie_rule must be one of {', '.join(TIE_RULES)}, got {self.tie_rule!r}")
        if self.family == "preference" and self.tie_rule == "inversions" and self.grouping != "prompt":
            out.append("tie_rule inversions is per prompt: grouping must be prompt")
        return out

    def describe(self) -> str:
        """One line: what every number of the benchmark means."""
        if self.family == "preference":
            text = f"pairwise accuracy: {TIE_RULES.get(str(self.tie_rule), self.tie_rule)}"
            if "accuracy_ties_dropped" in self.metrics:
                text += "; accuracy_ties_dropped: tied human pairs dropped, a model tie wrong"
        elif self.grouping == "prompt":
            text = ("per-prompt metrics, unweighted mean over prompts with both binary classes "
                    "(AUROC ties count 1/2; Spearman and Kendall tau-b against the graded label)")
        else:
            text = ("over all images of each subset: " + ", ".join(self.metrics)
                    + " (correlations against the mean human rating; Kendall is tau-b; "
                      "pairwise_acc is tie-optimised pairwise accuracy)")
        text += f"; {'' if self.family == 'preference' else 'headline '}{self.headline}"
        text += "; intervals: percentile bootstrap over prompts"
        return text + (f"; {self.note}" if self.note else "")

    def asdict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "text": self.describe()}


@dataclass
class BenchmarkData:
    """One benchmark's annotations, as loaded (images need not exist on disk).

    ``images`` has one row per image and the columns
    ``subset, prompt_id, prompt, image, binary, graded`` (``binary``: 0/1, NaN where the
    benchmark has no binary label; ``graded``: float64 in [0, 1], e.g. a mean Likert rating mapped
    linearly, NaN where it has none; the per-annotator ``label_0, label_1, ...`` where the
    benchmark has them; ``split`` where it has several, e.g. ``test`` and ``validation``) plus
    ``path`` once images are resolved. ``image`` is the path the annotation file gives, relative
    to the images folder.

    ``pairs`` (preference benchmarks): one row per compared pair of images of one prompt, columns
    ``subset, prompt_id, image_a, image_b, label`` (1.0: ``image_a`` preferred, 0.0: ``image_b``,
    0.5: a tie) and ``split`` where ``images`` has it. ``contrastive`` maps ``(subset, prompt)``
    to the contrastive prompts the benchmark ships, if any.
    """

    benchmark: str
    images: pd.DataFrame
    contrastive: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  #: relative path -> sha256
    source: str = ""  #: where the annotations came from (a folder or a URL)
    pairs: pd.DataFrame | None = None


class Benchmark(ABC):
    """A labelled benchmark of generated images (e.g. TIA2).

    ``Benchmark(data_dir=None)``: annotations come from ``data_dir`` or are downloaded into the
    user cache.
    """

    id: ClassVar[str]
    subsets: ClassVar[tuple[str, ...]]
    description: ClassVar[str] = ""
    #: How its numbers are computed (a :class:`Protocol`; a string is the TIA2 per-prompt
    #: protocol with that note), printed under every table and recorded in the manifest.
    protocol: ClassVar[Protocol | str] = Protocol()
    #: The annotation folder's name under a data root (``--data ROOT`` of a multi-benchmark run
    #: finds it as ``ROOT/<data_folder>``); default: the id.
    data_folder: ClassVar[str | None] = None
    #: Published reference numbers: ``{method: {metric: value}}`` (or ``{subset: {...}}``), with
    #: where they come from in :attr:`protocol`'s note; shown beside the table.
    published: ClassVar[dict[str, Any]] = {}

    def __init__(self, data_dir: str | Path | None = None):
        self.data_dir = data_dir

    def check_subsets(self, subsets: Sequence[str] | None) -> list[str]:
        """The subsets to evaluate (all when None); an unknown one gets "did you mean"."""
        if not subsets:
            return list(self.subsets)
        for s in subsets:
            if s not in self.subsets:
                raise HarnessError(
                    f"benchmark '{self.id}' has no subset '{s}'.{did_you_mean(s, self.subsets)} "
                    f"Subsets: {', '.join(self.subsets)}"
                )
        return list(dict.fromkeys(subsets))

    @abstractmethod
    def load(self, subsets: Sequence[str] | None = None) -> BenchmarkData:
        """Load annotations of ``subsets`` (all when ``None``)."""

    def files_read(self) -> dict[str, str]:
        """Every annotation file read so far (relative path -> sha256): the manifest records it."""
        return {}

    def mismatched_files(self) -> list[str]:
        """Files read so far whose sha256 differs from the benchmark's card."""
        return []

    def download(self, dest: Path | None = None, images: bool = False,
                 progress: bool = True) -> dict[str, str]:
        """Fetch the benchmark's public files (``harness data download``): the annotation files,
        and with ``images`` the images where they are public, into the folder ``dest`` (None: the
        benchmark's own cache, where :meth:`load` looks without ``data_dir``). Resumable and
        checked by sha256; files already there with the right checksum are kept.

        :returns: local path -> sha256 of every file fetched or found, and with ``images`` the
            folder to pass as ``--images`` -> ``"folder"``. Default: nothing public to fetch, an
            error.
        """
        raise HarnessError(f"benchmark '{self.id}' has nothing to download; see its documentation "
                           "for where its files come from, then pass --data/--images")

    @classmethod
    def get_protocol(cls) -> Protocol:
        """:attr:`protocol` as a :class:`Protocol` (a plain string becomes its note)."""
        if isinstance(cls.protocol, Protocol):
            return cls.protocol
        return Protocol(note=str(cls.protocol or ""))

    def reported(self, subsets: Sequence[str] | None = None) -> pd.DataFrame:
        """Published per-prompt metrics: columns ``subset, method, prompt`` + metric names
        (and ``scale``/``lambda`` where the authors released tuned values). Default: none."""
        import pandas as pd

        return pd.DataFrame(columns=["subset", "method", "prompt"])

    def reported_scores(self, subsets: Sequence[str] | None = None) -> pd.DataFrame:
        """Per-image scores the authors released (e.g. TIFA's clipscore and VQA scores): columns
        ``subset, image, method, score``; the harness evaluates them with the benchmark's
        protocol into "reported" rows, exactly as it does a scored model. Default: none."""
        import pandas as pd

        return pd.DataFrame(columns=["subset", "image", "method", "score"])

    def image_path(self, root: Path, subset: str, image: str) -> Path:
        """Where ``image`` of ``subset`` lives under the images folder ``root``: by default
        ``root/<subset>/<image>`` when the benchmark has several subsets (or ``root/<subset>``
        exists), else ``root/<image>``."""
        nested = len(self.subsets) > 1 or (root / str(self.subsets[0])).is_dir()
        return root / str(subset) / image if nested else root / image

    def resolve_images(
        self, data: BenchmarkData, images_dir: str | Path, skip_missing: bool = False
    ) -> tuple[BenchmarkData, list[str]]:
        """Add a ``path`` column: ``images_dir/<subset>/<image>`` (or ``images_dir/<image>``
        for a one-subset benchmark). Returns the data (rows whose image is missing or cannot be
        read dropped when ``skip_missing``, and listed in a warning) and those files; without
        ``skip_missing`` they are an error naming the first ones. What "cannot be read" means:
        :func:`harness.images.unreadable_reason` (a folder named like the image, a broken or
        looping link, no permission, an empty file)."""
        from harness.images import log_skipped, unreadable_images, unreadable_message

        frame = data.images.copy()
        root = Path(images_dir).expanduser()
        if not root.is_dir():
            raise HarnessError(f"images folder '{root}' does not exist")
        frame["path"] = [str(self.image_path(root, str(s), str(i)))
                         for s, i in zip(frame["subset"], frame["image"], strict=True)]
        culprits = unreadable_images(frame["path"])
        if culprits and not skip_missing:
            raise HarnessError(unreadable_message(culprits, len(frame), f"images of '{self.id}'",
                                                  root))
        log_skipped({p: why for p, why in culprits.items() if why != "missing"})
        kept = frame[~frame["path"].isin(list(culprits))].reset_index(drop=True)
        return dataclasses.replace(data, images=kept), list(culprits)

