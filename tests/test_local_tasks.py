"""lm-eval's built-in benchmark tasks on local files (`hf-earlyexit tasks`): the built-in prompts and metrics on data
read from the official file formats, and `ee-hf` at ε = 1 against `--model hf` on them.

The benchmark files here are a few items written by the tests in each benchmark's official format (the real copies
in ../shared/data are not needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_decoding import save_median_heads

from hf_earlyexit.evaluation.lm_eval_plugin import register
from hf_earlyexit.evaluation.local_tasks import TasksArgs, split_hellaswag_ctx, write_local_tasks

LOCAL_TASKS = ["arc_easy_local", "arc_challenge_local", "hellaswag_local", "winogrande_local", "mmlu_anatomy_local",
               "piqa_local"]
ARC = [
    {"id": "a1", "question": {"stem": "Which is a metal?", "choices": [
        {"text": "iron", "label": "A"}, {"text": "wood", "label": "B"}, {"text": "glass", "label": "C"}]},
     "answerKey": "A"},
    {"id": "a2", "question": {"stem": "What melts ice?", "choices": [
        {"text": "heat", "label": "1"}, {"text": "cold", "label": "2"}, {"text": "dark", "label": "3"},
        {"text": "wind", "label": "4"}]}, "answerKey": "1"},
]
HELLASWAG = [  # only `ctx`, as in ../shared/data (the Hub has ctx_a "...camera." and ctx_b "he")
    {"activity_label": "Playing harmonica", "ctx": "A man is in front of a camera. He plays a harmonica. he",
     "endings": ["rocks to the music.", "paints a fence.", "sleeps.", "runs away."], "label": 0},
    {"activity_label": "Home and Garden", "ctx": "How to install an ice maker. Locate the cold water pipe.",
     "endings": ["Turn off the water.", "Eat ice.", "Sing.", "Leave."], "label": 0},
]
WINOGRANDE = [
    {"qID": "w1", "sentence": "Ann was taller than Bea so _ got the top shelf.", "option1": "Ann",
     "option2": "Bea", "answer": "1"},
    {"qID": "w2", "sentence": "Ann was taller than Bea so _ needed a stool.", "option1": "Ann", "option2": "Bea",
     "answer": "2"},
]
MMLU_TEST = ['"Which bone, of the arm, is longest?",humerus,ulna,radius,carpal,A', "Where is the heart?,chest,leg,arm,"
             "head,A"]
MMLU_DEV = ["What is skin?,an organ,a bone,a nerve,a muscle,A"]
PIQA = [{"goal": "Open a jar.", "sol1": "Twist the lid.", "sol2": "Lick the lid."},
        {"goal": "Dry hair.", "sol1": "Use water.", "sol2": "Use a towel."}]
PIQA_LABELS = ["0", "1"]


def write_official(root: Path) -> Path:
    """A data folder laid out as ../shared/data, in the benchmarks' official formats."""
    def jsonl(path: Path, rows: list[dict]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    jsonl(root / "arc" / "ARC-Easy-Dev.jsonl", ARC)
    jsonl(root / "arc" / "ARC-Challenge-Test.jsonl", ARC[::-1])
    jsonl(root / "hellaswag" / "hellaswag_val_dev_split.jsonl", HELLASWAG)
    jsonl(root / "winogrande" / "dev_second_half.jsonl", WINOGRANDE)
    jsonl(root / "piqa" / "valid.jsonl", PIQA)
    (root / "piqa" / "valid-labels.lst").write_text("\n".join(PIQA_LABELS) + "\n")
    for split, rows in (("test", MMLU_TEST), ("dev", MMLU_DEV)):
        (root / "mmlu" / split).mkdir(parents=True)
        (root / "mmlu" / split / f"anatomy_{split}.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("local_tasks")
    out = root / "tasks"
    written = write_local_tasks(TasksArgs(data_dir=str(write_official(root / "data")), output_dir=str(out)))
    assert sorted(written) == sorted(LOCAL_TASKS)
    return out


@pytest.fixture(scope="module")
def task_manager(local_tasks):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(local_tasks))


def test_local_tasks_build_the_builtin_prompts_from_official_files(task_manager):
    """lm-eval's own templates and `process_docs` turn the converted records into the prompts, choices and targets
    that the Hub records of the same items give (written out by hand here)."""
    tasks = task_manager.load(LOCAL_TASKS)["tasks"]

    def view(name: str) -> list[tuple]:
        task = tasks[name]
        return [(task.doc_to_text(d), task.doc_to_choice(d), task.doc_to_target(d)) for d in task.eval_docs]

    assert view("arc_easy_local") == [
        ("Question: Which is a metal?\nAnswer:", ["iron", "wood", "glass"], 0),
        ("Question: What melts ice?\nAnswer:", ["heat", "cold", "dark", "wind"], 0)]
    assert view("arc_challenge_local")[0][0] == "Question: What melts ice?\nAnswer:"
    assert view("hellaswag_local") == [  # built-in process_docs: ctx_a + " " + ctx_b.capitalize()
        ("Playing harmonica: A man is in front of a camera. He plays a harmonica. He", HELLASWAG[0]["endings"], 0),
        ("Home and Garden: How to install an ice maker. Locate the cold water pipe.", HELLASWAG[1]["endings"], 0)]
    assert view("winogrande_local") == [
        (0, ["Ann was taller than Bea so Ann", "Ann was taller than Bea so Bea"], "got the top shelf."),
        (1, ["Ann was taller than Bea so Ann", "Ann was taller than Bea so Bea"], "needed a stool.")]
    assert view("mmlu_anatomy_local") == [
        ("Which bone, of the arm, is longest?\nA. humerus\nB. ulna\nC. radius\nD. carpal\nAnswer:",
         ["A", "B", "C", "D"], 0),
        ("Where is the heart?\nA. chest\nB. leg\nC. arm\nD. head\nAnswer:", ["A", "B", "C", "D"], 0)]
    assert view("piqa_local") == [("Question: Open a jar.\nAnswer:", ["Twist the lid.", "Lick the lid."], 0),
                                  ("Question: Dry hair.\nAnswer:", ["Use water.", "Use a towel."], 1)]
    assert tasks["mmlu_anatomy_local"].config.description.startswith("The following are multiple choice questions")


DATA_KEYS = {"task", "tag", "dataset_path", "dataset_name", "dataset_kwargs", "training_split", "validation_split",
             "test_split", "fewshot_split"}


@pytest.mark.parametrize("name", LOCAL_TASKS)
def test_local_task_yaml_overrides_only_the_data_source(local_tasks, name):
    from lm_eval.tasks._yaml_loader import load_yaml

    from hf_earlyexit.evaluation.local_tasks import builtin_yaml

    ours = load_yaml(local_tasks / f"{name}.yaml", resolve_func=False)
    theirs = load_yaml(builtin_yaml(name.removesuffix("_local")), resolve_func=False)
    changed = {k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k)}
    assert changed <= DATA_KEYS and "dataset_kwargs" in changed, changed
    assert ours["dataset_path"] == "json"
    assert all(Path(p).is_file() for p in ours["dataset_kwargs"]["data_files"].values())


