"""The measuring steps of `hf-earlyexit reproduce`: each runs the project's own machinery and returns plain numbers.

Every step takes the `Run` and its folder and returns a JSON-able dict that holds the numbers the report needs and
`commands`, the stand-alone commands that measure the same thing by hand.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch

from ..evaluation.bench import BenchArgs, run_bench
from ..evaluation.local_tasks import TasksArgs, write_local_tasks
from ..evaluation.sweep import SweepArgs, run_sweep
from ..files import write_json
from ..loading import load, resolve
from ..modeling.base_earlyexit import DTYPES, load_base_model, load_tokenizer
from ..modeling.configuration_earlyexit import METRICS, EarlyExitConfig
from ..modeling.metrics_earlyexit import auroc, coverage_at_agreement
from ..modeling.modeling_earlyexit import EarlyExitForCausalLM
from ..training.calibrate import CalibrateConfig, calibration_spec, collect, collect_metrics
from ..training.data import GenerationSpec, draft_vocabulary, generate_corpus
from ..training.pipeline import CalibrateJob, TrainJob, build_corpus, run_calibrate, run_train
from ..training.train import CHECKPOINT, TrainConfig, find_checkpoint, train_heads

logger = logging.getLogger(__name__)

# paper Fig. 1: heads trained from scratch or copied from the LM head, with a low and a high entropy penalty
DYNAMICS_RUNS = (("scratch", 0.1), ("scratch", 0.95), ("lm_head", 0.1), ("lm_head", 0.95))
COVERAGE_TARGET = 0.9  # section 2: coverage of each metric at this agreement
ROC_POINTS = 41


def run_name(init: str, lam: float) -> str:
    return f"{init}-lam{lam:g}"


def _train_spec(sizes):

    return GenerationSpec(num_sequences=sizes.sequences, max_new_tokens=sizes.new_tokens)


def _draft_ids(corpus, base, tokenizer, size: int) -> torch.Tensor | None:
    """The draft vocabulary the pipeline would choose for heads of `size` tokens (None: full vocabulary)."""

    if not size:
        return None
    always = [t for t in [tokenizer.eos_token_id] if t is not None]
    return draft_vocabulary(corpus, base.config.get_text_config().vocab_size, size, always)


# -- 1. training dynamics ------------------------------------------------------------------------------------------


def training_dynamics(run, folder: Path) -> dict:
    """Four short trainings of paper heads (scratch / LM-head copy x λ 0.1 / 0.95) on one generated corpus, with
    per-head agreement and entropy on held-out sequences at every logged step, and the breaking-ties AUROC after."""

    args, sizes = run.args, run.sizes
    base = load_base_model(args.model, dtype=DTYPES[args.dtype]).eval()
    tokenizer = load_tokenizer(args.model)
    spec = _train_spec(sizes)
    corpus = build_corpus(TrainJob(model=args.model), spec, base, tokenizer, args.model)
    held_out, train = corpus.split(sizes.held_out_fraction)
    draft = _draft_ids(corpus, base, tokenizer, args.draft_vocab_size)
    runs = [_dynamics_run(run, folder, base, tokenizer, draft, train, held_out, init, lam)
            for init, lam in DYNAMICS_RUNS]
    flags = (f"--model {args.model} --head paper --draft_vocab_size {args.draft_vocab_size} --num_sequences "
             f"{sizes.sequences} --max_new_tokens {sizes.new_tokens} --steps {sizes.train_steps} --batch_size "
             f"{sizes.batch_size} --held_out_fraction {sizes.held_out_fraction} --log_every {sizes.log_every}")
    return {
        "runs": runs, "exit_layers": runs[0]["exit_layers"],
        "num_layers": base.config.get_text_config().num_hidden_layers,
        "data": {"sequences": len(train), "tokens": train.num_tokens, "held_out_sequences": len(held_out),
                 "held_out_tokens": held_out.num_tokens},
        "commands": [f"hf-earlyexit train {flags} --head_init {init} --lam {lam:g} "
                     f"--output_dir fig1-{run_name(init, lam)}" for init, lam in DYNAMICS_RUNS],
    }


def _dynamics_run(run, folder, base, tokenizer, draft, train, held_out, init: str, lam: float) -> dict:
    """One Fig. 1 configuration, resumable: a finished run's JSON is reused, an interrupted one resumes."""

    name = run_name(init, lam)
    done = folder / name / "run.json"
    if done.exists():
        return json.loads(done.read_text())
    sizes = run.sizes
    torch.manual_seed(0)  # heads from scratch draw from the global generator
    model = EarlyExitForCausalLM.from_base(base, exit_layers=run.args.exit_layers, head="paper", head_init=init,
                                           draft_token_ids=draft, tokenizer=tokenizer)
    config = TrainConfig(steps=sizes.train_steps, batch_size=sizes.batch_size, lam=lam, log_every=sizes.log_every,
                         checkpoint_every=sizes.log_every)
    work = folder / name
    history = train_heads(model, train, config, work, resume=find_checkpoint(work / CHECKPOINT) is not None,
                          held_out=held_out)
    records = collect(model, held_out, "breaking_ties")
    result = {"name": name, "init": init, "lam": lam, "exit_layers": list(model.config.exit_layers),
              "train_config": asdict(config), "history": history,
              "auroc_breaking_ties": [auroc(r["score"], r["agree"]) for r in records]}
    write_json(done, result)
    return result


