"""An offline world with a known oracle: instructions with verifiable constraints.

Prompts come from a seeded grammar ("Name 3 fruits. Include the word red. End with !").
The oracle parses the constraints back out of the prompt text and scores a response in
[0, 1]: the share of constraints it satisfies, times its relevance (the share of its
words that belong to the topic or the instruction). Longer is never better by itself:
a surplus item breaks an exact count and an off-topic word lowers relevance.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

TOPICS: dict[str, list[str]] = {
    "fruits": "apple banana cherry grape lemon mango orange pear plum peach".split(),
    "animals": "cat dog horse cow sheep goat duck fox wolf bear".split(),
    "colours": "red green blue yellow purple pink brown black white grey".split(),
    "tools": "hammer saw drill wrench knife rope shovel ladder brush axe".split(),
    "vehicles": "car bus truck bike train boat plane tram van ship".split(),
}
FILLER = "very nice good thing stuff really maybe okay some and the".split()
ENDINGS = ["!", "."]
NUMBER_WORDS = {1: "1", 2: "2", 3: "3", 4: "4"}
MAX_ITEMS = 6


@dataclass(frozen=True)
class Spec:
    """The constraints of one prompt."""

    topic: str
    count: int
    include: str | None = None
    exclude: str | None = None
    ending: str | None = None

    def constraints(self) -> int:
        return 1 + sum(x is not None for x in (self.include, self.exclude, self.ending))


def vocabulary() -> list[str]:
    """Every word the world uses (for a word-level tokenizer)."""
    words = {w for ws in TOPICS.values() for w in ws} | set(TOPICS) | set(FILLER)
    words |= set(NUMBER_WORDS.values()) | set(ENDINGS) | {","}
    words |= set("name include the word do not use end with user assistant".split())
    words |= {w.capitalize() for w in ("name", "include", "do", "end")}
    return sorted(words)


def render_prompt(spec: Spec) -> str:
    parts = [f"Name {spec.count} {spec.topic} ."]
    if spec.include:
        parts.append(f"Include the word {spec.include} .")
    if spec.exclude:
        parts.append(f"Do not use the word {spec.exclude} .")
    if spec.ending:
        parts.append(f"End with {spec.ending}")
    return " ".join(parts)


_COUNT = re.compile(r"Name (\d) (\w+) \.")
_INCLUDE = re.compile(r"Include the word (\w+) \.")
_EXCLUDE = re.compile(r"Do not use the word (\w+) \.")
_ENDING = re.compile(r"End with ([!.])")


def parse_prompt(prompt: str) -> Spec:
    """The constraints of a grammar prompt (the oracle reads only the text)."""
    m = _COUNT.search(prompt)
    if not m or m.group(2) not in TOPICS:
        raise ValueError(f"not a demo-world prompt: {prompt!r}")
    inc, exc, end = _INCLUDE.search(prompt), _EXCLUDE.search(prompt), _ENDING.search(prompt)
    return Spec(m.group(2), int(m.group(1)), inc and inc.group(1), exc and exc.group(1), end and end.group(1))


def sample_spec(rng: random.Random) -> Spec:
    topic = rng.choice(sorted(TOPICS))
    count = rng.randint(1, 4)
    words = TOPICS[topic]
    include = rng.choice(words) if rng.random() < 0.6 else None
    exclude = rng.choice([w for w in words if w != include]) if rng.random() < 0.5 else None
    ending = rng.choice(ENDINGS) if rng.random() < 0.6 else None
    return Spec(topic, count, include, exclude, ending)


def make_prompts(n: int, seed: int) -> list[str]:
    """``n`` distinct prompts from the grammar (seeded)."""
    rng = random.Random(seed)
    out: dict[str, None] = {}
    attempts = 0
    while len(out) < n:
        out[render_prompt(sample_spec(rng))] = None
        attempts += 1
        if attempts > 100 * n:
            raise ValueError(f"the grammar has fewer than {n} distinct prompts")
    return list(out)


def words_of(response: str) -> list[str]:
    return re.findall(r"[\w]+|[!.,]", response)


def score(prompt: str, response: str) -> float:
    """Oracle score in [0, 1]: satisfied share of the constraints x relevance."""
    spec = parse_prompt(prompt)
    tokens = words_of(response)
    content = [w for w in tokens if w not in ("!", ".", ",")]
    topic_words = set(TOPICS[spec.topic])
    items = [w for w in content if w in topic_words]
    if not items:
        return 0.0  # empty or off-topic answers lose
    satisfied = int(len(items) == spec.count)
    if spec.include:
        satisfied += spec.include in items
    if spec.exclude:
        satisfied += spec.exclude not in content
    if spec.ending:
        satisfied += bool(tokens) and tokens[-1] == spec.ending
    relevance = len(items) / len(content)
    return satisfied / spec.constraints() * relevance


def prefer(prompt: str, response_1: str, response_2: str) -> float:
    """alpaca-eval's preference encoding: 1 if the first wins, 2 if the second wins, 1.5 for a tie."""
    s1, s2 = score(prompt, response_1), score(prompt, response_2)
    return 1.0 if s1 > s2 else 2.0 if s2 > s1 else 1.5


@dataclass
class DemoWriter:
    """Demonstrations of mixed quality: each constraint is kept only with probability ``skill``."""

    skill: float = 0.5
    rng: random.Random = field(default_factory=lambda: random.Random(0))

    def __call__(self, prompt: str) -> str:
        spec, rng = parse_prompt(prompt), self.rng
        words = TOPICS[spec.topic]
        count = spec.count if rng.random() < self.skill else rng.randint(1, 5)
        pool = [w for w in words if w != spec.exclude] if rng.random() < self.skill + 0.2 else list(words)
        items = rng.sample(pool, min(count, len(pool)))
        if spec.include and rng.random() < self.skill and spec.include not in items:
            items[rng.randrange(len(items))] = spec.include
        if rng.random() < (1 - self.skill) * 0.6:
            items.insert(rng.randrange(len(items) + 1), rng.choice(FILLER))
        end = spec.ending if spec.ending and rng.random() < self.skill else rng.choice(ENDINGS)
        return " , ".join(items) + f" {end}"
