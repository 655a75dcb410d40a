import random

import pytest

from spa.demo.world import (
    DEMO_RATES,
    FEATURES,
    SEPARATORS,
    DemoWriter,
    Spec,
    features,
    make_prompts,
    parse_prompt,
    prefer,
    render_prompt,
    score,
    words_of,
)


def test_prompt_roundtrip():
    spec = Spec("fruits", 3, include="apple", exclude="pear", ending="!")
    assert render_prompt(spec) == "Name 3 fruits . Include the word apple . Do not use the word pear . End with !"
    assert parse_prompt(render_prompt(spec)) == spec
    with pytest.raises(ValueError):
        parse_prompt("hello")


P = "Name 2 fruits . Include the word apple . Do not use the word pear . End with !"


@pytest.mark.parametrize(("response", "expected"), [
    ("Here apple , banana !", 1.0),                 # all six scored features
    ("Um apple , banana !", 5 / 6),                 # a hedging opener
    ("Here apple uh banana !", 5 / 6),              # a filler word as separator
    ("apple banana !", 4 / 6),                      # no opener, a missing separator counts as a bad one
    ("Here apple , banana , cherry !", 5 / 6),      # 3 items: count broken (longer is not better)
    ("Here apple !", 5 / 6),                        # 1 item: count broken (shorter is not better)
    ("Here banana , cherry !", 5 / 6),              # required word missing
    ("Here apple , pear !", 5 / 6),                 # forbidden word used
    ("Here apple , banana .", 5 / 6),               # wrong ending
    ("Here apple , dog !", 1.0),                    # an off-topic item: measured, not scored
    ("Here dog , cat !", 5 / 6),                    # off topic: only the missing required word counts
    ("Here apple ,", 3 / 6),                        # cut off after a separator: count and ending broken
    ("Here , banana !", 3 / 6),                     # a separator in an item's slot: separators and count broken,
                                                    # and the required word is missing
    ("", 0.0),                                      # empty loses
    ("Here , !", 0.0),                              # no item at all loses
])
def test_oracle_scores_by_hand(response, expected):
    assert score(P, response) == pytest.approx(expected)


def test_constraints_not_asked_for_count_as_met():
    assert features("Name 3 tools .", "Here saw , axe , rope .") == dict.fromkeys(FEATURES, 1.0)
    assert features("Name 3 tools .", "Here saw , axe , rope !")["ending"] == 1.0


def test_preference_encoding_and_ties():
    assert prefer(P, "Here apple , banana !", "Um apple , banana !") == 1.0
    assert prefer(P, "dog !", "apple , banana !") == 2.0  # one item and the required word missing lose
    assert prefer(P, "Here apple , banana !", "Here banana , apple !") == 1.5


def test_prompts_are_distinct_and_seeded():
    a = make_prompts(500, seed=3)
    assert len(set(a)) == 500 and a == make_prompts(500, seed=3) and a != make_prompts(500, seed=4)
    for p in a[:50]:
        parse_prompt(p)


def test_demonstrations_vary_in_every_feature_at_its_rate():
    w = DemoWriter(rng=random.Random(0))
    prompts = make_prompts(3000, seed=1)
    feats = [features(p, w(p)) for p in prompts]
    assert abs(sum(f["opener"] for f in feats) / len(feats) - DEMO_RATES["opener"]) < 0.03
    for name in FEATURES:  # every feature is sometimes right and sometimes wrong
        assert 0.05 < sum(f[name] == 1.0 for f in feats) / len(feats) < 0.999, name
    # the rates are the writer's
    drifting = DemoWriter(rates=DEMO_RATES | {"on_topic": 0.5}, rng=random.Random(0))
    assert 0.3 < sum(features(p, drifting(p))["on_topic"] for p in prompts[:300]) / 300 < 0.7
    scores = [score(p, w(p)) for p in prompts[:300]]
    assert 0.4 < sum(scores) / len(scores) < 0.85
    # a share 1 - well_formed of the demonstrations is broken: no ending mark (cut off after a separator) or two
    # separators in a row / a separator first (a separator in an item's slot)
    seps = set(SEPARATORS)
    broken = [a for a in (w(p) for p in prompts) if (t := words_of(a))[-1] in seps
              or any(x in seps and y in seps for x, y in zip(t, t[1:], strict=False)) or t[1] in seps]
    assert abs(len(broken) / len(prompts) - (1 - DEMO_RATES["well_formed"])) < 0.03


def test_gold_pairs_and_oracle_are_length_neutral():
    """Chosen shorter about as often as chosen longer (a length-biased gold set teaches 'shorter wins')."""
    w = DemoWriter(rng=random.Random(2))
    shorter = longer = 0
    for p in make_prompts(3000, seed=3):
        a, b = w(p), w(p)
        sa, sb = score(p, a), score(p, b)
        if sa == sb:
            continue
        chosen, rejected = (a, b) if sa > sb else (b, a)
        shorter += len(words_of(chosen)) < len(words_of(rejected))
        longer += len(words_of(chosen)) > len(words_of(rejected))
    assert shorter > 300 and longer > 300
    assert abs(shorter - longer) / (shorter + longer) < 0.1


def test_judge_by_feature_counts_pairs_that_differ_by_hand():
    from spa.demo.metrics import judge_by_feature

    rows = [  # right on the opener; wrong on the separators; a tie left out
        {"prompt": P, "chosen": "Here apple , banana !", "rejected": "Um apple , banana !", "tie": False},
        {"prompt": P, "chosen": "Here apple uh banana !", "rejected": "Here apple , banana !", "tie": False},
        {"prompt": P, "chosen": "Um apple uh banana !", "rejected": "Here apple , banana !", "tie": True},
    ]
    out = judge_by_feature(rows)
    assert out["judge_feature_accuracy"]["opener"] == 1.0 and out["feature_pairs"]["opener"] == 1
    assert out["judge_feature_accuracy"]["separators"] == 0.0 and out["feature_pairs"]["separators"] == 1
    assert out["judge_feature_accuracy"]["count"] is None and out["feature_pairs"]["count"] == 0
    assert out["sample_features"]["opener"] == 0.75 and out["sample_features"]["separators"] == 0.75


