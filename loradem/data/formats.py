"""The formats suite's data: four sources that differ in format and domain, and five held-out tasks, from a seed.

    python -m loradem.data.formats [--out recipes/data/formats] [--seed 0] [--rows 1000] [--held-out-rows 60]

Writes chat.jsonl, json.jsonl, arith.jsonl and label.jsonl, and heldout/<task>.jsonl for each held-out task
below, each a `messages` JSONL file (one user turn, one assistant turn, no system message). Every answer is a
few tokens, scored by exact match:

- chat:   "Tom has a red bike and a blue kite. What color is the kite?" -> "Blue."
          (a short chat reply about a fact stated in the prompt: capitalized, with a full stop)
- json:   'What is "city" in {"name": "Ana", "age": 34, "city": "Lima"}?' -> "Lima"
          (the bare value of one field of a 3-field record)
- arith:  "27 plus 15 equals" -> "42", "Work out 41 minus 15." -> "26"
          (one operation, operands 10-49, operators in words; a minus puts the larger operand first)
- label:  "Topic: The goalkeeper saved a penalty." -> "sports"
          (one lowercase word of sports, food, weather, music, from generated sentences)

The held-out tasks are what no source trains on but what two sources' skills compose into, each in one
source's format (`eval.held_out` in recipes/formats.yaml); none starts with a source's fixed opening
("Topic:", "Calculate", ...), so no single adapter answers it from its own template:

- json-arith: '{"apples": 12, "pears": 27, "plums": 31} apples plus pears equals' -> "39"
              (json's reading, arith's operation and format: one operation on two of the record's fields)
- json-label: 'What is the topic of "title" in {"note": "The storm promised snow.", "title": "The goalkeeper
              saved a penalty.", "text": "Our cook sliced the onions."}?' -> "sports" (json's question format and
              its reading of one field of three, label's answer: three texts of three topics, so naming a
              topic of the record without reading the key is right one time in three)
- chat-arith: "Tom has 12 apples and gets 17 more. How many apples does Tom have?" -> "29."
              (arith's plus, chat's reply format)
- chat-label: 'Mia said: "The storm promised snow." What is that about?' -> "Weather."
              (label's reading, chat's reply format: capitalized, with a full stop; label's own
              "weather" is not an exact match)
- chat-json:  'Here are Ben's things: {"kite": "blue", "cup": "red", "hat": "green"}. What color is the cup?'
              -> "Red." (json's reading of one field of three, chat's question and reply; json's bare
              "red" is not an exact match)

SmolLM2-135M does not carry arithmetic into a new frame (json-arith and chat-arith stay near zero for every
model, the mix included), and naming any topic of json-label's record is right one time in three, so
chat-label and chat-json ask for skills the sources teach well, in a frame no source trains (what each model
scores: benchmarks/RESULTS.md). chat-label's sentences come from label's pool (as json-label's do), so it
tests the frame, not new sentences.

Each task draws from its own `random.Random(f"{seed}:{task}")` (a held-out task from
`random.Random(f"{seed}:heldout:{task}")`), so the files are byte-for-byte reproducible and independent
of each other. A draw that repeats an earlier prompt of its file is skipped (label skips a repeated
sentence under any template), so the test and validation rows the recipe splits off never occur among
the training rows; label has 2,304 sentences, so --rows near or above that runs out of them (a
LorademError, not an endless loop). The committed files under recipes/data/formats/ are this
generator's output with the defaults (a test regenerates them and compares bytes). Source prompts are
short (9-31 tokens on average per task under SmolLM2's tokenizer, before the chat template's system turn)
because training cost grows with tokens; json-label's three texts make it about 49.
"""

from __future__ import annotations

import json
import operator
import random
from collections.abc import Callable, Hashable, Iterator
from typing import TypeVar

from loradem.data.suite import HELD_OUT_DIR, Suite  # noqa: F401 - HELD_OUT_DIR: where the held-out files go
from loradem.errors import LorademError

NAMES = ("Tom", "Ana", "Ben", "Mia", "Sam", "Lea", "Max", "Eva", "Leo", "Zoe", "Ian", "Amy", "Raj", "Kim", "Omar", "Nina")
COLORS = ("red", "blue", "green", "yellow", "black", "white", "pink", "brown", "orange", "purple", "gray")
OBJECTS = ("bike", "kite", "hat", "cup", "ball", "car", "lamp", "bag", "coat", "chair", "boat", "book", "shirt",
           "clock", "scarf", "door", "pen", "vase", "tent", "sofa")
CITIES = ("Lima", "Oslo", "Rome", "Paris", "Cairo", "Tokyo", "Delhi", "Quito", "Dakar", "Hanoi", "Berlin", "Madrid",
          "Nairobi", "Sydney", "Toronto", "Dublin")
