"""lm-evaluation-harness on the in-memory models: scores equal a hand computation from the model's own logits."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from test_multi import make_adapter

from loradem.errors import LorademError
from loradem.evaluate.harness import prepare_task_folder, resolve_include_path, run_lm_eval
from loradem.model.soup import load_base, load_multi, set_weights

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "eval" / "tasks"
ARITH = TASKS / "loradem_demo" / "arith.jsonl"
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def hand_scores(model, tokenizer, rows: list[dict]) -> dict[str, float]:
    """acc, acc_norm and brier_score of a multiple-choice task, from log-likelihoods computed here.

    lm-eval's rule: continuation = ' ' + choice; the context's tokens are those of the context alone;
    the choice's log-likelihood is the sum of log p(token) over the continuation's tokens."""
    acc = norm = brier = 0.0
    for row in rows:
        context = f"Question: {row['question']}\nAnswer:"
        n_ctx = len(tokenizer.encode(context))
        lls = []
        for choice in row["choices"]:
            whole = tokenizer.encode(context + " " + choice)
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([whole])).logits[0].double().log_softmax(-1)
            lls.append(sum(logp[i - 1, whole[i]].item() for i in range(n_ctx, len(whole))))
        gold = row["answer"]
        acc += float(max(range(len(lls)), key=lambda i: lls[i]) == gold)
        norm += float(max(range(len(lls)), key=lambda i: lls[i] / len(row["choices"][i])) == gold)
        top = max(lls)
        probs = [math.exp(v - top) for v in lls]
        probs = [p / sum(probs) for p in probs]
        brier += sum((p - float(i == gold)) ** 2 for i, p in enumerate(probs))
    n = len(rows)
    return {"acc": acc / n, "acc_norm": norm / n, "brier_score": brier / n}


def first_rows(n: int) -> list[dict]:
    return [json.loads(line) for line in ARITH.read_text().splitlines()[:n]]


@pytest.fixture
def multi(tiny_base, tmp_path):
    adapter = make_adapter(tiny_base, tmp_path / "adapter", seed=3, r=4, targets=TARGETS)
    return load_multi(tiny_base, {"arith": adapter})


def test_local_task_scores_the_in_memory_model(tiny_base, multi, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # data_files resolve beside the YAML, not in the working directory
    model, tok = multi
    rows = first_rows(4)
    scores = {}
    for w in (0.0, 1.0):
        set_weights(model, {"arith": w})
        state = torch.get_rng_state()
        got = run_lm_eval(model, tok, ["loradem_demo_arith"], include_path=TASKS, limit=4, batch_size=3, log=lambda m: None)
        assert torch.equal(torch.get_rng_state(), state)  # lm-eval reseeds torch; the caller's state is restored
        assert set(got) == {"loradem_demo_arith"}
        scores[w] = got["loradem_demo_arith"]
        expected = hand_scores(model, tok, rows)
        assert scores[w]["acc"] == pytest.approx(expected["acc"], abs=1e-12)
        assert scores[w]["acc_norm"] == pytest.approx(expected["acc_norm"], abs=1e-12)
        assert scores[w]["brier_score"] == pytest.approx(expected["brier_score"], abs=1e-5)
        assert 0.0 <= scores[w]["acc"] <= 1.0
    # the adapter's scale reaches lm-eval: weight 1 is another model than weight 0
    assert abs(scores[1.0]["brier_score"] - scores[0.0]["brier_score"]) > 1e-3
    # weight 0 is the base itself
    plain = run_lm_eval(load_base(tiny_base), tok, ["loradem_demo_arith"], include_path=TASKS, limit=4, log=lambda m: None)
    assert plain["loradem_demo_arith"] == pytest.approx(scores[0.0], abs=1e-6)


def test_lm_eval_draws_no_bars_unless_verbose(multi, capfd):
    """lm-eval draws its request bars with disable=False, past tqdm's defaults: loradem keeps them off the terminal."""
    from loradem.progress import set_verbose

    model, tok = multi
    run_lm_eval(model, tok, ["loradem_demo_arith"], include_path=TASKS, limit=2, batch_size=2, log=lambda m: None)
    assert "requests" not in capfd.readouterr().err
    set_verbose(True)
    try:
        run_lm_eval(model, tok, ["loradem_demo_arith"], include_path=TASKS, limit=2, batch_size=2, log=lambda m: None)
    finally:
        set_verbose(False)
    assert "Running loglikelihood requests" in capfd.readouterr().err


