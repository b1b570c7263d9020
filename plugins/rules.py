"""Rule-based contrastive prompts: change one countable or visual detail of a prompt.

- Counting (``"a realistic photo of three cats"``): the count changed by -2, -1, +1 and +2 (counts
  below one dropped), with the right article ("a"/"an") and plural; reproduces TIA2's released
  counting sets exactly.
- Composition (``"... of an X and a Y"``): TIA2's 13-prompt template: each object alone, the
  other count combinations up to three, "an X-like Y", "a Y-like X", and a cartoon drawing.
  ``faithful=True`` (default) keeps the released wording, which drops "and" in three of the
  combinations ("two airplanes two apples"); ``faithful=False`` writes "and" everywhere.
- Colours (``"a red car"``): every other basic colour word in place of each colour, and the two
  colours swapped when a prompt names two ("a red car and a blue bus").

A prompt no rule applies to is an error naming it (contrastive sets must not be empty).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import ClassVar

from harness.errors import HarnessError
from harness.hookspecs import hookimpl
from harness.types import PromptSetGenerator

NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
           "eleven", "twelve")
COUNT_WORDS = {w: i + 1 for i, w in enumerate(NUMBERS)} | {"a": 1, "an": 1}
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white",
          "gray")
IRREGULAR_PLURALS = {
    "deer": "deer", "sheep": "sheep", "fish": "fish", "person": "people", "child": "children",
    "man": "men", "woman": "women", "mouse": "mice", "goose": "geese", "tooth": "teeth",
    "foot": "feet", "knife": "knives", "leaf": "leaves", "wolf": "wolves", "loaf": "loaves",
    "bus": "buses", "cactus": "cacti", "ox": "oxen", "potato": "potatoes", "tomato": "tomatoes",
}
IRREGULAR_SINGULARS = {v: k for k, v in IRREGULAR_PLURALS.items()}
# Words after which a noun phrase cannot continue (they end the counted phrase).
STOP_WORDS = {"of", "in", "on", "with", "and", "at", "by", "near", "under", "over", "the"}
AN_EXCEPTIONS = ("uni", "use", "one", "eu", "ewe")
SILENT_H = ("hour", "honest", "honor", "heir")


def article(word: str) -> str:
    low = word.lower()
    if low.startswith(SILENT_H):
        return "an"
    if low.startswith(AN_EXCEPTIONS):
        return "a"
    return "an" if low[:1] in "aeiou" else "a"


def pluralize(noun: str) -> str:
    """Plural of a noun phrase (its last word): ``teddy bear`` -> ``teddy bears``."""
    *head, last = noun.split()
    low = last.lower()
    if low in IRREGULAR_PLURALS:
        plural = IRREGULAR_PLURALS[low]
    elif re.search(r"(s|x|z|ch|sh)$", low):
        plural = last + "es"
    elif re.search(r"[^aeiou]y$", low):
        plural = last[:-1] + "ies"
    else:
        plural = last + "s"
    return " ".join([*head, plural])


def singularize(noun: str) -> str:
    *head, last = noun.split()
    low = last.lower()
    if low in IRREGULAR_SINGULARS:
        single = IRREGULAR_SINGULARS[low]
    elif low.endswith("ies") and len(low) > 3:
        single = last[:-3] + "y"
    elif re.search(r"(ss|x|z|ch|sh)es$", low):
        single = last[:-2]
    elif low.endswith("s") and not low.endswith("ss"):
        single = last[:-1]
    else:
        single = last
    return " ".join([*head, single])


def counted(count: int, noun: str) -> str:
    """``counted(1, "apple")`` -> ``an apple``; ``counted(3, "apple")`` -> ``three apples``."""
    if count == 1:
        return f"{article(noun)} {noun}"
    if count > len(NUMBERS):
        return f"{count} {pluralize(noun)}"
    return f"{NUMBERS[count - 1]} {pluralize(noun)}"


def parse_counted(prompt: str) -> tuple[str, list[tuple[int, str]]] | None:
    """Split ``"<prefix> <count> <noun> [and <count> <noun>]"`` -> (prefix, [(count, singular)])."""
    words = prompt.strip().split()
    for start in range(len(words)):
        phrases = _parse_phrases(words[start:])
        if phrases:
            return " ".join(words[:start]), phrases
    return None


def _parse_phrases(words: list[str]) -> list[tuple[int, str]] | None:
    phrases, i = [], 0
    while i < len(words):
        count = COUNT_WORDS.get(words[i].lower())
        if count is None:
            return None
        j = i + 1
        noun_words = []
        while j < len(words) and words[j].lower() != "and":
            w = words[j].lower()
            if w in COUNT_WORDS or w in STOP_WORDS or not re.fullmatch(r"[a-z][a-z\-']*", w):
                return None
            noun_words.append(words[j])
            j += 1
        if not noun_words:
            return None
        noun = " ".join(noun_words)
        phrases.append((count, noun if count == 1 else singularize(noun)))
        i = j + 1 if j < len(words) else j
    return phrases or None


def counting_set(prefix: str, count: int, noun: str) -> list[str]:
    lead = f"{prefix} " if prefix else ""
    return [f"{lead}{counted(c, noun)}" for c in (count - 2, count - 1, count + 1, count + 2) if c >= 1]


# TIA2's composition template, in the released order: (count of X, count of Y, joined by "and").
_COMPOSITION_TEMPLATE = (
    (2, 1, True), (1, 2, True), (2, 2, False), (3, 1, True), (1, 3, True), (3, 2, False),
    (2, 3, True), (3, 3, False),
)


def _cartoon(prefix: str) -> str:
    if "realistic photo" in prefix:
        return prefix.replace("realistic photo", "cartoon drawing")
    if "photo" in prefix:
        return prefix.replace("photo", "cartoon drawing")
    return "a cartoon drawing of"


def composition_set(prefix: str, x: str, y: str, faithful: bool = True) -> list[str]:
    lead = f"{prefix} " if prefix else ""
    out = [f"{lead}{counted(1, x)}", f"{lead}{counted(1, y)}"]
    for cx, cy, with_and in _COMPOSITION_TEMPLATE:
        joiner = " and " if (with_and or not faithful) else " "
        out.append(f"{lead}{counted(cx, x)}{joiner}{counted(cy, y)}")
    out.append(f"{lead}{article(x)} {x}-like {y}")
    out.append(f"{lead}{article(y)} {y}-like {x}")
    if faithful:  # the released sets pluralise this one item naively ("three deers")
        out.append(f"{_cartoon(prefix)} two {x}s and three {y}s".strip())
    else:
        out.append(f"{_cartoon(prefix)} {counted(2, x)} and {counted(3, y)}".strip())
    return out


def color_set(prompt: str) -> list[str]:
    words = prompt.split()
    spots = [i for i, w in enumerate(words) if w.lower().strip(".,") in COLORS]
    out = []
    for i in spots:
        current = words[i].lower().strip(".,")
        for c in COLORS:
            if c != current:
                new = list(words)
                new[i] = words[i].lower().replace(current, c)
                if i > 0 and new[i - 1].lower() in {"a", "an"}:
                    new[i - 1] = article(c) if new[i - 1].islower() else article(c).capitalize()
                out.append(" ".join(new))
    if len(spots) == 2:
        a, b = spots
        swapped = list(words)
        swapped[a], swapped[b] = words[b], words[a]
        out.append(" ".join(swapped))
    return out


class RuleBasedPrompts(PromptSetGenerator):
    """Contrastive prompts from counting, composition and colour rules (no model needed)."""

    id: ClassVar[str] = "rules"

    def __init__(self, faithful: bool = True, colors: bool = True):
        self.faithful = faithful
        self.colors = colors

    def contrast(self, prompt: str) -> list[str]:
        out: list[str] = []
        parsed = parse_counted(prompt)
        if parsed is not None:
            prefix, phrases = parsed
            if len(phrases) == 1:
                out += counting_set(prefix, *phrases[0])
            elif len(phrases) == 2 and phrases[0][0] == phrases[1][0] == 1:
                out += composition_set(prefix, phrases[0][1], phrases[1][1], self.faithful)
        if self.colors:
            out += color_set(prompt)
        seen = {prompt.strip().lower()}
        unique = []
        for p in out:
            if p.lower() not in seen:
                seen.add(p.lower())
                unique.append(p)
        return unique

    def generate(self, prompts: Sequence[str]) -> dict[str, list[str]]:
        sets = {}
        for prompt in prompts:
            found = self.contrast(prompt)
            if not found:
                raise HarnessError(
                    f"no rule applies to prompt {prompt!r} (rules handle counts, 'X and Y' "
                    "compositions and colour words): use the llm generator for it"
                )
            sets[prompt] = found
        return sets


@hookimpl
def register_prompt_generators(register):
    register(RuleBasedPrompts)
