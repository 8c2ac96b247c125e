"""`hf-earlyexit bench`: speed of early exit and self-speculative decoding measured side by side with plain decoding
(and peer methods) on fixed prompt sets, in one run."""

from __future__ import annotations

import copy
import json
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from ..formatting import num
from ..loading import ModelArgs
from ..modeling.drafters_earlyexit import Proposal
from ..modeling.exits_earlyexit import ExitRule
from ..modeling.loop_earlyexit import DecodeRun, climb
from ..modeling.modeling_earlyexit import EarlyExitForCausalLM
from ..modeling.options_earlyexit import BATCH_EXITS, DEFAULT_MAX_DRAFT, EXIT_POLICIES, KV_FILLS
from ..modeling.products_earlyexit import LM_SCREENS
from ..training.data import GenerationSpec, draft_vocabulary, generate_corpus

# prompts of the bench: none of the training or calibration seeds, a mix of prose, code and facts
BENCH_PROMPTS = (
    "The history of the Roman Empire",
    "def fibonacci(n):",
    "The best way to learn a new language is",
    "Photosynthesis is the process by which",
    "Once upon a time, in a small village,",
    "The main difference between TCP and UDP is",
    "To make a cup of tea, first",
    "The theory of relativity states that",
)
# -- bench ---------------------------------------------------------------------------------------------------------


REPETITIVE_PROMPTS = (
    "Monday, Tuesday, Wednesday,",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,",
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):",
    "Repeat after me: the cat sat on the mat. The cat sat on the mat. The cat sat on the mat.",
    "A B C D E F G H",
    "<ul>\n  <li>apple</li>\n  <li>banana</li>\n  <li>cherry</li>\n",
    "Row 1: 0 0 0 0\nRow 2: 0 0 0 0\nRow 3:",
    "SELECT name FROM users;\nSELECT email FROM users;\nSELECT",
)
PROMPT_SETS = {"varied": BENCH_PROMPTS, "repetitive": REPETITIVE_PROMPTS}
BENCH_MODES = ("early_exit", "dssd", "all", "vocab")


