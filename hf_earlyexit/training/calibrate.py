"""ε-calibration (paper §3.3.1): per head, the lowest confidence whose tail agrees with the full model at rate ≥ ε.

Data: text the model writes from the calibration prompts (disjoint from the training prompts). For every head and
real token we record the confidence score, whether the head's top token equals the model's, and, where the head's top
token is the text's next token, its log-probability of that token minus the full model's (what a log-likelihood reads
from a head under `scoring_rule="top_token"`; the scoring gates of `scoring_delta` are fitted on it). Half the
sequences set the thresholds, the other half checks them on fresh tokens.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import Tensor
from tqdm.auto import tqdm

from ..modeling.configuration_earlyexit import METRICS
from ..modeling.exits_earlyexit import ExitRule, first_exit, fit_thresholds
from ..modeling.metrics_earlyexit import (
    DEFAULT_EPS_GRID,
    confidence,
    exit_rate_and_agreement,
    next_token_errors,
)
from ..modeling.modeling_earlyexit import EarlyExitForCausalLM
from .data import CALIBRATION_PROMPTS, Corpus, GenerationSpec, generate_corpus
from .losses import agreement
from .teacher import trim

logger = logging.getLogger(__name__)
AUTO_METRIC = "auto"


@dataclass
class CalibrateConfig:
    """How to calibrate (the heads folder and metric are given separately)."""

    metric: str | None = field(default=None, metadata={
        "help": f"confidence metric, one of {', '.join(METRICS)}, or {AUTO_METRIC}: the one that lets the most tokens "
                "exit at the folder's ε on the calibration tokens (default: the folder's metric)"})
    eps_grid: list[float] = field(default_factory=lambda: list(DEFAULT_EPS_GRID), metadata={"help": "ε values"})
    min_tokens: int = field(default=1000, metadata={"help": "fewest calibration tokens per head"})
    check_fraction: float = field(default=0.5, metadata={"help": "sequences kept to check thresholds"})
    batch_size: int = field(default=4, metadata={"help": "sequences per forward pass"})

    def __post_init__(self) -> None:
        if self.metric is not None and self.metric not in (*METRICS, AUTO_METRIC):
            raise ValueError(f"metric={self.metric!r} is not one of {', '.join((*METRICS, AUTO_METRIC))}")
        for eps in self.eps_grid:
            if isinstance(eps, bool) or not (isinstance(eps, int | float) and 0.0 <= eps <= 1.0):
                raise ValueError(f"eps={eps!r} in eps_grid must lie in [0, 1]")
        if not 0.0 < self.check_fraction < 1.0:
            raise ValueError(f"check_fraction={self.check_fraction!r} must lie strictly between 0 and 1")
        for name in ("min_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive integer")


def calibration_spec() -> GenerationSpec:
    """Calibration text: the paper's calibration prompts, a sampler seed unused by training."""
    return GenerationSpec(prompts=list(CALIBRATION_PROMPTS), num_sequences=64, sampling_seed=1_000_003)


def collect(model: EarlyExitForCausalLM, corpus: Corpus, metric: str, batch_size: int = 4) -> list[dict[str, Tensor]]:
    """Per head: `score` `(N,)` (higher = more confident), `agree` `(N,)` and `error` `(N,)` (NaN where the head's top
    token is not the next token) over the corpus's real tokens."""
    records = collect_metrics(model, corpus, [metric], batch_size)
    return [{"score": r[metric], "agree": r["agree"], "error": r["error"]} for r in records]


@torch.no_grad()
def collect_metrics(
    model: EarlyExitForCausalLM, corpus: Corpus, metrics: Sequence[str], batch_size: int = 4
) -> list[dict[str, Tensor]]:
    """Per head: one score `(N,)` per metric (keyed by its name, higher = more confident), `agree` `(N,)` and
    `error` `(N,)` over the corpus's real tokens, from a single forward pass per batch (entry `i` is the same token for
    every key). `error`: the head's log-probability of the text's next token minus the full model's where the head's
    top token is that token, NaN elsewhere (and at a sequence's last token)."""
    scores = [{m: [] for m in metrics} for _ in model.exit_heads]
    agrees = [[] for _ in model.exit_heads]
    errors = [[] for _ in model.exit_heads]
    embed = model.get_input_embeddings()
    for start in tqdm(range(0, len(corpus), batch_size), desc="Calibration forward", unit="batch"):
        rows = slice(start, start + batch_size)
        ids, mask = trim(corpus.input_ids[rows], corpus.attention_mask[rows])
        ids, mask = ids.to(model.device), mask.to(model.device)
        out = model(ids, attention_mask=mask, output_hidden_states=True)
        real = mask.bool()
        following = torch.cat([ids[:, 1:].masked_fill(~real[:, 1:], -1), torch.full_like(ids[:, :1], -1)], dim=1)
        previous = embed(ids)  # (batch, seq, hidden): what the first exit's similarity compares against
        for j, head in enumerate(model.exit_heads):
            hidden, logits = out.exit_hidden_states[j], out.exit_logits[j]
            # a head whose top class is OTHER cannot exit (the rule): such tokens never pass a threshold
            real_token = head.to_token_ids(logits.argmax(-1)) >= 0
            for metric in metrics:
                score = confidence(metric, logits=logits, hidden=hidden, previous_hidden=previous)  # (batch, seq)
                score = score.float().masked_fill(~real_token, -math.inf)
                scores[j][metric].append(score[real].cpu())
            agrees[j].append(agreement(head, logits, out.logits)[real].cpu())
            error, top_is_next = next_token_errors(head, logits, out.logits, following)
            errors[j].append(error.masked_fill(~top_is_next, math.nan)[real].cpu())
            previous = hidden
    return [{**{m: torch.cat(v) for m, v in s.items()}, "agree": torch.cat(a), "error": torch.cat(e)}
            for s, a, e in zip(scores, agrees, errors, strict=True)]


