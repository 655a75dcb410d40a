"""``data.overlong``: the token lengths of the rows ``spa prepare`` draws, rendered as the later stages render them.

A prompt set's prompt must leave room for the response (``model.max_length - sample.max_new_tokens``: ``spa
sample`` refuses a longer one); a seed or held-out pair must fit whole, prompt + each response (``model.max_length``:
``spa seed`` refuses a longer one). Only the rows a split draws are measured, once per role, so a source far larger
than the splits costs nothing extra; a row too long for one role can still be drawn for the other. ``drop`` marks
such rows (prepare then draws the next rows of its shuffle in their place; counted, the first few named), ``fail``
raises at the first one. Lengths are those of the library's one rendering path, the ids sampling and training
will see: prompts are rendered by ``spa.models.rendering.prompt_text`` and counted as a batch, and any within one
token of the limit counted again by ``prompt_ids``; pairs go through ``spa.models.logprobs.encode_pair``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from spa.config import SPAConfig
from spa.errors import BadInput, StageInputError
from spa.run.artifacts import file_sha256

NAMED = 5  # overlong rows named (by prompt id) in the summary and the echo line, per kind
BATCH = 1024  # rows tokenized per call

Record = tuple[str, str, str, str]  # (prompt_id, prompt, chosen, rejected) of one source row


def batched(items: Iterable[Any], n: int) -> Iterator[list[Any]]:
    it = iter(items)
    while chunk := list(islice(it, n)):
        yield chunk


class Overlong:
    """Which source rows are too long for a prompt set (``prompt``) or for seed/held-out (``pair``)."""

    def __init__(self, cfg: SPAConfig, source: str, rows: int):
        from spa.models import rendering

        try:
            self.tok = rendering.load_tokenizer(cfg.model.pi_init, cfg.model.trust_remote_code)
        except BadInput as exc:  # say why prepare needs a model at all
            raise type(exc)(f"{exc} (model.pi_init: spa prepare measures token lengths with its tokenizer)") from None
        self.source, self.fail, self.max_length = source, cfg.data.overlong == "fail", cfg.model.max_length
        self.room = cfg.model.max_length - cfg.sample.max_new_tokens
        self.prompt, self.pair = np.zeros(rows, bool), np.zeros(rows, bool)  # too long for that role
        self.measured = {"prompt": np.zeros(rows, bool), "pair": np.zeros(rows, bool)}
        self.named: dict[str, list[tuple[int, str]]] = {"prompt": [], "pair": []}

    def todo(self, as_prompt: np.ndarray, as_pair: np.ndarray) -> dict[str, np.ndarray]:
        """The rows drawn for each role (boolean masks) that are not measured for it yet."""
        return {"prompt": as_prompt & ~self.measured["prompt"], "pair": as_pair & ~self.measured["pair"]}

    def measure(self, todo: dict[str, np.ndarray], records: Iterable[tuple[int, Record]]) -> bool:
        """Measure ``records`` (the rows of ``todo``, in source order) in batches; True when some are too long."""
        found = False
        for chunk in batched(records, BATCH):
            over = [(i, pid, what) for i, (pid, prompt, chosen, rejected) in chunk if todo["pair"][i]
                    for what in [self._pair(prompt, chosen, rejected)] if what]
            over += self._prompts([(i, rec[0], rec[1]) for i, rec in chunk if not todo["pair"][i]])
            for i, pid, what in sorted(over):  # source order: ``fail`` names the first offending row
                self._over("pair" if todo["pair"][i] else "prompt", i, pid, what)
            found |= bool(over)
        for kind, rows in todo.items():
            self.measured[kind] |= rows
        return found

    def _prompts(self, rows: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
        """The prompts over the room: rendered one by one, tokenized as a batch (the tokenizer's fast path).

        ``prompt_ids`` is the batch's ids of ``prompt_text`` with exactly one BOS, so at most one token longer:
        a prompt whose batch count + 1 fits is within the room, and only the others are counted exactly."""
        from spa.models import rendering

        texts = [rendering.prompt_text(self.tok, prompt) for _, _, prompt in rows]
        counts = self.tok(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"] if texts else []
        over = []
        for (i, pid, prompt), ids in zip(rows, counts, strict=True):
            if len(ids) + 1 > self.room and (n := len(rendering.prompt_ids(self.tok, prompt))) > self.room:
                over.append((i, pid, f"the prompt is {n} tokens, over model.max_length - sample.max_new_tokens "
                                     f"= {self.room}"))
        return over

    def _pair(self, prompt: str, chosen: str, rejected: str) -> str | None:
        """Why a pair does not fit ``model.max_length`` (its longer side, rendered exactly), or None."""
        from spa.models import logprobs

        for which, response in (("chosen", chosen), ("rejected", rejected)):
            n = len(logprobs.encode_pair(self.tok, prompt, response).input_ids)
            if n > self.max_length:
                return f"prompt + {which} response are {n} tokens, over model.max_length = {self.max_length}"
        return None

    def _over(self, kind: str, i: int, pid: str, what: str) -> None:
        if self.fail:
            raise StageInputError(f"{self.source}: row {i} (prompt_id {pid!r}): {what}; shorten or remove the row, "
                                  "raise model.max_length, or set data.overlong: drop")
        (self.prompt if kind == "prompt" else self.pair)[i] = True
        self.named[kind].append((i, pid))

    def report(self) -> dict[str, Any]:
        """The stage summary's fields: counts per role, and the first prompt ids (source order)."""
        ids = {kind: [pid for _, pid in sorted(rows)[:NAMED]] for kind, rows in self.named.items()}
        return {"overlong_prompts": int(self.prompt.sum()), "overlong_pairs": int(self.pair.sum()),
                "overlong_prompt_ids": ids["prompt"], "overlong_pair_ids": ids["pair"]}

    def line(self) -> str | None:
        """The echo line naming the first dropped rows, or None when none was dropped."""
        r = self.report()
        if not (r["overlong_prompts"] or r["overlong_pairs"]):
            return None

        def named(kind: str) -> str:
            more = ", ..." if r[f"overlong_{kind}s"] > NAMED else ""
            return ", ".join(r[f"overlong_{kind}_ids"]) + more if r[f"overlong_{kind}s"] else "-"

        return (f"[prepare] dropped overlong rows: {r['overlong_prompts']} prompts over {self.room} tokens from the "
                f"prompt sets ({named('prompt')}), {r['overlong_pairs']} pairs over {self.max_length} tokens from "
                f"seed/held-out ({named('pair')})")


_TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                    "chat_template*", "config.json")


def tokenizer_digest(model_dir: str) -> str | None:
    """Hash of the files a tokenizer loads from (prepare's splits depend on the lengths it measures)."""
    path = Path(model_dir)
    if not path.is_dir():
        return None
    files = sorted({f for pattern in _TOKENIZER_FILES for f in path.glob(pattern) if f.is_file()})
    return hashlib.sha256("".join(f"{f.name}:{file_sha256(f)}\n" for f in files).encode()).hexdigest()