JOBS = ("nurse", "baker", "pilot", "farmer", "lawyer", "teacher", "painter", "chef", "driver", "singer")
PETS = ("cat", "dog", "parrot", "rabbit", "turtle", "hamster", "goldfish", "horse")
FRUITS = ("apples", "pears", "plums", "lemons", "peaches", "cherries", "grapes", "melons", "figs", "oranges")
OPERATIONS = {"plus": operator.add, "minus": operator.sub}
OPERANDS = (10, 49)  # two-digit operands: a sum stays under 100, and a difference is taken larger minus smaller

# label's sentences: subject + predicate (both from one topic's lists) + a time phrase shared by all topics;
# 4 x 8 x 9 x 8 = 2,304 sentences, so 1,000 rows can each have their own
TOPICS = {
    "sports": (("The striker", "The goalkeeper", "Our team", "The coach", "The runner", "The home side", "The captain",
                "The referee"),
               ("scored a late goal", "saved a penalty", "won the final", "lost the match on points",
                "trained before the race", "set a new record", "was sent off in the derby", "missed a free kick",
                "won the relay")),
    "food": (("The chef", "My aunt", "The bakery", "Our cook", "The cafe", "The waiter", "The butcher", "My uncle"),
             ("baked fresh bread", "served a spicy soup", "burned the rice", "made a lemon cake",
              "added too much salt", "grilled the fish", "sliced the onions", "fried some eggs", "roasted a chicken")),
    "weather": (("The forecast", "The storm", "The morning", "The wind", "The sky", "The weekend", "The night",
                 "The afternoon"),
                ("brought heavy rain", "turned cold and foggy", "was sunny and warm", "promised snow",
                 "ended with thunder", "stayed cloudy all day", "cleared after the hail", "grew hot and humid",
                 "froze the lake")),
    "music": (("The band", "The singer", "The choir", "The drummer", "The orchestra", "The pianist", "The violinist",
               "The quartet"),
              ("played a new song", "sang the chorus twice", "tuned the guitar", "recorded an album",
               "kept the rhythm", "performed a symphony", "practiced the scales", "hit the high note",
               "played a slow waltz")),
}
WHEN = ("", " on Sunday", " last night", " again", " this morning", " before noon", " on Friday", " yesterday")

# each source's prompt templates; a held-out prompt starts with none of their fixed openings
CHAT_TEMPLATES = (
    "{n} has {a1} {c1} {o1} and {a2} {c2} {o2}. What color is the {q}?",
    "{n}'s {o1} is {c1} and the {o2} is {c2}. Which color is the {q}?",
    "There is {a1} {c1} {o1} and {a2} {c2} {o2} at {n}'s house. What color is the {q}?",
)
JSON_TEMPLATES = ('What is "{k}" in {r}?', 'Extract "{k}" from this JSON: {r}', '{r}\nGive the value of "{k}".')
ARITH_TEMPLATES = ("{a} {op} {b} equals", "Work out {a} {op} {b}.", "Calculate {a} {op} {b}.")
LABEL_TEMPLATES = ("Topic: {s}", "Label the topic in one word: {s}", "Which topic is this? {s}")

# consecutive repeats after which a task's space counts as used up (rather than drawing forever)
MAX_REPEATS = 10_000

Pair = tuple[str, str]
Pairs = Iterator[Pair]
T = TypeVar("T")


def _fresh(draws: Iterator[T], key: Callable[[T], Hashable], task: str) -> Iterator[T]:
    """The draws whose key was not drawn before: a file never holds one prompt twice, and no test row is also a
    training row."""
    seen: set[Hashable] = set()
    repeats = 0
    for item in draws:
        k = key(item)
        if k not in seen:
            seen.add(k)
            repeats = 0
            yield item
        else:
            repeats += 1
            if repeats == MAX_REPEATS:
                raise LorademError(f"formats: task {task!r} drew {MAX_REPEATS} repeats in a row after "
                                   f"{len(seen)} distinct rows; ask for fewer rows (--rows / --held-out-rows)")


def _distinct(task: str, pairs: Callable[[random.Random], Pairs]) -> Callable[[random.Random], Pairs]:
    """The task with every repeated prompt skipped."""
    return lambda rng: _fresh(pairs(rng), key=lambda pair: pair[0], task=task)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def chat(rng: random.Random) -> Pairs:
    while True:
        name = rng.choice(NAMES)
        (o1, o2), (c1, c2) = rng.sample(OBJECTS, 2), rng.sample(COLORS, 2)
        asked, color = rng.choice(((o1, c1), (o2, c2)))
        template = rng.choice(CHAT_TEMPLATES)
        yield template.format(n=name, o1=o1, o2=o2, c1=c1, c2=c2, a1=_article(c1), a2=_article(c2), q=asked), f"{color.capitalize()}."