def check_enough(records: list[dict[str, Tensor]], exit_layers: list[int], min_tokens: int) -> None:
    for layer, rec in zip(exit_layers, records, strict=True):
        n = len(rec["score"])
        if n < min_tokens:
            raise ValueError(
                f"exit@{layer} has only {n} calibration tokens; at least {min_tokens} are needed (generate more "
                "calibration sequences or tokens, or lower min_tokens)"
            )


def eps_table(records: list[dict], thresholds: dict[str, list], exit_layers: list[int]) -> list[dict]:
    """Per head and ε: threshold, fraction of tokens that exit, agreement among them."""
    rows = []
    for key, per_head in thresholds.items():
        for layer, rec, tau in zip(exit_layers, records, per_head, strict=True):
            coverage, agree = exit_rate_and_agreement(rec["score"], rec["agree"], tau)
            rows.append({"eps": float(key), "exit": layer, "threshold": tau, "coverage": coverage, "agreement": agree})
    return rows


def grid_thresholds(records: list[dict], grid) -> dict[str, list[float | None]]:
    """`f"{eps:g}"` -> per-exit thresholds fit for the whole rule (`fit_thresholds`, cascade) at every ε of `grid`."""
    scores, agree = [r["score"] for r in records], [r["agree"] for r in records]
    return {f"{float(eps):g}": fit_thresholds(scores, agree, float(eps)) for eps in grid}


def cascade_table(records: list[dict], thresholds: dict[str, list]) -> list[dict]:
    """Per ε, the early-exit rule over all heads: a token leaves at the first exit whose score passes."""
    rows = []
    n = len(records[0]["score"])
    agree = torch.stack([r["agree"].bool() for r in records] + [torch.ones(n, dtype=torch.bool)], dim=1)  # (N, K+1)
    for key, per_head in thresholds.items():
        rule = ExitRule(tuple(per_head), tuple(tau is not None for tau in per_head), "")
        fires = rule.fires_from_scores([r["score"] for r in records])
        index = first_exit(fires) if any(f is not None for f in fires) else torch.full((n,), len(records))
        left = index < len(records)
        exited, agreed = int(left.sum()), int((agree.gather(1, index[:, None]).squeeze(1) & left).sum())
        rows.append({"eps": float(key), "exited": exited / n,
                     "agreement_exited": agreed / exited if exited else math.nan,
                     "agreement_all": (agreed + n - exited) / n})
    return rows


def run_calibration(
    model: EarlyExitForCausalLM, config: CalibrateConfig, corpus: Corpus | None = None
) -> tuple[dict[str, list], list[dict], list[dict]]:
    """Calibrate `model` in place (config.metric, thresholds, calibration stats and provenance).

    Returns:
        `(thresholds, check_rows, cascade_rows)`: the ε grid, and per-head / whole-rule results on held-out tokens.
    """
    if not model.config.training:
        logger.warning("WARNING: these heads were never trained (config.training is empty); thresholds of untrained "
                       "heads are valid but few tokens will exit")
    metric = config.metric or model.config.metric
    if corpus is None:
        name = model.config.base_model_name_or_path
        corpus = generate_corpus(model.backbone, model.tokenizer, calibration_spec(), name)
    check, fit = corpus.split(config.check_fraction)
    selection = None
    if metric == AUTO_METRIC:
        metric, records, selection = choose_metric(model, fit, model.config.eps, config.batch_size)
    else:
        records = collect(model, fit, metric, config.batch_size)
    check_enough(records, model.config.exit_layers, config.min_tokens)
    thresholds = grid_thresholds(records, config.eps_grid)
    held = collect(model, check, metric, config.batch_size)
    check_rows = eps_table(held, thresholds, model.config.exit_layers)
    cascade_rows = cascade_table(held, thresholds)
    model.config.metric = metric
    model.config.thresholds = thresholds
    model.calibration_stats = _stats_tensors(records)
    model.config.calibration = {
        "metric": metric, "fit": "cascade", "prompts": list(CALIBRATION_PROMPTS), "sequences": len(fit),
        "tokens": fit.num_tokens,
        "check_sequences": len(check), "check_tokens": check.num_tokens, "config": asdict(config),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "check": check_rows,
        "cascade": cascade_rows,
    }
    if selection is not None:
        model.config.calibration["metric_selection"] = selection
    return thresholds, check_rows, cascade_rows


