"""Build ``bundled_cloze.jsonl``: a 4-way multiple-choice cloze over the bundled evaluation slice.

Each item is the start of a document (``context``), its true next words and three distractors of about the same
length cut from other documents at word boundaries (``choices``, true one at ``label``). The bundled models never
trained on these documents (they are the corpus's test split), so a model scores above chance only by using the
context. Deterministic: ``python -m sink_modifier.tasks.make_bundled_cloze`` rewrites the same file.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

OUTPUT = Path(__file__).with_name("bundled_cloze.jsonl")
CONTEXT_CHARS = (150, 350, 550, 750)  # one item per cut point the document is long enough for
CONTINUATION_CHARS = 48
NUM_CHOICES = 4
SEED = 0
_SPACE = re.compile(r" (?=\S)")  # a word boundary inside a line: the task joins context and choice with " "


def _span(text: str, start: int, chars: int) -> str | None:
    """The words from ``start`` until at least ``chars`` characters, ending before a space (None: too short)."""
    end = next((m.start() for m in _SPACE.finditer(text, start + chars)), None)
    return None if end is None else text[start:end]


def _cut(text: str, at: int) -> int | None:
    """The first in-line word boundary at or after ``at`` (the space's index)."""
    match = _SPACE.search(text, at)
    return None if match is None else match.start()


def build(documents: list[str], seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    items = []
    for index, document in enumerate(documents):
        for chars in CONTEXT_CHARS:
            cut = _cut(document, chars)
            answer = None if cut is None else _span(document, cut + 1, CONTINUATION_CHARS)
            if answer is None or "\n" in answer:
                continue
            distractors: list[str] = []
            while len(distractors) < NUM_CHOICES - 1:
                other = rng.choice([d for j, d in enumerate(documents) if j != index])
                if len(other) < 2 * CONTINUATION_CHARS:
                    continue
                start = _cut(other, rng.randrange(len(other) - CONTINUATION_CHARS))
                span = None if start is None else _span(other, start + 1, CONTINUATION_CHARS)
                if span and "\n" not in span and span != answer and span not in distractors:
                    distractors.append(span)
            label = rng.randrange(NUM_CHOICES)
            items.append({"id": f"doc{index}_at{chars}", "context": document[:cut],
                          "choices": distractors[:label] + [answer] + distractors[label:], "label": label})
    return items


def main() -> None:
    from sink_modifier.bundled import load_eval_slice

    items = build(load_eval_slice())
    OUTPUT.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")
    print(f"{len(items)} items -> {OUTPUT}")


if __name__ == "__main__":
    main()