def test_hellaswag_context_is_split_back_at_its_last_sentence_end():
    assert split_hellaswag_ctx("A man sits. He plays. the man") == ("A man sits. He plays.", "the man")
    assert split_hellaswag_ctx("How to cook. Boil water.") == ("How to cook. Boil water.", "")
    assert split_hellaswag_ctx('He says "hi." then he') == ('He says "hi."', "then he")


@pytest.mark.parametrize("name, content, message", [
    ("arc/ARC-Easy-Dev.jsonl", json.dumps({**ARC[0], "answerKey": "E"}), "answerKey='E'"),
    ("mmlu/test/anatomy_test.csv", "Q?,a,b,c,d,F", "answer_letter"),
    ("winogrande/dev.jsonl", json.dumps({**WINOGRANDE[0], "answer": "3"}), "answer='3'"),
    ("piqa/valid.jsonl", json.dumps(PIQA[0]), "2 labels for the 1 items"),
    ("hellaswag/hellaswag_val.jsonl", json.dumps({**HELLASWAG[0], "label": 7}), "label=7"),
])
def test_bad_benchmark_files_are_named(tmp_path, name, content, message):
    root = write_official(tmp_path / "data")
    (root / name).write_text(content + "\n")
    with pytest.raises(ValueError, match=message):
        write_local_tasks(TasksArgs(data_dir=str(root), output_dir=str(tmp_path / "out")))


def test_a_folder_without_benchmarks_is_refused(tmp_path):
    with pytest.raises(ValueError, match="holds no benchmark files"):
        write_local_tasks(TasksArgs(data_dir=str(tmp_path), output_dir=str(tmp_path / "out")))
    with pytest.raises(ValueError, match="not a folder"):
        write_local_tasks(TasksArgs(data_dir=str(tmp_path / "missing"), output_dir=str(tmp_path / "out")))
    with pytest.raises(ValueError, match="benchmarks=\\['squad'\\]"):
        TasksArgs(data_dir=str(tmp_path), output_dir=str(tmp_path / "out"), benchmarks=["squad"])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_median_heads(tmp_path_factory.mktemp("local_models"))


def run_local(task_manager, model: str, model_args: str) -> dict:
    import lm_eval

    register()
    return lm_eval.simple_evaluate(model=model, model_args=model_args + ",dtype=float32", tasks=LOCAL_TASKS,
                                   device="cpu", batch_size=4, task_manager=task_manager, log_samples=True)


