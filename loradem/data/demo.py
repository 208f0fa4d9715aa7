"""The demo suite's data: four exact-match instruction tasks and six held-out ones, generated from a seed.

    python -m loradem.data.demo [--out recipes/data/demo] [--seed 0] [--rows 1000] [--held-out-rows 60]

Writes addition.jsonl, reverse.jsonl, sort.jsonl and uppercase.jsonl, and
heldout/<task>.jsonl for each of the six held-out tasks below,
each a `messages` JSONL file (one user turn, one assistant turn, no system message):

- addition:  "What is 347 + 589?" -> "936" (3-digit operands)
- reverse:   "Reverse the order of these words: frog bank floor" -> "floor bank frog" (3-5 words)
- sort:      "Sort these numbers from smallest to largest: 42, 7, 19, 3" -> "3, 7, 19, 42"
- uppercase: "Write this in capital letters: green apple" -> "GREEN APPLE"
  (the fourth source, for "adding a source later")

The held-out tasks are what no source trains on but what the sources' skills
compose into, answered in a source's own format, so a score tests skill
transfer rather than format guessing (`eval.held_out` in recipes/demo.yaml):

- subtract:        "What is 812 - 347?" -> "465" (3-digit operands, a >= b; addition's format)
- sort-words:      "Sort these words alphabetically: frog bank floor" -> "bank floor frog"
                   (3-5 words; sort's ordering in reverse's word-list format)
- sort-descending: "Sort these numbers from largest to smallest: 42, 7, 19, 3" -> "42, 19, 7, 3"
                   (sort's format, reverse's order)

Those three compose skills in a new way and are out of a 135M model's reach
(0-1% for every model, data mixing included). Three more are near transfer,
one step from a source, so that models score between nothing and everything
on them (the benchmark recipes use all six; recipes/demo.yaml the first three):

- reverse-numbers: "Reverse the order of these numbers: 42, 7, 19, 3" -> "3, 19, 7, 42"
                   (reverse's operation on sort's number lists)
- reverse-long:    reverse's questions on 6-7 words (it trains on 3-5)
- add-small:       addition's questions on 2-digit operands (it trains on 3-digit ones)

Each task draws from its own `random.Random(f"{seed}:{task}")` (a held-out
task from `random.Random(f"{seed}:heldout:{task}")`), so the files
are byte-for-byte reproducible and independent of each other. The committed
files under recipes/data/demo/ are this generator's output with the defaults
(a test regenerates them and compares bytes).

Reverse and uppercase draw from the word list below (727 words of 4-8
letters). Reverse asks for the order of 3-5 words backwards, not a word's
letters: SmolLM2-135M's tokens are not letters, and a letter-reversal adapter
learned nothing in the demo's 80 steps.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable, Iterator

from loradem.data.suite import HELD_OUT_DIR, Suite  # noqa: F401 - HELD_OUT_DIR: where the held-out files go

WORDS = tuple(
    """
    able about above accept across action active actor actual adult advice afraid after again
    agent agree ahead allow almost alone along already always amount animal answer anyone appear
    apple area argue around arrive artist autumn avoid award aware baby back bake ball band bank
    basket battle beach bean bear beauty become before begin behind believe bell belong below
    bench better beyond bicycle bird birthday black blanket blind block blood blue board boat
    body bone book border bottle bottom bowl brain branch brave bread break breath bridge bright
    bring broad brother brown brush bucket build burn busy butter button cabin cable cake call
    calm camera camp candle candy canvas captain card care carpet carry castle catch cattle
    ceiling center chair chalk chance change chapter charge cheap check cheese cherry chest
    chicken child choice choose church circle city claim class clean clear clever client climb
    clock close cloth cloud coast coffee coin cold collect color comb come common cookie copper
    corner cotton couch count country county couple course cousin cover crack cream credit crowd
    crown cruel culture cupboard curtain cushion custom cycle daily damage dance danger dark
    daughter dealer debate decide deep degree delay depth desert design desk detail device
    diamond dinner direct doctor dollar door double dragon drawer dream dress drink drive driver
    during dust duty eagle early earth easy edge effect effort eight either elbow eleven empty
    energy engine enjoy enough enter equal escape evening event exact exam expert extra fabric
    face fact fair faith fall family famous farm farmer fashion father fault favor feather feel
    fence field fifteen figure final finger finish fire fish flag flame flat flavor floor flower
    focus follow food foot forest forget fork form fortune forward frame free fresh friend frog
    front fruit funny future game garage garden garlic gate gather gentle giant gift ginger
    glass glove goal gold golden good grain grape grass great green ground group grow guard
    guess guest guitar habit hair hammer hand happy harbor hard head health heart heavy height
    hello helmet help herb hero hidden high hill history hobby hold hole holiday honey hope
    horse hospital hotel hour house human humor hunger hungry idea image inch income indeed
    inside island jacket jelly jewel join journey judge juice jump jungle just keep kettle kind
    king kitchen kitten knee knife knock label ladder lake lamp land large laser late laugh
    lawyer layer lead leaf learn leather lemon lesson letter level library light limit line lion
    liquid listen little live lizard local lock long loose lucky lunch machine magic mail major
    make manner many maple market master matter meadow meal measure meat medal member memory
    metal middle milk mind minute mirror model moment money monkey month moon morning mother
    motor mountain mouse mouth movie music name narrow nation nature near neck needle nephew
    nest never next night noble noise normal north note novel number nurse object ocean office
    often olive onion open orange orbit order organ other outside oven owner paint palace paper
    parent park party pass path patient pattern peace peach pencil people pepper person piano
    picture piece pillow pilot pink pizza place plane planet plant plate play pocket poem point
    police polite pond potato powder power price prince prize public purple puzzle queen quick
    quiet rabbit radio rain raise rapid reach ready reason record region remote repair report
    rest result rice rich river road robot rock roof room rope round royal rubber ruler runner
    sadness safe sail salad salt sand saucer scale school science screen season second secret
    seed sense seven shadow shape share sheep shell shirt shoe short shoulder signal silent silk
    silver simple singer sister size skill skirt sleep slow small smile smoke snake snow soap
    soft soldier sound soup south space spider spoon sport spring square stage stair star
    station steam steel stone storm story strange street strong student sugar summer sunny
    supper surface sweet swim table tail talent teacher temple tennis thank theory thick thin
    thought thread throat thunder ticket tiger timber toast today toilet tomato tongue tooth
    topic tower town track trade train travel tree trick truck trust turtle twelve twenty uncle
    under unit upper valley value velvet village violin visit voice volume wagon wait walk wall
    wallet water wave weather wedding week weight whale wheat wheel whisper white wide wife wild
    window winter wire wise wolf woman wonder wood wool word work world worry writer yard year
    yellow young zebra zero
    """.split()
)

Pair = tuple[str, str]
Pairs = Iterator[Pair]


def addition(rng: random.Random) -> Pairs:
    while True:
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        template = rng.choice(("What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} + {b}."))
        yield template.format(a=a, b=b), str(a + b)


def _word_lists(rng: random.Random, templates: tuple[str, ...], answer: Callable[[list[str]], list[str]],
                sizes: tuple[int, int] = (3, 5)) -> Pairs:
    while True:
        words = rng.sample(WORDS, rng.randint(*sizes))
        template = rng.choice(templates)
        yield template.format(p=" ".join(words)), " ".join(answer(words))


REVERSE_TEMPLATES = (
    "Reverse the order of these words: {p}",
    "Write these words in reverse order: {p}",
    "List these words from last to first: {p}",
)


def reverse(rng: random.Random) -> Pairs:
    return _word_lists(rng, REVERSE_TEMPLATES, lambda words: words[::-1])


def _sorted_numbers(rng: random.Random, templates: tuple[str, ...], descending: bool = False) -> Pairs:
    while True:
        numbers = rng.sample(range(1, 100), 4)
        template = rng.choice(templates)
        yield template.format(n=", ".join(map(str, numbers))), ", ".join(map(str, sorted(numbers, reverse=descending)))


def sort(rng: random.Random) -> Pairs:
    return _sorted_numbers(rng, (
        "Sort these numbers from smallest to largest: {n}",
        "Put these numbers in ascending order: {n}",
        "Arrange from lowest to highest: {n}",
    ))


def uppercase(rng: random.Random) -> Pairs:
    while True:
        phrase = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 3)))
        template = rng.choice((
            "Write this in capital letters: {p}",
            "Convert to uppercase: {p}",
            "Rewrite in all caps: {p}",
        ))
        yield template.format(p=phrase), phrase.upper()


def subtract(rng: random.Random) -> Pairs:
    while True:
        a, b = sorted((rng.randint(100, 999), rng.randint(100, 999)), reverse=True)
        template = rng.choice(("What is {a} - {b}?", "Subtract {b} from {a}.", "Compute {a} - {b}."))
        yield template.format(a=a, b=b), str(a - b)


def sort_words(rng: random.Random) -> Pairs:
    return _word_lists(rng, (
        "Sort these words alphabetically: {p}",
        "Put these words in alphabetical order: {p}",
        "Arrange these words from A to Z: {p}",
    ), sorted)


def sort_descending(rng: random.Random) -> Pairs:
    return _sorted_numbers(rng, (
        "Sort these numbers from largest to smallest: {n}",
        "Put these numbers in descending order: {n}",
        "Arrange from highest to lowest: {n}",
    ), descending=True)


def reverse_numbers(rng: random.Random) -> Pairs:
    while True:
        numbers = rng.sample(range(1, 100), 4)
        template = rng.choice(tuple(t.replace("words", "numbers") for t in REVERSE_TEMPLATES))
        yield template.format(p=", ".join(map(str, numbers))), ", ".join(map(str, numbers[::-1]))


def reverse_long(rng: random.Random) -> Pairs:
    return _word_lists(rng, REVERSE_TEMPLATES, lambda words: words[::-1], sizes=(6, 7))


def add_small(rng: random.Random) -> Pairs:
    while True:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        template = rng.choice(("What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} + {b}."))
        yield template.format(a=a, b=b), str(a + b)


TASKS: dict[str, Callable[[random.Random], Pairs]] = {
    "addition": addition,
    "reverse": reverse,
    "sort": sort,
    "uppercase": uppercase,
}
HELD_OUT: dict[str, Callable[[random.Random], Pairs]] = {
    "subtract": subtract,
    "sort-words": sort_words,
    "sort-descending": sort_descending,
    "reverse-numbers": reverse_numbers,
    "reverse-long": reverse_long,
    "add-small": add_small,
}
SUITE = Suite("demo", TASKS, HELD_OUT, "recipes/data/demo")


def task_rows(task: str, seed: int = 0, rows: int = 1000) -> list[dict]:
    """`rows` messages rows of one task (a source's or, by its name, a held-out one), the same for the same
    (task, seed); a longer run extends a shorter one."""
    return SUITE.rows(task, seed, rows)


def write_demo_data(out: str | Path, seed: int = 0, rows: int = 1000, held_out_rows: int = 60, log=print) -> list[Path]:
    """Write one <task>.jsonl per source task into `out`, and one per held-out task into `out`/heldout/."""
    return SUITE.write(out, seed, rows, held_out_rows, log)


def main(argv: list[str] | None = None) -> int:
    return SUITE.main(argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    raise SystemExit(main())
