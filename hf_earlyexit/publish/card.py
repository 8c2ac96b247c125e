"""Model cards for heads folders, rendered from the folder itself whenever it is saved or pushed.

Everything on the card comes from files in the folder: `config.json` (base, exits, heads, training and calibration
provenance, thresholds), `calibration.safetensors` (the scoring gates at the default `scoring_delta`), and when
present `bench.json` (`hf-earlyexit bench`), `eval_results.json` (an lm-eval results file) and `sweep.json`
(`hf-earlyexit sweep`). The body is the Jinja template `model_cards/earlyexit.md.j2`; the metadata is
huggingface_hub's `ModelCardData`, with measured speed and eval results as `model-index`. `validate_card` checks a
card offline (huggingface_hub's `RepoCard.validate` asks the Hub, which is unreachable here and in CI).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jinja2
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.repocard_data import model_index_to_eval_results

from ..formatting import is_number, num
from ..modeling.folder_earlyexit import BASE_SUBFOLDER, CALIBRATION_FILE, HEADS_FILE, read_calibration
from ..modeling.hub_earlyexit import CARD_MARKER, check_repo_id, hub_base_model, license_metadata
from ..modeling.metrics_earlyexit import DEFAULT_SCORING_DELTA, gates_from_stats

TEMPLATE_NAME = "earlyexit.md.j2"
# the template lives in the checkout's top-level model_cards/; a built wheel carries a copy inside this package
TEMPLATE_DIRS = (Path(__file__).parent / "model_cards", Path(__file__).resolve().parents[2] / "model_cards")
BENCH_FILE = "bench.json"
EVAL_FILE = "eval_results.json"
SWEEP_FILE = "sweep.json"
TAGS = ["hf-earlyexit", "early-exit", "self-speculative-decoding", "custom_code"]
HEAD_DESCRIPTIONS = {
    "paper": "norm + Linear(hidden, vocab), the shape of the model's own head",
    "shared": "norm + residual adapter in front of the model's frozen LM head",
}


def render_card(folder: str | Path, repo_id: str | None = None, license: str | None = None,
                title: str | None = None) -> str:
    """The card (`README.md` text) of the heads folder `folder`.

    Args:
        repo_id: the Hub repo the usage snippets name (default: a placeholder).
        title: the card's heading when there is no `repo_id` (default: the folder's name; a folder written under
            a staging name passes its final one).
        license: a Hub license id; default `"gemma"` for the embedded Gemma 3 base, else `"other"` (the base
            model's license applies to heads derived from its weights).
    """
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    context = card_context(folder, config, repo_id, title)
    data = card_data(folder, config, context, license)
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader([str(d) for d in TEMPLATE_DIRS]), trim_blocks=True, lstrip_blocks=True,
        keep_trailing_newline=True, undefined=jinja2.StrictUndefined,
    )
    body = env.get_template(TEMPLATE_NAME).render(marker=CARD_MARKER, **context)
    return f"---\n{data.to_yaml()}\n---\n\n{body}"


def card_data(folder: Path, config: dict, context: dict, license: str | None = None) -> ModelCardData:
    """The card's metadata; bench speed and lm-eval results become `model-index` entries."""
    base = hub_base_model(config.get("base_model_name_or_path"))
    extra: dict[str, Any] = license_metadata(config.get("base_model_name_or_path"), license)
    if base:
        extra["base_model_relation"] = "adapter"
    results = bench_eval_results(_read_json(folder / BENCH_FILE)) + lm_eval_results(
        _read_json(folder / EVAL_FILE), _read_json(folder / SWEEP_FILE)
    )
    return ModelCardData(
        base_model=base, library_name="transformers", pipeline_tag="text-generation",
        tags=[*TAGS, f"{config.get('head_type', 'paper')}-heads"], model_name=context["name"] if results else None,
        eval_results=results or None, **extra,
    )


def card_context(folder: Path, config: dict, repo_id: str | None, title: str | None = None) -> dict:
    """What the template shows, as plain values and pre-formatted table rows."""
    text = config.get("text_config") or {}
    layers = config.get("exit_layers") or []
    name = repo_id or "<user>/<this-repo>"
    return {
        "name": name.split("/")[-1] if repo_id else title or folder.name,
        "repo_id": name,
        "base": config.get("base_model_name_or_path"),
        "base_hub_id": hub_base_model(config.get("base_model_name_or_path")),
        "base_revision": config.get("base_revision"),
        "embedded": config.get("base_model_name_or_path") == "embedded",
        "merged": bool(config.get("base_subfolder")),
        "base_subfolder": config.get("base_subfolder") or BASE_SUBFOLDER,
        "fingerprint_parts": len(config.get("base_fingerprint") or []),
        "model_type": text.get("model_type"),
        "num_layers": text.get("num_hidden_layers"),
        "vocab_size": text.get("vocab_size"),
        "exit_layers": layers,
        "head_type": config.get("head_type"),
        "head_description": HEAD_DESCRIPTIONS.get(config.get("head_type"), ""),
        "head_init": config.get("head_init"),
        "adapter_rank": config.get("adapter_rank"),
        "draft_vocab_size": config.get("draft_vocab_size"),
        "metric": config.get("metric"),
        "eps": config.get("eps"),
        "format_version": config.get("format_version", 1),
        "files": sorted(p.relative_to(folder).as_posix() for p in folder.iterdir() if not p.name.startswith(".")),
        "heads_file": HEADS_FILE,
        "heads_size": _size(folder / HEADS_FILE),
        "calibration_file": CALIBRATION_FILE,
        "training": training_context(config.get("training")),
        "calibration": calibration_context(config, layers),
        "scoring_gates": scoring_gates_context(folder, config, layers),
        "bench": bench_context(_read_json(folder / BENCH_FILE)),
        "evals": eval_rows(_read_json(folder / EVAL_FILE), _read_json(folder / SWEEP_FILE)),
    }


def training_context(training: dict | None) -> dict | None:
    if not training:
        return None
    train = training.get("train_config") or {}
    data = training.get("data") or {}
    prompts = data.get("prompts") or []
    return {
        "steps": training.get("steps", train.get("steps")), "batch_size": train.get("batch_size"),
        "learning_rate": train.get("learning_rate"), "lam": train.get("lam"), "loss": train.get("loss"),
        "sequences": data.get("sequences"), "tokens": data.get("tokens"), "num_prompts": len(prompts),
        "prompts": prompts[:5], "max_new_tokens": data.get("max_new_tokens"), "temperature": data.get("temperature"),
        "top_k": data.get("top_k"), "text_files": data.get("text_files"),
        "held_out": [{"exit": r.get("exit"), "agreement": num(r.get("agreement")), "entropy": num(r.get("entropy")),
                      "tokens": r.get("tokens")} for r in training.get("held_out") or []],
    }


def calibration_context(config: dict, layers: list[int]) -> dict | None:
    """ε -> thresholds per head, and per ε the held-out coverage / agreement per head and for the whole rule."""
    thresholds = config.get("thresholds")
    if not thresholds:
        return None
    calibration = config.get("calibration") or {}
    check = {(float(r["eps"]), r["exit"]): r for r in calibration.get("check") or []}
    cascade = {float(r["eps"]): r for r in calibration.get("cascade") or []}
    rows = []
    for key in sorted(thresholds, key=float):
        eps = float(key)
        cells = [check.get((eps, layer)) for layer in layers]
        whole = cascade.get(eps) or {}
        rows.append({
            "eps": key, "thresholds": ["never" if t is None else num(t) for t in thresholds[key]],
            "coverage": [num(c and c.get("coverage")) for c in cells],
            "agreement": [num(c and c.get("agreement")) for c in cells],
            "exited": num(whole.get("exited")), "agreement_exited": num(whole.get("agreement_exited")),
            "agreement_all": num(whole.get("agreement_all")),
        })
    return {
        "rows": rows, "checked": bool(check), "metric": calibration.get("metric", config.get("metric")),
        "sequences": calibration.get("sequences"), "tokens": calibration.get("tokens"),
        "check_tokens": calibration.get("check_tokens"), "date": calibration.get("date"),
        "num_prompts": len(calibration.get("prompts") or []),
    }


def scoring_gates_context(folder: Path, config: dict, layers: list[int]) -> dict | None:
    """ε -> per head its scoring gate at the default `scoring_delta` (`gate_for_eps` on the calibration statistics'
    log-probability errors), or `None` when the folder's calibration recorded no errors."""
    if not config.get("thresholds") or not (folder / CALIBRATION_FILE).is_file():
        return None
    stats = read_calibration(str(folder))
    rows = []
    for key in sorted(config["thresholds"], key=float):
        gates = gates_from_stats(stats, len(layers), float(key), DEFAULT_SCORING_DELTA)
        if gates is None:  # calibrated before log-probability errors were recorded
            return None
        if float(key) < 1.0:
            rows.append({"eps": key, "gates": ["never" if g == math.inf else num(g) for g in gates]})
    return {"delta": DEFAULT_SCORING_DELTA, "rows": rows}


def bench_context(bench: dict | None) -> list[dict]:
    """One table per prompt set of `bench.json`."""
    if not bench:
        return []
    setup = f"{bench.get('dtype')}, batch {bench.get('batch_size')}, {bench.get('max_new_tokens')} new tokens"
    return [{"set": name, "setup": f"{setup}, {bench.get('threads')} threads", "rows": [
        {"label": r.get("label"), "tokens_per_s": num(r.get("tokens_per_s"), ".1f"), "speedup": num(r.get("speedup")),
         "agreement": num(r.get("agreement")), "identical": r.get("identical_sequences", "–"),
         "macs": num(r.get("macs_fraction"))}
        for r in entry.get("rows") or []]} for name, entry in (bench.get("sets") or {}).items()]


def bench_eval_results(bench: dict | None) -> list[EvalResult]:
    """Measured tokens/s and speed-up vs plain `generate()` of every bench configuration."""
    results = []
    for name, entry in ((bench or {}).get("sets") or {}).items():
        setup = f"{bench.get('dtype')}, batch {bench.get('batch_size')}, {bench.get('max_new_tokens')} new tokens"
        common = {"task_type": "text-generation", "task_name": "Decoding speed", "dataset_type": "hf-earlyexit-bench",
                  "dataset_name": f"hf-earlyexit bench prompts ({name})", "dataset_config": name}
        for row in entry.get("rows") or []:
            for metric, key in (("tokens_per_second", "tokens_per_s"), ("speedup_vs_plain_generate", "speedup")):
                if is_number(row.get(key)):
                    results.append(EvalResult(**common, metric_type=metric, metric_value=round(row[key], 4),
                                              metric_name=f"{row.get('label')}: {metric}", metric_config=setup))
    return results


def eval_rows(results: dict | None, sweep: list | None) -> list[dict]:
    """`(task, metric, ε, value)` from an lm-eval results file and / or an `hf-earlyexit sweep`."""
    rows = []
    if results:
        eps = ((results.get("config") or {}).get("early_exit") or {}).get("eps")
        rows += _metric_rows(results.get("results") or {}, eps)
    for point in sweep or []:
        rows += _metric_rows(point.get("metrics") or {}, point.get("eps"))
    return rows


def lm_eval_results(results: dict | None, sweep: list | None) -> list[EvalResult]:
    configs = (results or {}).get("configs") or {}
    out = []
    for row in eval_rows(results, sweep):
        task_config = configs.get(row["task"]) or {}
        path = task_config.get("dataset_path")
        out.append(EvalResult(
            task_type="text-generation", task_name=row["task"],
            dataset_type=path if path and path not in ("json", "csv", "text") else row["task"],
            dataset_name=row["task"], dataset_config=task_config.get("dataset_name"),
            dataset_split=task_config.get("test_split"), metric_type=row["metric"], metric_value=row["value"],
            metric_name=f"{row['label']} (ε={row['eps']})" if row["eps"] is not None else row["label"],
            metric_config=f"eps={row['eps']}" if row["eps"] is not None else None,
        ))
    return out


def validate_card(card: str | Path) -> ModelCard:
    """Check a card offline: its metadata parses (strictly), `model-index` converts to eval results and back, and
    `base_model` is a Hub id. Raises `ValueError` naming the problem; returns the parsed card."""
    text = card.read_text(encoding="utf-8") if isinstance(card, Path) else card
    parsed = ModelCard(text, ignore_metadata_errors=False)
    meta = parsed.data.to_dict()
    for base in [meta["base_model"]] if isinstance(meta.get("base_model"), str) else meta.get("base_model") or []:
        check_repo_id(base)
    if not meta.get("license"):
        raise ValueError("the card has no license")
    if parsed.data.eval_results:
        name, results = model_index_to_eval_results(meta["model-index"])
        for result in results:
            if not (is_number(result.metric_value) and result.task_type and result.dataset_type and result.metric_type):
                raise ValueError(f"model-index entry {result} lacks a type or a finite value")
    return parsed


def _metric_rows(metrics: dict, eps: Any) -> list[dict]:
    rows = []
    for task, values in metrics.items():
        for key, value in values.items():
            if "," not in key or "stderr" in key or not is_number(value):
                continue
            metric, filt = key.split(",", 1)
            rows.append({"task": task, "metric": metric, "label": metric if filt == "none" else f"{metric} ({filt})",
                         "eps": eps, "value": round(float(value), 4)})
    return rows


def _size(path: Path) -> str:
    size = path.stat().st_size if path.is_file() else 0
    return f"{size / 2**20:.1f} MB" if size >= 2**20 else f"{size / 2**10:.1f} kB"


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