# -- heads for sections 2-6 ----------------------------------------------------------------------------------------


def heads_config(path: str) -> EarlyExitConfig:
    """The config of a heads folder or of a name `load` knows (`shipped`)."""
    return EarlyExitConfig.from_pretrained(resolve(path))


def heads(run, folder: Path) -> dict:
    """The heads of sections 2-6: `--heads` as given, or trained and calibrated here with the project's pipeline."""
    args, sizes = run.args, run.sizes
    commands = []
    if args.heads:
        path = args.heads  # as given (`shipped` stays a name, so the report's commands run anywhere)
    else:
        path = str(folder / "model")
        _train_and_calibrate(run, folder, path)
        commands = [
            f"hf-earlyexit train --model {args.model} --output_dir {path} --head shared --draft_vocab_size "
            f"{args.draft_vocab_size} --adapter_rank {args.adapter_rank} --num_sequences {sizes.sequences} "
            f"--max_new_tokens {sizes.new_tokens} --steps {sizes.train_steps} --batch_size {sizes.batch_size} "
            f"--lam {args.lam:g} --dtype {args.dtype}",
            f"hf-earlyexit calibrate --model {path} --num_sequences {sizes.calibration_sequences} --max_new_tokens "
            f"{sizes.calibration_tokens} --min_tokens {sizes.min_calibration_tokens} --dtype {args.dtype}",
        ]
    config = heads_config(path)
    if not config.thresholds:
        raise ValueError(f"heads {path} are not calibrated; run `hf-earlyexit calibrate --model {path}` first")
    text = config.get_text_config()
    return {
        "path": path, "trained_here": not args.heads, "base_model": config.base_model_name_or_path,
        "model_type": text.model_type, "num_layers": text.num_hidden_layers, "vocab_size": text.vocab_size,
        "hidden_size": text.hidden_size, "exit_layers": list(config.exit_layers), "head_type": config.head_type,
        "head_init": config.head_init, "draft_vocab_size": config.draft_vocab_size, "metric": config.metric,
        "training": _training_summary(config.training), "commands": commands,
    }


def _training_summary(training: dict | None) -> dict:
    if not training:
        return {}
    train_config = training.get("train_config", {})
    return {"steps": training.get("steps"), "lam": train_config.get("lam"),
            "batch_size": train_config.get("batch_size"),
            "sequences": training.get("data", {}).get("sequences"), "held_out": training.get("held_out", [])}


def _train_and_calibrate(run, folder: Path, path: str) -> None:

    args, sizes = run.args, run.sizes
    work = folder / "work"
    job = TrainJob(model=args.model, output_dir=path, work_dir=str(work), dtype=args.dtype,
                   exit_layers=args.exit_layers, draft_vocab_size=args.draft_vocab_size, adapter_rank=args.adapter_rank,
                   resume=find_checkpoint(work / CHECKPOINT) is not None, overwrite=True)
    run_train(job, _train_spec(sizes), TrainConfig(steps=sizes.train_steps, batch_size=sizes.batch_size, lam=args.lam))
    calibrate = CalibrateJob(model=path, dtype=args.dtype, num_sequences=sizes.calibration_sequences,
                             max_new_tokens=sizes.calibration_tokens)
    run_calibrate(calibrate, CalibrateConfig(min_tokens=sizes.min_calibration_tokens))


# -- 2. confidence metrics -----------------------------------------------------------------------------------------


def confidence_metrics(run, folder: Path) -> dict:
    """Every metric on the same calibration-style tokens: AUROC of agreeing vs disagreeing tokens per head, the
    coverage at agreement `COVERAGE_TARGET`, and ROC curves."""

    args, sizes = run.args, run.sizes
    model, _ = load(run.heads, dtype=DTYPES[args.dtype])
    spec = calibration_spec()
    spec.num_sequences, spec.max_new_tokens = sizes.calibration_sequences, sizes.calibration_tokens
    corpus = generate_corpus(model.backbone, model.tokenizer, spec, model.config.base_model_name_or_path)
    records = collect_metrics(model, corpus, list(METRICS))
    rows = []
    for layer, record in zip(model.config.exit_layers, records, strict=True):
        agree = record["agree"]
        for metric in METRICS:
            scores = record[metric]
            rows.append({"exit": layer, "metric": metric, "auroc": auroc(scores, agree),
                         "coverage": coverage_at_agreement(scores, agree, COVERAGE_TARGET),
                         "agreement": float(agree.double().mean()), "tokens": len(agree),
                         "roc": roc_points(scores, agree)})
    return {"rows": rows, "metrics": list(METRICS), "target": COVERAGE_TARGET, "exit_layers": model.config.exit_layers,
            "sequences": len(corpus), "calibrated_metric": model.config.metric,
            "commands": [f"hf-earlyexit calibrate --model {run.heads} --metric {m} --num_sequences "
                         f"{sizes.calibration_sequences} --max_new_tokens {sizes.calibration_tokens}" for m in METRICS]}


