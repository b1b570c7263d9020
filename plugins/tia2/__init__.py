"""The TIA2 benchmark (Kim et al., ICLR 2024): comprehensive, counting and composition subsets.

550 prompts x 50 Stable Diffusion 2.1 images, three human alignment labels per image. The
annotations come from ``data_dir`` (the layout of the authors' kykim0/TextNorm repository) or are
downloaded from that repository at the revision pinned in ``card.yaml`` beside this module and
checked against the sha256 sums recorded there. Labels: 1 aligned, 0 not aligned, -1 (rare,
undocumented) is read as "not 1". An image is aligned (``binary`` = 1) when at least two of its
three labels are 1; ``graded`` is the mean of the three labels with -1 counted as 0.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import pandas as pd

from harness.errors import HarnessError, did_you_mean
from harness.hookspecs import hookimpl
from harness.images import log_skipped, unreadable_message, unreadable_reason
from harness.io import cache_dir, fetch, read_json, sha256_file
from harness.types import PROMPT_METRICS, Benchmark, BenchmarkData, PromptSetGenerator, Protocol

log = logging.getLogger("harness.tia2")

_IMAGE_RE = re.compile(r"^image_(\d+)_(\d+)_(\d+)\.jpg$")


def _card() -> dict[str, Any]:
    """The data card beside this module: source repository, pinned revision, files and sha256."""
    from importlib import resources

    import yaml

    return yaml.safe_load(resources.files(__name__).joinpath("card.yaml").read_text(encoding="utf-8"))


def _read_json(path: Path) -> Any:
    return read_json(path, "annotation file",
                     "truncated or not JSON; re-download it or pass the original --data folder")


class TIA2(Benchmark):
    """TIA2: text-image alignment assessment with three human labels per image."""

    id: ClassVar[str] = "tia2"
    subsets: ClassVar[tuple[str, ...]] = ("comprehensive", "counting", "composition")
    description: ClassVar[str] = "TIA2 text-image alignment (550 prompts, 27,500 SD2.1 images)"
    protocol: ClassVar[Protocol] = Protocol(
        family="per_image", grouping="prompt", metrics=PROMPT_METRICS, headline="auroc",
        note="Kim et al. (ICLR 2024): binary label = majority of 3 annotators, graded = their mean; "
             "50 images per prompt")

    def __init__(
        self,
        data_dir: str | Path | None = None,
        cache: str | Path | None = None,
        base_url: str | None = None,
    ):
        self.card = _card()
        self.data_dir = Path(data_dir).expanduser() if data_dir is not None else None
        revision = self.card["source"]["revision"]
        self.base_url = (
            base_url
            or os.environ.get("HARNESS_TIA2_BASE_URL")
            or self.card["source"]["base_url"].format(revision=revision)
        )
        if not self.base_url.endswith("/"):
            self.base_url += "/"
        self.cache = Path(cache) if cache is not None else cache_dir() / "tia2" / revision[:12]
        self.expected: dict[str, str] = dict(self.card["files"])
        self.checksums: dict[str, str] = {}
        self.checksum_mismatches: list[str] = []
        if self.data_dir is not None and not self.data_dir.is_dir():
            raise HarnessError(
                f"TIA2 data folder '{self.data_dir}' does not exist or is not a folder "
                "(expected human_annotations/, prompts/ and alignment_scores/ inside it)"
            )

    @property
    def source(self) -> str:
        return str(self.data_dir) if self.data_dir is not None else self.base_url

    # -- files -----------------------------------------------------------------------------
    def files_read(self) -> dict[str, str]:
        return dict(self.checksums)

    def mismatched_files(self) -> list[str]:
        return list(self.checksum_mismatches)

    def download(self, dest: Path | None = None, images: bool = False,
                 progress: bool = True) -> dict[str, str]:
        """Fetch every annotation file of ``card.yaml`` into ``dest`` (the layout of
        kykim0/TextNorm, a ``--data`` folder; None: the cache that :meth:`load` uses), each
        checked by sha256. The images are on the authors' Google Drive, not downloadable here."""
        if images:
            raise HarnessError(
                "TIA2's images are hosted by the authors on Google Drive (see the kykim0/TextNorm "
                "README): download them by hand and pass --images DIR; `harness data download "
                "tia2` without --images fetches the annotations")
        root = Path(dest).expanduser() if dest is not None else self.cache
        out = {}
        for relpath, expected in self.expected.items():
            path = fetch(self.base_url + relpath, root / relpath, expected)
            out[str(path)] = sha256_file(path)
        return out

    def check_subsets(self, subsets: Sequence[str] | None) -> list[str]:
        if not subsets:
            return list(self.subsets)
        out = []
        for s in subsets:
            if s not in self.subsets:
                raise HarnessError(
                    f"unknown TIA2 subset '{s}'.{did_you_mean(s, self.subsets)} "
                    f"Subsets: {', '.join(self.subsets)}"
                )
            if s not in out:
                out.append(s)
        return out

    def file(self, relpath: str) -> Path:
        """Local path of one annotation file (downloaded into the cache when no data_dir)."""
        expected = self.expected.get(relpath)
        if self.data_dir is not None:
            path = self.data_dir / relpath
            if not path.is_file():
                raise HarnessError(
                    f"missing TIA2 file {path} (the --data folder must have the layout of "
                    "kykim0/TextNorm: human_annotations/, prompts/, alignment_scores/)"
                )
        else:
            path = fetch(self.base_url + relpath, self.cache / relpath, expected)
        if relpath not in self.checksums:
            digest = sha256_file(path)
            self.checksums[relpath] = digest
            if expected is not None and digest != expected:
                self.checksum_mismatches.append(relpath)
        return path

    def _read(self, relpath: str) -> tuple[Path, Any]:
        """Parse one annotation file; warn (after it parses) if it is not the released version."""
        path = self.file(relpath)
        raw = _read_json(path)
        if relpath in self.checksum_mismatches:
            log.warning(
                "TIA2 file %s differs from the released version (sha256 %s, expected %s)",
                path, self.checksums[relpath][:12], self.expected[relpath][:12],
            )
        return path, raw

    # -- annotations -----------------------------------------------------------------------
    def load(self, subsets: Sequence[str] | None = None) -> BenchmarkData:
        import pandas as pd

        frames = []
        contrastive: dict[tuple[str, str], list[str]] = {}
        for subset in self.check_subsets(subsets):
            frames.append(self._load_labels(subset))
            contrastive.update(self._load_prompt_sets(subset))
        images = pd.concat(frames, ignore_index=True)
        images["subset"] = pd.Categorical(images["subset"], categories=list(self.subsets))
        missing_sets = sorted(
            {(s, p) for s, p in zip(images["subset"], images["prompt"], strict=True)}
            - set(contrastive)
        )
        if missing_sets:
            s, p = missing_sets[0]
            log.warning("%d TIA2 prompts have no contrastive prompt set, e.g. %s: %r",
                        len(missing_sets), s, p)
        return BenchmarkData(
            benchmark=self.id,
            images=images,
            contrastive=contrastive,
            files=dict(self.checksums),
            source=self.source,
        )

    def _load_labels(self, subset: str) -> pd.DataFrame:
        import numpy as np
        import pandas as pd

        path, raw = self._read(f"human_annotations/human_labels_{subset}.json")
        if not isinstance(raw, dict) or not raw:
            raise HarnessError(f"malformed annotation file {path}: expected a non-empty object")
        rows = []
        for name, entry in raw.items():
            m = _IMAGE_RE.match(name)
            labels = entry.get("human_labels") if isinstance(entry, dict) else None
            caption = entry.get("caption") if isinstance(entry, dict) else None
            if (
                m is None
                or not isinstance(caption, str)
                or not isinstance(labels, list)
                or len(labels) != 3
                or any(lab not in (-1, 0, 1) or isinstance(lab, bool) for lab in labels)
            ):
                raise HarnessError(
                    f"malformed annotation file {path}: entry '{name}' must be "
                    "image_<p>_<j>_<k>.jpg -> {caption: str, human_labels: [3 x -1/0/1]}"
                )
            rows.append((int(m[1]), int(m[2]), int(m[3]), name, caption, *labels))
        df = pd.DataFrame(
            rows, columns=["prompt_id", "j", "k", "image", "prompt", "label_0", "label_1", "label_2"]
        )
        per_prompt = df.groupby("prompt_id")["prompt"].nunique()
        if (per_prompt > 1).any():
            bad = int(per_prompt[per_prompt > 1].index[0])
            raise HarnessError(f"malformed annotation file {path}: prompt {bad} has several captions")
        df = df.sort_values(["prompt_id", "j", "k"], kind="stable").reset_index(drop=True)
        labels = df[["label_0", "label_1", "label_2"]].to_numpy()
        df[["label_0", "label_1", "label_2"]] = labels.astype(np.int8)
        df["binary"] = ((labels == 1).sum(1) >= 2).astype(np.int8)
        df["graded"] = (labels == 1).mean(1).astype(np.float64)
        df.insert(0, "subset", subset)
        return df.drop(columns=["j", "k"])

    def _load_prompt_sets(self, subset: str) -> dict[tuple[str, str], list[str]]:
        path, raw = self._read(f"prompts/prompt_set_{subset}.json")
        if not isinstance(raw, dict) or not all(
            isinstance(v, list) and all(isinstance(x, str) for x in v) for v in raw.values()
        ):
            raise HarnessError(
                f"malformed prompt-set file {path}: expected {{prompt: [contrastive prompts]}}"
            )
        return {(subset, prompt): list(v) for prompt, v in raw.items()}

    def reported(self, subsets: Sequence[str] | None = None) -> pd.DataFrame:
        """The paper's released per-prompt metrics (``alignment_scores_<subset>.json``).

        :returns: long table with columns ``subset, method, prompt`` + METRICS + ``scale``,
            ``lambda`` (TextNorm's per-prompt hyperparameters; NaN for other methods).
        """
        import numpy as np
        import pandas as pd

        from harness.evaluation.metrics import METRICS

        rows = []
        for subset in self.check_subsets(subsets):
            path, raw = self._read(f"alignment_scores/alignment_scores_{subset}.json")
            if not isinstance(raw, dict):
                raise HarnessError(f"malformed metrics file {path}: expected an object")
            for prompt, methods in raw.items():
                if not isinstance(methods, dict):
                    raise HarnessError(f"malformed metrics file {path}: prompt {prompt!r}")
                for method, values in methods.items():
                    if not isinstance(values, dict):
                        continue  # e.g. "human": the share of aligned images
                    try:
                        row = {"subset": subset, "method": method, "prompt": prompt}
                        row.update({m: float(values[m]) for m in METRICS})
                    except (KeyError, TypeError, ValueError) as exc:
                        raise HarnessError(
                            f"malformed metrics file {path}: {method} of prompt {prompt!r} "
                            f"lacks a numeric {exc}"
                        ) from exc
                    row["scale"] = float(values.get("scale", np.nan))
                    row["lambda"] = float(values.get("lambda", np.nan))
                    rows.append(row)
        return pd.DataFrame(rows)

    # -- images ----------------------------------------------------------------------------
    def resolve_images(
        self, data: BenchmarkData, images_dir: str | Path, skip_missing: bool = False
    ) -> tuple[BenchmarkData, list[str]]:
        """Find every image under ``images_dir/<subset>/`` (or ``images_dir/`` for one subset).

        :returns: the data with a ``path`` column (rows whose image is missing or cannot be
            read, :func:`harness.images.unreadable_reason`, dropped when ``skip_missing`` and
            the unreadable ones listed in a warning) and those images as ``<subset>/<file>``.
        :raises HarnessError: when images are missing or unreadable and ``skip_missing`` is
            False, naming the first ones.
        """
        root = Path(images_dir).expanduser()
        if not root.is_dir():
            raise HarnessError(f"images folder '{root}' does not exist or is not a folder")
        images = data.images
        subsets = [s for s in self.subsets if (images["subset"] == s).any()]
        flat_users = [s for s in subsets if not (root / s).is_dir()]
        if len(flat_users) > 1:
            raise HarnessError(
                f"images folder '{root}' has no per-subset folders for {', '.join(flat_users)}: "
                "TIA2 file names repeat across subsets, so put each subset's images in "
                f"{root}/<subset>/"
            )
        paths: list[str | None] = []
        culprits: dict[str, str] = {}
        for s, name in zip(images["subset"], images["image"], strict=True):
            path = (root / s if s not in flat_users else root) / name
            why = unreadable_reason(path)
            if why is None:
                paths.append(str(path))
            else:
                paths.append(None)
                culprits[f"{s}/{name}"] = why
        if culprits and not skip_missing:
            raise HarnessError(unreadable_message(culprits, len(images), "TIA2 images", root))
        log_skipped({p: why for p, why in culprits.items() if why != "missing"})
        out = images.assign(path=paths)
        out = out[out["path"].notna()].reset_index(drop=True)
        resolved = BenchmarkData(
            benchmark=data.benchmark, images=out, contrastive=data.contrastive,
            files=data.files, source=data.source,
        )
        return resolved, list(culprits)


class TIA2Prompts(PromptSetGenerator):
    """The contrastive prompt sets released with TIA2 (looked up by prompt text)."""

    id: ClassVar[str] = "tia2"

    def __init__(self, data_dir: str | Path | None = None, cache: str | Path | None = None):
        bench = TIA2(data_dir, cache=cache)
        self.sets: dict[str, list[str]] = {}
        for subset in bench.subsets:
            for (_, prompt), values in bench._load_prompt_sets(subset).items():
                self.sets.setdefault(prompt, values)

    def generate(self, prompts: Sequence[str]) -> dict[str, list[str]]:
        out = {}
        for prompt in prompts:
            if prompt not in self.sets:
                raise HarnessError(
                    f"prompt {prompt!r} is not a TIA2 prompt, so it has no released contrastive "
                    "set: use the rules or llm generator"
                )
            out[prompt] = list(self.sets[prompt])
        return out


@hookimpl
def register_benchmarks(register):
    register(TIA2)


@hookimpl
def register_prompt_generators(register):
    register(TIA2Prompts)
