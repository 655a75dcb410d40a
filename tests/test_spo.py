"""SPO: RAKE key phrases, removal draws, heads, and the train stage with ``train.loss: spo``."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch
from conftest import tiny_config

from spa.run.layout import RunLayout
from spa.training.rake import key_phrase_token_spans, key_phrases
from spa.training.spo import RemovalHead, aux_loss, draw_removals

# RAKE's worked example (Rose et al. 2010, Fig. 1.1-1.3), first two sentences
ABSTRACT = ("Compatibility of systems of linear constraints over the set of natural numbers. Criteria of "
            "compatibility of a system of linear Diophantine equations, strict inequations, and nonstrict "
            "inequations are considered.")


def test_rake_scores_the_papers_example():
    phrases = [p for p, _ in key_phrases(ABSTRACT)]
    # deg/freq: linear 5/2, diophantine 3/1, equations 3/1 -> 8.5; linear constraints 2.5 + 2 = 4.5; 2-word phrases 4
    assert phrases[0] == "linear diophantine equations" and phrases[1] == "linear constraints"
    assert set(phrases[2:5]) == {"natural numbers", "strict inequations", "nonstrict inequations"}
    assert dict(key_phrases(ABSTRACT))["compatibility"] == [(0, 13), (92, 105)]  # every occurrence


def _covered(tok, prompt, text):
    """The text each key phrase's span decodes to, read from the response's ids as training renders them."""
    from spa.models.rendering import render

    spans, n_text = key_phrase_token_spans(tok, prompt, text)
    ids = render(tok, prompt, text, finished=True)[1]
    assert n_text == len(ids) - 1  # the response's text tokens: all but the end-of-turn token
    return [tok.decode([ids[i] for i in span]).strip() for span in spans]


def test_key_phrase_token_spans_cover_the_phrases(tiny_model_dir):
    from spa.models.rendering import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    text = "Red apples and green pears grow in the orchard near the river."
    decoded = [d.replace(" ", "").lower() for d in _covered(tok, "Name fruit.", text)]
    for phrase, _ in key_phrases(text):
        assert phrase.replace(" ", "") in "".join(decoded)


@pytest.mark.parametrize("text", ["\nStarts with newline then Paris", "Photosynthesis converts light energy.",
                                  "Ünïcödé café serves naïve tourists"])
def test_key_phrase_token_spans_index_the_joint_tokenization_on_sentencepiece(text, zephyr_tok):
    """Zephyr's tokenizer splits a response tokenized alone differently from the same text after the prompt (a
    leading newline gets an extra word-boundary piece): the spans must index the ids training sees, so each
    phrase's tokens decode to exactly the phrase (before the fix, the newline case decoded to ``s with``)."""
    decoded = _covered(zephyr_tok, "Say something.", text)
    phrases = [phrase for phrase, _ in key_phrases(text)]
    assert phrases and [d.lower() for d in decoded] == phrases


def test_removal_draws_mask_whole_phrases_and_skip_short_responses():
    spans = [[[0, 1], [3], [5, 6], [8]], [[2]]]  # 4 phrases; 1 phrase
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        classes, masked, usable = draw_removals(spans, 5, gen)
        assert usable[0] == (classes[0] + 1 <= 4) and usable[1] == (classes[1] == 0)
        if usable[0]:  # exactly c + 1 whole phrases removed
            removed = [p for p in spans[0] if set(p) <= masked[0]]
            assert len(removed) == classes[0] + 1 and masked[0] == {t for p in removed for t in p}


def test_head_learns_the_number_of_removed_phrases():
    """The head with position encoding can read how many tokens were removed (the paper's heads reach
    > 90% accuracy; here on synthetic hidden states where only the kept length carries the answer)."""
    torch.manual_seed(0)
    d, n_classes = 16, 5
    head = RemovalHead(d, n_classes, 32)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    spans = [[[2 * k, 2 * k + 1] for k in range(6)]] * 32  # 6 two-token phrases in a 16-token response
    acc = 0.0
    for step in range(150):
        hidden = torch.randn(32, 20, d) * 0.1
        gen = torch.Generator().manual_seed(step)
        loss, correct, count = aux_loss(head, hidden, [4] * 32, [16] * 32, spans, n_classes, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        acc = correct / count
    assert acc >= 0.9, acc


def test_spo_training_logs_head_accuracy_and_saves_heads(tmp_path, tiny_model_dir, prefs_file):
    from spa.stages import prepare, train

    cfg = tiny_config(tmp_path / "spo", tiny_model_dir, prefs_file, train={"loss": "spo", "spo": {"width": 32, "draw": "available"}})
    prepare.run(cfg)
    res = train.run(cfg, 0)  # the seed stage: DPO + gamma * (CE_pref + CE_dispref)
    assert res.summary["loss"] == "spo"
    lay = RunLayout(cfg.run_dir)
    log = pq.read_table(lay.train_log(0)).to_pylist()
    assert all(r["spo_acc_pref"] is not None and 0 <= r["spo_acc_pref"] <= 1 for r in log)
    assert (lay.iteration(0) / "spo_heads.safetensors").exists()
    # the policy's weights carry no head: pi_0 loads as a plain causal LM with the base's keys
    from safetensors import safe_open

    with safe_open(str(lay.model(0) / "model.safetensors"), "pt") as f:
        assert not any("pref" in k for k in f.keys())
    # SPO adds gamma * CE (> 0) to DPO: the first step's loss exceeds ln 2
    assert log[0]["loss"] > 0.6931 + 1e-3
    with pytest.raises(ValueError, match="self_refine"):
        tiny_config(tmp_path / "x", tiny_model_dir, prefs_file, train={"loss": "sr+dro", "refinement": {"self_refine": False}})