def test_unknown_task_is_one_line_error(multi):
    model, tok = multi
    with pytest.raises(LorademError, match=r"lm-eval task 'loradem_demo_arit': unknown: not in .* nor among lm-eval's tasks; did you mean loradem_demo_arith") as err:
        run_lm_eval(model, tok, ["loradem_demo_arit"], include_path=TASKS, log=lambda m: None)
    assert "\n" not in str(err.value)


def test_public_task_without_its_dataset_says_so(multi, monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no hub here anyway; never wait on retries
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model, tok = multi
    with pytest.raises(LorademError, match=r"^lm-eval task 'arc_easy': could not load its data \(.*\); public tasks need their datasets reachable"):
        run_lm_eval(model, tok, ["arc_easy"], include_path=TASKS, log=lambda m: None)


def _task(folder: Path, name: str, **cfg) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"task": name, "dataset_path": "json", "output_type": "multiple_choice", **cfg}))
    return path


def test_include_folder_problems_are_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = _task(tmp_path / "a", "t_missing", dataset_kwargs={"data_files": {"test": "nowhere.jsonl"}})
    with pytest.raises(LorademError, match=rf"^{missing}: dataset_kwargs.data_files.test: 'nowhere.jsonl' not found beside the YAML"):
        prepare_task_folder(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "broken.yaml").write_text("task: x\n  bad: [\n")
    with pytest.raises(LorademError, match=r"broken.yaml: line \d+: not valid YAML"):
        prepare_task_folder(tmp_path / "b")
    with pytest.raises(LorademError, match=r"eval.lm_eval_include_path: 'no/such/folder' is not a folder"):
        resolve_include_path("no/such/folder")


def test_paths_resolve_beside_the_yaml_and_tags_survive(tmp_path, monkeypatch):
    from lm_eval.tasks._yaml_loader import load_yaml

    monkeypatch.chdir(tmp_path)
    src = tmp_path / "tasks"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "rows.jsonl").write_text("{}\n")
    (tmp_path / "cwd.jsonl").write_text("{}\n")
    _task(src / "sub", "t_beside", dataset_kwargs={"data_files": {"test": "rows.jsonl", "validation": ["cwd.jsonl"]}},
          process_docs="PLACEHOLDER")
    text = (src / "sub" / "t_beside.yaml").read_text().replace("PLACEHOLDER", "!function utils.process")
    (src / "sub" / "t_beside.yaml").write_text(text)
    _task(src, "t_hub", dataset_kwargs={"data_files": {"test": "hf://datasets/x/y/z.jsonl"}})
    copy = prepare_task_folder(src)
    cfg = load_yaml(copy / "sub" / "t_beside.yaml", resolve_func=False)  # as lm-eval reads it
    assert cfg["process_docs"] == str(copy / "sub" / "utils.process")  # the !function tag survives, relative to its YAML
    assert cfg["dataset_kwargs"]["data_files"] == {"test": str((src / "sub" / "rows.jsonl").resolve()), "validation": ["cwd.jsonl"]}
    assert (copy / "t_hub.yaml").read_text() == (src / "t_hub.yaml").read_text()  # nothing to change: copied as is


def test_relative_include_path_resolution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_include_path("eval/tasks") == TASKS  # from anywhere: the checkout's eval/tasks
    (tmp_path / "recipes" / "eval" / "tasks").mkdir(parents=True)
    assert resolve_include_path("eval/tasks", recipe_dir=tmp_path / "recipes") == (tmp_path / "recipes" / "eval" / "tasks").resolve()
    assert resolve_include_path(str(TASKS)) == TASKS


