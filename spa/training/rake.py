"""RAKE key-phrase extraction (Rose et al. 2010), offline, for SPO (docs/variants.md 1.3 and 1.6, items 6 and 8).

Candidate phrases are maximal runs of content words between stopwords and punctuation; a word
scores ``deg(w) / freq(w)`` (degree = co-occurrences within candidates, its own included), a phrase
the sum of its words' scores (SPO Eq. 3). The top ``ceil(W / 3)`` distinct phrases are key phrases
(``W`` content words; RAKE's default). Written by hand: ``rake-nltk`` reads NLTK corpora at run
time, which are absent offline.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

from spa.models.rendering import prompt_text, render

# a compact English stopword list (the classic SMART/NLTK core), bundled so that nothing is downloaded
STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between both
but by can could did do does doing down during each few for from further had has have having he her here hers
herself him himself his how i if in into is it its itself just me more most my myself no nor not now of off on
once only or other our ours ourselves out over own same she should so some such than that the their theirs them
themselves then there these they this those through to too under until up very was we were what when where which
while who whom why will with would you your yours yourself yourselves also may might must shall yet ever upon
""".split())

_WORD = re.compile(r"[^\W_][\w'-]*")  # Unicode letters and digits: "naïve" is one word, not "na" and "ve"
_BREAK = re.compile(r"[.,;:!?()\[\]{}\"\n]")


def _candidates(text: str) -> list[list[tuple[str, int, int]]]:
    """Runs of content words ``(word, start, end)`` split at stopwords and punctuation."""
    phrases: list[list[tuple[str, int, int]]] = []
    current: list[tuple[str, int, int]] = []
    pos = 0
    for m in _WORD.finditer(text):
        if _BREAK.search(text, pos, m.start()) and current:
            phrases.append(current)
            current = []
        word = m.group(0).lower()
        if word in STOPWORDS:
            if current:
                phrases.append(current)
            current = []
        else:
            current.append((word, m.start(), m.end()))
        pos = m.end()
    if current:
        phrases.append(current)
    return phrases


def key_phrases(text: str) -> list[tuple[str, list[tuple[int, int]]]]:
    """Key phrases, best first, each with the character spans of every occurrence in ``text``."""
    cands = _candidates(text)
    freq: dict[str, int] = defaultdict(int)
    degree: dict[str, int] = defaultdict(int)
    for phrase in cands:
        for word, _, _ in phrase:
            freq[word] += 1
            degree[word] += len(phrase)
    spans: dict[str, list[tuple[int, int]]] = defaultdict(list)
    scores: dict[str, float] = {}
    for phrase in cands:
        key = " ".join(w for w, _, _ in phrase)
        spans[key].append((phrase[0][1], phrase[-1][2]))
        scores[key] = sum(degree[w] / freq[w] for w, _, _ in phrase)
    content_words = sum(len(p) for p in cands)
    keep = math.ceil(content_words / 3)
    ranked = sorted(scores, key=lambda k: (-scores[k], spans[k][0][0]))[:keep]
    return [(k, spans[k]) for k in ranked]


def key_phrase_token_spans(tok, prompt, text: str) -> tuple[list[list[int]], int]:
    """Per key phrase, the indices of the response tokens it covers, and the number of the response's text tokens.

    The indices are into the response's ids as :func:`spa.models.rendering.render` gives them (the joint
    tokenization of prompt + response), the ids the policy is trained on: a response tokenized alone can split
    differently (SentencePiece puts a word-boundary piece before a leading newline: one token more, and every
    span one token late). Character offsets come from the same joint tokenization.
    """
    head = prompt_text(tok, prompt)
    _, r_ids = render(tok, prompt, text, finished=False)
    joint = tok(head + text, add_special_tokens=False, return_offsets_mapping=True)
    skip = len(tok(head, add_special_tokens=False)["input_ids"])
    if joint["input_ids"][skip:] == r_ids:  # the usual case: the response's ids are the tail of the joint ones
        offsets = [(s - len(head), e - len(head)) for s, e in joint["offset_mapping"][skip:]]
    else:  # render fell back to the response's own ids (a token would span the prompt's end)
        own = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = own["offset_mapping"]
    out = []
    for _, char_spans in key_phrases(text):
        idx = sorted({i for i, (s, e) in enumerate(offsets) for a, b in char_spans if s < b and e > a and e > s})
        if idx:
            out.append(idx)
    return out, len(r_ids)
