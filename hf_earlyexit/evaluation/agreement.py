"""`hf-earlyexit agreement`: how often each exit agrees with the full model on any text, and what the exit rule makes
of it at a few ε.

Two kinds of text: a text file read teacher-forced (real prose: every position's next token as the full model
predicts it), and the model's own greedy continuations of prompts (what decoding actually meets). Per exit: top-1
agreement with the full model and the AUROC of the calibrated metric; per ε: the fraction of tokens the whole rule
lets leave (a token takes the first exit that fires) and their agreement, and what a log-likelihood would read there:
on the positions that leave with the text's next token as their head's top token (`scoring_rule="top_token"`), the
head's log-probability of that token minus the full model's (mean and mean absolute).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..loading import ModelArgs
from ..modeling.exits_earlyexit import ExitRule, first_exit
from ..modeling.metrics_earlyexit import DEFAULT_SCORING_DELTA, auroc, confidence, next_token_errors
from ..modeling.modeling_earlyexit import EarlyExitForCausalLM
from ..training.data import Corpus, read_prompt_file, read_text_files, text_corpus
from ..training.losses import agreement
from ..training.teacher import trim


@dataclass
class AgreementArgs(ModelArgs):
    """Per-exit agreement with the full model on a text file (teacher-forced) or on the model's own continuations."""

    text_file: list[str] | None = field(default=None, metadata={
        "help": "text read teacher-forced (.txt; .jsonl / .csv: one passage per record)"})
    prompt_file: str | None = field(default=None, metadata={
        "help": "prompts, one per line: the model's own greedy continuations are measured"})
    max_new_tokens: int = field(default=64, metadata={"help": "continuation length per prompt"})
    max_tokens: int = field(default=20000, metadata={"help": "read at most this many tokens of the text"})
    seq_len: int = field(default=128, metadata={"help": "window length for teacher forcing"})
    eps: list[float] = field(default_factory=lambda: [0.7, 0.8, 0.9, 0.95], metadata={"help": "ε of the rule"})
    batch_size: int = field(default=8, metadata={"help": "windows per forward pass"})
    scoring_delta: float = field(default=DEFAULT_SCORING_DELTA, metadata={
        "help": "also report the scored exits that pass the scoring gates fitted for this log-probability error "
                "bound (nats; ee-hf's scoring_delta)"})
    output: str | None = field(default=None, metadata={"help": "also write the result as JSON here"})

    def __post_init__(self) -> None:
        if not self.text_file and not self.prompt_file:
            raise ValueError("give --text_file FILE (teacher-forced text) or --prompt_file FILE (continuations)")