def test_ee_hf_at_eps_one_equals_hf_on_every_local_benchmark(models, task_manager):
    """Acceptance of issue 20 on a slice: `ee-hf eps=1` gives the metrics `--model hf` gives, and its log-likelihoods
    to float rounding, on the built-in tasks of all five benchmarks run from local files; at ε = 0.5 scored positions
    of every task do exit."""
    base, heads = models
    reference = run_local(task_manager, "hf", f"pretrained={base}")
    ours = run_local(task_manager, "ee-hf", f"pretrained={heads},eps=1.0")
    assert set(reference["results"]) == set(LOCAL_TASKS)
    for task in LOCAL_TASKS:
        assert ours["results"][task] == reference["results"][task], task
        # ee-hf runs the LM head on the scored rows only and a shared context once: the sums agree to float rounding
        ours_resps = [resp for s in ours["samples"][task] for resp in s["filtered_resps"]]
        reference_resps = [resp for s in reference["samples"][task] for resp in s["filtered_resps"]]
        assert [greedy for _, greedy in ours_resps] == [greedy for _, greedy in reference_resps], task
        assert ([logprob for logprob, _ in ours_resps]
                == pytest.approx([logprob for logprob, _ in reference_resps], rel=1e-5, abs=1e-3)), task
    exiting = run_local(task_manager, "ee-hf", f"pretrained={heads},eps=0.5,scoring_rule=confidence")[
        "config"]["early_exit"]["tasks"]
    for task in LOCAL_TASKS:
        assert 0 < exiting[task]["scoring"]["exit_fractions"]["full"] < 1, task


def test_tasks_command_writes_the_tasks_and_names_a_bad_folder(tmp_path, capsys):
    from hf_earlyexit.commands.cli import main

    root = write_official(tmp_path / "data")
    assert main(["tasks", "--data_dir", str(root), "--output_dir", str(tmp_path / "out"), "--benchmarks", "piqa"]) == 0
    assert "piqa_local" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").glob("*.yaml")) == ["piqa_local.yaml"]
    assert main(["tasks", "--data_dir", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "out")]) == 2
    assert "data_dir=" in capsys.readouterr().err


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"the development copies of the benchmarks ({SHARED_DATA}) are "
                    "not on this machine")
def test_the_shared_benchmark_copies_become_runnable_builtin_tasks(tmp_path):
    """Every file of ../shared/data converts, and lm-eval loads each local task with all of its documents."""
    from lm_eval.tasks import TaskManager

    written = write_local_tasks(TasksArgs(data_dir=str(SHARED_DATA), output_dir=str(tmp_path)))
    assert {"arc_easy_local", "arc_challenge_local", "hellaswag_local", "winogrande_local", "piqa_local"} <= set(
        written) and any(name.startswith("mmlu_") for name in written)
    names = ["arc_easy_local", "arc_challenge_local", "hellaswag_local", "winogrande_local", "piqa_local",
             next(name for name in sorted(written) if name.startswith("mmlu_"))]
    tasks = TaskManager(include_path=str(tmp_path)).load(names)["tasks"]
    for name in names:
        splits = written[name]["splits"]
        assert len(tasks[name].eval_docs) == splits.get("test", splits.get("validation")), name
    harmonica = next(d for d in tasks["hellaswag_local"].eval_docs if d["activity_label"] == "Playing harmonica"
                     and "in front of a camera. He starts playing a harmonica" in d["ctx"])
    # the Hub record has ctx_a "... for the camera." and ctx_b "he" (official hellaswag_val.jsonl, ind 149)
    assert harmonica["query"].endswith("He starts playing a harmonica for the camera. He")


def test_reproduce_section_4_runs_the_builtin_tasks_from_a_data_dir(models, tmp_path):
    """`hf-earlyexit reproduce --data_dir`: section 4 converts the official files and sweeps lm-eval's built-in
    task on them; its ε = 1 point scores exactly what `--model hf` scores there."""
    from dataclasses import replace

    import lm_eval
    from lm_eval.tasks import TaskManager

    from hf_earlyexit.reproduce import steps
    from hf_earlyexit.reproduce.run import QUICK, ReproduceArgs, Run

    base, heads = models
    data = write_official(tmp_path / "data")
    sizes = replace(QUICK, sweep_eps=(0.5,))
    run = Run(args=ReproduceArgs(output_dir=str(tmp_path / "out"), data_dir=str(data)), sizes=sizes,
              out=tmp_path / "out", heads=heads)
    result = steps.lm_eval(run, tmp_path / "out" / "lm_eval")
    assert result["tasks"] == ["arc_easy_local"] and result["real_tasks"]
    assert result["task_sizes"] == {"arc_easy_local": len(ARC)}
    assert result["commands"][0].startswith(f"hf-earlyexit tasks --data_dir {data}")
    points = {p["eps"]: p for p in result["points"]}
    assert set(points) == {0.5, 1.0}
    register()
    manager = TaskManager(include_path=str(tmp_path / "out" / "lm_eval" / "tasks"))
    reference = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={base},dtype=float32", tasks=["arc_easy_local"], device="cpu",
        batch_size=8, limit=sizes.real_limit, task_manager=manager)
    expected = {k: v for k, v in reference["results"]["arc_easy_local"].items() if "," in k and "stderr" not in k}
    assert points[1.0]["metrics"]["arc_easy_local"] == expected