def roc_points(scores: torch.Tensor, agree: torch.Tensor, points: int = ROC_POINTS) -> dict[str, list[float]]:
    """`{"fpr": [...], "tpr": [...]}` at `points` score quantiles (for the figure)."""
    positive = agree.bool()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return {"fpr": [], "tpr": []}
    cuts = torch.quantile(scores.double(), torch.linspace(1, 0, points, dtype=torch.double))  # (points,)
    passed = scores.double().unsqueeze(0) >= cuts.unsqueeze(1)  # (points, N)
    tpr = (passed & positive).sum(1).double() / n_pos
    fpr = (passed & ~positive).sum(1).double() / n_neg
    return {"fpr": [0.0, *fpr.tolist()], "tpr": [0.0, *tpr.tolist()]}


# -- 3. calibration honesty ----------------------------------------------------------------------------------------


def calibration(run, folder: Path) -> dict:
    """The held-out check that calibration itself ran: agreement of exited tokens vs ε, per head and whole rule."""
    config = heads_config(run.heads)
    calib = config.calibration or {}
    if not calib.get("cascade"):
        raise ValueError(f"heads {run.heads} hold no held-out calibration check; run `hf-earlyexit calibrate`")
    return {"metric": calib.get("metric"), "check": calib["check"], "cascade": calib["cascade"],
            "fit_sequences": calib.get("sequences"), "fit_tokens": calib.get("tokens"),
            "check_sequences": calib.get("check_sequences"), "check_tokens": calib.get("check_tokens"),
            "eps_grid": calib.get("config", {}).get("eps_grid"),
            "commands": [f"hf-earlyexit calibrate --model {run.heads} --num_sequences "
                         f"{(calib.get('sequences') or 0) + (calib.get('check_sequences') or 0)}"]}


# -- 4. accuracy, speed-up and exits vs ε through lm-eval ----------------------------------------------------------


def tasks_dir(run) -> str:
    """The folder of the offline lm-eval tasks (the project's lm_eval_tasks unless --tasks_dir)."""
    candidates = [run.args.tasks_dir] if run.args.tasks_dir else [
        str(Path(__file__).resolve().parents[2] / "lm_eval_tasks"), "lm_eval_tasks"]
    for candidate in candidates:
        if Path(candidate).is_dir():
            return str(Path(candidate).resolve())
    raise FileNotFoundError(f"no lm-eval task folder at {' or '.join(candidates)}; pass --tasks_dir")


def _task_size(folder: str, task: str, limit: int | None) -> int | None:
    """Documents evaluated for a local JSONL task (`None` when the task is not one file of the folder)."""
    path = Path(folder) / f"{task}.jsonl"
    if not path.exists():
        return limit
    count = sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return min(count, limit) if limit else count


def lm_eval(run, folder: Path) -> dict:
    """`hf-earlyexit sweep` (lm-eval with `--model ee-hf` at every ε, resumable per point) and its three figures: on
    the offline smoke tasks, or with `--data_dir` on lm-eval's built-in benchmark tasks read from local files."""

    sizes = run.sizes
    eps = sorted({*sizes.sweep_eps, 1.0})
    if run.args.data_dir:
        include = str((folder / "tasks").resolve())
        written = write_local_tasks(TasksArgs(data_dir=run.args.data_dir, output_dir=include))
        tasks = [t for t in sizes.real_tasks if t in written]
        if not tasks:
            raise ValueError(f"data_dir={run.args.data_dir!r} holds none of the benchmarks of {list(sizes.real_tasks)}")
        limit = sizes.real_limit
        sizes_of = {t: min(written[t]["splits"].get(_eval_split(written[t]), 0), limit or 10**9) for t in tasks}
        setup = [f"hf-earlyexit tasks --data_dir {run.args.data_dir} --output_dir {include}"]
    else:
        include, tasks, limit = tasks_dir(run), list(sizes.sweep_tasks), sizes.sweep_limit
        sizes_of = {task: _task_size(include, task, limit) for task in tasks}
        setup = []
    sweep = SweepArgs(tasks=tasks, model=run.heads, eps=eps, dtype=run.args.dtype, limit=limit,
                      include_path=include, output_dir=str(folder / "sweep"))
    result = run_sweep(sweep)
    limit_words = f" --limit {limit}" if limit else ""
    eps_words = " ".join(f"{e:g}" for e in eps)
    return {
        "points": result["points"], "rows": result["rows"], "tasks": tasks, "eps": eps, "task_sizes": sizes_of,
        "real_tasks": bool(run.args.data_dir), "scoring_rule": sweep.scoring_rule,
        "figures": {name: str(folder / "sweep" / f"{name}.png") for name in ("score_vs_eps", "speedup_vs_eps",
                                                                             "exits_vs_eps")},
        "commands": [*setup,
                     f"hf-earlyexit sweep --model {run.heads} --tasks {' '.join(tasks)} --eps {eps_words} "
                     f"--dtype {run.args.dtype} --include_path {include}{limit_words}",
                     f"lm_eval --model ee-hf --model_args pretrained={run.heads},eps=<ε>,dtype={run.args.dtype} "
                     f"--tasks {','.join(tasks)} --include_path {include}{limit_words}"],
    }


