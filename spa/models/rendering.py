"""The one rendering path for every stage (docs/guarantees.md, "Rendering and tokens").

Sampling, judging, training and evaluation all turn a (prompt, response) into
token ids here: the prompt through the model's own chat template with the
generation prompt, exactly one BOS, then the response tokens, then the
end-of-turn token only if the response finished (a truncated response never
gets one: docs/algorithm.md, "Truncated responses").

The response's tokens are those of the whole conversation tokenized at once, as the
model was trained and as it generates, not of the response alone: SentencePiece
tokenizers (Llama 2, Mistral, Zephyr) start a text tokenized alone with a word-boundary
piece (``'▁Hello'``) that the same text after the prompt's newline does not get
(``'Hello'``). Only where the tokenizer merges across the prompt's end (the joint ids
do not start with the prompt's ids) are the response's own ids used: generation
conditions on the prompt's ids, so a token spanning the boundary cannot occur.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from spa.errors import RenderingError  # noqa: F401 - raised here, defined without torch for the CLI

_MARKER = "\u2063SPA-RESPONSE\u2063"


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local model directory and check it has a chat template."""
    path = Path(path)
    if not path.is_dir():
        raise RenderingError(f"{path}: model directory does not exist")
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise RenderingError(f"{path}: no usable tokenizer in the model directory ({exc})") from exc
    if not getattr(tok, "chat_template", None):
        raise RenderingError(
            f"{path}: the tokenizer has no chat template; add one (tokenizer_config.json 'chat_template' "
            "or chat_template.jinja) so prompts render as the model was trained"
        )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _adds_bos_by_default(tok: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer prepends BOS itself; asked once per tokenizer (every rendered pair needs it twice)."""
    cached = getattr(tok, "_spa_adds_bos", None)
    if cached is None:
        cached = tok.bos_token_id is not None and tok("x", add_special_tokens=True)["input_ids"][:1] == [tok.bos_token_id]
        tok._spa_adds_bos = cached
    return cached


Prompt = str | Sequence[Mapping[str, str]]  # one user message, or a conversation ending with a user turn


def prompt_text(tok: PreTrainedTokenizerBase, prompt: Prompt) -> str:
    """The prompt rendered by the chat template, ending with the assistant generation prompt."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if not messages or messages[-1].get("role") != "user":
        raise RenderingError("a conversation prompt must end with a user message")
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _with_one_bos(tok: PreTrainedTokenizerBase, ids: list[int]) -> list[int]:
    bos = tok.bos_token_id
    if bos is not None and _adds_bos_by_default(tok):
        while ids and ids[0] == bos:  # template already wrote it, maybe twice (trl#1591)
            ids = ids[1:]
        ids = [bos] + ids
    return ids


def prompt_ids(tok: PreTrainedTokenizerBase, prompt: Prompt) -> list[int]:
    """Token ids of the rendered prompt with exactly one BOS (when the model uses one)."""
    return _with_one_bos(tok, tok(prompt_text(tok, prompt), add_special_tokens=False)["input_ids"])


def render(tok: PreTrainedTokenizerBase, prompt: Prompt, response: str, finished: bool = True
           ) -> tuple[list[int], list[int]]:
    """``(prompt ids, response ids)`` of one conversation: the joint tokenization of prompt + response (module
    docstring), then the end-of-turn token only when the response finished."""
    text = prompt_text(tok, prompt)
    p_ids = _with_one_bos(tok, tok(text, add_special_tokens=False)["input_ids"])
    joint = _with_one_bos(tok, tok(text + response, add_special_tokens=False)["input_ids"])
    if joint[: len(p_ids)] == p_ids:
        r_ids = joint[len(p_ids):]
    else:  # a token would span the prompt's end: the model, conditioned on the prompt's ids, cannot make it
        r_ids = tok(response, add_special_tokens=False)["input_ids"]
    return p_ids, r_ids + [eot_id(tok)] if finished else r_ids


def _find_eot_id(tok: PreTrainedTokenizerBase) -> int:
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARKER}], tokenize=False
    )
    if _MARKER not in rendered:
        raise RenderingError("the chat template drops the assistant message; cannot find its end-of-turn token")
    suffix = rendered.split(_MARKER, 1)[1]
    special = set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}) or {})
    for tid in tok(suffix, add_special_tokens=False)["input_ids"]:
        if tid in special:
            return tid
    if tok.eos_token_id is None:
        raise RenderingError("the chat template closes assistant turns without a special token and there is no EOS")
    return tok.eos_token_id


def eot_id(tok: PreTrainedTokenizerBase) -> int:
    """The token that closes an assistant turn in this chat template (e.g. ``<|im_end|>``, ``<|eot_id|>``)."""
    cached = getattr(tok, "_spa_eot_id", None)
    if cached is None:
        cached = _find_eot_id(tok)
        tok._spa_eot_id = cached
    return cached


def response_ids(tok: PreTrainedTokenizerBase, prompt: Prompt, response: str, finished: bool = True) -> list[int]:
    """The response's token ids after ``prompt`` (:func:`render`), end-of-turn token only when it finished."""
    return render(tok, prompt, response, finished)[1]


def stop_token_ids(tok: PreTrainedTokenizerBase) -> list[int]:
    """Tokens that end generation: the end-of-turn token and EOS."""
    ids = {eot_id(tok)}
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    return sorted(ids)