@dataclass
class BenchArgs(ModelArgs):
    """Tokens/s of early exit / self-speculative decoding vs plain decoding (and peers), side by side in one run."""

    mode: str = field(default="early_exit", metadata={
        "help": "early_exit: plain + early exit at eps_grid + forced exits; dssd: plain + DSSD at dssd_eps_grid + "
                "peers (HF assistant early exit, prompt lookup, LayerSkip-style fixed drafting) + early exit at the "
                "same ε; all: both; vocab: draft-vocabulary size study (coverage vs head cost)",
        "choices": BENCH_MODES})
    eps_grid: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.8, 0.9, 0.95, 1.0],
                                  metadata={"help": "ε values of early exit"})
    dssd_eps_grid: list[float] = field(default_factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.9],
                                       metadata={"help": "ε values of DSSD"})
    max_draft: int = field(default=DEFAULT_MAX_DRAFT, metadata={"help": "DSSD: most tokens drafted per round"})
    dssd_lookup: list[int] = field(default_factory=lambda: [2], metadata={
        "help": "DSSD + prompt lookup: n-gram sizes to time (the heads draft where lookup finds nothing); "
                "give 0 alone for none"})
    peers: bool = field(default=True, metadata={"help": "dssd mode: also time the peer methods"})
    hf_early_exit_layers: list[int] | None = field(default=None, metadata={
        "help": "HF assistant_early_exit layers to try (default: the heads' exit layers)"})
    layerskip_drafts: list[int] = field(default_factory=lambda: [2, 4, 6],
                                        metadata={"help": "LayerSkip-style baseline: fixed draft lengths to try"})
    layerskip_exits: list[int] | None = field(default=None, metadata={
        "help": "LayerSkip-style baseline: exit layers to try (default: every exit)"})
    prompt_lookup_tokens: list[int] = field(default_factory=lambda: [3, 10],
                                            metadata={"help": "HF prompt lookup: n-gram draft lengths to try"})
    prompt_sets: list[str] | None = field(default=None, metadata={
        "help": "prompt sets (varied, repetitive); default: varied for early_exit, both for dssd/all"})
    kv_fill: str = field(default="recompute", metadata={"help": "KV cache of skipped layers",
                                                        "choices": list(KV_FILLS)})
    batch_exit: list[str] = field(default_factory=list, metadata={
        "help": "early exit and DSSD with a batch: row (each row runs only the layers of its own positions), step "
                "(every row rides along to the step's deepest exit; DSSD rows carry fillers); give both to time both "
                "(default: each mode's own default, step for early exit, row for DSSD)"})
    exit_policy: str = field(default="auto", metadata={"help": "auto: only exits that pay at this ε; all: every exit",
                                                       "choices": list(EXIT_POLICIES)})
    lm_screen: str = field(default="auto", metadata={
        "help": "our loops' float32 LM-head argmax: auto (also through the head's bfloat16 copy where the CPU "
                "multiplies bfloat16 natively and that is faster; the same tokens), bf16 (also where emulated), off "
                "(float32 products only)", "choices": list(LM_SCREENS)})
    max_new_tokens: int = field(default=128, metadata={"help": "tokens per prompt (EOS ignored)"})
    batch_size: int = field(default=1, metadata={"help": "prompts per generate call (left padded)"})
    num_prompts: int = field(default=len(BENCH_PROMPTS), metadata={"help": "how many prompts of each set to use"})
    repeats: int = field(default=1, metadata={"help": "timed repetitions of every configuration (median kept)"})
    oracle: bool = field(default=True, metadata={
        "help": "dssd mode: also time the oracle ceiling, DSSD whose drafts at each exit are the full model's own "
                "tokens at that exit's real cost (every speed is then also given as a fraction of the best ceiling)"})
    oracle_mix: list[str] = field(default_factory=list, metadata={
        "help": "dssd mode: also time imperfect oracles, each EXIT:DRAFTED:KEPT (e.g. 4:0.75:0.9): at exit EXIT a "
                "position is drafted with probability DRAFTED and a draft is the full model's token with "
                "probability KEPT (else a wrong one), at that exit's real cost: what heads of that quality would give "
                "(exact in float32, where DSSD reproduces plain greedy)"})
    per_exit: bool = field(default=True, metadata={"help": "early_exit mode: also time tokens forced to leave at "
                                                           "each exit"})
    vocab_sizes: list[int] = field(default_factory=lambda: [2048, 4096, 8192, 16384, 32768, 65536],
                                   metadata={"help": "vocab mode: draft vocabulary sizes to compare"})
    vocab_sequences: int = field(default=96, metadata={
        "help": "vocab mode: generated sequences the frequencies come from (96 = the README's training data)"})
    output_dir: str = field(default="bench", metadata={"help": "where bench.json and bench.png go"})
    device: str = field(default="cpu", metadata={"help": "where the model runs: cpu, cuda or cuda:N"})


