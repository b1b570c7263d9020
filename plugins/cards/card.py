"""Benchmark cards: a benchmark in a known annotation format is one YAML file.

A card names where the annotation files come from (a public Git repository or a Hugging Face hub
repository, at a pinned commit), each file's upstream path and sha256, the format that parses them,
the subsets, where the images are, the :class:`~harness.types.Protocol` its numbers follow and the
published reference numbers. :func:`read_card` loads and checks one (an unknown key, a value of the
wrong type, an inconsistent protocol: one line naming the card and the key);
:func:`card_benchmark` turns it into a :class:`~harness.types.Benchmark` subclass that any plugin
registers from its ``register_benchmarks`` hook.

Formats are functions ``(files, card, subsets) -> BenchmarkData`` (``files``: the card's logical
file names -> local paths) registered with :func:`register_format`, optionally with a companion
that returns the per-image scores the authors released (``reported_scores``). A card's ``format``
is a registered name or ``module:function`` (a third-party parser, imported when first loaded).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import posixpath
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from harness.config import load_config, read_mapping
from harness.errors import HarnessError, did_you_mean
from harness.io import cache_dir, sha256_file
from harness.types import Benchmark, BenchmarkData, Protocol

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("harness.cards")

_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_ID = re.compile(r"^[a-z0-9][a-z0-9_\-]*$")
_REPO = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
SOURCE_KINDS = ("git", "hub")
REPO_TYPES = ("dataset", "model", "space")


# -- the schema ----------------------------------------------------------------------------------
@dataclass
class CardFile:
    """One file of a source: its path inside the repository and its sha256.

    ``sha256: null`` means "not known in advance": the file is pinned by the source revision only,
    its digest is recorded in the run manifest at first use and a warning says the card has none.
    """

    path: str
    sha256: str | None = None
    size: int | None = None  #: bytes, when known (progress bars, a quick sanity check)

    @property
    def name(self) -> str:
        """The upstream base name: what the file is called inside a ``--data`` folder."""
        return posixpath.basename(self.path)

    def validate(self) -> None:
        if not self.path or self.path.startswith("/") or ".." in self.path.split("/"):
            raise HarnessError(f"path {self.path!r} must be a relative path inside the repository")
        if self.sha256 is not None and not _HEX64.match(self.sha256):
            raise HarnessError(f"sha256 of {self.path} must be 64 lowercase hex digits or null, "
                               f"got {self.sha256!r}")
        if self.size is not None and self.size < 0:
            raise HarnessError(f"size of {self.path} must be a number of bytes, got {self.size}")


@dataclass
class CardSource:
    """A repository at a pinned commit: ``git`` (raw files of a public GitHub repository) or
    ``hub`` (a Hugging Face hub repository of ``repo_type``)."""

    kind: str = "git"
    repo: str = ""
    revision: str = ""  #: the full 40-hex commit
    repo_type: str = "dataset"  #: hub only: dataset, model or space
    files: dict[str, CardFile] = field(default_factory=dict)  #: images.source only

    def validate(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise HarnessError(f"kind must be one of {', '.join(SOURCE_KINDS)}, got {self.kind!r}")
        if not _REPO.match(self.repo):
            raise HarnessError(f"repo must be owner/name, got {self.repo!r}")
        if not _HEX40.match(self.revision):
            raise HarnessError(f"revision must be a full 40-hex commit (pin it), got {self.revision!r}")
        if self.repo_type not in REPO_TYPES:
            raise HarnessError(f"repo_type must be one of {', '.join(REPO_TYPES)}, "
                               f"got {self.repo_type!r}")

    def url(self) -> str:
        """A human-readable address of the repository at the revision."""
        if self.kind == "git":
            return f"https://github.com/{self.repo}/tree/{self.revision}"
        prefix = {"dataset": "datasets/", "space": "spaces/"}.get(self.repo_type, "")
        return f"https://huggingface.co/{prefix}{self.repo}/tree/{self.revision}"


@dataclass
class CardImages:
    """Where the images are. ``root``: the folder inside ``--images DIR`` that the annotation
    paths start from (e.g. an archive's top folder); formats prefix every image path with it."""

    note: str = ""  #: how to get them, for people
    layout: str = ""  #: what DIR looks like once they are there
    root: str = ""
    source: CardSource | None = None  #: what ``harness data download --images`` fetches


@dataclass
class CardPublished:
    """Reference numbers: ``values`` is ``{method: {metric: value}}``; ``source`` says where
    from (printed with the protocol)."""

    source: str = ""
    values: dict[str, Any] = field(default_factory=dict)


@dataclass
class Card:
    """One benchmark card (the YAML keys; see ``plugins/cards/cards/*.yaml``)."""

    id: str
    format: str
    source: CardSource
    files: dict[str, CardFile]
    name: str = ""
    description: str = ""
    paper: str = ""
    license: str = ""
    subsets: list[str] = field(default_factory=lambda: ["all"])
    images: CardImages = field(default_factory=CardImages)
    protocol: Protocol = field(default_factory=Protocol)
    published: CardPublished = field(default_factory=CardPublished)
    #: the folder's name under a data root (``--data ROOT`` finds ``ROOT/<data_folder>``);
    #: default: the id
    data_folder: str | None = None
    #: the card file it was read from (not a YAML key)
    path: str = field(default="", init=False, compare=False)

    def validate(self) -> None:
        if not _ID.match(self.id):
            raise HarnessError(f"id must be lowercase letters, digits, _ or -, got {self.id!r}")
        where = {"source": self.source}
        if self.images.source is not None:
            where["images.source"] = self.images.source
        for key, source in where.items():
            try:
                source.validate()
            except HarnessError as exc:
                raise HarnessError(f"{key}: {exc}") from exc
        if not self.files:
            raise HarnessError("files: list at least one annotation file")
        names = [f.name for f in self.files.values()]
        clash = sorted({n for n in names if names.count(n) > 1})
        if clash:
            raise HarnessError(f"files: two files share the base name {clash[0]!r} (a --data folder "
                               "holds files under their base names)")
        if not self.subsets or len(set(self.subsets)) != len(self.subsets) or not all(self.subsets):
            raise HarnessError(f"subsets must be a non-empty list of distinct names, got {self.subsets}")
        if ":" not in self.format and self.format not in FORMATS:
            raise HarnessError(
                f"format {self.format!r} is not a registered format.{did_you_mean(self.format, FORMATS)} "
                f"Known: {', '.join(sorted(FORMATS))}; or give module:function")
        problems = self.protocol.problems()
        if problems:
            raise HarnessError(f"protocol: {'; '.join(problems)}")

    def image(self, path: str) -> str:
        """An annotation file's image path as the harness names it: under :attr:`CardImages.root`."""
        root = self.images.root.strip("/")
        return f"{root}/{path}" if root else path

    def cache_folder(self) -> Path:
        """Where downloaded annotation files live: ``<cache>/benchmarks/<id>/<revision[:12]>``."""
        return cache_dir() / "benchmarks" / self.id / self.source.revision[:12]


def _file_specs(raw: Any, key: str) -> dict[str, CardFile]:
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise HarnessError(f"{key} must map names to {{path: ..., sha256: ...}}")
    out = {}
    for name, spec in raw.items():
        try:
            out[str(name)] = load_config(CardFile, spec)
        except HarnessError as exc:
            raise HarnessError(f"{key}.{name}: {exc}") from exc
    return out


def read_card(path: str | Path) -> Card:
    """Load and check the card at ``path``.

    :raises HarnessError: one line, ``card <path>: <problem>``, naming the key at fault.
    """
    path = Path(path).expanduser()
    try:
        raw = dict(read_mapping(path))
        missing = [k for k in ("id", "format", "source", "files") if k not in raw]
        if missing:
            raise HarnessError(f"missing key '{missing[0]}' (a card needs id, format, source and "
                               "files)")
        raw["files"] = _file_specs(raw.get("files"), "files")
        images = raw.get("images")
        if isinstance(images, dict) and isinstance(images.get("source"), dict):
            source = dict(images["source"])
            source["files"] = _file_specs(source.get("files", {}), "images.source.files")
            raw["images"] = {**images, "source": source}
        card = load_config(Card, raw)
    except HarnessError as exc:
        message = re.sub(r" See the \w+ settings in its documentation", " (see CONTRIBUTING.md, "
                         "'Adding a benchmark')", str(exc))
        message = message.replace(f"config '{path}'", "the file")
        message = re.sub(r"^(unknown )?config (key )?'", lambda m: f"{m[1] or ''}key '", message)
        raise HarnessError(f"card {path}: {message}") from exc
    protocol = card.protocol
    card.protocol = dataclasses.replace(
        protocol, metrics=tuple(protocol.metrics),
        thresholds=tuple(float(t) for t in protocol.thresholds))
    card.subsets = [str(s) for s in card.subsets]
    card.path = str(path)
    return card


# -- formats -------------------------------------------------------------------------------------
Format = Callable[[dict[str, Path], Card, list[str]], BenchmarkData]
Reported = Callable[[dict[str, Path], Card, list[str]], "pd.DataFrame"]

#: Registered annotation formats: name -> parser.
FORMATS: dict[str, Format] = {}


def register_format(name: str, reported: Reported | None = None) -> Callable[[Format], Format]:
    """Decorator: register a format parser under ``name``; ``reported`` returns the per-image
    scores the authors released (columns ``subset, image, method, score``)."""

    def wrap(fn: Format) -> Format:
        fn.reported_scores = reported  # type: ignore[attr-defined]
        FORMATS[name] = fn
        return fn

    return wrap


def format_functions(card: Card) -> tuple[Format, Reported | None]:
    """The parser of ``card.format`` and its reported-scores companion (None: none)."""
    spec = card.format
    if ":" not in spec:
        fn = FORMATS[spec]
    else:
        module, _, name = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise HarnessError(f"card {card.path or card.id}: format {spec!r} cannot be imported "
                               f"({type(exc).__name__}: {exc}); install the plugin that provides it") from exc
        if not callable(fn):
            raise HarnessError(f"card {card.path or card.id}: format {spec!r} is not a function")
    return fn, getattr(fn, "reported_scores", None)


def required_files(files: dict[str, Path], card: Card, *names: str) -> list[Path]:
    """The paths of the logical files ``names`` a format needs, or one line naming the card."""
    missing = [n for n in names if n not in files]
    if missing:
        raise HarnessError(f"card {card.path or card.id}: format {card.format!r} needs the files "
                           f"{', '.join(names)} under `files:`; {', '.join(missing)} missing")
    return [files[n] for n in names]


# -- the benchmark -------------------------------------------------------------------------------
_REQUIRED = ("subset", "prompt_id", "prompt", "image", "binary", "graded")


class CardBenchmark(Benchmark):
    """A benchmark described by a :class:`Card`; :func:`card_benchmark` makes one subclass per card.

    Annotation files come from ``data_dir`` (each under its upstream base name, as in the
    repository) or are downloaded into :meth:`Card.cache_folder` and checked by sha256. A file in
    ``data_dir`` whose sha256 differs from the card is used with a warning and listed by
    :meth:`mismatched_files` (the run manifest records it).
    """

    card: ClassVar[Card]

    def __init__(self, data_dir: str | Path | None = None):
        self.data_dir = Path(data_dir).expanduser() if data_dir is not None else None
        self.checksums: dict[str, str] = {}
        self.checksum_mismatches: list[str] = []
        self._paths: dict[str, Path] = {}
        self._warned: set[str] = set()
        if self.data_dir is not None and not self.data_dir.is_dir():
            raise HarnessError(
                f"{self.id} data folder '{self.data_dir}' does not exist or is not a folder "
                f"(expected {', '.join(f.name for f in self.card.files.values())} inside it)")

    def __reduce__(self) -> tuple[Any, ...]:
        # Generated classes cannot be found by name: rebuild from the card when unpickled.
        return _rebuild, (self.card, self.data_dir)

    @property
    def source(self) -> str:
        return str(self.data_dir) if self.data_dir is not None else self.card.source.url()

    # -- files ---------------------------------------------------------------------------------
    def files_read(self) -> dict[str, str]:
        return dict(self.checksums)

    def mismatched_files(self) -> list[str]:
        return list(self.checksum_mismatches)

    def file(self, name: str) -> Path:
        """The local path of the card's file ``name`` (downloaded when there is no data_dir)."""
        if name in self._paths:
            return self._paths[name]
        spec = self.card.files[name]
        if self.data_dir is not None:
            path = self.data_dir / spec.name
            if not path.is_file():
                raise HarnessError(
                    f"missing {self.id} file {path} (the --data folder holds {spec.path} of "
                    f"{self.card.source.repo} under its base name; `harness data download "
                    f"{self.id}` fetches it)")
        else:
            from harness_plugins.cards.download import fetch_file

            path = Path(fetch_file(self.card, name, self.card.cache_folder(), progress=False))
        digest = sha256_file(path)
        self.checksums[spec.name] = digest
        if spec.sha256 is not None and digest != spec.sha256:
            self.checksum_mismatches.append(spec.name)
        self._paths[name] = path
        return path

    def files(self) -> dict[str, Path]:
        return {name: self.file(name) for name in self.card.files}

    def _warn_mismatches(self) -> None:
        for name in self.checksum_mismatches:
            if name not in self._warned:
                self._warned.add(name)
                spec = next(f for f in self.card.files.values() if f.name == name)
                log.warning("%s file %s differs from the version the card pins (sha256 %s, "
                            "expected %s)", self.id, self._paths_by_name(name),
                            self.checksums[name][:12], str(spec.sha256)[:12])

    def _paths_by_name(self, name: str) -> Path | str:
        for key, spec in self.card.files.items():
            if spec.name == name and key in self._paths:
                return self._paths[key]
        return name

    # -- annotations ---------------------------------------------------------------------------
    def load(self, subsets: Sequence[str] | None = None) -> BenchmarkData:
        wanted = self.check_subsets(subsets)
        parse, _ = format_functions(self.card)
        data = parse(self.files(), self.card, wanted)
        self._warn_mismatches()
        if not isinstance(data, BenchmarkData):
            raise HarnessError(f"format {self.card.format!r} of {self.id} returned "
                               f"{type(data).__name__}, not BenchmarkData")
        absent = [c for c in _REQUIRED if c not in data.images.columns]
        if absent:
            raise HarnessError(f"format {self.card.format!r} of {self.id} gave no column(s) "
                               f"{', '.join(absent)}")
        subset_col = data.images["subset"].astype(str)
        unknown = sorted(set(subset_col) - set(self.subsets))
        if unknown:
            raise HarnessError(
                f"{self.id}: the annotations have rows of subset {unknown[0]!r}, which the card "
                f"{self.card.path} does not list (subsets: {', '.join(self.subsets)})")
        images = data.images[subset_col.isin(wanted).to_numpy()].reset_index(drop=True)
        images["subset"] = images["subset"].astype(str)
        pairs = data.pairs
        if pairs is not None:
            pairs = pairs[pairs["subset"].astype(str).isin(wanted).to_numpy()].reset_index(drop=True)
        return dataclasses.replace(data, benchmark=self.id, images=images, pairs=pairs,
                                   files=dict(self.checksums), source=self.source)

    def reported_scores(self, subsets: Sequence[str] | None = None) -> pd.DataFrame:
        wanted = self.check_subsets(subsets)
        _, reported = format_functions(self.card)
        if reported is None:
            return super().reported_scores(subsets)
        frame = reported(self.files(), self.card, wanted)
        self._warn_mismatches()
        return frame[frame["subset"].astype(str).isin(wanted).to_numpy()].reset_index(drop=True)

    # -- images --------------------------------------------------------------------------------
    def image_path(self, root: Path, subset: str, image: str) -> Path:
        """Flat: images are where the annotation files say, relative to ``--images``."""
        return Path(root) / image

    def download(self, dest: Path | None = None, images: bool = False,
                 progress: bool = True) -> dict[str, str]:
        """Fetch the annotation files (and with ``images`` the image archives) into ``dest``
        (None: the cache :meth:`load` reads without a data folder)."""
        from harness_plugins.cards.download import download_card

        return download_card(self.card, None if dest is None else Path(dest), images=images,
                             progress=progress)


def _rebuild(card: Card, data_dir: Path | None) -> CardBenchmark:
    return card_benchmark(card)(data_dir)


def card_benchmark(card: str | Path | Card) -> type[CardBenchmark]:
    """A :class:`CardBenchmark` subclass for ``card`` (a path to a YAML card, or a :class:`Card`)."""
    if not isinstance(card, Card):
        card = read_card(card)
    note = card.protocol.note
    if card.published.source:
        note = f"{note}; published numbers: {card.published.source}" if note else (
            f"published numbers: {card.published.source}")
    protocol = dataclasses.replace(card.protocol, note=note)
    problems = protocol.problems()
    if problems:
        raise HarnessError(f"card {card.path or card.id}: protocol: {'; '.join(problems)}")
    name = "".join(part.capitalize() for part in re.split(r"[_\-]", card.id)) + "Benchmark"
    attrs = {
        "id": card.id,
        "subsets": tuple(card.subsets),
        "description": card.description or card.name or card.id,
        "protocol": protocol,
        "published": dict(card.published.values),
        "data_folder": card.data_folder or card.id,
        "card": card,
        "__module__": __name__,
        "__doc__": f"{card.name or card.id} (from the card {card.path or card.id}).",
    }
    return type(name, (CardBenchmark,), attrs)