@torch.no_grad()
def measure(model: EarlyExitForCausalLM, corpus: Corpus, eps_grid: list[float], batch_size: int = 8,
            positions: torch.Tensor | None = None, scoring_delta: float | None = None) -> dict:
    """Agreement per exit and the whole rule per ε over the real tokens of `corpus` (or only where `positions`
    `(rows, width)` is true); with `scoring_delta`, the scored exits also once the scoring gates apply."""
    scores, agrees, real_tokens = [[] for _ in model.exit_heads], [[] for _ in model.exit_heads], 0
    errors = [{"error": [], "top_is_next": []} for _ in model.exit_heads]
    embed = model.get_input_embeddings()
    for start in range(0, len(corpus), batch_size):
        rows = slice(start, start + batch_size)
        ids, mask = corpus.input_ids[rows], corpus.attention_mask[rows]
        keep = mask.bool() if positions is None else positions[rows] & mask.bool()
        first = ids.shape[1] - trim(ids, mask)[0].shape[1]
        ids, mask, keep = ids[:, first:], mask[:, first:], keep[:, first:]
        out = model(ids.to(model.device), attention_mask=mask.to(model.device), output_hidden_states=True)
        keep = keep.to(model.device)
        ids = ids.to(model.device)
        # the token each position predicts in the text (the last column predicts none: it never counts as scored)
        following = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -1)], dim=1)
        previous = embed(ids)
        for j, head in enumerate(model.exit_heads):
            hidden, logits = out.exit_hidden_states[j], out.exit_logits[j]
            score = confidence(model.config.metric, logits=logits, hidden=hidden, previous_hidden=previous)
            top = head.to_token_ids(logits.argmax(-1))
            real_token = top >= 0
            scores[j].append(score.masked_fill(~real_token, -math.inf)[keep].float().cpu())
            agrees[j].append(agreement(head, logits, out.logits)[keep].cpu())
            error, top_is_next = next_token_errors(head, logits, out.logits, following)
            errors[j]["error"].append(error[keep].double().cpu())
            errors[j]["top_is_next"].append(top_is_next[keep].cpu())
            previous = hidden
        real_tokens += int(keep.sum())
    score = [torch.cat(s) for s in scores]
    agree = [torch.cat(a) for a in agrees]
    per_exit = [{"exit": layer, "agreement": float(a.double().mean()), "auroc": auroc(s.nan_to_num(neginf=-1e9), a)}
                for layer, s, a in zip(model.config.exit_layers, score, agree, strict=True)]
    rule_rows = []
    calibrated = bool(model.config.thresholds or model.calibration_stats)
    for eps in eps_grid if calibrated else []:  # uncalibrated heads: agreement only
        thresholds = tuple(model.thresholds_for(eps))
        rule = ExitRule(thresholds, tuple(t is not None for t in thresholds), model.config.metric)
        fires = rule.fires_from_scores(score)
        n = len(agree[0])
        index = first_exit(fires) if any(f is not None for f in fires) else torch.full((n,), len(agree))
        left = index < len(agree)
        hit = torch.stack([*agree, torch.ones(n, dtype=torch.bool)], 1).gather(1, index[:, None]).squeeze(1) & left
        exited = int(left.sum())
        rule_rows.append({"eps": eps, "exited": exited / max(n, 1),
                          "agreement_exited": int(hit.sum()) / exited if exited else math.nan,
                          "exits": torch.bincount(index, minlength=len(agree) + 1).tolist(),
                          **scored_errors(errors, index)})
        gates = model.scoring_gates_for(eps, scoring_delta) if scoring_delta is not None else None
        if gates is not None:  # where a log-likelihood reads a head once the scoring gates apply
            gated = ExitRule(rule.thresholds, rule.checked, rule.metric, gates).gated(index, score)
            rule_rows[-1]["gated"] = {"scoring_delta": scoring_delta, **scored_errors(errors, gated)}
    return {"tokens": real_tokens, "per_exit": per_exit, "rule": rule_rows}


def scored_errors(errors: list[dict[str, list[torch.Tensor]]], index: torch.Tensor) -> dict:
    """Where a position leaves (`index`: its exit, `len(errors)`: none) with the text's next token as its head's top
    token (where a log-likelihood would read the head under `scoring_rule="top_token"`): their number, and the mean
    and mean absolute error of the head's log-probability of that token against the full model's."""
    n = len(errors)
    rows = torch.arange(len(index))
    stacked = {name: torch.stack([torch.cat(e[name]) for e in errors] + [torch.zeros(len(index), dtype=dtype)], 1)
               for name, dtype in (("error", torch.float64), ("top_is_next", torch.bool))}
    scored = (index < n) & stacked["top_is_next"][rows, index]
    error = stacked["error"][rows, index][scored]
    return {"scored_exits": int(scored.sum()),
            "log_prob_error": float(error.mean()) if len(error) else math.nan,
            "log_prob_abs_error": float(error.abs().mean()) if len(error) else math.nan}