def vocab_study(args: BenchArgs, model: EarlyExitForCausalLM, tokenizer) -> dict:
    """Which draft-vocabulary size: coverage of the full model's greedy tokens on the bench prompts by the most
    frequent tokens of the model's own generations, against the time of one head evaluation (and one decoder
    layer, and the full LM head), measured side by side."""
    corpus = generate_corpus(model.backbone, tokenizer, GenerationSpec(num_sequences=args.vocab_sequences),
                             model.config.base_model_name_or_path)
    prompts = list(BENCH_PROMPTS[: args.num_prompts]) + list(REPETITIVE_PROMPTS[: args.num_prompts])
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    greedy = model.generate(**enc, mode="plain", max_new_tokens=args.max_new_tokens, do_sample=False,
                            eos_token_id=None, pad_token_id=tokenizer.pad_token_id)[:, enc["input_ids"].shape[1]:]
    targets = greedy[greedy != tokenizer.pad_token_id]
    parts = model.engine.parts
    weight = parts.lm_head.weight.detach()  # (vocab, hidden)
    hidden = torch.randn(1, weight.shape[1], dtype=weight.dtype)

    def timed(fn, reps: int = 30) -> float:
        fn()
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples) * 1000

    engine = model.engine
    state = engine.start(enc["input_ids"][:1])
    engine.run_to(state, engine.num_layers)
    token = torch.zeros(1, 1, dtype=torch.long)

    def one_layer():  # embed one new token and run decoder layer 0 on it
        engine.append(state, token)
        engine.run_to(state, 1)

    rows = []
    full_ms = timed(lambda: torch.nn.functional.linear(hidden, weight))
    layer_ms = timed(one_layer)
    for size in args.vocab_sizes:
        ids = draft_vocabulary(corpus, weight.shape[0], min(size, weight.shape[0]))
        rows_w = weight[ids].contiguous()
        coverage = float(torch.isin(targets, ids).float().mean())
        rows.append({"size": size, "coverage": coverage,
                     "head_ms": timed(lambda w=rows_w: torch.nn.functional.linear(hidden, w))})
    report = {"dtype": args.dtype, "targets": int(targets.numel()), "layer_ms": layer_ms, "full_head_ms": full_ms,
              "vocab": weight.shape[0], "rows": rows}
    lines = [f"draft vocabulary study ({args.dtype}): coverage of {report['targets']} greedy tokens; one decoder "
             f"layer {layer_ms:.2f} ms, full {weight.shape[0]}-row LM head {full_ms:.2f} ms", "",
             "| draft vocabulary | coverage of greedy tokens | head ms | head / layer |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['coverage']:.3f} | {r['head_ms']:.2f} | {r['head_ms'] / layer_ms:.2f} |")
    print("\n".join(lines))
    return report


def token_agreement(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, list[int | None]]:
    """Fraction of identical new tokens, and per row the first position where they differ (`None`: never)."""
    width = min(reference.shape[1], other.shape[1])
    same = reference[:, :width] == other[:, :width]  # (batch, new)
    first = []
    for row in same:
        bad = (~row).nonzero()
        first.append(int(bad[0, 0]) if len(bad) else (None if width == reference.shape[1] else width))
    return float(same.float().sum() / reference.numel()), first


def _forced(model: EarlyExitForCausalLM, j: int, tau: float = -math.inf) -> dict[str, list]:
    """Thresholds that check exit `j` alone, at `tau`: by default every token leaves there; `math.inf`: none does."""
    taus = [None] * model.config.num_exits
    taus[j] = tau
    return {"0": taus}


class OracleDrafter:
    """The oracle ceiling of DSSD at exit `j`: it drafts the full model's own next token (known from a plain greedy
    run of the same prompts) while doing the real work of a draft at exit `j` (the layers below it and its head), so
    every draft is kept and the time is the best a head at that exit could give."""

    name = "oracle"

    def __init__(self, run: DecodeRun, j: int, reference: list[list[int]]) -> None:
        num_exits = run.rule.num_exits
        thresholds = tuple(-math.inf if i == j else None for i in range(num_exits))
        self.rule = ExitRule(thresholds, tuple(i == j for i in range(num_exits)), run.rule.metric)
        self.run, self.j, self.reference = run, j, reference

    def propose(self, wanted: torch.Tensor, newest: torch.Tensor, history: list[list[int]]) -> Proposal:
        tokens = torch.full_like(newest, -1)
        if bool(wanted.any()):
            climb(self.run, wanted, newest, self.rule)  # the work of a draft at exit j (its verdict is not needed)
        for i in wanted.nonzero().squeeze(1).tolist():
            sofar = history[i]
            ref = next((r for r in self.reference if r[: len(sofar)] == sofar and len(r) > len(sofar)), None)
            if ref is not None:
                tokens[i] = ref[len(sofar)]
        exits = torch.full_like(newest, self.rule.num_exits).masked_fill(wanted, self.j)
        return Proposal(ok=wanted & (tokens >= 0), exits=exits, tokens=tokens)


