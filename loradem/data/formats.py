"""The formats suite's data: four sources that differ in format and domain, and three held-out tasks, from a seed.

    python -m loradem.data.formats [--out recipes/data/formats] [--seed 0] [--rows 1000] [--held-out-rows 60]

Writes chat.jsonl, json.jsonl, arith.jsonl and label.jsonl, and heldout/json-arith.jsonl,
heldout/json-label.jsonl and heldout/chat-arith.jsonl, each a `messages` JSONL file (one user turn,
one assistant turn, no system message). Every answer is a few tokens, scored by exact match:

- chat:   "Tom has a red bike and a blue kite. What color is the kite?" -> "Blue."
          (a short chat reply about a fact stated in the prompt: capitalized, with a full stop)
- json:   'What is "city" in {"name": "Ana", "age": 34, "city": "Lima"}?' -> "Lima"
          (the bare value of one field of a 3-field record)
- arith:  "27 plus 15 minus 9 equals" -> "33" (operands 2-49, operators in words, never negative;
          SmolLM2-135M barely learns it in 80 steps: benchmarks/RESULTS.md, "The formats suite")
- label:  "Topic: The goalkeeper saved a penalty." -> "sports"
          (one lowercase word of sports, food, weather, music, from generated sentences)

The held-out tasks are what no source trains on but what two sources' skills compose into, each in one
source's format (`eval.held_out` in recipes/formats.yaml):

- json-arith: '{"apples": 12, "pears": 7, "plums": 3} apples plus pears minus plums equals' -> "16"
              (json's reading, arith's operation and format)
- json-label: 'Topic: {"id": 412, "text": "The goalkeeper saved a penalty."}' -> "sports"
              (json's reading, label's format)
- chat-arith: "Tom has 12 apples and gets 7 more. How many apples does Tom have?" -> "19."
              (arith's operation, chat's reply format)

Each task draws from its own `random.Random(f"{seed}:{task}")` (a held-out task from
`random.Random(f"{seed}:heldout:{task}")`), so the files are byte-for-byte reproducible and independent
of each other. The committed files under recipes/data/formats/ are this generator's output with the
defaults (a test regenerates them and compares bytes). Prompts are short (12-30 tokens on average under
SmolLM2's tokenizer, before the chat template's system turn) because training cost grows with tokens.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator

from loradem.data.suite import HELD_OUT_DIR, Suite  # noqa: F401 - HELD_OUT_DIR: where the held-out files go

NAMES = ("Tom", "Ana", "Ben", "Mia", "Sam", "Lea", "Max", "Eva", "Leo", "Zoe", "Ian", "Amy", "Raj", "Kim", "Omar", "Nina")
COLORS = ("red", "blue", "green", "yellow", "black", "white", "pink", "brown", "orange", "purple", "gray")
OBJECTS = ("bike", "kite", "hat", "cup", "ball", "car", "lamp", "bag", "coat", "chair", "boat", "book", "shirt",
           "clock", "scarf", "door", "pen", "vase", "tent", "sofa")
CITIES = ("Lima", "Oslo", "Rome", "Paris", "Cairo", "Tokyo", "Delhi", "Quito", "Dakar", "Hanoi", "Berlin", "Madrid",
          "Nairobi", "Sydney", "Toronto", "Dublin")
JOBS = ("nurse", "baker", "pilot", "farmer", "lawyer", "teacher", "painter", "chef", "driver", "singer")
PETS = ("cat", "dog", "parrot", "rabbit", "turtle", "hamster", "goldfish", "horse")
FRUITS = ("apples", "pears", "plums", "lemons", "peaches", "cherries", "grapes", "melons", "figs", "oranges")

# label's sentences: subject + predicate (both from one topic's lists) + a time phrase shared by all topics
TOPICS = {
    "sports": (("The striker", "The goalkeeper", "Our team", "The coach", "The runner", "The home side"),
               ("scored a late goal", "saved a penalty", "won the final", "lost the match on points",
                "trained before the race", "set a new record", "was sent off in the derby")),
    "food": (("The chef", "My aunt", "The bakery", "Our cook", "The cafe", "The waiter"),
             ("baked fresh bread", "served a spicy soup", "burned the rice", "made a lemon cake",
              "added too much salt", "grilled the fish", "sliced the onions")),
    "weather": (("The forecast", "The storm", "The morning", "The wind", "The sky", "The weekend"),
                ("brought heavy rain", "turned cold and foggy", "was sunny and warm", "promised snow",
                 "ended with thunder", "stayed cloudy all day", "cleared after the hail")),
    "music": (("The band", "The singer", "The choir", "The drummer", "The orchestra", "The pianist"),
              ("played a new song", "sang the chorus twice", "tuned the guitar", "recorded an album",
               "kept the rhythm", "performed a symphony", "practiced the scales")),
}

WHEN = ("", " on Sunday", " last night", " again", " this morning", " before noon")

Pair = tuple[str, str]
Pairs = Iterator[Pair]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def chat(rng: random.Random) -> Pairs:
    while True:
        name = rng.choice(NAMES)
        (o1, o2), (c1, c2) = rng.sample(OBJECTS, 2), rng.sample(COLORS, 2)
        asked, color = rng.choice(((o1, c1), (o2, c2)))
        template = rng.choice((
            "{n} has {a1} {c1} {o1} and {a2} {c2} {o2}. What color is the {q}?",
            "{n}'s {o1} is {c1} and the {o2} is {c2}. Which color is the {q}?",
            "There is {a1} {c1} {o1} and {a2} {c2} {o2} at {n}'s house. What color is the {q}?",
        ))
        yield template.format(n=name, o1=o1, o2=o2, c1=c1, c2=c2, a1=_article(c1), a2=_article(c2), q=asked), f"{color.capitalize()}."


def _record(rng: random.Random) -> dict:
    fields = {"name": rng.choice(NAMES), "age": rng.randint(18, 90), "city": rng.choice(CITIES),
              "job": rng.choice(JOBS), "pet": rng.choice(PETS), "id": rng.randint(100, 999)}
    return {k: fields[k] for k in rng.sample(list(fields), 3)}


def json_field(rng: random.Random) -> Pairs:
    while True:
        record = _record(rng)
        key = rng.choice(list(record))
        template = rng.choice((
            'What is "{k}" in {r}?',
            'Extract "{k}" from this JSON: {r}',
            '{r}\nGive the value of "{k}".',
        ))
        yield template.format(k=key, r=json.dumps(record)), str(record[key])


def _plus_minus(rng: random.Random) -> tuple[int, int, int]:
    a, b = rng.randint(2, 49), rng.randint(2, 49)
    return a, b, rng.randint(1, min(49, a + b))


def arith(rng: random.Random) -> Pairs:
    while True:
        a, b, c = _plus_minus(rng)
        template = rng.choice((
            "{a} plus {b} minus {c} equals",
            "Work out {a} plus {b} minus {c}.",
            "Calculate {a} plus {b} minus {c}.",
        ))
        yield template.format(a=a, b=b, c=c), str(a + b - c)


def _sentence(rng: random.Random) -> tuple[str, str]:
    topic = rng.choice(list(TOPICS))
    subjects, predicates = TOPICS[topic]
    return f"{rng.choice(subjects)} {rng.choice(predicates)}{rng.choice(WHEN)}.", topic


def label(rng: random.Random) -> Pairs:
    while True:
        sentence, topic = _sentence(rng)
        template = rng.choice(("Topic: {s}", "Label the topic in one word: {s}", "Which topic is this? {s}"))
        yield template.format(s=sentence), topic


def json_arith(rng: random.Random) -> Pairs:
    while True:
        a, b, c = _plus_minus(rng)
        names = rng.sample(FRUITS, 3)
        record = dict(zip(names, (a, b, c)))
        yield f"{json.dumps(record)} {names[0]} plus {names[1]} minus {names[2]} equals", str(a + b - c)


def json_label(rng: random.Random) -> Pairs:
    while True:
        sentence, topic = _sentence(rng)
        yield f"Topic: {json.dumps({'id': rng.randint(100, 999), 'text': sentence})}", topic


def chat_arith(rng: random.Random) -> Pairs:
    while True:
        name, fruit = rng.choice(NAMES), rng.choice(FRUITS)
        a, b = rng.randint(2, 49), rng.randint(2, 49)
        yield f"{name} has {a} {fruit} and gets {b} more. How many {fruit} does {name} have?", f"{a + b}."


TASKS: dict[str, Callable[[random.Random], Pairs]] = {
    "chat": chat,
    "json": json_field,
    "arith": arith,
    "label": label,
}
HELD_OUT: dict[str, Callable[[random.Random], Pairs]] = {
    "json-arith": json_arith,
    "json-label": json_label,
    "chat-arith": chat_arith,
}
SUITE = Suite("formats", TASKS, HELD_OUT, "recipes/data/formats")


def main(argv: list[str] | None = None) -> int:
    return SUITE.main(argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    raise SystemExit(main())
