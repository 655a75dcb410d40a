"""An offline world with a known oracle: list answers with fixed slots and six scored quality features.

Prompts come from a seeded grammar ("Name 3 fruits . Include the word red . End with !").
An answer has fixed slots: an opener word, the items with one separator between each
two, and an ending mark, e.g. ``Here apple , pear , plum !``. The oracle reads the
constraints back out of the prompt text and scores an answer in [0, 1] as the mean of
six features (:data:`SCORED`):

- two that hold for every prompt, like the style part of human preference that a
  pretrained model already represents: the opener is ``Here`` (not one of four hedges),
  the separators are commas (not filler words);
- four that are specific to the prompt: the item count asked for, the word to include,
  the word to avoid, the ending mark asked for.

Whether the items belong to the prompt's topic is measured (``on_topic``, a diagnostic)
but not scored. Why: which words a policy uses drifts under DPO (a word pushed up in some
chosen answers becomes likelier in every context), the implicit reward of Eq. 7 rewards
that drift wherever it went, and self-labelled rounds amplify it. An oracle that scored
topic membership made that drift decide the outcome: on some seeds whole answers switched
topic ("Name 3 animals" answered with vehicles) and the rounds collapsed (docs/demo_world.md, "Why the
world looks like this").

Why slots: quality never changes length. Only the item count changes an answer's
length, and a wrong count is one item too many or one too few about equally often, so
neither the oracle nor the gold data favour short or long answers.

Why some demonstrations are broken (:data:`DEMO_RATES` ``well_formed``): pi_init
sometimes cuts a list off after a separator or puts a separator where an item belongs,
as real SFT models sometimes stop mid-answer or repeat themselves. The gold pairs then
contain such answers on the losing side, and the seed stage learns to make them
unlikely. Without them, the rounds drove the policy into exactly these outputs (an
end-of-turn right after a comma, runs of separators): pi_init never produced them, so
no seed pair pinned their probabilities, and the implicit reward rewarded whatever way
they drifted.
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
GOOD_OPENER = "Here"
OPENERS = [GOOD_OPENER, "Um", "Well", "So", "Hmm"]
GOOD_SEPARATOR = ","
SEPARATORS = [GOOD_SEPARATOR, "uh", "like", "basically", "erm"]
ENDINGS = ["!", "."]
COUNTS = (2, 3, 4)  # a wrong count is count-1 or count+1 (1..5): too short as often as too long
FEATURES = ("opener", "separators", "on_topic", "count", "include", "exclude", "ending")  # measured
SCORED = tuple(f for f in FEATURES if f != "on_topic")  # what the oracle's score averages


@dataclass(frozen=True)
class Spec:
    """The constraints of one prompt."""

    topic: str
    count: int
    include: str | None = None
    exclude: str | None = None
    ending: str | None = None


def vocabulary() -> list[str]:
    """Every word the world uses (for a word-level tokenizer)."""
    words = {w for ws in TOPICS.values() for w in ws} | set(TOPICS) | set(OPENERS) | set(SEPARATORS)
    words |= {str(c) for c in range(1, 6)} | set(ENDINGS)
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
    count = rng.choice(COUNTS)
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


def _items(tokens: list[str]) -> list[str]:
    """The words of an answer that fill item slots: everything but openers, separators and ending marks."""
    return [w for w in tokens if w not in SEPARATORS and w not in OPENERS and w not in ENDINGS]


def features(prompt: str, response: str) -> dict[str, float]:
    """The seven features of ``response``, six scored and ``on_topic`` measured (each in [0, 1]; a constraint not
    asked for counts as met)."""
    spec = parse_prompt(prompt)
    tokens = words_of(response)
    body = tokens[1:] if tokens and tokens[0] in OPENERS else tokens
    body = body[:-1] if body and body[-1] in ENDINGS else body
    seps = [w for w in body if w in SEPARATORS]
    items = _items(body)
    topic = set(TOPICS[spec.topic])
    expected_seps = max(len(items) - 1, 0)
    return {
        "opener": float(bool(tokens) and tokens[0] == GOOD_OPENER),
        # missing separators count as bad ones: "apple banana" is no better than "apple uh banana"
        "separators": (min(seps.count(GOOD_SEPARATOR), expected_seps) / max(expected_seps, len(seps))
                       if max(expected_seps, len(seps)) else 1.0),
        "on_topic": sum(w in topic for w in items) / len(items) if items else 0.0,
        "count": float(len(items) == spec.count),
        "include": 1.0 if spec.include is None else float(spec.include in items),
        "exclude": 1.0 if spec.exclude is None else float(spec.exclude not in items),
        "ending": (float(bool(tokens) and tokens[-1] in ENDINGS) if spec.ending is None
                   else float(bool(tokens) and tokens[-1] == spec.ending)),
    }


def score(prompt: str, response: str) -> float:
    """Oracle score in [0, 1]: the mean of the six :data:`SCORED` features; an answer that names no item scores 0."""
    if not _items(words_of(response)):
        return 0.0
    f = features(prompt, response)
    return sum(f[name] for name in SCORED) / len(SCORED)


def prefer(prompt: str, response_1: str, response_2: str) -> float:
    """alpaca-eval's preference encoding: 1 if the first wins, 2 if the second wins, 1.5 for a tie."""
    s1, s2 = score(prompt, response_1), score(prompt, response_2)
    return 1.0 if s1 > s2 else 2.0 if s2 > s1 else 1.5