class MixedOracleDrafter(OracleDrafter):
    """An imperfect oracle at exit `j`: like `OracleDrafter` it does the real work of a draft at exit `j`, but a
    position is drafted only with probability `drafted` (else the round's drafting stops there, as where no head is
    confident) and a draft is the full model's token only with probability `kept` (else a wrong token). After a
    wrong draft the row keeps drafting (rejected filler), as a real drafter would. The draws depend only on the
    reference sequence and the position, so every run and every configuration with the same rates sees the same
    ones. Where the verified text itself leaves the reference (a bfloat16 verify pass rounds differently from
    one-token steps) it drafts nothing, as `OracleDrafter` does: its figures are exact where DSSD reproduces plain
    greedy token for token (float32)."""

    name = "oracle_mix"

    def __init__(self, run: DecodeRun, j: int, reference: list[list[int]], drafted: float, kept: float,
                 vocab_size: int) -> None:
        super().__init__(run, j, reference)
        self.drafted, self.kept, self.vocab_size = drafted, kept, vocab_size
        self.wrong: set[tuple[int, int, int]] = set()  # (reference, position, token) of each wrong draft made

    def propose(self, wanted: torch.Tensor, newest: torch.Tensor, history: list[list[int]]) -> Proposal:
        tokens = torch.full_like(newest, -1)
        for i in wanted.nonzero().squeeze(1).tolist():
            sofar = history[i]
            # the reference that shares the longest prefix with the row (the first of equals), and that length
            split, r = max((_common_prefix(ref, sofar), -k) for k, ref in enumerate(self.reference))
            r = -r
            ref = self.reference[r]
            if len(ref) <= len(sofar) or (split < len(sofar) and (r, split, sofar[split]) not in self.wrong):
                continue  # past the reference, or off it where no wrong draft of ours put it
            draw = random.Random(f"{r}:{len(sofar)}")
            if draw.random() >= self.drafted:
                continue
            right = ref[len(sofar)]
            if split == len(sofar) and draw.random() < self.kept:
                tokens[i] = right
            else:  # a wrong draft, or filler after one (rejected with it)
                tokens[i] = (right + 1) % self.vocab_size
                self.wrong.add((r, len(sofar), int(tokens[i])))
        ok = wanted & (tokens >= 0)
        if bool(ok.any()):
            climb(self.run, ok, newest, self.rule)  # the work of a draft at exit j
        # the rows it declines go on to the heads, whose rule checks exit j and never fires there (`_forced` at
        # inf): the same layers and head, no draft, so the round's drafting ends there as where no head is confident
        exits = torch.full_like(newest, self.rule.num_exits).masked_fill(ok, self.j)
        return Proposal(ok=ok, exits=exits, tokens=tokens)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def parse_oracle_mix(spec: str, exits: list[int]) -> tuple[int, float, float]:
    """`"EXIT:DRAFTED:KEPT"` -> (exit index, drafted, kept); a clear error names the entry and what is expected."""
    parts = spec.split(":")
    try:
        layer, drafted, kept = int(parts[0]), float(parts[1]), float(parts[2])
        if len(parts) != 3:
            raise ValueError
    except (ValueError, IndexError):
        raise ValueError(f"oracle_mix={spec!r} must read EXIT:DRAFTED:KEPT, e.g. 4:0.75:0.9") from None
    if layer not in exits:
        raise ValueError(f"oracle_mix={spec!r}: exit {layer} is not an exit of these heads (exits: {exits})")
    if not (0.0 < drafted <= 1.0 and 0.0 <= kept <= 1.0):
        raise ValueError(f"oracle_mix={spec!r}: DRAFTED must lie in (0, 1] and KEPT in [0, 1]")
    return exits.index(layer), drafted, kept


@dataclass
class _Config:
    """One timed configuration of the bench."""

    family: str  # plain, early_exit, forced, dssd, hf_early_exit, prompt_lookup, layerskip
    label: str
    params: dict
    run: object  # (encoding) -> (sequences, ExitStats | None)