def _eval_split(entry: dict) -> str:
    """The split lm-eval scores a local task on (its test split when it has one, else validation)."""
    return "test" if "test" in entry["splits"] else "validation"


# -- 5 and 6. timed decoding ---------------------------------------------------------------------------------------


def bench_once(bench, folder: Path) -> dict:
    """`run_bench` into `folder`, or the `bench.json` already there when it was made with the same arguments."""

    bench.output_dir = str(folder)
    path = folder / "bench.json"
    if path.exists():
        report = json.loads(path.read_text())
        if report.get("args") == json.loads(json.dumps(asdict(bench))):
            return report
    return run_bench(bench)


def _bench_command(bench) -> str:
    words = [f"--model {bench.model}", f"--dtype {bench.dtype}", f"--mode {bench.mode}"]
    for name in ("eps_grid", "dssd_eps_grid", "layerskip_drafts", "hf_early_exit_layers", "prompt_lookup_tokens",
                 "prompt_sets"):
        value = getattr(bench, name)
        if value and (bench.mode == "dssd") == (name != "eps_grid"):
            words.append(f"--{name} " + " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value))
    words += [f"--num_prompts {bench.num_prompts}", f"--max_new_tokens {bench.max_new_tokens}",
              f"--batch_size {bench.batch_size}"]
    if bench.mode == "early_exit":
        words.append("--per_exit false")
    return "hf-earlyexit bench " + " ".join(words)


def dssd(run, folder: Path) -> dict:
    """DSSD at an ε grid against the LayerSkip-style baseline (every exit x fixed draft lengths), plain greedy, HF
    prompt lookup and HF assistant early exit at the deepest exit, on the varied and repetitive prompt sets."""

    sizes = run.sizes
    exits = list(heads_config(run.heads).exit_layers)
    bench = BenchArgs(model=run.heads, dtype=run.args.bench_dtype, mode="dssd",
                      dssd_eps_grid=sorted({*sizes.dssd_eps, 1.0}), layerskip_drafts=list(sizes.layerskip_drafts),
                      hf_early_exit_layers=[exits[-1]], prompt_lookup_tokens=[3], num_prompts=sizes.dssd_prompts,
                      max_new_tokens=sizes.dssd_tokens, output_dir=str(folder / "bench"))
    report = bench_once(bench, folder / "bench")
    return {"sets": {name: part["rows"] for name, part in report["sets"].items()}, "dtype": report["dtype"],
            "threads": report["threads"], "max_new_tokens": report["max_new_tokens"],
            "prompts": sizes.dssd_prompts, "exit_layers": exits, "commands": [_bench_command(bench)]}


def batching(run, folder: Path) -> dict:
    """Early exit at several batch sizes: tokens/s against HF's batched greedy and against the same loop without
    exits (ε = 1), with the layer work spent on rows that had already exited."""

    sizes = run.sizes
    results, commands = {}, []
    for size in sizes.batch_sizes:
        bench = BenchArgs(model=run.heads, dtype=run.args.bench_dtype, mode="early_exit",
                          eps_grid=sorted({*sizes.batch_eps, 1.0}), per_exit=False, prompt_sets=["varied"],
                          batch_size=size, num_prompts=sizes.batch_prompts, max_new_tokens=sizes.batch_tokens)
        report = bench_once(bench, folder / f"batch{size}")
        results[str(size)] = report["sets"]["varied"]["rows"]
        commands.append(_bench_command(bench))
    return {"batches": results, "dtype": run.args.bench_dtype, "prompts": sizes.batch_prompts,
            "max_new_tokens": sizes.batch_tokens, "commands": commands}
