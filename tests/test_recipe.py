"""Recipe validation: every bad recipe fails before any work, with one line naming file, field and expectation."""

from pathlib import Path

import pytest
import yaml

from loradem.errors import LorademError
from loradem.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]


def test_every_shipped_recipe_validates():
    recipes = sorted((REPO / "recipes").rglob("*.yaml")) + sorted((REPO / "recipes").rglob("*.yml"))
    assert len(recipes) >= 2  # demo.yaml and demo-plus.yaml at least
    for path in recipes:
        recipe = load_recipe(path)
        for source in recipe.sources:
            assert Path(source.data).is_file(), (path, source.name)


@pytest.fixture
def recipe_dir(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "1+1=", "completion": "2"}\n')
    return tmp_path


def write(recipe_dir: Path, **overrides) -> Path:
    raw = {"base": "smollm2-135m", "sources": [{"name": "a", "data": "a.jsonl"}]}
    raw.update(overrides)
    path = recipe_dir / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_defaults_and_overrides(recipe_dir):
    path = write(recipe_dir, train={"learning_rate": 3e-4},
                 sources=[{"name": "a", "data": "a.jsonl", "train": {"max_steps": 7}, "lora": {"r": 4, "use_rslora": True}}])
    recipe = load_recipe(path)
    assert recipe.name == "r"  # from the file name
    assert recipe.out_dir == Path("runs/r")
    src = recipe.sources[0]
    assert Path(src.data) == (recipe_dir / "a.jsonl").resolve()  # relative to the recipe
    tr, lo = recipe.train_for(src), recipe.lora_for(src)
    assert (tr.learning_rate, tr.max_steps, tr.batch_size) == (3e-4, 7, 8)
    assert (lo.r, lo.alpha, lo.use_rslora) == (4, 16.0, True)
    assert recipe.train.max_steps == 60  # the default block itself is untouched


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"sources": [{"name": "a", "data": "a.jsonl", "trian": {}}]},
         r"r\.yaml: sources\[0\]\.trian: unknown key; expected one of: name, data"),
        ({"train": {"lr": 1}}, r"r\.yaml: train\.lr: unknown key; expected one of: learning_rate"),
        ({"bogus": 1}, r"r\.yaml: bogus: unknown key"),
        ({"train": {"learning_rate": "fast"}}, r"r\.yaml: train\.learning_rate: .*valid number.*'fast'"),
        ({"sources": [{"name": "a", "data": "missing.jsonl"}]},
         r"r\.yaml: sources\[0\]\.data: expected an existing data file, .*missing\.jsonl' does not exist"),
        ({"sources": [{"name": "a", "data": "a.jsonl"}, {"name": "a", "data": "a.jsonl"}]},
         r"r\.yaml: sources: expected unique source names, 'a' appears twice"),
        ({"sources": [{"name": "../evil", "data": "a.jsonl"}]},
         r"r\.yaml: sources\[0\]\.name: expected a safe folder name .*got '\.\./evil'"),
        ({"sources": [{"name": "a", "data": "a.jsonl", "validation": 1.5}]},
         r"sources\[0\]\.validation: expected a row count .* got 1\.5"),
        ({"sources": [{"name": "a", "data": "a.jsonl", "metric": "bleu"}]},
         r"sources\[0\]\.metric: Input should be 'exact_match' or 'loss'"),
        ({"sources": []}, r"r\.yaml: sources: List should have at least 1 item"),
        ({"base": "./nope"}, r"r\.yaml: base: expected a model folder, .*nope' is not a directory"),
        ({"search": {"low": 2, "high": 1}}, r"r\.yaml: search: expected low < high"),
        ({"lora": {"r": 0}}, r"r\.yaml: lora\.r: Input should be greater than 0"),
        ({"train": {"quantization": "int3"}}, r"train\.quantization: Input should be 'none' or 'nf4'"),
        ({"sources": [{"name": "a"}]}, r"r\.yaml: sources\[0\]\.data: required field is missing"),
    ],
)
def test_bad_recipe_one_line_error(recipe_dir, overrides, expected):
    path = write(recipe_dir, **overrides)
    with pytest.raises(LorademError, match=expected) as info:
        load_recipe(path)
    assert "\n" not in str(info.value)


def test_an_override_can_set_a_field_to_null(recipe_dir):
    """`max_steps: null` in a source's or a variant's train: means "run by epochs", not "inherit the recipe's 80"."""
    path = write(recipe_dir, train={"max_steps": 80, "early_stopping_patience": 3},
                 sources=[{"name": "a", "data": "a.jsonl", "train": {"max_steps": None, "early_stopping_patience": None, "epochs": 2}},
                          {"name": "b", "data": "a.jsonl"}],
                 variants=[{"name": "v", "train": {"max_steps": None}}])
    recipe = load_recipe(path)
    a, b = recipe.source("a"), recipe.source("b")
    assert (recipe.train_for(a).max_steps, recipe.train_for(a).early_stopping_patience, recipe.train_for(a).epochs) == (None, None, 2)
    assert (recipe.train_for(b).max_steps, recipe.train_for(b).early_stopping_patience) == (80, 3)  # unset fields inherit
    assert recipe.variants[0].overrides() == {"train": {"max_steps": None}}
    variant = recipe.variant("v")
    assert variant.train_for(b).max_steps is None and variant.train_for(b).early_stopping_patience == 3
    assert variant.train_for(a).epochs == 2  # the source's own override survives into the variant