def _configs(args: BenchArgs, model: EarlyExitForCausalLM, common: dict, references: dict) -> list[_Config]:
    """Every timed configuration; `references` (filled before timing) maps `id(encoding)` to the plain greedy
    sequences of that encoding, which the oracle drafts from."""
    saved = dict(model.config.thresholds or {})

    def plain(enc):
        return model.generate(**enc, mode="plain", **common), None

    def ours(mode, eps, thresholds=None, **extra):
        def run(enc):
            if thresholds is not None:
                model.config.thresholds = thresholds
            try:
                out = model.generate(**enc, mode=mode, eps=eps, return_dict_in_generate=True, **extra, **common)
            finally:
                model.config.thresholds = saved
            return out.sequences, out.exit_stats
        return run

    def hf(**extra):
        def run(enc):
            return model.generate(**enc, mode="plain", **extra, **common), None
        return run

    def oracle(j, drafted=1.0, kept=1.0):
        perfect = drafted == kept == 1.0

        def run(enc):
            def drafter(decode_run):
                if perfect:
                    return OracleDrafter(decode_run, j, references[id(enc)])
                return MixedOracleDrafter(decode_run, j, references[id(enc)], drafted, kept,
                                          model.engine.vocab_size)
            thresholds = _forced(model, j, -math.inf if perfect else math.inf)
            return ours("dssd", 0.0, thresholds, max_draft=args.max_draft, exit_policy="all",
                        drafters=(drafter,))(enc)
        return run

    exits = model.config.exit_layers
    # each batch rule to time, and the label suffix that tells them apart when there are several
    rules = [(rule, f" ({rule} rule)" if len(args.batch_exit) > 1 else "") for rule in args.batch_exit] or [(None, "")]
    configs = [_Config("plain", "plain", {}, plain)]
    if args.mode in ("early_exit", "all"):
        for rule, named in rules:
            for eps in args.eps_grid:
                configs.append(_Config("early_exit", f"early exit ε={eps:g}{named}", {"eps": eps, "batch_exit": rule},
                                       ours("early_exit", eps, kv_fill=args.kv_fill, exit_policy=args.exit_policy,
                                            batch_exit=rule)))
        if args.per_exit:
            for j, layer in enumerate(exits):
                # propagate: a token that cannot leave (its head's top class is "other") does not drag the
                # skipped positions through the deep layers, so the time reflects the exit layer alone
                configs.append(_Config("forced", f"all at exit@{layer}", {"exit": layer},
                                       ours("early_exit", 0.0, _forced(model, j), kv_fill="propagate",
                                            exit_policy="all")))
    if args.mode in ("dssd", "all"):
        for rule, named in rules:
            for eps in args.dssd_eps_grid:
                configs.append(_Config("dssd", f"DSSD ε={eps:g}{named}", {"eps": eps, "batch_exit": rule},
                                       ours("dssd", eps, max_draft=args.max_draft, exit_policy=args.exit_policy,
                                            batch_exit=rule)))
        for n in (n for n in args.dssd_lookup if n > 0):
            for eps in args.dssd_eps_grid:
                configs.append(_Config("dssd_lookup", f"DSSD ε={eps:g} + lookup n={n}", {"eps": eps, "lookup": n},
                                       ours("dssd", eps, max_draft=args.max_draft, exit_policy=args.exit_policy,
                                            lookup=n)))
        if args.mode == "dssd":  # the lossy mode at the same ε, for comparison
            for eps in args.dssd_eps_grid:
                configs.append(_Config("early_exit", f"early exit ε={eps:g}", {"eps": eps},
                                       ours("early_exit", eps, kv_fill=args.kv_fill, exit_policy=args.exit_policy)))
        if args.oracle:
            for j, layer in enumerate(exits):
                configs.append(_Config("oracle_dssd", f"oracle DSSD at exit@{layer}", {"exit": layer}, oracle(j)))
        for spec in args.oracle_mix:
            j, drafted, kept = parse_oracle_mix(spec, list(exits))
            configs.append(_Config("oracle_mix", f"oracle at exit@{exits[j]}: {drafted:.0%} drafted, {kept:.0%} right",
                                   {"exit": exits[j], "share": drafted, "right": kept}, oracle(j, drafted, kept)))
        if args.peers:
            for layer in args.hf_early_exit_layers or exits:
                configs.append(_Config("hf_early_exit", f"HF assistant_early_exit={layer}", {"layer": layer},
                                       hf(assistant_early_exit=layer)))
            for n in args.prompt_lookup_tokens:
                configs.append(_Config("prompt_lookup", f"HF prompt lookup n={n}", {"n": n},
                                       hf(prompt_lookup_num_tokens=n)))
            unknown = sorted(set(args.layerskip_exits or []) - set(exits))
            if unknown:
                raise ValueError(f"layerskip_exits={unknown} are not exits of these heads (exits: {exits})")
            for j, layer in enumerate(exits):
                if args.layerskip_exits and layer not in args.layerskip_exits:
                    continue
                for draft in args.layerskip_drafts:
                    configs.append(_Config(
                        "layerskip", f"fixed exit@{layer}, {draft} drafts", {"exit": layer, "drafts": draft},
                        ours("dssd", 0.0, _forced(model, j), max_draft=draft, exit_policy="all",
                             adaptive_draft=False),
                    ))
    return configs


