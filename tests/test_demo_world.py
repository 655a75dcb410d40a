import random

import pytest

from spa.demo.world import DemoWriter, Spec, make_prompts, parse_prompt, prefer, render_prompt, score


def test_prompt_roundtrip():
    spec = Spec("fruits", 3, include="apple", exclude="pear", ending="!")
    assert render_prompt(spec) == "Name 3 fruits . Include the word apple . Do not use the word pear . End with !"
    assert parse_prompt(render_prompt(spec)) == spec
    with pytest.raises(ValueError):
        parse_prompt("hello")


P = "Name 2 fruits . Include the word apple . Do not use the word pear . End with !"


@pytest.mark.parametrize(("response", "expected"), [
    ("apple , banana !", 1.0),                      # all 4 constraints, fully relevant
    ("apple , banana .", 0.75),                     # wrong ending
    ("apple , banana , cherry !", 0.75),            # 3 items: count broken (longer is not better)
    ("banana , cherry !", 0.75),                    # required word missing
    ("apple , pear !", 0.75),                       # forbidden word used
    ("apple , banana , nice !", 1.0 * 2 / 3),       # filler word: relevance 2/3
    ("", 0.0),                                      # empty loses
    ("dog , cat !", 0.0),                           # off-topic loses
])
def test_oracle_scores_by_hand(response, expected):
    assert score(P, response) == pytest.approx(expected)


def test_preference_encoding_and_ties():
    assert prefer(P, "apple , banana !", "dog !") == 1.0
    assert prefer(P, "dog !", "apple , banana !") == 2.0
    assert prefer(P, "apple , banana !", "banana , apple !") == 1.5


def test_prompts_are_distinct_and_seeded():
    a = make_prompts(500, seed=3)
    assert len(set(a)) == 500 and a == make_prompts(500, seed=3) and a != make_prompts(500, seed=4)
    for p in a[:50]:
        parse_prompt(p)


def test_demonstrations_are_of_mixed_quality():
    w = DemoWriter(skill=0.5, rng=random.Random(0))
    scores = [score(p, w(p)) for p in make_prompts(300, seed=1)]
    assert 0.3 < sum(scores) / len(scores) < 0.9
    assert sum(s == 1.0 for s in scores) > 30 and sum(s < 0.6 for s in scores) > 30