def test_null_where_a_value_is_required_names_the_field(recipe_dir):
    path = write(recipe_dir, sources=[{"name": "a", "data": "a.jsonl", "lora": {"r": None}}])
    with pytest.raises(LorademError, match=r"r\.yaml: sources\[0\]\.lora\.r: .*valid integer \(got None\)"):
        load_recipe(path)


def test_an_unknown_key_is_named_before_the_problems_it_causes(recipe_dir):
    path = write(recipe_dir, sources=[{"name": "a", "dataset": "a.jsonl"}])
    with pytest.raises(LorademError, match=r"r\.yaml: sources\[0\]\.dataset: unknown key; expected one of: name, data, .*\(and 1 more problem\)"):
        load_recipe(path)


def test_a_recipe_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\nbase: smollm2-135m\n".encode("latin-1"))
    with pytest.raises(LorademError, match=r"latin1\.yaml: byte 9: not UTF-8 text; save the recipe as UTF-8"):
        load_recipe(path)


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("base: smollm2-135m\ntrain:\n  max_steps: 5\nsources: []\ntrain:\n  max_steps: 9\n")
    with pytest.raises(LorademError, match=r"twice\.yaml: line 5, column 1: not valid YAML \(key 'train' given twice "
                                           r"\(first on line 2\)\)"):
        load_recipe(path)
    path.write_text("base: smollm2-135m\ntrain:\n  max_steps: 5\n  max_steps: 9\n")
    with pytest.raises(LorademError, match=r"line 4, column 3: not valid YAML \(key 'max_steps' given twice"):
        load_recipe(path)


def test_bad_yaml_and_missing_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("base: [\n")
    with pytest.raises(LorademError, match=r"bad\.yaml: line 2, column 1: not valid YAML"):
        load_recipe(path)
    path.write_text("- just\n- a list\n")
    with pytest.raises(LorademError, match=r"bad\.yaml: \(top level\): expected a mapping"):
        load_recipe(path)
    with pytest.raises(LorademError, match=r"nothere\.yaml: recipe file not found"):
        load_recipe(tmp_path / "nothere.yaml")


def test_docs_recipe_reference_is_current():
    from loradem.recipe import reference_markdown

    assert reference_markdown() in (REPO / "docs" / "recipes.md").read_text()


def test_reference_renders_types_as_users_read_them():
    from loradem.recipe import reference_markdown

    rows: dict[str, str] = {}
    for line in reference_markdown().splitlines():  # a key's first table (`sources` is also warmup.sources)
        if line.startswith("| `"):
            rows.setdefault(line.split("|")[1].strip(), line)
    cell = lambda key: [c.strip() for c in rows[key].split(" | ")][1]  # noqa: E731
    assert cell("`tokens`") == "'match' \\| int"
    assert cell("`max_steps`") == "int \\| None"
    assert cell("`target_modules`") == "'all-linear' \\| list[str]"
    assert cell("`validation`") == "int \\| float"
    assert cell("`sampler`") == "'tpe' \\| 'random' \\| 'cmaes' \\| 'gp' \\| 'grid'"
    assert cell("`sources`") == "list[Source]"
    assert "Union" not in reference_markdown() and "Literal" not in reference_markdown() and "Annotated" not in reference_markdown()


def test_lm_eval_include_path_resolves_against_the_recipe(recipe_dir):
    (recipe_dir / "tasks").mkdir()
    recipe = load_recipe(write(recipe_dir, eval={"lm_eval_include_path": "tasks"}))
    assert Path(recipe.eval.lm_eval_include_path) == (recipe_dir / "tasks").resolve()
    with pytest.raises(LorademError, match=r"eval\.lm_eval_include_path: expected a folder of lm-eval task YAMLs"):
        load_recipe(write(recipe_dir, eval={"lm_eval_include_path": "nowhere"}))


def test_a_dumped_recipe_validates_back_to_itself(recipe_dir):
    path = write(recipe_dir, train={"max_steps": 80},
                 sources=[{"name": "a", "data": "a.jsonl", "train": {"max_steps": None}}, {"name": "b", "data": "a.jsonl"}],
                 variants=[{"name": "v", "lora": {"r": 4}}])
    recipe = load_recipe(path)
    dumped = recipe.model_dump(mode="json")
    assert dumped["sources"][0]["train"] == {"max_steps": None} and dumped["sources"][1]["train"] == {}
    again = type(recipe).model_validate(dumped)
    assert again == recipe and again.train_for(again.source("a")).max_steps is None
