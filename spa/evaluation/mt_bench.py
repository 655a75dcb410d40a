"""MT-Bench (Zheng et al., NeurIPS 2023 Datasets and Benchmarks): two-turn answers, single-answer grading.

Generation: turn 1 answers the first question; turn 2 answers the second question in the
conversation ``[user q1, assistant a1, user q2]``. Grading follows FastChat's ``llm_judge``:
the ``single-v1`` prompt (``single-math-v1`` with the GPT-4 reference answer for math,
reasoning and coding) for turn 1, their ``-multi-turn`` forms for turn 2, and the rating
parsed from ``[[x]]``. The judge is

- ``python:module:function``: ``fn(question, turn, answers, reference) -> float`` in [1, 10]; or
- ``openai:<model>``: a chat-completions model behind ``evaluate.judge_endpoint`` (an
  OpenAI-compatible server) or api.openai.com, key from the environment.

One deviation from FastChat, recorded in ``eval.json``: one sampling temperature for every
category (``evaluate.temperature``), where FastChat uses per-category temperatures.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from spa.errors import AnnotatorUnavailable
from spa.evaluation.annotators import Endpoint, load_annotator
from spa.evaluation.eval_sets import MTBenchQuestion, mt_bench_judge_prompts

NEED_REFERENCE = ("math", "reasoning", "coding")  # FastChat's NEED_REF_CATS
_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_RATING_FALLBACK = re.compile(r"\[(\d+\.?\d*)\]")


@dataclass(frozen=True)
class Graded:
    score: float | None  # None: the judge's answer had no rating
    judgment: str


def parse_rating(judgment: str) -> float | None:
    """FastChat's rating parser: ``[[x]]``, else ``[x]``; ``None`` when neither is there."""
    match = _RATING.search(judgment) or _RATING_FALLBACK.search(judgment)
    if match is None:
        return None
    value = float(match.group(1))
    return value if 0 <= value <= 10 else None


def judge_messages(question: MTBenchQuestion, turn: int, answers: Sequence[str], prompts: dict[str, dict]) -> list[dict]:
    """The chat messages FastChat sends to a single-answer judge for ``turn`` (1 or 2)."""
    use_ref = question.category in NEED_REFERENCE and question.reference is not None
    name = ("single-math-v1" if use_ref else "single-v1") + ("-multi-turn" if turn == 2 else "")
    spec = prompts[name]
    fields: dict[str, str] = {}
    if turn == 1:
        fields.update(question=question.turns[0], answer=answers[0])
    else:
        fields.update(question_1=question.turns[0], question_2=question.turns[1], answer_1=answers[0],
                      answer_2=answers[1])
    if use_ref:
        assert question.reference is not None
        fields["ref_answer_1"] = question.reference[0]
        if turn == 2:
            fields["ref_answer_2"] = question.reference[1]
    return [{"role": "system", "content": spec["system_prompt"]},
            {"role": "user", "content": spec["prompt_template"].format(**fields)}]


def make_judge(spec: str, endpoint: Endpoint | None) -> Callable[[MTBenchQuestion, int, Sequence[str]], Graded]:
    """A grading function from ``python:module:function`` or ``openai:<model>``."""
    kind, _, target = spec.partition(":")
    if kind == "python":
        fn = load_annotator(spec)

        def python_judge(question: MTBenchQuestion, turn: int, answers: Sequence[str]) -> Graded:
            score = float(fn(question.turns, turn, list(answers), question.reference))
            return Graded(score if 1 <= score <= 10 else None, f"python judge: {score}")

        return python_judge
    key_env = endpoint.api_key_env if endpoint else "OPENAI_API_KEY"
    if not os.environ.get(key_env):
        raise AnnotatorUnavailable(f"the MT-Bench judge {spec!r} needs ${key_env} in the environment")
    from openai import OpenAI

    client = OpenAI(api_key=os.environ[key_env], base_url=endpoint.base_url if endpoint else None)
    model = target or (endpoint.model if endpoint else None)
    prompts = mt_bench_judge_prompts()

    def api_judge(question: MTBenchQuestion, turn: int, answers: Sequence[str]) -> Graded:
        reply = client.chat.completions.create(model=model, messages=judge_messages(question, turn, answers, prompts),
                                               temperature=0.0, max_tokens=2048)
        text = reply.choices[0].message.content or ""
        return Graded(parse_rating(text), text)

    return api_judge
