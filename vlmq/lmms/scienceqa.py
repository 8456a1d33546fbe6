"""Robust option-letter extraction for multiple-choice answers (paper Appendix E.1).

Models often answer a ScienceQA question with "The answer is B." or "(B) a magnet" instead
of the bare letter that lmms-eval's default ``scienceqa_img`` scoring expects, which scores a
correct answer as wrong. :func:`extract_option_letter` parses the response with regular
expressions and contextual cues and returns the single most probable option letter, or
``None`` when the response names no option or is ambiguous (two different letters asserted,
"A or B", a negated letter, ...). It never guesses: ``None`` is scored as wrong.

Strategies, tried in order; the first that finds something decides (one distinct letter ->
that letter, several -> ``None``):

1. bare letter: ``B``, ``(B)``, ``B.``, ``b``;
2. leading letter with a delimiter: ``B. magnet``, ``(B) magnet``, ``B) magnet``, ``B: magnet``;
3. answer cues: ``the answer is B``, ``Answer: (B)``, ``the correct option is B``,
   ``I choose B``, ``option B is correct``, ``B is the correct answer``, ``Answer: b.``;
4. parenthesised letters: ``... so (C).``;
5. standalone capital letters that are not an article or pronoun (``A dog`` and ``I think`` are
   not options; ``A is right`` is) and are not negated (``not A``);
6. with the choices given: the one option whose text the response contains (``magnet``).

A letter is only valid if it names an option (``A``.. the number of choices; ``A``-``E`` when
the choices are not given).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
DEFAULT_N_OPTIONS = 5  # ScienceQA has at most 5 options

# Words after a capital letter that make it an option mention rather than an article/pronoun.
_CONNECTORS = {
    "or", "and", "nor", "vs", "versus", "is", "was", "are", "seems", "would", "should", "could",
    "might", "must", "because", "since", "as", "which", "fits", "matches", "looks", "appears",
    "then", "but", "so", "correct", "right", "wrong", "incorrect",
}
_L = r"\(?([A-Z])\)?"                  # one capital letter, optionally in parentheses
_END = r"(?=$|[\s.,;:!?)\"'*])"          # what may follow the letter
_I = "(?i:{})"                          # case-insensitive cue words, case-sensitive letter

_BARE = re.compile(r"\(?([A-Za-z])\)?[.):]?")
_LEADING = re.compile(r"\(?([A-Z])(?:\)|\.|:|\s*[-\u2013\u2014])\s*\S")
_CUES = [
    # "the answer is B", "Answer: (B)", "final answer would be option B"
    re.compile(_I.format(r"\banswer\s*(?:is|:|=|would\s+be|should\s+be|will\s+be|must\s+be)?\s*"
                         r"(?:option\s+|choice\s+|letter\s+)?") + _L + _END),
    # "the correct option is B", "best choice: C"
    re.compile(_I.format(r"\b(?:correct|right|best|most\s+likely)\s+(?:option|choice|letter)\s*"
                         r"(?:is|:|=|would\s+be|should\s+be)?\s*") + _L + _END),
    # "I choose B", "I would go with (C)", "I'd pick option A"
    re.compile(_I.format(r"\bI(?:\s+would|'d)?\s+(?:choose|select|pick|go\s+with)\s+(?:option\s+|choice\s+)?")
               + _L + _END),
    # "option B is correct", "B is the correct answer", "(B) is right"
    re.compile(_I.format(r"(?:\b(?:option|choice)\s+)?") + r"(?<![A-Za-z0-9'])" + _L
               + _I.format(r"\s+is\s+(?:the\s+)?(?:correct|right|true|best)(?:\s+(?:answer|option|choice))?\b")),
]
# "Answer: b", "the answer is (c)." - a lower-case letter only right before the end/punctuation
_CUE_LOWER = re.compile(_I.format(r"\banswer\s*(?:is|:)\s*") + r"\(?([a-z])\)?(?=$|[.,;:!?)\"'])")
_PAREN = re.compile(r"\(([A-Z])\)")
_STANDALONE = re.compile(r"(?<![A-Za-z0-9'\u2019])([A-Z])(?![A-Za-z0-9'\u2019])")
_NEGATED = re.compile(r"(?i:\b(?:not|never|isn't|is\s+not|no)\s+(?:option\s+|choice\s+)?)\(?$")
_FOLLOWING_WORD = re.compile(r"\)?\s+([a-z][a-z']*)")
_PAIR = re.compile(r"(?<![A-Za-z0-9'])\(?([A-Z])\)?\s*(?:or|and|/|,|&|nor)\s*\(?([A-Z])\)?(?![A-Za-z0-9'])")


def _clean(text: str) -> str:
    text = text.replace("**", "").replace("__", "").replace("`", "")
    return " ".join(text.strip().strip("\"'").split())


def _decide(found: Sequence[str], valid: str) -> tuple[bool, str | None]:
    """(decided, letter): decided when the strategy found any valid letter."""
    letters = {c for c in found if c in valid}
    if not letters:
        return False, None
    return True, (letters.pop() if len(letters) == 1 else None)


def _listed_with_other(text: str, letter: str, valid: str) -> bool:
    """``letter`` appears in an "X or Y" / "X, Y" / "X and Y" list with another valid letter."""
    for m in _PAIR.finditer(text):
        a, b = m.group(1), m.group(2)
        if a != b and letter in (a, b) and a in valid and b in valid:
            return True
    return False


def _standalone_mentions(text: str) -> list[str]:
    out = []
    for m in _STANDALONE.finditer(text):
        if _NEGATED.search(text[: m.start()]):
            continue
        nxt = _FOLLOWING_WORD.match(text, m.end())
        if nxt and nxt.group(1) not in _CONNECTORS:
            continue  # "A dog ...", "I think ..." - an article or a pronoun
        out.append(m.group(1))
    return out


def _cue_letters(text: str) -> list[str]:
    found = [m.group(1) for rx in _CUES for m in rx.finditer(text) if not _NEGATED.search(text[: m.start(1)])]
    return found + [m.group(1).upper() for m in _CUE_LOWER.finditer(text)]


def _choice_text_matches(text: str, choices: Sequence[str]) -> list[str]:
    low = text.lower()
    hits = []
    for i, choice in enumerate(choices):
        c = " ".join(str(choice).lower().split())
        if c and re.search(r"(?<![a-z0-9])" + re.escape(c) + r"(?![a-z0-9])", low):
            hits.append(LETTERS[i])
    # an option contained in a longer matching option ("red" in "dark red") is not a second hit
    texts = {LETTERS[i]: " ".join(str(c).lower().split()) for i, c in enumerate(choices)}
    return [h for h in hits if not any(h != o and texts[h] in texts[o] for o in hits)]


def extract_option_letter(response: str, choices: Sequence[str] | None = None,
                          n_options: int | None = None) -> str | None:
    """The option letter a free-form answer names, or ``None`` (no option / ambiguous).

    Args:
        response: the model's generated text.
        choices: the option texts (enables matching the answer by content, strategy 6, and
            limits valid letters to ``len(choices)``).
        n_options: number of options when ``choices`` is not given (default 5).
    """
    if response is None:
        return None
    text = _clean(str(response))
    if not text:
        return None
    n = len(choices) if choices is not None else (n_options or DEFAULT_N_OPTIONS)
    valid = LETTERS[: max(1, min(n, len(LETTERS)))]

    m = _BARE.fullmatch(text)
    if m:
        letter = m.group(1).upper()
        return letter if letter in valid else None

    m = _LEADING.match(text)
    if m and m.group(1) in valid and not _listed_with_other(text, m.group(1), valid):
        return m.group(1)

    strategies = (
        lambda: _cue_letters(text),
        lambda: _PAREN.findall(text),
        lambda: _standalone_mentions(text),
        lambda: _choice_text_matches(text, choices) if choices is not None else [],
    )
    for strategy in strategies:
        decided, letter = _decide(strategy(), valid)
        if decided:
            if letter is not None and _listed_with_other(text, letter, valid):
                return None
            return letter
    return None
