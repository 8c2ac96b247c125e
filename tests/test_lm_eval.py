"""`--model ee-hf` in lm-eval-harness against its oracle, `--model hf` on the same base model."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_decoding import save_median_heads
from tiny import WeightReads, launch_two_cpu_ranks

from hf_earlyexit.evaluation.lm_eval_plugin import register
from hf_earlyexit.modeling.options_earlyexit import check_eps

TASKS_DIR = Path(__file__).resolve().parents[1] / "lm_eval_tasks"
TASKS = ["ee_capitals", "ee_sequences"]
LIMIT = 6


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return save_median_heads(tmp_path_factory.mktemp("lm_eval"), strict_key="0.7")


def evaluate(model: str, model_args: str, **kw) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    register()
    return lm_eval.simple_evaluate(
        model=model, model_args=model_args + ",dtype=float32", tasks=TASKS, device="cpu", batch_size=4,
        limit=LIMIT, task_manager=TaskManager(include_path=str(TASKS_DIR)), **kw,
    )


def metrics(results: dict) -> dict:
    return {task: {k: v for k, v in values.items() if "," in k} for task, values in results["results"].items()}


def responses(results: dict) -> dict:
    return {task: [s["filtered_resps"] for s in samples] for task, samples in results["samples"].items()}


@pytest.fixture(scope="module")
def reference(folders):
    base, _ = folders
    return evaluate("hf", f"pretrained={base}", log_samples=True)


@pytest.mark.parametrize("extra", ["eps=1", "eps=1.0,mode=early_exit", "mode=full", "eps=1,mode=dssd",
                                   "eps=1,continuous=True", "mode=full,continuous=true"])
def test_eps_one_gives_exactly_the_hf_metrics(folders, reference, extra):
    _, heads = folders
    got = evaluate("ee-hf", f"pretrained={heads},{extra}", log_samples=True)
    assert metrics(got) == metrics(reference)
    # generated texts and greedy flags exactly; log-likelihoods to float rounding (a context shared by several
    # requests runs once, then each continuation on its cache: the same sums in another order, which some CPUs'
    # kernels round differently in the last bit)
    got_flat, reference_flat = flat_responses(got), flat_responses(reference)
    assert got_flat.keys() == reference_flat.keys()
    for task in got_flat:
        assert same_responses(got_flat[task], reference_flat[task]), task


def test_dssd_generation_is_lossless_while_scoring_exits(folders, reference):
    _, heads = folders
    got = evaluate("ee-hf", f"pretrained={heads},eps=0.5,mode=dssd", log_samples=True)
    assert responses(got)["ee_sequences"] == responses(reference)["ee_sequences"]
    report = got["config"]["early_exit"]["tasks"]
    assert report["ee_sequences"]["generation"]["acceptance_rate"] is not None


def test_continuous_batching_generates_what_batched_early_exit_generates(folders):
    """Requests queued (batch 4 refilled as they finish) decode as in lm-eval's own batches: same responses, same
    exit counts (kv_fill recompute is exact, so a request's tokens do not depend on its batch)."""
    _, heads = folders
    batched = evaluate("ee-hf", f"pretrained={heads},eps=0.5", log_samples=True)
    queued = evaluate("ee-hf", f"pretrained={heads},eps=0.5,continuous=True", log_samples=True)
    assert responses(queued) == responses(batched) and metrics(queued) == metrics(batched)
    counts = [r["config"]["early_exit"]["tasks"]["ee_sequences"]["generation"]["exit_counts"]
              for r in (queued, batched)]
    assert counts[0] == counts[1] and counts[0]["full"] < sum(counts[0].values())
    with pytest.raises(ValueError, match="continuous=True decodes by early exit with the step rule; got mode='dssd'"):
        evaluate("ee-hf", f"pretrained={heads},eps=0.5,mode=dssd,continuous=True")
    with pytest.raises(ValueError, match="continuous='maybe' must be true or false"):
        evaluate("ee-hf", f"pretrained={heads},eps=0.5,continuous=maybe")


def test_exit_counts_cover_only_scored_positions(folders):
    _, heads = folders
    got = evaluate("ee-hf", f"pretrained={heads},eps=0.5")
    report = got["config"]["early_exit"]
    assert report["eps"] == 0.5 and report["mode"] == "early_exit"
    scoring = report["tasks"]["ee_capitals"]["scoring"]
    # character tokenizer: each choice is scored on " " + choice, one token per character
    import json

    docs = [json.loads(line) for line in (TASKS_DIR / "ee_capitals.jsonl").read_text().splitlines()[:LIMIT]]
    assert scoring["tokens"] == sum(1 + len(c) for d in docs for c in d["choices"])
    assert sum(scoring["exit_counts"].values()) == scoring["tokens"]
    assert 0 < scoring["exit_fractions"]["full"] < 1 and scoring["layers_saved"] > 0
    generation = report["tasks"]["ee_sequences"]["generation"]
    assert generation["tokens"] > 0 and generation["tokens_per_s"] > 0


@pytest.mark.parametrize("value, expected", [(1, 1.0), (0.9, 0.9), ("0.5", 0.5), (0, 0.0)])
def test_eps_values_arrive_typed_and_are_coerced(value, expected):
    assert check_eps(value) == expected


@pytest.mark.parametrize("value", [1.5, -0.1, "abc", True, float("nan")])
def test_bad_eps_is_named(value):
    with pytest.raises(ValueError, match="eps="):
        check_eps(value)


def test_bad_mode_and_uncalibrated_eps_are_named(folders):
    _, heads = folders
    with pytest.raises(ValueError, match="mode='fast'"):
        evaluate("ee-hf", f"pretrained={heads},mode=fast")
    with pytest.raises(ValueError, match="eps=0.9"):
        evaluate("ee-hf", f"pretrained={heads},eps=0.9")


def test_plain_lm_eval_cli_finds_ee_hf_and_keeps_its_own_models(folders, tmp_path):
    """The installed `.pth` hook registers `ee-hf` for the unmodified `lm_eval` command; `--model hf` still works."""
    base, heads = folders
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    common = ["--tasks", "ee_capitals", "--include_path", str(TASKS_DIR), "--limit", "3", "--device", "cpu"]
    lm_eval = [sys.executable, "-m", "lm_eval"]
    ours = subprocess.run([*lm_eval, "--model", "ee-hf", "--model_args", f"pretrained={heads},eps=0.5", *common],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert ours.returncode == 0, ours.stderr[-3000:]
    assert "ee_capitals" in ours.stdout and "early exit: eps=0.5" in ours.stdout
    theirs = subprocess.run([*lm_eval, "--model", "hf", "--model_args", f"pretrained={base}", *common],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert theirs.returncode == 0, theirs.stderr[-3000:]


def test_sweep_writes_points_plots_and_resumes(folders, tmp_path, monkeypatch):
    import json

    from hf_earlyexit.commands.cli import main

    _, heads = folders
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    out = tmp_path / "sweep"
    args = ["sweep", "--model", heads, "--tasks", "ee_capitals", "--eps", "0.5", "1", "--limit", "4",
            "--output_dir", str(out)]
    assert main(args) == 0
    for name in ("sweep.csv", "sweep.json", "score_vs_eps.png", "speedup_vs_eps.png", "exits_vs_eps.png"):
        assert (out / name).stat().st_size > 0, name
    points = json.loads((out / "sweep.json").read_text())
    assert [p["eps"] for p in points] == [0.5, 1.0]
    full = points[1]["early_exit"]["tasks"]["ee_capitals"]["scoring"]["exit_fractions"]["full"]
    assert full == 1.0 and points[0]["early_exit"]["tasks"]["ee_capitals"]["scoring"]["exit_fractions"]["full"] < 1
    # resumable: finished points are not rerun
    stamp = (out / "points" / "eps_0.5.json").stat().st_mtime_ns
    assert main(args + ["--eps", "0.5", "0.7", "1"]) == 0
    assert (out / "points" / "eps_0.5.json").stat().st_mtime_ns == stamp
    assert (out / "points" / "eps_0.7.json").exists()


def test_sweep_refuses_a_bad_eps():
    from hf_earlyexit.evaluation.sweep import SweepArgs

    with pytest.raises(ValueError, match="eps=2"):
        SweepArgs(tasks=["ee_capitals"], eps=[0.5, 2])


def test_non_editable_install_registers_ee_hf(folders, tmp_path):
    """`pip install .` (a built wheel, not the editable hook) also installs the `.pth` and the model card template:
    the plain `lm_eval` finds `ee-hf` from that copy, `--model hf` still works beside it, and cards render."""
    import site
    import venv

    base, heads = folders
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    # The new venv sees the packages of the interpreter running this suite (wherever that was installed: a venv, the
    # system, a user site), as plain paths listed after its own site-packages: the `.pth` files there (the editable
    # hook among them) are not processed, so only the copy installed below can provide hf_earlyexit and the hook.
    [inner_site] = env_dir.glob("lib/python*/site-packages")
    outer = [p for p in (*site.getsitepackages(), site.getusersitepackages()) if Path(p).is_dir()]
    (inner_site / "outer_packages.pth").write_text("".join(f"{p}\n" for p in outer))
    repo = Path(__file__).resolve().parents[1]
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "-q", str(repo)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    where = subprocess.run([str(python), "-c", "import hf_earlyexit; print(hf_earlyexit.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert str(env_dir) in where.stdout, where.stdout + where.stderr  # the installed copy, not the source tree
    assert list(env_dir.glob("lib/python*/site-packages/hf_earlyexit_lm_eval.pth")), "the wheel installs the hook"
    card = subprocess.run([str(python), "-c", "import sys; from hf_earlyexit.publish.card import render_card; "
                           "print(render_card(sys.argv[1]))", heads], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)  # the model card template travels inside the wheel
    assert card.returncode == 0 and "hf-earlyexit model card" in card.stdout, card.stderr[-3000:]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    common = ["--tasks", "ee_capitals", "--include_path", str(TASKS_DIR), "--limit", "2", "--device", "cpu"]
    for model, args in (("ee-hf", f"pretrained={heads},eps=0.5"), ("hf", f"pretrained={base}")):
        run = subprocess.run([str(python), "-m", "lm_eval", "--model", model, "--model_args", args, *common],
                             capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
        assert run.returncode == 0, (model, run.stderr[-3000:])
        assert "ee_capitals" in run.stdout



# lm-eval 0.4.13 stops a rank that gets no document of a task ("build_requests() did not find any docs"), under
# `--model hf` too, so every task here has at least one document per rank of the 2-rank test.
ROLLING_DOCS = {"ee_roll_many": ["first text", "second, longer text", "third"]}
ROLLING_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""


def tasks_with_rolling(folder: Path) -> Path:
    """The shipped tasks plus a perplexity task (3 documents: 2 + 1 over two ranks)."""
    import json
    import shutil

    shutil.copytree(TASKS_DIR, folder)
    for task, texts in ROLLING_DOCS.items():
        data = folder / f"{task}.jsonl"
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        (folder / f"{task}.yaml").write_text(ROLLING_YAML.format(task=task, data=data))
    return folder


def comparable(filtered_resps) -> list:
    """One document's responses: log-likelihoods and perplexity scores as floats (a samples file stores them as text),
    other texts as text."""
    if not isinstance(filtered_resps, (list, tuple)):
        filtered_resps = [filtered_resps]
    def one(r):
        if isinstance(r, (list, tuple)):  # (log-likelihood, is_greedy)
            return float(r[0])
        try:  # a perplexity score, as a float or as its text
            return float(r)
        except ValueError:
            return str(r)

    return [one(r) for r in filtered_resps]


def flat_responses(results: dict) -> dict[str, list]:
    """Per task, every sample's filtered responses in order, `(log-likelihood, is_greedy)` pairs flattened."""
    flat: dict[str, list] = {}
    for task, per_sample in responses(results).items():
        items = flat.setdefault(task, [])
        for resps in per_sample:
            for r in resps:
                items.extend(r if isinstance(r, tuple | list) else [r])
    return flat


def same_responses(got: list, expected: list, rel: float = 1e-6) -> bool:
    """Numbers equal to `rel` (float32 sums gathered from other processes differ by ~1 ulp), texts exactly."""
    if len(got) != len(expected):
        return False
    return all(math.isclose(g, e, rel_tol=rel) if isinstance(e, float) and isinstance(g, float) else g == e
               for g, e in zip(got, expected, strict=True))


def test_same_responses_compares_numbers_loosely_and_texts_exactly():
    assert same_responses([1.0, "a"], [1.0 + 1e-9, "a"])
    assert not same_responses([1.0, "a"], [1.0, "b"])
    assert not same_responses([1.0], [1.01])
    assert not same_responses(["1.0"], [1.0]) and not same_responses([1.0], [1.0, 2.0])


@pytest.mark.slow  # two processes that each import lm-eval: 40 s on idle cores, up to 2 min on busy ones
def test_accelerate_data_parallel_gathers_exit_counts_of_all_ranks(folders, tmp_path):
    """Under `accelerate launch` each rank scores its share; rank 0 writes exit counts summed over both, equal to one
    process's, with the same metrics and per-document responses. `--limit 5` splits documents 3 + 2, so the evaluator
    pads rank 1 with copies of its last request (not to be counted); the perplexity task splits 2 + 1."""
    import json

    import lm_eval
    from lm_eval.tasks import TaskManager

    _, heads = folders
    tasks, include = TASKS + list(ROLLING_DOCS), tasks_with_rolling(tmp_path / "tasks")
    limit, model_args = 5, f"pretrained={heads},eps=0.5,dtype=float32"
    run = launch_two_cpu_ranks("lm_eval", ["--model", "ee-hf", "--model_args", model_args, "--tasks", ",".join(tasks),
                                "--include_path", str(include), "--limit", str(limit), "--batch_size", "1",
                                "--output_path", str(tmp_path / "out"), "--log_samples"], cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    [results_file] = (tmp_path / "out").rglob("results_*.json")
    parallel = json.loads(results_file.read_text())
    register()
    single = lm_eval.simple_evaluate(model="ee-hf", model_args=model_args, tasks=tasks, device="cpu", batch_size=1,
                                     limit=limit, task_manager=TaskManager(include_path=str(include)),
                                     log_samples=True)

    assert metrics(parallel).keys() == metrics(single).keys() == set(tasks)
    for task, values in metrics(single).items():  # float32 sums from other processes, in another order: ~1 ulp
        ours = metrics(parallel)[task]
        assert ours.keys() == values.keys(), task
        assert same_responses([ours[k] for k in values], list(values.values())), (task, ours, values)
        [samples] = results_file.parent.glob(f"samples_{task}_*.jsonl")
        got = {row["doc_id"]: comparable(row["filtered_resps"]) for row in map(json.loads, samples.open())}
        expected = {row["doc_id"]: comparable(row["filtered_resps"]) for row in single["samples"][task]}
        assert got.keys() == expected.keys(), task
        for doc_id, responses in expected.items():
            assert same_responses(got[doc_id], responses), (task, doc_id, got[doc_id], responses)
    ours, theirs = parallel["config"]["early_exit"], single["config"]["early_exit"]
    assert (ours["ranks"], theirs["ranks"]) == (2, 1)
    assert ours["tasks"].keys() == theirs["tasks"].keys() == set(tasks)
    for task, kinds in theirs["tasks"].items():
        for kind, expected in kinds.items():
            entry = ours["tasks"][task][kind]
            assert sum(entry["exit_counts"].values()) == entry["tokens"] > 0
            for key in ("tokens", "exit_counts", "layers_saved", "macs_saved"):
                assert entry[key] == expected[key], (task, kind, key)


def test_padding_copies_are_told_apart_from_repeats():
    from types import SimpleNamespace

    from hf_earlyexit.evaluation.lm_eval_model import split_padding

    a, b, c = (SimpleNamespace(repeats=1), SimpleNamespace(repeats=2), SimpleNamespace(repeats=1))
    # the evaluator's list: each request `repeats` times, then the padding, copies of the last request
    assert split_padding([a, b, b, c, c, c]) == ([0, 1, 2, 3], {4: 3, 5: 3})
    assert split_padding([]) == ([], {})


def test_rank_local_view_is_restored_after_an_error():
    from hf_earlyexit.evaluation.lm_eval_model import EarlyExitLM

    lm = EarlyExitLM.__new__(EarlyExitLM)  # no model needed for the rank bookkeeping
    lm._rank, lm._world_size = 1, 2
    with pytest.raises(RuntimeError, match="boom"), lm._rank_local():
        assert lm.world_size == 1 and lm.rank == 1
        raise RuntimeError("boom")
    assert (lm.rank, lm.world_size) == (1, 2)


def sweep_points(heads: str, include: Path, out: Path, eps: list[str], *extra: str) -> dict[float, dict]:
    """`hf-earlyexit sweep` over the shipped tasks and a perplexity task: per ε, the metrics and the exit report
    without timings."""
    import json

    from hf_earlyexit.commands.cli import main

    tasks = ["ee_capitals", "ee_sequences", *ROLLING_DOCS]
    assert main(["sweep", "--model", heads, "--tasks", *tasks, "--include_path", str(include), "--eps", *eps,
                 "--limit", "4", "--batch_size", "3", "--output_dir", str(out), *extra]) == 0
    points = {}
    for point in json.loads((out / "sweep.json").read_text()):
        for kinds in point["early_exit"]["tasks"].values():
            for entry in kinds.values():
                entry.pop("tokens_per_s", None)
        points[point["eps"]] = point
    return points


@pytest.fixture(scope="module")
def separate_sweep(folders, tmp_path_factory):
    """The reference: one full evaluation per ε."""
    _, heads = folders
    root = tmp_path_factory.mktemp("separate_sweep")
    include = tasks_with_rolling(root / "tasks")
    return include, sweep_points(heads, include, root / "sweep", ["0.5", "0.7", "1"], "--no_one_pass")


@pytest.mark.parametrize("order", [["0.5", "0.7", "1"], ["1", "0.7", "0.5"]])
def test_one_pass_sweep_equals_a_separate_run_at_each_eps(folders, separate_sweep, tmp_path, order):
    """Scored requests of every ε come from the first point's forward passes, exactly: the same metrics (accuracy,
    perplexity), per-task exit counts and layers saved as an evaluation per ε; generation still decodes per ε.
    Either the full model (ε = 1) or an exiting ε may be the point that records."""
    _, heads = folders
    include, expected = separate_sweep
    got = sweep_points(heads, include, tmp_path / "sweep", order)
    assert got.keys() == expected.keys() == {0.5, 0.7, 1.0}
    for eps, point in expected.items():
        assert got[eps]["metrics"] == point["metrics"], eps
        assert got[eps]["early_exit"] == point["early_exit"], eps
    capitals = {eps: p["early_exit"]["tasks"]["ee_capitals"]["scoring"]["exit_fractions"]["full"]
                for eps, p in got.items()}
    assert capitals[0.5] <= capitals[0.7] < capitals[1.0] == 1.0  # exits depend on ε
    assert got[0.5]["early_exit"] != got[0.7]["early_exit"]


def test_replayed_points_run_no_forward_pass_for_scored_requests(folders, monkeypatch):
    """After the recording evaluation, a replayed ε answers log-likelihood requests without the model, and an ε
    that was not recorded is refused by name."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from hf_earlyexit.evaluation.lm_eval_model import EarlyExitLM

    _, heads = folders
    manager = TaskManager(include_path=str(TASKS_DIR))
    lm = EarlyExitLM(pretrained=heads, eps=0.5, dtype="float32", batch_size=4)
    calls = []
    handle = lm.model.engine.parts.layers[0].register_forward_hook(lambda *_: calls.append(1))
    try:
        lm.start_scoring_sweep([0.5, 1.0])
        first = lm_eval.simple_evaluate(model=lm, tasks=["ee_capitals"], limit=LIMIT, task_manager=manager)
        assert calls, "the recording evaluation runs the model"
        calls.clear()
        lm.replay_scoring(1.0)
        replayed = lm_eval.simple_evaluate(model=lm, tasks=["ee_capitals"], limit=LIMIT, task_manager=manager)
        assert not calls
    finally:
        handle.remove()
    assert replayed["config"]["early_exit"]["tasks"]["ee_capitals"]["scoring"]["exit_fractions"]["full"] == 1.0
    assert first["config"]["early_exit"]["tasks"]["ee_capitals"]["scoring"]["exit_fractions"]["full"] < 1.0
    with pytest.raises(ValueError, match="eps=0.7 was not recorded"):
        lm.replay_scoring(0.7)


def test_one_pass_sweep_of_generation_alone_decodes_at_each_eps(folders, tmp_path):
    """A grid of generation tasks only records no scored answers; every point still decodes at its own ε."""
    import json

    from hf_earlyexit.commands.cli import main

    _, heads = folders
    out = tmp_path / "sweep"
    assert main(["sweep", "--model", heads, "--tasks", "ee_sequences", "--include_path", str(TASKS_DIR), "--eps",
                 "0.5", "1", "--limit", "3", "--output_dir", str(out)]) == 0
    points = {p["eps"]: p["early_exit"]["tasks"]["ee_sequences"]["generation"]
              for p in json.loads((out / "sweep.json").read_text())}
    assert points[1.0]["exit_fractions"]["full"] == 1.0 > points[0.5]["exit_fractions"]["full"]


def _oracle_loglikelihood(lm, ids: list[int], contlen: int, eps: float, rule: str, shared_last: bool = False,
                          gates: list[float] | None = None, reads: list[list[float]] | None = None) -> float:
    """The log-likelihood of the last `contlen` tokens of `ids`, written out by hand from the base model and the
    heads: a position leaves at the first exit whose breaking-ties score (top-1 minus top-2 probability) reaches τ,
    under `top_token` only where that head's top token is the scored token (never at a last position that other
    requests score with another token, `shared_last`) and its score reaches the head's gate (`gates`), and then
    reads the head's log-probability; else the base model's. `reads[j]` collects the scores of the positions that
    would read head `j` without gates."""
    model = lm.model
    taus = model.thresholds_for(eps)
    x = torch.tensor([ids[:-1]])
    with torch.no_grad():
        full = torch.log_softmax(model.get_base_model()(x).logits[0].float(), dim=-1)
        heads = [torch.log_softmax(h[0].float(), dim=-1) for h in model(x, output_hidden_states=True).exit_logits]
    total = 0.0
    for pos in range(len(ids) - 1 - contlen, len(ids) - 1):
        token, value = ids[pos + 1], full[pos, ids[pos + 1]]
        for j, (tau, log_probs) in enumerate(zip(taus, heads, strict=True)):
            top2 = log_probs[pos].exp().topk(2)
            score = float(top2.values[0] - top2.values[1])
            if tau is not None and score >= tau:
                shared = shared_last and pos == len(ids) - 2
                if rule == "top_token" and int(top2.indices[0]) == token and not shared and reads is not None:
                    reads[j].append(score)
                if rule == "confidence" or (int(top2.indices[0]) == token and not shared
                                            and (gates is None or score >= gates[j])):
                    value = log_probs[pos, token]
                break
        total += float(value)
    return total


@pytest.mark.parametrize("rule", ["top_token", "confidence"])
def test_scored_positions_take_the_head_only_where_the_rule_lets_them(folders, rule):
    """Log-likelihoods at ε = 0.5 equal a hand-written oracle of the rule (base model + heads), on a continuation
    the first head would write itself (so top-token exits happen) and on one-token continuations of one context
    (HFLM scores them from one input; its last position differs between them, so under `top_token` it stays with
    the full model and both choices are scored by the same distribution)."""
    from lm_eval.api.instance import Instance

    from hf_earlyexit.evaluation.lm_eval_model import EarlyExitLM

    _, heads = folders
    lm = EarlyExitLM(pretrained=heads, eps=0.5, scoring_rule=rule, dtype="float32", batch_size=4)
    context = "the capital of france is"
    ids = lm.tok_encode(context)
    letters = set(lm.tok_encode("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    for _ in range(12):  # continue with the first head's own top tokens (letters only: the text round-trips)
        with torch.no_grad():
            logits = lm.model(torch.tensor([ids]), output_hidden_states=True).exit_logits[0][0, -1]
        top = int(lm.model.exit_heads[0].to_token_ids(logits.argmax()))
        ids.append(top if top in letters else lm.tok_encode("e")[0])
    continuation = lm.tokenizer.decode(ids[len(lm.tok_encode(context)):])
    assert lm.tok_encode(context + continuation) == ids
    requests = [(context, continuation), (context, "p"), (context, "q")]
    with WeightReads(lm.model.get_base_model().get_output_embeddings().weight) as reads:
        got = lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)])
    for (ctx, cont), (value, _) in zip(requests, got, strict=True):
        whole = lm.tok_encode(ctx + cont)
        contlen = len(whole) - len(lm.tok_encode(ctx))
        expected = _oracle_loglikelihood(lm, whole, contlen, 0.5, rule, shared_last=contlen == 1)
        assert value == pytest.approx(expected, rel=1e-5, abs=1e-4)
    scoring = lm.early_exit_report()["tasks"]["all"]["scoring"]
    assert scoring["exit_fractions"]["full"] < 1  # exits happened on scored positions
    # the LM head ran at the scored positions that stayed, and nowhere else
    stayed = round(scoring["exit_fractions"]["full"] * scoring["tokens"])
    assert reads.positions() == stayed
    one_token = [(context, "p"), (context, "q")]
    if rule == "top_token":  # the shared last position stays with the full model for both choices
        plain = EarlyExitLM(pretrained=heads, eps=1.0, dtype="float32", batch_size=4)
        full = plain.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(one_token)])
        assert [v for v, _ in got[1:]] == [v for v, _ in full]


def test_scoring_reads_the_lm_head_only_at_scored_positions(folders):
    """The LM head sees exactly the scored positions (continuations for `loglikelihood`, every token for
    `loglikelihood_rolling`), and the answers are the full model's log-probabilities taken from a plain forward
    pass over each request alone (the oracle), requests of different lengths sharing right-padded batches."""
    from lm_eval.api.instance import Instance

    from hf_earlyexit.evaluation.lm_eval_model import EarlyExitLM

    _, heads = folders
    lm = EarlyExitLM(pretrained=heads, eps=1.0, dtype="float32", batch_size=2)
    base = lm.model.get_base_model()
    pairs = [("the capital of france is", " paris"), ("one two three", " four five six seven"), ("a", " b c d")]
    text = "monday tuesday wednesday thursday"
    with WeightReads(base.get_output_embeddings().weight) as reads:
        got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
        rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    encoded = [lm._encode_pair(*p) for p in pairs] + [([lm.prefix_token_id], lm.tok_encode(text))]
    assert reads.positions() == sum(len(cont) for _, cont in encoded)  # scored positions, nothing more
    for (context, cont), value in zip(encoded, [v for v, _ in got] + rolling, strict=True):
        ids = torch.tensor([context + cont[:-1]])
        with torch.no_grad():
            log_probs = torch.log_softmax(base(ids).logits[0, -len(cont):], dim=-1)
        assert value == pytest.approx(float(log_probs[torch.arange(len(cont)), cont].sum()), rel=1e-6, abs=1e-5)


def test_scoring_gates_send_positions_below_a_heads_gate_to_the_full_model(folders, tmp_path):
    """With `scoring_delta`, a scored position that would read its exit head (`top_token`) reads it only where the
    head's confidence also reaches that head's gate (fitted from the calibration statistics: here one recorded token
    per head at a chosen confidence, within δ), else the full model scores it — it does not move on to a later exit.
    Log-likelihoods equal the by-hand oracle with those gates and differ from the ungated ones; a one-pass sweep
    records and replays the same answers; `scoring_delta=inf` removes the gates."""
    from lm_eval.api.instance import Instance

    from hf_earlyexit.evaluation.lm_eval_model import EarlyExitLM
    from hf_earlyexit.modeling.modeling_earlyexit import EarlyExitForCausalLM

    _, heads = folders
    plain = EarlyExitLM(pretrained=heads, eps=0.5, dtype="float32", batch_size=4)
    context = "the capital of france is"
    ids = lm_ids = plain.tok_encode(context)
    letters = set(plain.tok_encode("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    for _ in range(16):  # the last head's own top tokens (letters only: the text round-trips), so heads are read
        with torch.no_grad():
            logits = plain.model(torch.tensor([ids]), output_hidden_states=True).exit_logits[-1][0, -1]
        top = int(plain.model.exit_heads[-1].to_token_ids(logits.argmax()))
        ids = ids + [top if top in letters else plain.tok_encode("e")[0]]
    continuation = plain.tokenizer.decode(ids[len(lm_ids):])
    contlen = len(ids) - len(lm_ids)
    reads = [[] for _ in plain.model.exit_heads]
    ungated = _oracle_loglikelihood(plain, ids, contlen, 0.5, "top_token", reads=reads)
    assert sum(map(len, reads)) >= 2, reads
    gates = []  # per head: between its two middle read scores (so some reads pass and some do not), else never
    for scores in reads:
        scores = sorted(scores)
        gates.append((scores[len(scores) // 2 - 1] + scores[len(scores) // 2]) / 2 if len(scores) >= 2
                     else (scores[0] + 1e-3 if scores else 2.0))
    model = EarlyExitForCausalLM.from_pretrained(heads)
    model.calibration_stats = {}
    for j, gate in enumerate(gates):  # one calibration token per head, read at `gate` within δ: its gate is `gate`
        model.calibration_stats |= {f"score.{j}": torch.tensor([gate]), f"agree.{j}": torch.ones(1, dtype=torch.uint8),
                                    f"error.{j}": torch.tensor([0.05])}
    model.save_pretrained(tmp_path / "gated")
    lm = EarlyExitLM(pretrained=str(tmp_path / "gated"), eps=0.5, scoring_delta="0.1", dtype="float32",
                     batch_size=4)
    assert lm.model.scoring_gates_for(0.5, 0.1) == pytest.approx(tuple(gates))
    gated = _oracle_loglikelihood(lm, ids, contlen, 0.5, "top_token", gates=gates)
    assert abs(gated - ungated) > 1e-4  # the gates change what is read
    request = [Instance("loglikelihood", {}, (context, continuation), 0)]
    [(value, _)] = lm.loglikelihood(request)
    assert value == pytest.approx(gated, rel=1e-5, abs=1e-4)
    assert lm.early_exit_report()["scoring_delta"] == 0.1
    lm.start_scoring_sweep([0.5, 1.0])
    [(recorded, _)] = lm.loglikelihood(request)
    lm.replay_scoring(0.5)
    assert recorded == lm.loglikelihood(request)[0][0] == pytest.approx(gated, rel=1e-5, abs=1e-4)
    loose = EarlyExitLM(pretrained=str(tmp_path / "gated"), eps=0.5, scoring_delta="inf", dtype="float32",
                        batch_size=4)
    assert loose.loglikelihood(request)[0][0] == pytest.approx(ungated, rel=1e-5, abs=1e-4)
    assert loose.early_exit_report()["scoring_delta"] is None


@pytest.mark.parametrize("value", ["abc", 0, -0.5, "nan", True])
def test_bad_scoring_delta_is_named(value):
    from hf_earlyexit.evaluation.scoring import check_scoring_delta

    with pytest.raises(ValueError, match=f"scoring_delta={value!r} must be a positive number"):
        check_scoring_delta(value)
    assert check_scoring_delta("0.2") == 0.2 and check_scoring_delta("none") == math.inf


def test_auto_policy_stops_checking_exits_that_do_not_pay_on_scored_positions(folders):
    """`exit_policy="auto"`: after `scoring_review` scored positions of a task, an exit whose positions leave too
    seldom to pay for its head (here: the tiny heads cost about what the LM head saves) is no longer checked. The
    first batch (the longest request, scored before the review) is answered as without the review, every later one
    exactly as at ε = 1, and no exit head runs after the review; the report names the exits still checked; a one-pass
    sweep reviews each ε as its own run would and records the same answers; `scoring_review=0` never reviews."""
    from lm_eval.api.instance import Instance

    from hf_earlyexit.evaluation.lm_eval_model import EarlyExitLM

    _, heads = folders
    probe = EarlyExitLM(pretrained=heads, eps=0.5, dtype="float32", batch_size=1, scoring_review=0)
    context = "the capital of france is"
    ids = probe.tok_encode(context)
    letters = set(probe.tok_encode("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    for _ in range(12):  # the first head's own top tokens, so positions of the first request leave
        with torch.no_grad():
            logits = probe.model(torch.tensor([ids]), output_hidden_states=True).exit_logits[0][0, -1]
        top = int(probe.model.exit_heads[0].to_token_ids(logits.argmax()))
        ids.append(top if top in letters else probe.tok_encode("e")[0])
    longest = probe.tokenizer.decode(ids[len(probe.tok_encode(context)):])
    requests = [(context, longest), ("one two three", " four five"), ("a", " b c"), ("monday", " tuesday")]
    instances = [Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)]
    unreviewed = probe.loglikelihood(instances)
    assert probe.early_exit_report()["tasks"]["all"]["scoring"]["exit_fractions"]["full"] < 1
    plain = EarlyExitLM(pretrained=heads, eps=1.0, dtype="float32", batch_size=1).loglikelihood(instances)
    lm = EarlyExitLM(pretrained=heads, eps=0.5, dtype="float32", batch_size=1, scoring_review="1")
    first = lm.loglikelihood(instances[:1])  # its positions reach the review
    scoring = lm.early_exit_report()["tasks"]["all"]["scoring"]
    assert scoring["checked_exits"] == []  # neither tiny head pays for itself
    calls = []
    hooks = [head.norm.register_forward_hook(lambda *_: calls.append(1)) for head in lm.model.exit_heads]
    try:
        rest = lm.loglikelihood(instances[1:])
    finally:
        for hook in hooks:
            hook.remove()
    assert not calls  # no exit head runs after the review
    assert first == unreviewed[:1] and first != plain[:1]  # before the review: exits checked
    assert rest == plain[1:]  # after it: the full model everywhere
    reviewed = first + rest
    lm.start_scoring_sweep([0.5, 1.0])
    recorded = lm.loglikelihood(instances)
    lm.replay_scoring(0.5)
    assert recorded == reviewed == lm.loglikelihood(instances)
    with pytest.raises(ValueError, match="scoring_review='x' must be a whole number"):
        EarlyExitLM(pretrained=heads, eps=0.5, dtype="float32", scoring_review="x")
