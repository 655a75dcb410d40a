"""Write verifiable-instruction tasks: short base tasks, each with 1-3 constraints a checker can verify offline.

A task is a base request ("Write a short note to a neighbour about a lost cat.") followed by the
descriptions of 1-3 constraints drawn, seeded, from IFEval's instruction registry ("Your entire
response should be in English, and in all lowercase letters. ..."); each description is built by
IFEval's own instruction class from the arguments drawn here, so the verifier
(``spa/judges/verifier.py``) checks exactly what the prompt asks. Rows are in IFEval's format
(``key``, ``prompt``, ``instruction_id_list``, ``kwargs``) plus empty ``chosen``/``rejected``, so the
same file is a prompt source for ``spa prepare`` and the task file of the verifier.

Arguments are drawn from ranges a ~100-token answer can meet (at most 3 bullets, sections or
paragraphs; word limits of 25-80). Left out: the two types whose checkers need NLTK's sentence data
(not installed offline: ``number_sentences``, ``capital_word_frequency``) and ``response_language``
(a small English model cannot answer in another language, and "answer in English" is met by every
answer). No prompt of IFEval itself is used: the base tasks are written here, and
``tests/test_verifiable_tasks.py`` checks that none of IFEval's 541 prompts contains one.

Two files: ``--out`` (the run's tasks: seed, held-out gold and prompt sets are drawn from it by
``spa prepare``) and ``--dev`` (a held-out evaluation split whose base tasks never occur in ``--out``).

    python data/verifiable_tasks.py --out runs/if/tasks.jsonl --dev runs/if/dev.jsonl --n 2000 --n-dev 300
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import random
import sys
from pathlib import Path

REQUESTS = [
    "Write a short note to a neighbour about {event}.",
    "Describe {thing} in a few sentences.",
    "Give some advice to someone who is {situation}.",
    "Explain {concept} to a ten-year-old.",
    "Write a short product description for {product}.",
    "Give a few reasons to try {activity}.",
    "Write a short poem about {thing}.",
    "Summarize why {activity} is good for people.",
    "Write a brief review of {place}.",
    "Write the opening of a story about {character}.",
    "Write a short announcement about {event}.",
    "Explain why people enjoy {activity}.",
    "Write a thank-you message to {person}.",
    "Describe a typical day for {character}.",
    "Suggest how a family could spend a weekend at {place}.",
    "Write a short speech for {event}.",
    "Tell me what you know about {concept}.",
    "Write a short letter to {person} about {activity}.",
    "Compare {thing} with {thing2} in a few sentences.",
    "Give tips for someone who is {situation}.",
]
FILLERS = {
    "event": ["a lost cat", "a street party next Saturday", "the new recycling schedule", "a power cut tonight",
              "a school bake sale", "a parcel delivered to the wrong door", "a noisy renovation", "a garden swap",
              "a charity run", "the closing of the local library", "a found bicycle", "a book club meeting",
              "a water leak in the building", "a farewell lunch", "a chess tournament", "a winter coat drive"],
    "thing": ["a rainy morning", "an old bicycle", "the sea at night", "a busy train station", "a mountain lake",
              "a bowl of soup", "a city park in autumn", "a thunderstorm", "a wooden kitchen table", "the first snow",
              "a crowded market", "a lighthouse", "a paper map", "a quiet village", "a sunflower field",
              "a second-hand bookshop", "an empty stadium", "a desert road"],
    "situation": ["starting a new job", "learning to cook", "moving to a new city", "training for a first race",
                  "trying to sleep better", "saving money for a trip", "learning a second language",
                  "looking after a puppy", "studying for an exam", "working from home", "planting a first garden",
                  "preparing for an interview"],
    "concept": ["gravity", "photosynthesis", "a budget", "recycling", "the water cycle", "how vaccines work",
                "why the sky is blue", "compound interest", "the seasons", "how bridges stay up", "electricity",
                "the food chain", "time zones", "how bees make honey", "the moon's phases", "erosion"],
    "product": ["a reusable water bottle", "a folding umbrella", "a wool blanket", "a desk lamp", "running shoes",
                "a cast-iron pan", "a kite for children", "a travel backpack", "a bird feeder", "a teapot",
                "a pair of gardening gloves", "a wind-up radio"],
    "activity": ["walking to work", "keeping a diary", "learning to swim", "growing vegetables", "cycling",
                 "reading before bed", "playing board games", "volunteering", "baking bread", "bird watching",
                 "cold showers", "drawing every day", "learning chess", "camping", "yoga", "visiting museums"],
    "place": ["a seaside town", "a small bakery", "a national park", "a science museum", "a night market",
              "a botanical garden", "a mountain hut", "a public swimming pool", "a riverside cafe", "a zoo",
              "an old castle", "a farm shop"],
    "character": ["a retired sailor", "a young beekeeper", "a lighthouse keeper", "a baker who cannot sleep",
                  "a girl who collects maps", "a clockmaker", "a lost robot", "a school bus driver",
                  "a street musician", "an old fisherman", "a nervous astronaut", "a fox in the city"],
    "person": ["a teacher", "a bus driver", "a nurse", "a grandparent", "a coach", "a neighbour", "a librarian",
               "a firefighter", "a friend who helped you move", "a mentor"],
}
FILLERS["thing2"] = FILLERS["thing"]

END_PHRASES = ["Is there anything else I can help with?", "Any other questions?", "That is all.",
               "Let me know if you have additional questions."]
FIRST_WORDS = ["today", "first", "remember", "finally", "often", "imagine"]
FORBIDDEN = ["very", "really", "also", "just", "good", "great", "many", "things"]
LETTERS = ["k", "v", "w", "y", "z", "b"]


def _word(rng: random.Random) -> str:
    from if_verifiable.ifeval.instructions_util import WORD_LIST

    return rng.choice(WORD_LIST)


# id -> arguments drawn with ``rng`` (ranges a ~100-token answer can meet)
ARGUMENTS = {
    "keywords:existence": lambda r: {"keywords": sorted({_word(r) for _ in range(r.randint(1, 2))})},
    "keywords:frequency": lambda r: {"keyword": _word(r), "frequency": r.randint(2, 3), "relation": "at least"},
    "keywords:forbidden_words": lambda r: {"forbidden_words": r.sample(FORBIDDEN, r.randint(1, 2))},
    "keywords:letter_frequency": lambda r: {"letter": r.choice(LETTERS), "let_frequency": r.randint(2, 4),
                                            "let_relation": "at least"},
    "length_constraints:number_paragraphs": lambda r: {"num_paragraphs": r.randint(2, 3)},
    "length_constraints:number_words": lambda r: r.choice([{"num_words": r.choice([25, 40, 60, 80]),
                                                            "relation": "less than"},
                                                           {"num_words": r.choice([30, 50]), "relation": "at least"}]),
    "length_constraints:nth_paragraph_first_word": lambda r: {"num_paragraphs": 2, "nth_paragraph": r.randint(1, 2),
                                                              "first_word": r.choice(FIRST_WORDS)},
    "detectable_content:number_placeholders": lambda r: {"num_placeholders": r.randint(1, 3)},
    "detectable_content:postscript": lambda r: {"postscript_marker": r.choice(["P.S.", "P.P.S"])},
    "detectable_format:number_bullet_lists": lambda r: {"num_bullets": r.randint(2, 4)},
    "detectable_format:constrained_response": lambda r: {},
    "detectable_format:number_highlighted_sections": lambda r: {"num_highlights": r.randint(1, 3)},
    "detectable_format:multiple_sections": lambda r: {"section_spliter": r.choice(["SECTION", "PART"]),
                                                      "num_sections": r.randint(2, 3)},
    "detectable_format:json_format": lambda r: {},
    "detectable_format:title": lambda r: {},
    "combination:two_responses": lambda r: {},
    "combination:repeat_prompt": lambda r: {},  # prompt_to_repeat: the base request, filled in by make_task
    "startend:end_checker": lambda r: {"end_phrase": r.choice(END_PHRASES)},
    "startend:quotation": lambda r: {},
    "change_case:english_capital": lambda r: {},
    "change_case:english_lowercase": lambda r: {},
    "punctuation:no_comma": lambda r: {},
}


def base_requests() -> list[str]:
    """Every base request: each template with each filler (``{thing2}`` never the same as ``{thing}``)."""
    out = []
    for template in REQUESTS:
        slots = [s for s in FILLERS if "{" + s + "}" in template]
        for values in itertools.product(*(FILLERS[s] for s in slots)):
            fill = dict(zip(slots, values, strict=True))
            if fill.get("thing") is not None and fill.get("thing") == fill.get("thing2"):
                continue
            out.append(template.format(**fill))
    return out


def is_dev_request(request: str, dev_share: float) -> bool:
    """Whether a base request belongs to the held-out (dev) split: a hash, so both files agree on every run."""
    return int(hashlib.sha256(request.encode()).hexdigest()[:8], 16) / 16**8 < dev_share


def make_task(request: str, rng: random.Random, key: str) -> dict:
    """One task: ``request`` with 1-3 non-conflicting constraints and their IFEval descriptions."""
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_CONFLICTS, INSTRUCTION_DICT

    ids: list[str] = []
    for _ in range(rng.choice([1, 1, 2, 2, 3])):
        free = [i for i in ARGUMENTS if i not in ids and not any(i in INSTRUCTION_CONFLICTS[j] for j in ids)]
        if free:
            ids.append(rng.choice(sorted(free)))
    kwargs, descriptions = [], []
    for instruction_id in ids:
        args = ARGUMENTS[instruction_id](rng)
        if instruction_id == "combination:repeat_prompt":
            args = {"prompt_to_repeat": request}
        checker = INSTRUCTION_DICT[instruction_id](instruction_id)
        descriptions.append(checker.build_description(**args))
        kwargs.append(args)
    return {"key": key, "prompt": " ".join([request, *descriptions]), "instruction_id_list": ids, "kwargs": kwargs,
            "chosen": "", "rejected": ""}


def make_tasks(n: int, seed: int, dev: bool, dev_share: float = 0.15) -> list[dict]:
    """``n`` tasks from the training (``dev=False``) or held-out base requests, distinct prompts, seeded."""
    rng = random.Random(seed)
    pool = [r for r in base_requests() if is_dev_request(r, dev_share) == dev]
    rows, seen = [], set()
    split = "dev" if dev else "task"
    while len(rows) < n:
        if len(seen) >= len(pool) * 40:
            raise ValueError(f"asked for {n} distinct tasks from {len(pool)} base requests: ask for fewer")
        row = make_task(rng.choice(pool), rng, f"{split}-{seed}-{len(rows)}")
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    return rows


def write_jsonl(rows: list[dict], path: Path) -> None:
    """Atomically: a temporary file beside ``path``, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the tasks of the run (JSONL)")
    parser.add_argument("--dev", type=Path, help="the held-out evaluation split (JSONL)")
    parser.add_argument("--n", type=int, default=2000, help="tasks in --out")
    parser.add_argument("--n-dev", type=int, default=300, help="tasks in --dev")
    parser.add_argument("--seed", type=int, default=0)
    ns = parser.parse_args(argv)
    try:
        write_jsonl(make_tasks(ns.n, ns.seed, dev=False), ns.out)
        if ns.dev:
            write_jsonl(make_tasks(ns.n_dev, ns.seed + 1, dev=True), ns.dev)
    except (ValueError, ImportError) as exc:
        print(f"verifiable_tasks.py: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {ns.n} tasks to {ns.out}" + (f" and {ns.n_dev} to {ns.dev}" if ns.dev else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