def test_shipped_data_is_its_generators_output():
    spec = importlib.util.spec_from_file_location("make_data", TASKS / "loradem_demo" / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert ARITH.read_text() == module.render(module.make_rows())


@pytest.mark.slow
def test_comparison_rows_carry_benchmarks(tiny_base, tmp_path):
    from loradem.evaluate.compare import EvalPlan, EvalSource, compare_models
    from loradem.recipe import EvalSettings

    def test_rows(task: str) -> list[dict]:
        lines = (REPO / "recipes" / "data" / "demo" / f"{task}.jsonl").read_text().splitlines()[:3]
        return [json.loads(line) for line in lines]

    adapters = {n: make_adapter(tiny_base, tmp_path / "adapters" / n, seed=5 + i, r=4, targets=TARGETS)
                for i, n in enumerate(("addition", "sort"))}
    settings = EvalSettings(max_new_tokens=4, batch_size=6, lm_eval_tasks=["loradem_demo_arith", "loradem_demo_arith_gen"],
                            lm_eval_include_path=str(TASKS), lm_eval_limit=3)
    out = tmp_path / "runs" / "bench"
    # the "assembled" model is the base folder itself, so the dem row must score as the base row does
    plan = EvalPlan(run_name="bench", sources=tuple(EvalSource(n, "exact_match", test_rows(n)) for n in ("addition", "sort")),
                    settings=settings, max_length=256, base_dir=tiny_base, adapters=adapters,
                    search={"weights": {"addition": 0.0, "sort": 0.0}}, model_dir=tiny_base, out_dir=out)
    rows = compare_models(plan, log=lambda m: None)

    by_name = {r["name"]: r["benchmarks"] for r in rows}
    assert list(by_name) == ["base", "adapter:addition", "adapter:sort", "uniform", "sum", "dem"]
    for bench in by_name.values():
        assert set(bench) == {"loradem_demo_arith", "loradem_demo_arith_gen"}
        assert 0.0 <= bench["loradem_demo_arith"]["acc"] <= 1.0 and 0.0 <= bench["loradem_demo_arith_gen"]["exact_match"] <= 1.0
    assert by_name["dem"]["loradem_demo_arith"] == pytest.approx(by_name["base"]["loradem_demo_arith"], abs=1e-6)
    model, tok = load_multi(tiny_base, adapters)
    set_weights(model, {"addition": 1.0, "sort": 1.0})
    expected = hand_scores(model, tok, first_rows(3))
    assert by_name["sum"]["loradem_demo_arith"]["brier_score"] == pytest.approx(expected["brier_score"], abs=1e-5)
    assert abs(by_name["sum"]["loradem_demo_arith"]["brier_score"] - by_name["base"]["loradem_demo_arith"]["brier_score"]) > 1e-3

    report = json.loads((out / "report.json").read_text())
    assert [r["benchmarks"] for r in report["rows"]] == list(by_name.values())
    assert report["lm_eval"]["limit"] == 3 and (out / report["lm_eval"]["include_path"]).resolve() == TASKS.resolve()
    md = (out / "report.md").read_text()
    assert "| model | loradem_demo_arith acc | loradem_demo_arith acc_norm | loradem_demo_arith brier_score | loradem_demo_arith_gen exact_match |" in md
    assert f"| `sum` | {by_name['sum']['loradem_demo_arith']['acc']:.4f} |" in md
    assert "At most 3 examples per task" in md


def test_report_refuses_malformed_benchmarks(tmp_path):
    from test_report import METRICS, make_rows

    from loradem.evaluate.report import write_report

    rows = make_rows(["579", "49", "22", "1000"])
    rows[0]["benchmarks"] = {"loradem_demo_arith": {"acc": "N/A"}}
    with pytest.raises(LorademError, match=r"row 0 \('base'\): benchmarks: expected \{task: \{metric: finite number\}\}"):
        write_report(tmp_path / "out", "demo", METRICS, rows)
    assert not (tmp_path / "out").exists()
