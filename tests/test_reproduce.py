"""`hf-earlyexit reproduce`: the whole --quick ladder on a tiny model (the embedded model's code path, smaller), its
resumability, and the pure pieces (AUROC, coverage, verdict rules)."""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

import pytest
import torch
from tiny import save_tiny_base

from hf_earlyexit.commands.cli import main
from hf_earlyexit.files import write_json
from hf_earlyexit.modeling.metrics_earlyexit import auroc, coverage_at_agreement
from hf_earlyexit.reproduce.run import FULL, QUICK, ReproduceArgs, Run, Step, is_done, prepare_folder
from hf_earlyexit.reproduce.verdicts import (
    CONFIRMED,
    DIFFERS,
    REFUTED,
    verdicts_batching,
    verdicts_calibration,
    verdicts_dssd,
)

SECTION_FIGURES = 8  # 1 + 1 + 1 + 3 (the sweep's three plots) + 1 + 1


def test_quick_reproduction_writes_six_sections_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_EARLYEXIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # the task folder is found next to the package, not in the working directory
    base = save_tiny_base("llama", tmp_path / "base")
    out, docs = tmp_path / "runs", tmp_path / "docs"
    argv = ["reproduce", "--model", base, "--quick", "--draft_vocab_size", "64", "--adapter_rank", "8",
            "--bench_dtype", "float32", "--output_dir", str(out), "--docs_dir", str(docs)]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "already done (skipped): none" in first

    text = (docs / "RESULTS.md").read_text()
    assert re.findall(r"^## (\d)\. ", text, flags=re.M) == ["1", "2", "3", "4", "5", "6"]
    figures = re.findall(r"!\[[^\]]*\]\((results/[^)]+\.png)\)", text)
    assert len(figures) == SECTION_FIGURES
    for figure in figures:
        assert (docs / figure).stat().st_size > 0, figure
    verdicts = re.findall(r"^- \*\*Verdict (\w+): (\w+)\.\*\*", text, flags=re.M)
    assert {key[0] for key, _ in verdicts} == set("123456")
    assert {verdict for _, verdict in verdicts} <= {CONFIRMED, DIFFERS, REFUTED}
    summary = re.findall(r"^\| (\w+) \| .* \| \*\*(\w+)\*\* \|$", text, flags=re.M)
    assert summary == verdicts  # the summary table carries every verdict
    assert "hf-earlyexit reproduce --model" in text and "hf-earlyexit sweep" in text and "hf-earlyexit bench" in text

    dynamics = json.loads((out / "training_dynamics" / "result.json").read_text())
    assert [r["name"] for r in dynamics["runs"]] == ["scratch-lam0.1", "scratch-lam0.95", "lm_head-lam0.1",
                                                    "lm_head-lam0.95"]
    assert all("held_out_agreement" in row for r in dynamics["runs"] for row in r["history"])
    metrics = json.loads((out / "confidence_metrics" / "result.json").read_text())
    assert {r["metric"] for r in metrics["rows"]} == {"breaking_ties", "max_prob", "entropy", "hidden_similarity"}

    # resumable: a second invocation finds every step done and only renders the report again
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/result.json")}
    assert len(stamps) == 7
    assert main(argv) == 0
    second = capsys.readouterr().out
    assert "steps run: none" in second
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("*/result.json")}
    assert (docs / "RESULTS.md").read_text().count("## ") == text.count("## ")

    # --steps: only the named steps run; a step left out keeps its place in the report as not measured
    for step in ("dssd", "batching"):
        (out / step / "result.json").unlink()
    assert main([*argv, "--steps", "batching"]) == 0
    assert "steps run: batching" in capsys.readouterr().out
    assert not (out / "dssd" / "result.json").exists()
    assert "Not measured yet" in (docs / "RESULTS.md").read_text().split("## 5.")[1].split("## 6.")[0]
    with pytest.raises(ValueError, match=r"steps=\['bench'\] are not steps of reproduce"):
        ReproduceArgs(steps=["bench"])