def choose_metric(
    model: EarlyExitForCausalLM, corpus: Corpus, eps: float, batch_size: int = 4
) -> tuple[str, list[dict[str, Tensor]], dict]:
    """The metric under which the most tokens of `corpus` leave (whole rule, thresholds for `eps` set on `corpus`).

    Returns:
        `(metric, records, selection)`: the winner, its per-head `collect` records, and `{eps, exited: {metric:
        fraction}}` for the record.
    """
    every = collect_metrics(model, corpus, METRICS, batch_size)
    exited = {}
    for metric in METRICS:
        records = [{"score": r[metric], "agree": r["agree"]} for r in every]
        exited[metric] = cascade_table(records, grid_thresholds(records, [eps]))[0]["exited"]
    best = max(METRICS, key=lambda m: exited[m])
    logger.info("Confidence metric at ε=%g: %s (fraction of calibration tokens that exit: %s)", eps, best,
                ", ".join(f"{m} {v:.3f}" for m, v in exited.items()))
    return best, [{"score": r[best], "agree": r["agree"], "error": r["error"]} for r in every], {
        "eps": eps, "exited": exited}


def _stats_tensors(records: list[dict]) -> dict[str, Tensor]:
    """Per head and calibration token: score, agreement and log-probability error (NaN where the head's top token is
    not the next token), in the same token order for every head (entry `i` of every head is one token), so any ε's
    thresholds, scoring gates and the joint exit pattern can be derived at load time."""
    stats = {"aligned": torch.ones(1, dtype=torch.uint8)}
    for j, rec in enumerate(records):
        stats[f"score.{j}"] = rec["score"].contiguous()
        stats[f"agree.{j}"] = rec["agree"].to(torch.uint8).contiguous()
        if "error" in rec:
            stats[f"error.{j}"] = rec["error"].float().contiguous()
    return stats


def plot_sweep(check_rows: list[dict], cascade_rows: list[dict], path: Path) -> None:
    """Coverage and agreement against ε per head, plus the whole rule (the ε sweep people want to see)."""
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for layer in sorted({r["exit"] for r in check_rows}):
        rows = sorted((r for r in check_rows if r["exit"] == layer), key=lambda r: r["eps"])
        axes[0].plot([r["eps"] for r in rows], [r["coverage"] for r in rows], marker="o", label=f"exit@{layer}")
        axes[1].plot([r["eps"] for r in rows], [r["agreement"] for r in rows], marker="o", label=f"exit@{layer}")
    rows = sorted(cascade_rows, key=lambda r: r["eps"])
    axes[0].plot([r["eps"] for r in rows], [r["exited"] for r in rows], "k--", label="any exit")
    axes[1].plot([r["eps"] for r in rows], [r["agreement_all"] for r in rows], "k--", label="all tokens")
    axes[1].plot([0, 1], [0, 1], color="grey", linewidth=0.5)
    axes[0].set(title="tokens that exit (held out)", xlabel="ε", ylabel="fraction")
    axes[1].set(title="agreement with the full model (held out)", xlabel="ε", ylabel="agreement")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def save_calibrated(model: EarlyExitForCausalLM, folder: str | Path, check_rows: list, cascade_rows: list) -> None:
    """Rewrite the heads folder (atomically) with thresholds, stats and the ε sweep plot."""
    with tempfile.TemporaryDirectory() as tmp:
        plot = Path(tmp) / "calibration.png"
        plot_sweep(check_rows, cascade_rows, plot)
        extra = {"calibration.png": plot}
        for name in ("train_log.csv", "training_curves.png"):
            if (Path(folder) / name).exists():
                extra[name] = Path(folder) / name
        with tempfile.TemporaryDirectory() as keep:  # extra files must survive the folder being replaced
            copies = {}
            for name, path in extra.items():
                copies[name] = Path(keep) / name
                copies[name].write_bytes(Path(path).read_bytes())
            model.save_pretrained(folder, overwrite=True, extra_files=copies)  # writes CALIBRATION_FILE too
