import pytest
import torch
from conftest import copy_without_chat_template

from spa.models.loading import ModelLoadError, load_causal_lm
from spa.models.logprobs import (
    SequenceTooLongError,
    collate,
    encode_pair,
    length_sorted_batches,
    sequence_logps,
)
from spa.models.rendering import RenderingError, eot_id, load_tokenizer, prompt_ids, response_ids


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    torch.manual_seed(0)
    return load_causal_lm(tiny_model_dir, device="cpu")


def test_prompt_has_exactly_one_bos_and_generation_prompt(tok):
    ids = prompt_ids(tok, "Name three fruits.")
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")


def test_eot_only_for_finished_responses(tok):
    assert eot_id(tok) == tok.convert_tokens_to_ids("<|im_end|>")
    fin, cut = response_ids(tok, "q", "apple banana", True), response_ids(tok, "q", "apple banana", False)
    assert fin == cut + [eot_id(tok)]
    assert eot_id(tok) not in cut


def test_missing_chat_template_is_a_clear_error(tmp_path, tiny_model_dir):
    bad = copy_without_chat_template(tiny_model_dir, tmp_path / "m")
    with pytest.raises(RenderingError, match="no chat template"):
        load_tokenizer(bad)


def test_missing_model_dir(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_causal_lm(tmp_path / "none")
    with pytest.raises(RenderingError, match="does not exist"):
        load_tokenizer(tmp_path / "none")


def test_pickled_weights_are_refused(tmp_path, tiny_model_dir, model):
    import shutil

    d = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, d)
    (d / "model.safetensors").unlink()
    torch.save(model.state_dict(), d / "pytorch_model.bin")  # a pickle: must never be loaded
    with pytest.raises(ModelLoadError, match="cannot load the model safely"):
        load_causal_lm(d)


def dense_logp(model, tok, prompt, response, finished):
    """Straightforward reference: one unpadded sequence, full log-softmax."""
    p = prompt_ids(tok, prompt)
    r = response_ids(tok, prompt, response, finished)
    ids = torch.tensor([p + r])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
    return sum(logp[len(p) - 1 + i, tok_id].item() for i, tok_id in enumerate(r)), len(r)


def test_sequence_logps_match_dense_and_keep_order(model, tok):
    prompts = ["Name a fruit.", "Write a long list of numbers please", "hi"]
    responses = ["apple", "1 2 3 4 5 6 7 8 9 10", "hello there, how are you today?"]
    finished = [True, False, True]
    got, counts = sequence_logps(model, tok, prompts, responses, finished, batch_size=2)
    for i in range(3):
        want, n = dense_logp(model, tok, prompts[i], responses[i], finished[i])
        assert got[i] == pytest.approx(want, abs=1e-4)
        assert counts[i] == n
    again, _ = sequence_logps(model, tok, prompts, responses, finished, batch_size=1)
    assert again == pytest.approx(got, abs=1e-4)


def test_truncated_scoring_differs_by_the_eot_token(model, tok):
    a, na = sequence_logps(model, tok, ["q"], ["apple"], [True])
    b, nb = sequence_logps(model, tok, ["q"], ["apple"], [False])
    assert na[0] == nb[0] + 1 and a[0] < b[0]


def test_too_long_names_the_row(tok):
    limit = len(prompt_ids(tok, "p")) + 5
    with pytest.raises(SequenceTooLongError, match=rf"row 1: .*max_length={limit}"):
        [encode_pair(tok, "p", r, True, max_length=limit, row=i) for i, r in enumerate(["a", "a " * 40])]


def test_collate_masks_only_response_tokens(tok):
    e = [encode_pair(tok, "p", "apple"), encode_pair(tok, "a longer prompt", "x")]
    b = collate(e, tok.pad_token_id)
    assert b["loss_mask"].sum(-1).tolist() == [e[0].num_response_tokens, e[1].num_response_tokens]
    assert b["input_ids"].shape[1] - 1 == b["labels"].shape[1]


def test_length_sorted_batches():
    assert length_sorted_batches([3, 9, 1, 7], 2) == [[1, 3], [0, 2]]


def test_peft_adapter_directory_scores_like_its_base_at_init(tmp_path, tiny_model_dir, model, tok):
    from peft import LoraConfig, get_peft_model

    base = load_causal_lm(tiny_model_dir, device="cpu")
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded = load_causal_lm(tmp_path / "adapter", device="cpu")
    assert type(loaded).__name__ == "PeftModelForCausalLM"
    a, _ = sequence_logps(loaded, tok, ["q"], ["apple"])
    b, _ = sequence_logps(model, tok, ["q"], ["apple"])
    assert a[0] == pytest.approx(b[0], abs=1e-5)  # LoRA B starts at zero