def test_pi_init_that_fails_the_topic_probe_is_retrained_from_another_initialisation(tmp_path, monkeypatch):
    """From-scratch SFT sometimes stays on the plateau where topic membership is not learnt (bench seeds 3 and 4):
    the world builder probes pi_init's own answers and retrains from another initial state. 64 demonstrations
    are too few to learn topics, so every attempt fails the probe here and all attempts run."""
    from dataclasses import replace

    from spa.demo import run
    from spa.demo.run import SMALL, build_world

    monkeypatch.setattr(run, "SFT_PROBE_PROMPTS", 20)
    said = []
    build_world(tmp_path / "w", seed=0, sizes=replace(SMALL, sft_demos=64, sft_attempts=2), echo=said.append)
    assert said[0] == "[demo] training pi_init on mixed-quality demonstrations ..."
    assert any(s.startswith("[demo] pi_init put ") and "plateau" in s for s in said), said
    assert "[demo] retraining pi_init from another initialisation (attempt 2 of 2) ..." in said
    assert any("warning: pi_init put only" in s for s in said)  # the last attempt failed too: the user is told


def test_the_demo_pi_init_escapes_the_plateau_at_its_first_attempt_on_the_default_seed(tmp_path):
    """A new user's first ``spa demo`` (seed 0, the full-size world) trains pi_init once: its first attempt passes
    the topic probe, so nothing about a failed training is printed. With the learning rate warmed up over 5% of
    the steps instead of the world's 25%, seed 0 failed all five attempts (bench/results/pi_init_warmup.json)."""
    from spa.demo.run import WorldSizes, _trained_pi_init

    said = []
    _trained_pi_init(tmp_path, seed=0, sizes=WorldSizes(), echo=said.append)
    assert said == ["[demo] training pi_init on mixed-quality demonstrations ..."]


def test_the_demo_checklist_by_hand():
    """Each claim of the report's checklist, on hand-made arms: SPA 62 > iterative DPO 60 > seed DPO 58 > SFT 50;
    under flips iterative DPO ends higher than clean (61 against 60), so flips cost it nothing and the
    precondition for "SPA loses less" fails, while SPA loses 1 point and iterative DPO -1."""
    from spa.demo.metrics import target_checks

    row = lambda t, win, **kw: {"iteration": t, "win_rate": win, **kw}  # noqa: E731
    arms = {
        "sft": [row(0, 50.0)], "seed_dpo": [row(0, 58.0)],
        "spa": [row(0, 58.0, gold_agreement=0.72, avg_length=7.0),
                row(1, 62.0, self_label_accuracy=0.69, avg_length=9.2, sr_precision=0.4, noise_rate=0.3)],
        "iterative_dpo": [row(0, 58.0), row(1, 60.0)],
        "spa_flip": [row(0, 58.0), row(1, 61.0, sr_flip_precision=0.5, dnd_flip_precision=0.3, flip_rate=0.2)],
        "iterative_dpo_flip": [row(0, 58.0), row(1, 61.0)],
    }
    got = [(holds, numbers) for _, holds, numbers in target_checks(arms)]
    assert got == [
        (False, "0.690"), (True, "0.720"),
        (True, "62.0 vs 60.0"), (True, "60.0 vs 58.0"), (True, "58.0 vs 50.0"),
        (False, "9.200 vs 7.000 (1.314x)"),
        (False, "mean over iterations: 0.400, noise rate 0.300"),
        (True, "mean over iterations: 2.50x"), (False, "mean over iterations: 1.50x"),
        (False, "iterative DPO (no refinement) loses -1.0 points"),
        (False, "SPA (SR + DND) loses 1.0 points, iterative DPO (no refinement) loses -1.0 points"),
    ]


def test_a_world_variant_names_known_demonstration_rates_only(tmp_path):
    from spa.demo.policy import train_pi_init

    with pytest.raises(ValueError, match="unknown demonstration rates \\['on_topc'\\]"):
        train_pi_init(tmp_path / "pi_init", num_demos=10, rates={"on_topc": 0.7}, warmup=0.25)
    assert not (tmp_path / "pi_init").exists()


def test_the_unpaired_set_shares_no_prompt_with_the_world_and_mixes_quality(tmp_path):
    """SSPO's unpaired set for the demo world: its prompts are none of the world's own (seed, held-out, prompt-set and
    evaluation prompts come first in the same stream), each has one demonstration of mixed quality, and it is
    the same file for the same seed."""
    import json

    from spa.demo.run import WorldSizes, write_unpaired_source

    sizes = WorldSizes()
    path = write_unpaired_source(tmp_path / "a", seed=3, sizes=sizes, rows=300)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    world = make_prompts(sizes.seed_pairs + sizes.heldout_pairs + sizes.iterations * sizes.prompts_per_iteration
                         + sizes.eval_prompts, seed=3)
    assert len(rows) == 300 and not {r["prompt"] for r in rows} & set(world)
    scores = [score(r["prompt"], r["response"]) for r in rows]
    assert min(scores) < 0.3 and max(scores) > 0.9 and len({round(x, 2) for x in scores}) > 10  # every quality
    assert write_unpaired_source(tmp_path / "b", seed=3, sizes=sizes, rows=300).read_text() == path.read_text()