def _measure(args: BenchArgs, configs: list[_Config], encoded: list) -> tuple[dict, dict, dict]:
    device = encoded[0]["input_ids"].device  # where the prompts (and the model) are
    times = {c.label: [] for c in configs}
    outputs, stats = {}, {}
    bar = tqdm(total=args.repeats * len(encoded) * len(configs), desc="Bench", unit="run")
    for rep in range(args.repeats):
        order = configs if rep % 2 == 0 else configs[::-1]  # alternate the order against drift
        for g, enc in enumerate(encoded):
            for config in order:
                _synchronize(device)
                start = time.perf_counter()
                seqs, st = config.run(enc)
                _synchronize(device)
                times[config.label].append((g, time.perf_counter() - start))
                if rep == 0:
                    outputs[config.label, g] = seqs[:, enc["input_ids"].shape[1]:]
                    if st is not None:
                        stats.setdefault(config.label, []).append(st)
                bar.update()
    bar.close()
    return times, outputs, stats


def _synchronize(device: torch.device) -> None:
    """Wait for queued accelerator work, so a timer stops when the tokens exist (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_report(device: torch.device) -> dict:
    """Where the bench ran, beside the CPU capability every report records."""
    if device.type == "cuda":
        return {"device": str(device), "device_name": torch.cuda.get_device_name(device),
                "torch_cuda": torch.version.cuda}
    return {"device": str(device)}


def _rows(configs: list[_Config], times: dict, outputs: dict, stats: dict, groups: int) -> list[dict]:
    tokens = sum(outputs["plain", g].numel() for g in range(groups))
    rows = []
    for config in configs:
        per_group = {}
        for g, seconds in times[config.label]:
            per_group.setdefault(g, []).append(seconds)
        seconds = sum(statistics.median(v) for v in per_group.values())
        row = {"family": config.family, "label": config.label, **config.params, "seconds": seconds,
               "tokens_per_s": tokens / seconds}
        if config.family != "plain":
            agree, first = zip(*(token_agreement(outputs["plain", g], outputs[config.label, g]) for g in range(groups)),
                               strict=True)
            row["agreement"] = statistics.fmean(agree)
            firsts = [f for group in first for f in group]
            row["first_divergence"] = firsts
            row["identical_sequences"] = sum(f is None for f in firsts)
        if config.label in stats:
            total = copy.deepcopy(stats[config.label][0])
            for extra in stats[config.label][1:]:
                total.add(extra)
            row["exit_fractions"] = [c / max(1, total.tokens) for c in total.exit_counts]
            row["layers_fraction"] = total.layers_computed_fraction
            row["macs_fraction"] = total.macs_fraction
            row["weight_bytes_fraction"] = total.weight_bytes_fraction
            row["wasted_layer_tokens"] = total.wasted_layer_tokens
            row["checked_exits"] = total.checked_exits
            if total.seconds:
                row["seconds_by_phase"] = total.seconds
            if total.rounds:
                row["acceptance_rate"] = total.acceptance_rate
                row["mean_accepted"] = total.mean_accepted
                row["drafted"] = total.drafted
                row["drafted_by"], row["accepted_by"] = total.drafted_by, total.accepted_by
        rows.append(row)
    plain_speed = rows[0]["tokens_per_s"]
    # our loop without exits, under the same batch rule where it was timed
    same_loop = {r.get("batch_exit"): r["tokens_per_s"] for r in rows[::-1]
                 if r["family"] == "early_exit" and r["eps"] == 1.0}
    # the ceilings: DSSD with an oracle drafter, early exit forced to one exit (same work, the head's tokens)
    ceilings = {"dssd": max((r["tokens_per_s"] for r in rows if r["family"] == "oracle_dssd"), default=None),
                "early_exit": max((r["tokens_per_s"] for r in rows if r["family"] == "forced"), default=None)}
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / plain_speed
        loop = same_loop.get(row.get("batch_exit"), next(iter(same_loop.values()), None))
        row["speedup_vs_eps1"] = row["tokens_per_s"] / loop if loop else None
        kind = "dssd" if row["family"].startswith("dssd") or row["family"] == "layerskip" else row["family"]
        ceiling = ceilings.get(kind)
        row["vs_ceiling"] = row["tokens_per_s"] / ceiling if ceiling else None
    return rows


def run_bench(args: BenchArgs) -> dict:
    """Measure, print, and write `bench.json` + `bench.png` into `args.output_dir`."""
    for eps in [*args.eps_grid, *args.dssd_eps_grid]:
        if not 0.0 <= eps <= 1.0:
            raise ValueError(f"eps={eps!r} must lie in [0, 1]")
    sets = args.prompt_sets or (["varied"] if args.mode == "early_exit" else ["varied", "repetitive"])
    for rule in args.batch_exit:
        if rule not in BATCH_EXITS:
            raise ValueError(f"batch_exit={rule!r} is not one of {', '.join(BATCH_EXITS)}")
    for name in sets:
        if name not in PROMPT_SETS:
            raise ValueError(f"prompt set {name!r} is not one of {', '.join(PROMPT_SETS)}")
    if not 1 <= args.num_prompts <= len(BENCH_PROMPTS):
        raise ValueError(f"num_prompts={args.num_prompts} must lie in 1..{len(BENCH_PROMPTS)}")
    try:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("this torch build sees no CUDA device")
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"device={args.device!r} cannot run here ({err}); expected cpu, cuda or cuda:N") from None
    if args.mode == "vocab" and device.type != "cpu":
        raise ValueError(f"device={args.device!r}: the vocab study times heads on the CPU; expected cpu")
    model, tokenizer = args.load()
    model.to(device)
    model.engine.lm_screen = args.lm_screen
    tokenizer.padding_side = "left"
    if args.mode == "vocab":
        with torch.inference_mode():
            report = vocab_study(args, model, tokenizer)
        out_dir = Path(args.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "vocab.json").write_text(json.dumps(report, indent=2))
        return report
    # EOS off (no extra logits processor), so every run writes exactly max_new_tokens tokens
    common = {"max_new_tokens": args.max_new_tokens, "eos_token_id": None, "do_sample": False,
              "pad_token_id": tokenizer.pad_token_id}
    references: dict[int, list[list[int]]] = {}
    configs = _configs(args, model, common, references)
    report = {
        "model": args.model, "dtype": args.dtype, "mode": args.mode, "kv_fill": args.kv_fill,
        "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
        "exit_layers": model.config.exit_layers, "num_layers": model.num_layers,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), **_device_report(device),
        "torch": torch.__version__, "args": asdict(args), "sets": {},
    }
    with torch.inference_mode():
        for name in sets:
            prompts = list(PROMPT_SETS[name][: args.num_prompts])
            groups = [prompts[i: i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
            encoded = [tokenizer(g, return_tensors="pt", padding=True).to(device) for g in groups]
            configs[0].run(encoded[0])  # warm-up
            model.engine.learn_final_argmax()  # the LM head's fastest way per row count, learned before timing
            for enc in encoded:  # what the oracle drafts: the plain model's own greedy tokens
                references[id(enc)] = model.generate(**enc, mode="plain", **common).tolist()
            times, outputs, stats = _measure(args, configs, encoded)
            report["sets"][name] = {"prompts": prompts, "rows": _rows(configs, times, outputs, stats, len(encoded))}
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(report, indent=2))
    plot_bench(report, out_dir / "bench.png")
    print(bench_table(report))
    print(f"\nwritten: {out_dir / 'bench.json'}, {out_dir / 'bench.png'}")
    return report


def bench_table(report: dict) -> str:
    """The bench as Markdown tables, one per prompt set."""
    names = [f"exit@{k}" for k in report["exit_layers"]] + ["full"]
    lines = []
    for name, part in report["sets"].items():
        lines += [
            "",
            f"{name} prompts: {report['dtype']}, batch {report['batch_size']}, {report['max_new_tokens']} new tokens "
            f"x {len(part['prompts'])} prompts, {report['threads']} threads",
            "",
            "| run | tok/s | vs plain | vs ε=1 | vs ceiling | token agreement | identical seqs | accepted / drafted | "
            "accepted per round | layer work | MACs | exits (" + " / ".join(names) + ") |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in part["rows"]:
            exits = " / ".join(f"{f:.2f}" for f in row["exit_fractions"]) if "exit_fractions" in row else "–"
            identical = (f"{row['identical_sequences']}/{len(row['first_divergence'])}"
                         if "identical_sequences" in row else "–")
            lines.append(
                f"| {row['label']} | {row['tokens_per_s']:.1f} | {row['speedup']:.2f} | "
                f"{num(row['speedup_vs_eps1'], '.2f')} | {num(row.get('vs_ceiling'), '.2f')} | "
                f"{num(row.get('agreement', 1.0))} | {identical} | "
                f"{num(row.get('acceptance_rate'), '.2f')} | {num(row.get('mean_accepted'), '.2f')} | "
                f"{num(row.get('layers_fraction'), '.2f')} | {num(row.get('macs_fraction'), '.2f')} | {exits} |"
            )
    return "\n".join(lines)


def plot_bench(report: dict, path: Path) -> None:
    """Per prompt set: speed-up of every run, and token agreement / acceptance against ε."""
    sets = list(report["sets"].items())
    fig = Figure(figsize=(13, 4.5 * len(sets)))
    axes = fig.subplots(len(sets), 2, squeeze=False)
    for (name, part), (left, right) in zip(sets, axes, strict=True):
        rows = part["rows"]
        left.barh([r["label"] for r in rows], [r["speedup"] for r in rows],
                  color=[_FAMILY_COLOURS.get(r["family"], "grey") for r in rows])
        left.axvline(1.0, color="black", lw=0.8)
        left.invert_yaxis()
        left.set_xlabel("tokens/s relative to plain greedy")
        left.set_title(f"{name} prompts ({report['dtype']}, batch {report['batch_size']})")
        left.tick_params(axis="y", labelsize=7)
        for family, marker in (("early_exit", "o-"), ("dssd", "s-"), ("dssd_lookup", "^-")):
            fam = [r for r in rows if r["family"] == family]
            if fam:
                right.plot([r["eps"] for r in fam], [r["speedup"] for r in fam], marker, label=f"{family} speed-up")
                right.plot([r["eps"] for r in fam], [r.get("agreement", 1.0) for r in fam], marker, alpha=0.5,
                           label=f"{family} token agreement")
        right.axhline(1.0, color="grey", lw=0.8)
        right.set_xlabel("ε")
        right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


_FAMILY_COLOURS = {"plain": "black", "early_exit": "tab:blue", "forced": "tab:cyan", "dssd": "tab:red",
                   "dssd_lookup": "tab:pink",
                   "hf_early_exit": "tab:orange", "prompt_lookup": "tab:green", "layerskip": "tab:purple",
                   "oracle_dssd": "tab:gray", "oracle_mix": "silver"}