def _run(tmp_path: Path, **kw) -> Run:
    return Run(args=ReproduceArgs(output_dir=str(tmp_path), **kw), sizes=QUICK, out=tmp_path)


def test_a_step_is_redone_only_when_its_settings_change(tmp_path):
    step = Step("toy", lambda run, folder: {}, ("dtype", "train_steps"))
    folder = tmp_path / "toy"
    run = _run(tmp_path)
    prepare_folder(step, run, folder)
    (folder / "partial.bin").write_bytes(b"work in progress")
    prepare_folder(step, run, folder)  # same settings: an interrupted step keeps its partial work
    assert (folder / "partial.bin").exists()
    write_json(folder / "result.json", {"settings": {"dtype": "float32", "train_steps": QUICK.train_steps}})
    assert is_done(step, run, folder)
    assert is_done(step, _run(tmp_path, lam=0.5), folder)  # a setting the step does not use
    other = _run(tmp_path, dtype="bfloat16")
    assert not is_done(step, other, folder)
    prepare_folder(step, other, folder)  # other settings: start afresh
    assert not (folder / "partial.bin").exists() and not (folder / "result.json").exists()
    assert QUICK.train_steps < FULL.train_steps and QUICK.sweep_limit


def test_auroc_matches_pair_counting_with_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (80,), generator=g).float()
    agree = torch.rand(80, generator=g) < 0.3 + scores / 10
    pos, neg = scores[agree].tolist(), scores[~agree].tolist()
    pairs = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    assert auroc(scores, agree) == pytest.approx(pairs / (len(pos) * len(neg)))
    assert auroc(torch.arange(4.0), torch.tensor([False, False, True, True])) == 1.0
    assert math.isnan(auroc(torch.arange(4.0), torch.ones(4, dtype=torch.bool)))  # one class only


def test_coverage_at_agreement_takes_the_most_confident_first():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    agree = torch.tensor([True, True, True, False, False])
    assert coverage_at_agreement(scores, agree, 0.9) == pytest.approx(0.6)
    assert coverage_at_agreement(scores, agree, 0.5) == pytest.approx(1.0)
    assert coverage_at_agreement(scores, ~agree, 0.9) == 0.0


def _bench_rows(dssd_acceptance: float, fixed_acceptance: float) -> list[dict]:
    return [
        {"family": "plain", "label": "plain", "speedup": 1.0},
        {"family": "dssd", "label": "DSSD ε=0.8", "eps": 0.8, "speedup": 1.4, "drafted": 10,
         "acceptance_rate": dssd_acceptance},
        {"family": "layerskip", "label": "fixed", "exit": 2, "drafts": 4, "speedup": 1.2,
         "acceptance_rate": fixed_acceptance},
        {"family": "layerskip", "label": "fixed slow", "exit": 1, "drafts": 2, "speedup": 0.9, "acceptance_rate": 0.9},
    ]


@pytest.mark.parametrize("dssd, expected", [(0.85, CONFIRMED), (0.6, DIFFERS), (0.4, REFUTED)])
def test_dssd_acceptance_rule_against_the_tuned_baseline(dssd, expected):
    # the tuned baseline is the fastest fixed configuration (acceptance 0.5), not the most accepting one
    verdicts = verdicts_dssd({"sets": {"varied": _bench_rows(dssd, 0.5)}, "threads": 2, "dtype": "bfloat16"}, {})
    assert verdicts[0].verdict == expected
    assert verdicts[1].verdict == CONFIRMED  # 1.4x plain, faster than the baseline's 1.2x
    assert (verdicts[0].reason == "") == (expected == CONFIRMED)


@pytest.mark.parametrize("speedups, expected", [((2.0, 1.5, 1.0), CONFIRMED), ((2.0, 2.4, 1.0), DIFFERS),
                                                ((1.0, 1.2, 1.0), REFUTED)])
