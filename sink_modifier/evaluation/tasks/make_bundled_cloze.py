"""Build ``bundled_cloze.jsonl``: a 4-way cloze over the bundled evaluation slice, for offline downstream accuracy.

Each item is the true next words of a document (``continuation``) and the starts of four documents from four
different sources of the corpus (``contexts``): the model must say which one it continues (``label``). The
choice is among contexts, not continuations (lm-eval's multiple-input form, as WinoGrande's), because the bundled
DLM is too weak for the other way round: the likelihoods of four different continuations differ by their token
frequencies far more than by the context (measured: about chance), while one continuation after its own context
beats it after another's by several nats. Items come in groups of four sharing their contexts, so a model that
ignores the context scores exactly chance, 25%. The bundled models never trained on these documents (the corpus's
test split). Deterministic: ``python -m sink_modifier.evaluation.tasks.make_bundled_cloze`` rewrites the same file.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

OUTPUT = Path(__file__).with_name("bundled_cloze.jsonl")
CONTEXT_CHARS = (100, 200, 300, 400)  # one item per cut point a document is long enough for
CONTINUATION_CHARS = 40
NUM_CHOICES = 4
SEED = 0
_SPACE = re.compile(r" (?=\S)")  # a word boundary inside a line: lm-eval joins context and continuation with " "


def source(document: str) -> str:
    """Which part of the corpus a document comes from (a heuristic; docs/corpus.md lists the sources)."""
    head, lower = document.split("\n", 1)[0], document.lower()
    if re.fullmatch(r"(\d )?[A-Z][a-z]+ \d+", head):
        return "bible"
    for name in ("sqlite", "django", "postgresql"):
        if name in lower:
            return name
    return "python" if head.startswith((".. ", ":mod:")) or "python" in lower else "other"


def _split(document: str, chars: int) -> tuple[str, str] | None:
    """(start, next words): cut at the first in-line word boundary after ``chars``; the next words run to the
    first boundary after ``CONTINUATION_CHARS`` more and stay on one line (None: the document is too short)."""
    cut = _SPACE.search(document, chars)
    if cut is None:
        return None
    end = _SPACE.search(document, cut.end() + CONTINUATION_CHARS)
    words = None if end is None else document[cut.end() : end.start()]
    return None if words is None or "\n" in words else (document[: cut.start()], words)


def _groups(candidates: list[tuple], rng: random.Random) -> list[list[tuple]]:
    """Disjoint groups of ``NUM_CHOICES`` candidates from different sources."""
    pool, groups = list(candidates), []
    while True:
        rng.shuffle(pool)
        group, seen = [], set()
        for candidate in pool:
            if candidate[-1] not in seen and len(group) < NUM_CHOICES:
                group.append(candidate)
                seen.add(candidate[-1])
        if len(group) < NUM_CHOICES:
            return groups
        groups.append(group)
        pool = [c for c in pool if c not in group]


def build(documents: list[str], seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    items = []
    for chars in CONTEXT_CHARS:
        candidates = [(index, *split, source(document)) for index, document in enumerate(documents)
                      if (split := _split(document, chars)) is not None]
        for group in _groups(candidates, rng):
            contexts = [context for _, context, _, _ in group]
            rng.shuffle(contexts)
            for index, context, continuation, _ in group:
                items.append({"id": f"doc{index}_at{chars}", "contexts": contexts, "continuation": continuation,
                              "label": contexts.index(context)})
    return items


def main() -> None:
    from sink_modifier.bundled import load_eval_slice

    items = build(load_eval_slice())
    OUTPUT.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")
    print(f"{len(items)} items -> {OUTPUT}")


if __name__ == "__main__":
    main()
