"""The contracts every plugin implements, as abstract base classes.

Shapes use ``B`` for images in a batch, ``P`` for prompts per image and ``D`` for feature
dimensions. Scores are ``float32`` unless a docstring says otherwise. Nothing here imports torch:
reward models may return ``torch.Tensor`` or ``numpy.ndarray`` of the documented shape.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # pandas is imported by the code that builds the frames, not by plugin loading
    import pandas as pd


class RewardModel(ABC):
    """Scores image-prompt pairs.

    Construction loads a real checkpoint: ``Model(checkpoint=hub_id_or_path, device=..., dtype=...)``.
    Scoring is split in two so that an image scored against its prompt and 32 contrastive prompts
    costs one image encode:

    1. :meth:`preprocess` turns one ``PIL.Image`` into a model input; it runs in data-loader
       workers, so it must be picklable and must not touch the GPU.
    2. :meth:`embed_images` encodes a collated batch once: ``B`` inputs -> features (any
       structure whose first dimension is ``B``).
    3. :meth:`score` scores cached features against prompts: ``features`` for ``B`` images and
       ``prompts`` a list of ``B`` lists of strings -> a list of ``B`` float arrays, the ``i``-th of
       length ``len(prompts[i])``. Higher means better aligned.
    """

    id: ClassVar[str]
    #: Bump when :meth:`preprocess` changes numerically: it keys the score cache.
    preprocessing_version: ClassVar[str] = "1"
    default_checkpoint: ClassVar[str | None] = None
    #: A Ray runtime_env for this model's actors (pip requirements, env vars), so models with
    #: conflicting dependencies can run side by side on one cluster. None: the driver's env.
    ray_runtime_env: ClassVar[dict[str, Any] | None] = None

    @abstractmethod
    def preprocess(self, image: Any) -> Any:
        """One ``PIL.Image.Image`` (RGB) -> one model input (e.g. float32 ``[3, H, W]``)."""

    def preprocessor(self) -> Any:
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
        """Features of ``B`` images and ``B`` prompt lists -> ``B`` float arrays of scores."""

    def describe(self) -> dict[str, Any]:
        """What the run manifest records: checkpoint, revision or file hash, truncation length."""
        return {"id": self.id, "preprocessing_version": self.preprocessing_version}


class Normalizer(ABC):
    """Turns raw scores of one or more reward models into one calibrated score per image.

    Input: for each model ``m``, a float array ``[N, 1 + C]``: column 0 is the image's own prompt,
    columns ``1..C`` its contrastive prompts. Output: float64 ``[N]``.
    """

    id: ClassVar[str]

    @abstractmethod
    def __call__(self, scores: dict[str, Any]) -> Any:
        """``{model_id: [N, 1 + C] array}`` -> ``[N]`` calibrated scores."""


class PromptSetGenerator(ABC):
    """Writes contrastive prompts: a prompt -> prompts that differ from it in one detail."""

    id: ClassVar[str]

    @abstractmethod
    def generate(self, prompts: Sequence[str]) -> dict[str, list[str]]:
        """Prompts -> ``{prompt: [contrastive prompts]}``; every input prompt is a key."""


class FineTuner(ABC):
    """Fine-tunes a text-to-image pipeline against a reward callable."""

    id: ClassVar[str]

    @abstractmethod
    def train(self, pipeline: Any, reward: Any, prompts: Sequence[str], config: Any) -> Any:
        """Train; returns the checkpoints written and the training log."""


@dataclass
class BenchmarkData:
    """One benchmark's annotations, as loaded (images need not exist on disk).

    ``images`` has one row per image and the columns
    ``subset, prompt_id, prompt, image, label_0, label_1, label_2, binary, graded``
    (``binary``: int8 0/1; ``graded``: float64 in [0, 1]) plus ``path`` once images are resolved.
    ``contrastive`` maps ``(subset, prompt)`` to its contrastive prompts.
    """

    benchmark: str
    images: pd.DataFrame
    contrastive: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  #: relative path -> sha256
    source: str = ""  #: where the annotations came from (a folder or a URL)


class Benchmark(ABC):
    """A labelled benchmark of generated images (e.g. TIA2).

    ``Benchmark(data_dir=None, cache_dir=None)``: annotations come from ``data_dir`` or are
    downloaded into ``cache_dir``.
    """

    id: ClassVar[str]
    subsets: ClassVar[tuple[str, ...]]
    description: ClassVar[str] = ""

    @abstractmethod
    def load(self, subsets: Sequence[str] | None = None) -> BenchmarkData:
        """Load annotations of ``subsets`` (all when ``None``)."""

    def reported(self, subsets: Sequence[str] | None = None) -> pd.DataFrame:
        """Published per-prompt metrics: columns ``subset, method, prompt`` + metric names."""
        import pandas as pd

        return pd.DataFrame()

    @abstractmethod
    def resolve_images(
        self, data: BenchmarkData, images_dir: str | Path, skip_missing: bool = False
    ) -> tuple[BenchmarkData, list[str]]:
        """Add a ``path`` column; returns the data (missing rows dropped) and the missing files."""