def test_speedup_rule_refutes_only_a_low_eps_no_faster_than_full(speedups, expected):
    from hf_earlyexit.reproduce.verdicts import verdicts_lm_eval

    rows = [{"task": "t", "eps": eps, "value": 0.5, "cost_speedup": speedup,
             "exit_fractions": json.dumps({"exit@1": 0.0 if eps == 1.0 else 0.5, "full": 1.0 if eps == 1.0 else 0.5})}
            for eps, speedup in zip((0.5, 0.8, 1.0), speedups, strict=True)]
    assert verdicts_lm_eval({"rows": rows, "task_sizes": {"t": 10}}, {})[1].verdict == expected


def test_a_task_where_nothing_exits_is_named_not_judged():
    """A task where the scoring rule lets no position leave at any ε (MMLU's shared one-token answers under
    top_token) says nothing about speed or exits vs ε; it is named in the reason instead of refuting the claims."""
    from hf_earlyexit.reproduce.verdicts import verdicts_lm_eval

    def rows(task, speedups, exited):
        return [{"task": task, "eps": eps, "value": 0.5, "cost_speedup": speedup,
                 "exit_fractions": json.dumps({"exit@1": share / 2, "exit@2": share / 2, "full": 1.0 - share})}
                for eps, speedup, share in zip((0.5, 0.8, 1.0), speedups, exited, strict=True)]

    result = {"rows": rows("t", (2.0, 1.5, 1.0), (0.5, 0.3, 0.0)) + rows("mmlu", (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)),
              "task_sizes": {"t": 10, "mmlu": 10}, "scoring_rule": "top_token", "real_tasks": True}
    _, speed, exits = verdicts_lm_eval(result, {})
    assert speed.verdict == exits.verdict == CONFIRMED
    result["rows"] = rows("t", (2.0, 2.2, 1.0), (0.3, 0.4, 0.0)) + rows("mmlu", (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    _, speed, exits = verdicts_lm_eval(result, {})
    assert speed.verdict == DIFFERS and exits.verdict == REFUTED
    for verdict in (speed, exits):
        assert "no scored position leaves at any ε on mmlu" in verdict.reason
        assert "the first head that passes its threshold names the scored token" in verdict.reason


def test_batching_rule_uses_the_loop_without_exits_and_needs_exits():
    def rows(speedup: float, exited: float) -> list[dict]:
        return [{"family": "early_exit", "eps": 0.9, "speedup_vs_eps1": speedup, "speedup": speedup,
                 "exit_fractions": [exited, 1 - exited]},
                {"family": "early_exit", "eps": 1.0, "speedup_vs_eps1": 1.0, "speedup": 1.0,
                 "exit_fractions": [0.0, 1.0]}]

    for speedup, expected in ((1.3, CONFIRMED), (1.1, DIFFERS), (0.8, REFUTED)):
        result = {"batches": {"1": rows(2.0, 0.5), "4": rows(speedup, 0.5)}, "dtype": "bfloat16"}
        assert verdicts_batching(result, {})[0].verdict == expected
    silent = verdicts_batching({"batches": {"4": rows(0.8, 0.0)}, "dtype": "bfloat16"}, {})[0]
    assert silent.verdict == DIFFERS and "no token exited" in silent.reason


def test_calibration_rule_allows_binomial_noise_and_flags_a_shortfall():
    def result(agreement: float, exited: float) -> dict:
        return {"check_tokens": 1000, "fit_tokens": 1000,
                "cascade": [{"eps": 0.9, "exited": exited, "agreement_exited": agreement, "agreement_all": 0.99},
                            {"eps": 1.0, "exited": 0.0, "agreement_exited": None, "agreement_all": 1.0}]}

    assert verdicts_calibration(result(0.89, 0.3), {})[0].verdict == CONFIRMED  # 300 tokens: 0.01 is noise
    assert verdicts_calibration(result(0.85, 0.3), {})[0].verdict == DIFFERS
    assert verdicts_calibration(result(0.7, 0.3), {})[0].verdict == REFUTED
    assert verdicts_calibration(result(0.5, 0.01), {})[0].verdict == DIFFERS  # 10 tokens are too few to judge