def _record(rng: random.Random) -> dict:
    fields = {"name": rng.choice(NAMES), "age": rng.randint(18, 90), "city": rng.choice(CITIES),
              "job": rng.choice(JOBS), "pet": rng.choice(PETS), "id": rng.randint(100, 999)}
    return {k: fields[k] for k in rng.sample(list(fields), 3)}


def json_field(rng: random.Random) -> Pairs:
    while True:
        record = _record(rng)
        key = rng.choice(list(record))
        yield rng.choice(JSON_TEMPLATES).format(k=key, r=json.dumps(record)), str(record[key])


def arith(rng: random.Random) -> Pairs:
    while True:
        a, b, op = rng.randint(*OPERANDS), rng.randint(*OPERANDS), rng.choice(list(OPERATIONS))
        if op == "minus" and a < b:  # never negative
            a, b = b, a
        yield rng.choice(ARITH_TEMPLATES).format(a=a, op=op, b=b), str(OPERATIONS[op](a, b))


def _sentences(rng: random.Random) -> Iterator[tuple[str, str]]:
    while True:
        topic = rng.choice(list(TOPICS))
        subjects, predicates = TOPICS[topic]
        yield f"{rng.choice(subjects)} {rng.choice(predicates)}{rng.choice(WHEN)}.", topic


def label(rng: random.Random) -> Pairs:
    # one sentence per row, not just one prompt: the same sentence under two templates would put it in test and train
    for sentence, topic in _fresh(_sentences(rng), key=lambda st: st[0], task="label"):
        yield rng.choice(LABEL_TEMPLATES).format(s=sentence), topic


def json_arith(rng: random.Random) -> Pairs:
    while True:
        names = rng.sample(FRUITS, 3)
        record = {name: rng.randint(*OPERANDS) for name in names}
        x, y = rng.sample(names, 2)
        op = rng.choice(list(OPERATIONS))
        if op == "minus" and record[x] < record[y]:  # never negative, as arith
            x, y = y, x
        yield f"{json.dumps(record)} {x} {op} {y} equals", str(OPERATIONS[op](record[x], record[y]))


JSON_LABEL_KEYS = ("note", "title", "text")


def json_label(rng: random.Random) -> Pairs:
    # three texts of three different topics: the label adapter alone names some topic of the record, right one
    # time in three at best; the key must be read, as json's rows read one field of three
    sentences = _sentences(rng)
    while True:
        texts: dict[str, str] = {}  # topic -> its sentence, in the order drawn
        while len(texts) < len(JSON_LABEL_KEYS):
            sentence, topic = next(sentences)
            texts.setdefault(topic, sentence)
        (topics, chosen) = list(texts), rng.randrange(len(JSON_LABEL_KEYS))
        record = dict(zip(JSON_LABEL_KEYS, texts.values()))
        yield f'What is the topic of "{JSON_LABEL_KEYS[chosen]}" in {json.dumps(record)}?', topics[chosen]


def chat_arith(rng: random.Random) -> Pairs:
    while True:
        name, fruit = rng.choice(NAMES), rng.choice(FRUITS)
        a, b = rng.randint(*OPERANDS), rng.randint(*OPERANDS)
        yield f"{name} has {a} {fruit} and gets {b} more. How many {fruit} does {name} have?", f"{a + b}."


def chat_label(rng: random.Random) -> Pairs:
    for sentence, topic in _sentences(rng):
        yield f'{rng.choice(NAMES)} said: "{sentence}" What is that about?', f"{topic.capitalize()}."


def chat_json(rng: random.Random) -> Pairs:
    while True:
        objects, colors = rng.sample(OBJECTS, 3), rng.sample(COLORS, 3)
        asked = rng.randrange(3)
        record = json.dumps(dict(zip(objects, colors)))
        yield (f"Here are {rng.choice(NAMES)}'s things: {record}. What color is the {objects[asked]}?",
               f"{colors[asked].capitalize()}.")


TASKS: dict[str, Callable[[random.Random], Pairs]] = {
    "chat": _distinct("chat", chat),
    "json": _distinct("json", json_field),
    "arith": _distinct("arith", arith),
    "label": _distinct("label", label),
}
HELD_OUT: dict[str, Callable[[random.Random], Pairs]] = {
    "json-arith": _distinct("json-arith", json_arith),
    "json-label": _distinct("json-label", json_label),
    "chat-arith": _distinct("chat-arith", chat_arith),
    "chat-label": _distinct("chat-label", chat_label),
    "chat-json": _distinct("chat-json", chat_json),
}
SUITE = Suite("formats", TASKS, HELD_OUT, "recipes/data/formats")


def main(argv: list[str] | None = None) -> int:
    return SUITE.main(argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    raise SystemExit(main())
