"""Free-text and tag search over function cards.

One implementation serves the live executive and `soma cards search` over exported files.
Every word of the query must match somewhere in a function's name, tags, description or
examples (case-insensitive substrings, as the specification's discovery pattern does for a
single word); matches are ranked by where the words hit, name first.
"""

from __future__ import annotations

from collections.abc import Iterable

from soma_runtime.cards import FunctionCard

# How much a word counts by where it matched.
_NAME, _TAG_EXACT, _TAG, _DESCRIPTION, _EXAMPLE = 8, 6, 4, 2, 1


def _word_score(word: str, card: FunctionCard) -> int:
    if word in card.name.lower():
        return _NAME
    tags = [t.lower() for t in card.tags]
    if word in tags:
        return _TAG_EXACT
    if any(word in t for t in tags):
        return _TAG
    if word in card.description.lower():
        return _DESCRIPTION
    if any(word in example.lower() for example in card.examples):
        return _EXAMPLE
    return 0


def has_tag(card: FunctionCard, tag: str) -> bool:
    wanted = tag.lower()
    return any(t.lower() == wanted for t in card.tags)


def search_functions(
    functions: Iterable[tuple[str, FunctionCard]], query: str = "", tag: str | None = None
) -> list[tuple[str, FunctionCard]]:
    """The `(organ, card)` pairs matching every word of `query` and carrying `tag`, best first."""
    words = query.lower().split()
    scored: list[tuple[int, str, str, FunctionCard]] = []
    for organ, card in functions:
        if tag and not has_tag(card, tag):
            continue
        score = 0
        for word in words:
            hit = _word_score(word, card)
            if hit == 0:
                break
            score += hit
        else:
            scored.append((-score, card.name, organ, card))
    scored.sort(key=lambda item: (item[0], item[1]))
    return [(organ, card) for _, _, organ, card in scored]
