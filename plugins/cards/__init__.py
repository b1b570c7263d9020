"""Card-driven benchmarks: one :class:`~harness.types.Benchmark` per YAML card in ``cards/``.

Each card (``cards/<id>.yaml``) names the annotation files of a benchmark (a public repository at
a pinned commit, every file's sha256), the format that parses them (:mod:`.per_image`,
:mod:`.preference`), where the images are, the protocol of its numbers and the published
reference numbers; :mod:`.card` reads it. Built-in cards: TIFA v1.0, DSG-TIFA160, SeeTRUE,
GenAI-Bench (per-image labels), ImageReward test, HPD v2 test, Pick-a-Pic v2 (preferences).

A third-party plugin ships a card the same way, from its own ``register_benchmarks`` hook:
``register(card_benchmark(Path(__file__).parent / "mybench.yaml"))``.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from harness.hookspecs import hookimpl
from harness_plugins.cards import per_image, preference  # noqa: F401 - they register formats
from harness_plugins.cards.card import CardBenchmark, card_benchmark, read_card, register_format

__all__ = ["CardBenchmark", "card_benchmark", "read_card", "register_format"]

CARDS = Path(__file__).parent / "cards"


@cache
def builtin_benchmarks() -> tuple[type[CardBenchmark], ...]:
    """One class per built-in card, in file-name order (read once per process)."""
    return tuple(card_benchmark(path) for path in sorted(CARDS.glob("*.yaml")))


@hookimpl
def register_benchmarks(register):
    for cls in builtin_benchmarks():
        register(cls)