@torch.no_grad()
def continuations(model: EarlyExitForCausalLM, tokenizer, prompts: list[str], max_new_tokens: int,
                  batch_size: int = 8) -> tuple[Corpus, torch.Tensor]:
    """The model's greedy continuations of `prompts` as a corpus, and which positions to score `(rows, width)`: those
    that predict a continuation token (the prompt's last position and the continuation, never the prompt)."""
    tokenizer.padding_side = "left"
    chunks, masks, scored = [], [], []
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[start: start + batch_size], return_tensors="pt", padding=True)
        out = model.generate(**enc, mode="plain", max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
        width = enc["input_ids"].shape[1]
        mask = torch.cat([enc["attention_mask"], torch.ones_like(out[:, width:])], 1)
        score = torch.zeros_like(mask, dtype=torch.bool)
        score[:, width - 1: -1] = True
        chunks.append(out)
        masks.append(mask)
        scored.append(score)
    pad = max(c.shape[1] for c in chunks)
    ids = torch.cat([torch.nn.functional.pad(c, (pad - c.shape[1], 0), value=tokenizer.pad_token_id) for c in chunks])
    mask = torch.cat([torch.nn.functional.pad(m, (pad - m.shape[1], 0)) for m in masks])
    positions = torch.cat([torch.nn.functional.pad(s, (pad - s.shape[1], 0)) for s in scored])
    return Corpus(ids, mask, {"kind": "continuations", "prompts": len(prompts)}), positions


def run_agreement(args: AgreementArgs) -> dict:
    """Measure, print a table per kind of text, optionally write JSON."""
    model, tokenizer = args.load()
    result = {"model": args.model, "dtype": args.dtype, "metric": model.config.metric}
    if args.text_file:
        passages = read_text_files(args.text_file)
        corpus = text_corpus(tokenizer, passages, seq_len=args.seq_len, source=",".join(args.text_file))
        limit = max(1, args.max_tokens // args.seq_len)
        corpus = Corpus(corpus.input_ids[:limit], corpus.attention_mask[:limit], corpus.source)
        result["text"] = measure(model, corpus, args.eps, args.batch_size, scoring_delta=args.scoring_delta)
    if args.prompt_file:
        prompts = list(read_prompt_file(args.prompt_file))
        corpus, positions = continuations(model, tokenizer, prompts, args.max_new_tokens, args.batch_size)
        result["continuations"] = measure(model, corpus, args.eps, args.batch_size, positions,
                                          args.scoring_delta)
    print(agreement_table(result))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1))
    return result


def agreement_table(result: dict) -> str:
    lines = []
    for kind in ("text", "continuations"):
        if kind not in result:
            continue
        part = result[kind]
        exits = " / ".join(f"exit@{r['exit']}" for r in part["per_exit"])
        lines += [f"{kind} ({part['tokens']} tokens): top-1 agreement with the full model at {exits}: "
                  + " / ".join(f"{r['agreement']:.3f}" for r in part["per_exit"])
                  + f"; AUROC of {result['metric']}: " + " / ".join(f"{r['auroc']:.3f}" for r in part["per_exit"])]
        for row in part["rule"]:
            agree = "–" if math.isnan(row["agreement_exited"]) else f"{row['agreement_exited']:.3f}"
            lines.append(f"  ε={row['eps']:g}: {row['exited']:.3f} of tokens exit, agreeing at {agree}")
            if row.get("scored_exits"):
                lines.append(f"    {row['scored_exits']} leave with the text's next token as their top token; the "
                             f"head's log-probability of it minus the full model's: {row['log_prob_error']:+.3f} on "
                             f"average, {row['log_prob_abs_error']:.3f} in absolute value")
            gated = row.get("gated")
            if gated:
                error = ("" if not gated["scored_exits"] else f"; error {gated['log_prob_error']:+.3f} on average, "
                         f"{gated['log_prob_abs_error']:.3f} in absolute value")
                lines.append(f"    with the scoring gates of scoring_delta={gated['scoring_delta']:g}: "
                             f"{gated['scored_exits']} of them{error}")
    return "\n".join(lines)
