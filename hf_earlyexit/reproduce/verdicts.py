"""Verdict rules of `hf-earlyexit reproduce`: from a step's numbers to confirmed / differs / refuted, with a reason.

Every rule is a small pure function of the step's JSON (and `facts`, what is known about the model and heads), so
the same numbers always give the same verdict. A reason is given whenever a claim is not confirmed; it is chosen
from measured facts (model size, vocabulary, head agreement, CPU vs GPU, data, --quick sizes).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass

from ..formatting import num

CONFIRMED, DIFFERS, REFUTED = "confirmed", "differs", "refuted"
DSSD_ACCEPTANCE_CLAIM = 1.66  # DSSD revision: acceptance vs a manually tuned LayerSkip baseline
BATCH_SPEEDUP_CLAIM = 1.25  # inference-framework paper: early exit with iteration-level batching
AGREEMENT_TOLERANCE = 0.02  # "keeps agreement": within this much
ENTROPY_CHANGE = 0.05  # nats: smaller entropy differences count as no change
TIE = 0.005  # AUROC differences below this are ties
CLOSE = 0.03  # AUROC gaps below this make a claim "differ" rather than fail
MIN_EXITED = 20  # held-out exited tokens needed to judge one ε
PAPER_MODELS = "Phi-2 (2.7B parameters, 32 layers, 51k vocabulary) and Pythia 70M-2.8B"


@dataclass
class Verdict:
    """One claim and what the numbers say about it."""

    key: str  # "1a", "2b", ...
    claim: str
    source: str
    verdict: str
    evidence: str
    reason: str = ""


def _mean(values) -> float:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.fmean(values) if values else math.nan


# -- reasons, chosen from measured facts ---------------------------------------------------------------------------


def reason_model(facts: dict) -> str:
    return (f"model size: {facts.get('base_model')} has {facts.get('num_layers')} layers and hidden size "
            f"{facts.get('hidden_size')}, the papers used {PAPER_MODELS}")


def reason_vocab(facts: dict) -> str:
    draft = facts.get("draft_vocab_size")
    heads = f"heads restricted to the {draft:,} most frequent" if draft else "full-vocabulary heads"
    return f"vocabulary: {facts.get('vocab_size', 0):,} tokens, {heads}"


def reason_heads(facts: dict) -> str:
    agreement = facts.get("agreement") or {}
    if not agreement:
        return ""
    parts = ", ".join(f"exit@{k} {num(v, '.2f')}" for k, v in agreement.items())
    return f"heads: agreement with the full model {parts}; shallow exits rarely pass a threshold"


def reason_quick(facts: dict) -> str:
    return "--quick sizes, too small to settle this" if facts.get("quick") else ""


def reason_cpu(threads, dtype) -> str:
    return f"CPU vs GPU: timed on {threads} CPU threads in {dtype}, the papers timed GPUs"


def join(*reasons: str) -> str:
    return "; ".join(r for r in reasons if r)


# -- 1. training dynamics ------------------------------------------------------------------------------------------


def final_stats(run: dict) -> dict:
    """Mean over exits of the last logged held-out agreement / entropy of one Fig. 1 run, and its AUROC."""
    last = max(row["step"] for row in run["history"])
    rows = [row for row in run["history"] if row["step"] == last]
    key = "held_out_agreement" if "held_out_agreement" in rows[0] else "agreement"
    return {"agreement": _mean(r[key] for r in rows),
            "entropy": _mean(r[key.replace("agreement", "entropy")] for r in rows),
            "auroc": _mean(run.get("auroc_breaking_ties", [])), "step": last}


def verdicts_training(result: dict, facts: dict) -> list[Verdict]:
    s = {run["name"]: final_stats(run) for run in result["runs"]}
    s01, s95, c01, c95 = (s["scratch-lam0.1"], s["scratch-lam0.95"], s["lm_head-lam0.1"], s["lm_head-lam0.95"])
    steps = s01["step"]
    out = []
    d_agree, d_entropy = s95["agreement"] - s01["agreement"], s95["entropy"] - s01["entropy"]
    if d_entropy <= -ENTROPY_CHANGE:
        verdict = REFUTED
    else:
        kept = d_agree >= -AGREEMENT_TOLERANCE
        verdict = CONFIRMED if kept and d_entropy >= ENTROPY_CHANGE else DIFFERS
    reason = "" if verdict == CONFIRMED else join(
        f"after {steps} steps λ = 0.95 changed agreement by {d_agree:+.3f} and entropy by {d_entropy:+.3f} nats "
        f"(changes under {ENTROPY_CHANGE} nats count as none)", reason_quick(facts), reason_model(facts))
    out.append(Verdict("1a", "Heads trained from scratch with a high entropy penalty (λ = 0.95) keep their agreement "
                       "while their entropy rises.", "paper §4.1, Fig. 1", verdict,
                       f"scratch λ=0.1 → 0.95: agreement {num(s01['agreement'])} → {num(s95['agreement'])}, entropy "
                       f"{num(s01['entropy'])} → {num(s95['entropy'])} nats", reason))
    accurate = c01["agreement"] >= s95["agreement"]
    overconfident = c01["entropy"] <= s95["entropy"] - ENTROPY_CHANGE
    penalty_weak = c95["entropy"] <= s95["entropy"] - ENTROPY_CHANGE
    verdict = (CONFIRMED if accurate and overconfident and penalty_weak
               else REFUTED if not accurate and not overconfident else DIFFERS)
    failed = [text for ok, text in ((accurate, "copied heads are not more accurate"),
                                    (overconfident, "copied heads are not less entropic"),
                                    (penalty_weak, "λ = 0.95 lifts a copied head's entropy to a scratch head's"))
              if not ok]
    out.append(Verdict("1b", "Heads copied from the LM head are accurate but over-confident (low entropy), and a "
                       "penalty does not fix that.", "paper §4.1, Fig. 1", verdict,
                       f"copied λ=0.1: agreement {num(c01['agreement'])}, entropy {num(c01['entropy'])}; "
                       f"copied λ=0.95: entropy {num(c95['entropy'])}; scratch λ=0.95: agreement "
                       f"{num(s95['agreement'])}, entropy {num(s95['entropy'])}",
                       "" if verdict == CONFIRMED else join(", ".join(failed), reason_quick(facts))))
    aurocs = {name: v["auroc"] for name, v in s.items() if not math.isnan(v["auroc"])}
    best = max(aurocs, key=aurocs.get) if aurocs else None
    mine = s95["auroc"]
    if best is None or math.isnan(mine):
        verdict = DIFFERS
    elif mine >= aurocs[best] - TIE:
        verdict = CONFIRMED
    else:
        verdict = REFUTED if mine <= min(aurocs.values()) else DIFFERS
    out.append(Verdict("1c", "That entropy makes the confidence metric useful: scratch heads with λ = 0.95 separate "
                       "agreeing from disagreeing tokens best.", "paper §4.1", verdict,
                       "breaking-ties AUROC on held-out tokens: " + ", ".join(f"{k} {num(v)}"
                                                                               for k, v in aurocs.items()),
                       "" if verdict == CONFIRMED else join(f"best here: {best}", reason_quick(facts))))
    return out


# -- 2. confidence metrics -----------------------------------------------------------------------------------------

METRIC_CLAIMS = (
    ("2a", "breaking_ties", "Breaking ties (top-1 minus top-2 probability) is the best confidence metric.",
     "paper v1 §3.3.1"),
    ("2b", "entropy", "Entropy separates agreeing from disagreeing tokens best.", "DSSD revision"),
    ("2c", "hidden_similarity", "Hidden-state similarity is the best early-exit signal.", "inference framework"),
)


def metric_means(result: dict) -> dict[str, dict[str, float]]:
    """Per metric: mean AUROC and coverage over the exits."""
    return {m: {"auroc": _mean(r["auroc"] for r in result["rows"] if r["metric"] == m),
                "coverage": _mean(r["coverage"] for r in result["rows"] if r["metric"] == m)}
            for m in result["metrics"]}


def verdicts_metrics(result: dict, facts: dict) -> list[Verdict]:
    means = metric_means(result)
    scored = {m: v["auroc"] for m, v in means.items() if not math.isnan(v["auroc"])}
    best = max(scored, key=scored.get) if scored else None
    softmax = [scored[m] for m in ("breaking_ties", "max_prob", "entropy") if m in scored]
    spread = max(softmax) - min(softmax) if softmax else math.nan
    evidence = "mean AUROC over exits: " + ", ".join(f"{m} {num(v)}" for m, v in scored.items())
    out = []
    for key, metric, claim, source in METRIC_CLAIMS:
        gap = scored[best] - scored[metric] if best and metric in scored else math.nan
        verdict = (DIFFERS if math.isnan(gap) else CONFIRMED if gap <= TIE else DIFFERS if gap <= CLOSE
                   else REFUTED)
        if metric == "hidden_similarity":
            why = ("here it compares an exit's hidden state with the previous exit's (the embeddings for the first) on "
                   "a frozen backbone; the framework measured it on CALM models fine-tuned so that layers saturate")
        else:
            why = (f"the softmax metrics lie within {num(spread)} AUROC of each other; their order depends on the "
                   "head's vocabulary and λ")
        reason = "" if verdict == CONFIRMED else join(f"best here: {best} ({num(scored.get(best))})", why,
                                                       reason_vocab(facts), reason_quick(facts))
        out.append(Verdict(key, claim, source, verdict, evidence, reason))
    return out


# -- 3. calibration honesty ----------------------------------------------------------------------------------------


def calibration_points(result: dict) -> list[dict]:
    """Whole-rule held-out points below ε = 1 with their exited-token count and the tolerance of a binomial mean."""
    points = []
    for row in sorted(result["cascade"], key=lambda r: r["eps"]):
        if row["eps"] >= 1.0:
            continue
        n = round(row["exited"] * (result.get("check_tokens") or 0))
        tolerance = max(AGREEMENT_TOLERANCE, 2 * math.sqrt(row["eps"] * (1 - row["eps"]) / n)) if n else math.nan
        points.append({**row, "n": n, "tolerance": tolerance})
    return points


def verdicts_calibration(result: dict, facts: dict) -> list[Verdict]:
    points = calibration_points(result)
    judged = [p for p in points if p["n"] >= MIN_EXITED and p["agreement_exited"] is not None]
    short = [p for p in judged if p["eps"] - p["agreement_exited"] > p["tolerance"]]
    if not judged:
        verdict = DIFFERS
    elif not short:
        verdict = CONFIRMED
    else:
        far = any(p["eps"] - p["agreement_exited"] > max(0.1, p["tolerance"]) for p in short)
        verdict = REFUTED if far else DIFFERS
    evidence = ", ".join(f"ε={p['eps']:g}: {num(p['agreement_exited'])} ({p['n']} tokens)" for p in judged) or "none"
    if verdict == CONFIRMED:
        reason = ""
    elif not judged:
        reason = join(f"fewer than {MIN_EXITED} held-out tokens exited at every ε", reason_heads(facts),
                      reason_quick(facts))
    else:
        worst = max(short, key=lambda p: p["eps"] - p["agreement_exited"])
        reason = join(f"at ε = {worst['eps']:g} the exited tokens agree at {num(worst['agreement_exited'])}: "
                      f"thresholds rest on {result.get('fit_tokens')} calibration tokens, and the high-ε tail holds "
                      "few of them",
                      reason_quick(facts))
    return [Verdict("3", "Calibrated thresholds keep the agreement of exited tokens at ε or above on tokens not used "
                    "for calibration, for every ε.", "paper §3.3.1", verdict,
                    f"held-out agreement of exited tokens: {evidence}", reason)]


# -- 4. lm-eval: score, speed-up, exits vs ε -----------------------------------------------------------------------


def _sweep_series(result: dict) -> dict[str, dict[float, dict]]:
    """Per task, per ε: score (its first metric), cost-model speed-up, exit fractions."""
    series = {}
    for row in result["rows"]:
        per_eps = series.setdefault(row["task"], {})
        if row["eps"] not in per_eps:  # the task's first metric
            per_eps[row["eps"]] = row
    return series


def verdicts_lm_eval(result: dict, facts: dict) -> list[Verdict]:
    series = _sweep_series(result)
    sizes = result.get("task_sizes", {})
    score_ok, score_bad, speed_ok, speed_bad, exit_ok, exit_bad, deep_only, any_exit = ([] for _ in range(8))
    score_ev, speed_ev, exit_ev, silent = [], [], [], []
    for task, per_eps in series.items():
        eps = sorted(per_eps)
        low, full = eps[0], eps[-1]
        score = {e: per_eps[e]["value"] for e in eps}
        tolerance = max(0.02, 1 / sizes[task]) if sizes.get(task) else 0.05
        high = [e for e in eps if 0.9 <= e < 1.0] or eps[-2:-1]
        score_ok.append(all(abs(score[e] - score[full]) <= tolerance for e in high))
        score_bad.append(score[low] > score[full] + tolerance)
        score_ev.append(f"{task}: " + ", ".join(f"ε={e:g} {num(score[e])}" for e in eps))
        fractions = {e: json.loads(per_eps[e]["exit_fractions"] or "{}") for e in eps}
        exited = {e: 1.0 - fractions[e].get("full", 1.0) for e in eps}
        if not any(exited[e] > 0 for e in eps):  # nothing left at any ε: speed and exits say nothing of ε here
            silent.append(task)
            continue
        speed = {e: per_eps[e]["cost_speedup"] or 1.0 for e in eps}
        speed_ok.append(all(speed[a] >= speed[b] - 0.01 for a, b in zip(eps, eps[1:], strict=False)))
        speed_bad.append(speed[low] <= speed[full] + 0.01)
        speed_ev.append(f"{task}: " + ", ".join(f"ε={e:g} {speed[e]:.2f}x" for e in eps))
        exit_ok.append(all(exited[a] >= exited[b] - 0.01 for a, b in zip(eps, eps[1:], strict=False)))
        any_exit.append(exited[low] > 0)
        names = [n for n in fractions[low] if n != "full"]
        deep_only.append(bool(names) and exited[low] > 0 and all(fractions[low][n] == 0 for n in names[:-1]))
        exit_ev.append(f"{task}: tokens exiting " + ", ".join(f"ε={e:g} {exited[e]:.2f}" for e in eps))
    docs = ", ".join(f"{t} {n}" for t, n in sizes.items())
    if not docs:
        data = ""
    elif result.get("real_tasks"):
        data = f"data: {docs} documents per task (one document moves a score by 1/N)"
    else:
        data = f"data: {docs} local questions per task, not MMLU / HellaSwag / Winogrande"
    top_token = result.get("scoring_rule") == "top_token"
    quiet = (f"no scored position leaves at any ε on {', '.join(silent)}, left out of the speed and exit judgments"
             + (" (scoring_rule=top_token keeps a position that several one-token answers share with the full "
                "model)" if top_token else "")) if silent else ""
    # under top_token the first head that passes decides: one naming another token keeps the position full
    first_decides = ("scoring_rule=top_token: a position leaves only where the first head that passes its threshold "
                     "names the scored token; at low ε the shallow heads pass first and name other tokens more often, "
                     "so fewer positions leave than at a higher ε") if top_token else ""
    none_exit = not any(any_exit)
    v_score = (DIFFERS if none_exit else CONFIRMED if all(score_ok) and not any(score_bad)
               else REFUTED if any(score_bad) and not any(score_ok) else DIFFERS)
    # refuted only when a low ε is no faster than the full model; a rise with dips along the way differs
    v_speed = (DIFFERS if none_exit else REFUTED if any(speed_bad) else CONFIRMED if all(speed_ok) else DIFFERS)
    v_exit = (DIFFERS if none_exit else REFUTED if not all(exit_ok)
              else DIFFERS if any(deep_only) else CONFIRMED)
    nothing = "no scored position exited at any ε < 1" if none_exit else ""
    return [
        Verdict("4a", "Scores stay near the full model's at high ε and rise with ε (lower ε, lower or equal scores).",
                "paper §4.2, Fig. 2", v_score, "; ".join(score_ev),
                "" if v_score == CONFIRMED else join(nothing, data, reason_heads(facts), reason_quick(facts))),
        Verdict("4b", "Speed-up grows as ε falls.", "paper §4.2, Fig. 3", v_speed,
                "cost-model speed-up on scored positions: " + "; ".join(speed_ev),
                "" if v_speed == CONFIRMED else join(nothing, quiet, first_decides if not all(speed_ok) else "",
                                                     reason_vocab(facts), reason_heads(facts))),
        Verdict("4c", "With lower ε more tokens exit, and more of them at the earlier heads.", "paper §4.2, Fig. 4",
                v_exit, "; ".join(exit_ev),
                "" if v_exit == CONFIRMED else join(nothing, quiet, first_decides if not all(exit_ok) else "",
                                                    "only the deepest exit fires" if any(deep_only) else "",
                                                    reason_heads(facts), reason_model(facts))),
    ]


# -- 5. DSSD -------------------------------------------------------------------------------------------------------


def dssd_summary(rows: list[dict]) -> dict:
    """The fastest DSSD run that drafted (ε < 1) and the fastest LayerSkip-style run (the tuned baseline) of one
    prompt set, and the ratio of their acceptance rates."""
    dssd = [r for r in rows if r["family"] == "dssd" and r["eps"] < 1.0 and r.get("drafted")]
    fixed = [r for r in rows if r["family"] == "layerskip"]
    best_dssd = max(dssd, key=lambda r: r["speedup"]) if dssd else None
    best_fixed = max(fixed, key=lambda r: r["speedup"]) if fixed else None
    ratio = math.nan
    if best_dssd and best_fixed and best_dssd.get("acceptance_rate") is not None and best_fixed.get("acceptance_rate"):
        ratio = best_dssd["acceptance_rate"] / best_fixed["acceptance_rate"]
    return {"dssd": best_dssd, "layerskip": best_fixed, "acceptance_ratio": ratio}


def verdicts_dssd(result: dict, facts: dict) -> list[Verdict]:
    summaries = {name: dssd_summary(rows) for name, rows in result["sets"].items()}
    ratio = _mean(s["acceptance_ratio"] for s in summaries.values())
    if math.isnan(ratio):
        verdict = DIFFERS
    else:
        verdict = CONFIRMED if ratio >= DSSD_ACCEPTANCE_CLAIM else DIFFERS if ratio >= 1.0 else REFUTED
    evidence = "; ".join(
        f"{name}: DSSD ε={s['dssd']['eps']:g} accepts {num(s['dssd'].get('acceptance_rate'), '.2f')}, LayerSkip-style "
        f"exit@{s['layerskip']['exit']} × {s['layerskip']['drafts']} drafts "
        f"{num(s['layerskip'].get('acceptance_rate'), '.2f')} (ratio {num(s['acceptance_ratio'], '.2f')})"
        for name, s in summaries.items() if s["dssd"] and s["layerskip"])
    baseline = ("our LayerSkip-style baseline drafts with the same trained exit heads (a fixed exit and draft length), "
                "not with a LayerSkip-trained model's shallow layers, so it starts strong")
    out = [Verdict("5a", f"DSSD accepts {DSSD_ACCEPTANCE_CLAIM}× more draft tokens than a tuned LayerSkip baseline.",
                   "DSSD revision (Pythia)", verdict,
                   f"mean ratio {num(ratio, '.2f')}; {evidence or 'DSSD drafted nothing at these ε'}",
                   "" if verdict == CONFIRMED else join("DSSD drafted nothing" if math.isnan(ratio) else baseline,
                                                        reason_heads(facts), reason_model(facts), reason_quick(facts)))]
    faster = [s["dssd"] and s["layerskip"] and s["dssd"]["speedup"] > max(1.0, s["layerskip"]["speedup"])
              for s in summaries.values()]
    drafted = any(s["dssd"] for s in summaries.values())
    slower = [s["dssd"] is None or s["dssd"]["speedup"] < 1.0 for s in summaries.values()]
    verdict = DIFFERS if not drafted else CONFIRMED if all(faster) else REFUTED if all(slower) else DIFFERS
    evidence = "; ".join(f"{name}: DSSD {num(s['dssd'] and s['dssd']['speedup'], '.2f')}x, LayerSkip-style "
                         f"{num(s['layerskip'] and s['layerskip']['speedup'], '.2f')}x plain greedy"
                         for name, s in summaries.items())
    out.append(Verdict("5b", "DSSD is faster in wall-clock time than plain greedy decoding and the LayerSkip-style "
                       "baseline.", "DSSD revision", verdict, evidence,
                       "" if verdict == CONFIRMED else join(
                           "DSSD drafted nothing" if not drafted else
                           "every round ends in a full verification pass, and the drafts pay for their heads",
                           reason_cpu(result.get("threads"), result.get("dtype")), reason_quick(facts))))
    return out


# -- 6. batching ---------------------------------------------------------------------------------------------------


def batch_best(rows: list[dict]) -> dict | None:
    """The early-exit run (ε < 1) where some token exited with the best speed-up over the same loop without exits
    (ε = 1)."""
    runs = [r for r in rows if r["family"] == "early_exit" and r["eps"] < 1.0 and r.get("speedup_vs_eps1")
            and r.get("exit_fractions") and r["exit_fractions"][-1] < 1.0]
    return max(runs, key=lambda r: r["speedup_vs_eps1"]) if runs else None


def verdicts_batching(result: dict, facts: dict) -> list[Verdict]:
    best = {int(size): batch_best(rows) for size, rows in result["batches"].items()}
    batched = {size: row for size, row in best.items() if size > 1 and row}
    value = max((row["speedup_vs_eps1"] for row in batched.values()), default=math.nan)
    if math.isnan(value):
        verdict = DIFFERS
    else:
        verdict = CONFIRMED if value >= BATCH_SPEEDUP_CLAIM else DIFFERS if value >= 1.0 else REFUTED
    evidence = "; ".join(f"batch {size}: ε={row['eps']:g} {row['speedup_vs_eps1']:.2f}x the same loop without exits "
                         f"({row['speedup']:.2f}x HF greedy), layer work {num(row.get('layers_fraction'), '.2f')}"
                         for size, row in sorted(best.items()) if row)
    why = ("no token exited in a batched run at these ε" if not batched else
           "a batched step ends only when every row has left, so rows that exited ride along "
           "(the layer work shows it); on CPU each extra row costs real time, on a GPU it is nearly free")
    claim = f"Early exit with iteration-level batching reaches up to {BATCH_SPEEDUP_CLAIM}× the full-layer throughput."
    return [Verdict("6", claim, "inference framework (vLLM, CALM)", verdict, evidence or "no token exited",
                    "" if verdict == CONFIRMED else join(why, reason_cpu(facts.get("threads"), result.get("dtype")),
                                                         reason_heads(facts), reason_quick(facts)))]


VERDICTS = {
    "training_dynamics": verdicts_training,
    "confidence_metrics": verdicts_metrics,
    "calibration": verdicts_calibration,
    "lm_eval": verdicts_lm_eval,
    "dssd": verdicts_dssd,
    "batching": verdicts_batching,
}