# How often pi_init's demonstrations get each feature right (the rest is what DPO can teach), and how often a
# demonstration is well formed (the rest are cut off after a separator or have a separator where an item
# belongs: the module docstring says why). Off-topic items stay in the demonstrations (15% of items) although
# they are not scored: with none (tried as "world version 3"), pi_init gives other topics' words almost no
# probability and any later drift towards them earns a large implicit reward.
DEMO_RATES = {"opener": 0.35, "separator": 0.5, "on_topic": 0.85, "count": 0.7, "include": 0.5, "exclude": 0.7,
              "ending": 0.5, "well_formed": 0.85}


@dataclass
class DemoWriter:
    """Demonstrations of mixed quality: each feature is right with its own probability (:data:`DEMO_RATES`),
    and a share of them is broken (cut off after a separator, or a separator where an item belongs).

    The features vary independently, so a pair of demonstrations differs in several of them at once.
    """

    rates: dict[str, float] = field(default_factory=lambda: dict(DEMO_RATES))
    rng: random.Random = field(default_factory=lambda: random.Random(0))

    def __call__(self, prompt: str) -> str:
        spec, rng, p = parse_prompt(prompt), self.rng, self.rates
        topic = TOPICS[spec.topic]
        off_topic = [w for name, ws in TOPICS.items() if name != spec.topic for w in ws]
        count = spec.count if rng.random() < p["count"] else spec.count + rng.choice((-1, 1))
        allowed = [w for w in topic if w != spec.exclude]
        items = rng.sample(allowed, count)
        if spec.exclude and rng.random() >= p["exclude"]:
            items[rng.randrange(count)] = spec.exclude
        if spec.include and spec.include not in items and rng.random() < p["include"]:
            free = [i for i, w in enumerate(items) if w != spec.exclude] or [0]
            items[rng.choice(free)] = spec.include
        items = [w if rng.random() < p["on_topic"] else rng.choice(off_topic) for w in items]
        opener = GOOD_OPENER if rng.random() < p["opener"] else rng.choice(OPENERS[1:])
        words = [opener, items[0]]
        for item in items[1:]:
            words += [GOOD_SEPARATOR if rng.random() < p["separator"] else rng.choice(SEPARATORS[1:]), item]
        asked = spec.ending or rng.choice(ENDINGS)
        other = ENDINGS[1 - ENDINGS.index(asked)]
        words.append(asked if spec.ending is None or rng.random() < p["ending"] else other)
        if rng.random() < 1 - p["well_formed"]:
            words = self._broken(words)
        return " ".join(words)

    def _broken(self, words: list[str]) -> list[str]:
        """The answer cut off right after one of its separators (no ending mark; shorter), or one of its items
        replaced by a run of 2-6 separators (longer; also for one-item answers, which have no separator to cut
        after): broken answers are shorter as often as longer, so the gold pairs stay length-neutral."""
        rng = self.rng
        seps = [i for i, w in enumerate(words) if w in SEPARATORS]
        if rng.choice(("cut", "run")) == "cut" and seps:
            return words[:rng.choice(seps) + 1]
        items = [i for i in range(1, len(words) - 1) if words[i] not in SEPARATORS]
        slot = rng.choice(items)
        run = [rng.choice(SEPARATORS) for _ in range(rng.randint(2, 6))]
        return words[:slot] + run + words[slot + 1:]
