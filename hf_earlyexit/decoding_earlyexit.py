"""Early-exit generation (lossy; paper §3.3.2) on the layer engine (portable: torch + transformers + siblings).

Each new token runs the decoder layers up to the first exit, that head is read, and if its confidence passes the
calibrated threshold τ_k(ε) the token is emitted from the head and no deeper layer is computed for it; otherwise the
next exit is tried, and finally the full model. With a batch, a step ends when every row has exited (rows that
exited early ride along to the deepest exit any row needs: the iteration-level rule); rows that finish leave the
batch.

The KV cache of the layers a token skipped is kept usable in one of two ways (`kv_fill`):

- `"recompute"` (EE-LLM): the skipped layers of an exited token are computed later, together with the next token
  that reaches them, so every cache entry is exactly what the full model stores. It costs the skipped layers'
  work after all (batched with the next deep token, so it reads the weights once) and saves only when later tokens
  also exit; it is exact.
- `"propagate"` (CALM): the exit hidden state is copied up, and each skipped layer computes only its key/value
  projections from it (input norm + q/k/v projections, no attention, no MLP): a fraction of a layer's cost, but the
  deeper layers then attend to approximate keys and values.

Decoding runs inside HF `generate()` (as its `custom_generate` loop), so generation configs, logits processors
(temperature, top-k/p, repetition penalty), stopping criteria, stop strings, EOS, streamers and
`return_dict_in_generate` work as usual. With sampling, a token that exits is sampled from its head's distribution.
"""

from __future__ import annotations

import copy
import functools
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers.generation import GenerateDecoderOnlyOutput, StoppingCriteriaList, StopStringCriteria

from .heads_earlyexit import Cost, ExitHead, module_cost
from .metrics_earlyexit import confidence

KV_FILLS = ("recompute", "propagate")
EXIT_POLICIES = ("auto", "all")


@dataclass
class ExitStats:
    """What early-exit generation spent, against the plain model on the same tokens.

    Attributes:
        exit_layers: the exits, in order (`exit_counts[-1]` counts tokens from the full model).
        num_layers: decoder layers of the base model.
        tokens: generated tokens (the first token of each sequence comes from the prompt pass, at full depth).
        exit_counts: tokens per exit, then full depth.
        steps: decoding steps after the prompt pass (each one batch pass).
        layer_tokens: token-positions run through a decoder layer in those steps (catch-up of skipped layers and
            rows carried along in a batch included).
        layer_tokens_full: the same for the plain model (one full pass per token after the first).
        kv_fill_tokens: token-positions whose keys/values were filled by propagation.
        wasted_layer_tokens: layer work spent on rows that had already exited in the same batch step.
        head_tokens: head evaluations.
        macs / macs_full: weight multiply-adds spent vs the plain model (attention over the context not counted).
        weight_bytes / weight_bytes_full: bytes of weights read (once per pass, shared by the batch) vs plain.
        checked_exits: the exits that were checked (the exit policy may skip exits that seldom fire at this ε).
        drafted / accepted / rounds: self-speculative decoding: draft tokens proposed (by the heads, or by prompt
            lookup when it is on), how many the full model accepted, and draft-verify rounds (per sequence).
        lookup_drafted / lookup_accepted: the part of `drafted` / `accepted` that came from prompt lookup (their
            accepted tokens count as full-model tokens in `exit_counts`: no head produced them).
        seconds: wall-clock time by phase (`draft`, `verify`, `heads` (inside draft), `bookkeeping`), where
            measured.
    """

    exit_layers: list[int]
    num_layers: int
    checked_exits: list[int] | None = None
    tokens: int = 0
    exit_counts: list[int] = field(default_factory=list)
    steps: int = 0
    layer_tokens: int = 0
    layer_tokens_full: int = 0
    kv_fill_tokens: int = 0
    wasted_layer_tokens: int = 0
    head_tokens: int = 0
    macs: int = 0
    macs_full: int = 0
    weight_bytes: int = 0
    weight_bytes_full: int = 0
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    lookup_drafted: int = 0
    lookup_accepted: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.exit_counts:
            self.exit_counts = [0] * (len(self.exit_layers) + 1)

    def add(self, other: ExitStats) -> None:
        """Accumulate `other` (same exits) into this one."""
        if other.exit_layers != self.exit_layers:
            raise ValueError(f"cannot add stats for exits {other.exit_layers} to stats for {self.exit_layers}")
        for name in ("tokens", "steps", "layer_tokens", "layer_tokens_full", "kv_fill_tokens",
                     "wasted_layer_tokens", "head_tokens", "macs", "macs_full", "weight_bytes", "weight_bytes_full",
                     "drafted", "accepted", "rounds", "lookup_drafted", "lookup_accepted"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.exit_counts = [a + b for a, b in zip(self.exit_counts, other.exit_counts, strict=True)]
        for key, value in other.seconds.items():
            self.seconds[key] = self.seconds.get(key, 0.0) + value
        if other.checked_exits is not None:
            self.checked_exits = sorted(set(self.checked_exits or []) | set(other.checked_exits))

    @property
    def exit_names(self) -> list[str]:
        return [f"exit@{layer}" for layer in self.exit_layers] + ["full"]

    @property
    def layers_computed_fraction(self) -> float:
        """Decoder-layer work relative to the plain model (1.0 = no saving)."""
        return self.layer_tokens / self.layer_tokens_full if self.layer_tokens_full else float("nan")

    @property
    def acceptance_rate(self) -> float:
        """Accepted ÷ drafted tokens (self-speculative decoding)."""
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def mean_accepted(self) -> float:
        """Accepted draft tokens per draft-verify round."""
        return self.accepted / self.rounds if self.rounds else float("nan")

    @property
    def macs_fraction(self) -> float:
        return self.macs / self.macs_full if self.macs_full else float("nan")

    @property
    def weight_bytes_fraction(self) -> float:
        return self.weight_bytes / self.weight_bytes_full if self.weight_bytes_full else float("nan")

    def as_dict(self) -> dict:
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        out["exit_counts_by_name"] = dict(zip(self.exit_names, self.exit_counts, strict=True))
        out["layers_computed_fraction"] = self.layers_computed_fraction
        out["macs_fraction"] = self.macs_fraction
        out["weight_bytes_fraction"] = self.weight_bytes_fraction
        out["acceptance_rate"] = self.acceptance_rate
        out["mean_accepted"] = self.mean_accepted
        return out

    def summary(self) -> str:
        """One line: exits per head, and work vs the plain model."""
        total = max(self.tokens, 1)
        exits = ", ".join(f"{n} {c} ({c / total:.0%})" for n, c in zip(self.exit_names, self.exit_counts, strict=True))
        if self.rounds:
            exits += (f"; drafted {self.drafted}, accepted {self.accepted} ({self.acceptance_rate:.0%}), "
                      f"{self.mean_accepted:.2f} accepted per round")
            if self.lookup_drafted:
                exits += f" (prompt lookup: drafted {self.lookup_drafted}, accepted {self.lookup_accepted})"
        return (
            f"{self.tokens} tokens: {exits}; decoder-layer work {self.layers_computed_fraction:.2f}x, "
            f"multiply-adds {self.macs_fraction:.2f}x, weight bytes {self.weight_bytes_fraction:.2f}x of plain decoding"
        )


@dataclass
class EarlyExitGenerateOutput(GenerateDecoderOnlyOutput):
    """HF's decoder-only generate output plus where each token left.

    Attributes:
        exit_stats: what this call spent (`ExitStats`).
        exit_index: `(batch, new_tokens)` the exit each generated token left from (`len(exit_layers)` = full
            model; -1 for padding after a sequence finished).
    """

    exit_stats: ExitStats | None = None
    exit_index: Tensor | None = None


class _Costs:
    """Per-token costs of every part the decoder can run (from the cost model of `heads_earlyexit`)."""

    def __init__(self, model) -> None:
        parts = model.engine.parts
        self.layers = [module_cost(layer) for layer in parts.layers]
        self.heads = [head.cost() for head in model.exit_heads]
        self.final = module_cost(parts.norm) + module_cost(parts.lm_head)
        self.full = sum(self.layers, Cost(0, 0)) + self.final
        self._model = model
        self._kv: list[Cost] | None = None

    def kv(self) -> list[Cost]:
        """Cost of a KV-only pass through each layer, counted once by running one (torch's flop counter)."""
        if self._kv is None:
            from torch.utils.flop_counter import FlopCounterMode

            engine = self._model.engine
            weight = engine.parts.embed.weight
            macs = []
            for i in range(engine.num_layers):  # one token's KV-only pass through layer i, nothing else
                state = engine.start(torch.zeros(1, 1, dtype=torch.long, device=weight.device))
                hidden = state.frontier.pop(0)
                with FlopCounterMode(display=False) as counter:
                    engine._run_layer(state, i, hidden, {}, {}, kv_only=True)
                macs.append(counter.get_total_flops() // 2)
            self._kv = [Cost(m, m * weight.element_size()) for m in macs]
        return self._kv


def _costs(model) -> _Costs:
    costs = getattr(model, "_exit_costs", None)
    if costs is None:
        costs = _Costs(model)
        object.__setattr__(model, "_exit_costs", costs)
    return costs


@dataclass
class Tally:
    """Head and final-head work of one generate call (decoder-layer work is counted by the engine)."""

    head_tokens: list[int]
    head_calls: list[int]
    final_tokens: int = 0
    final_calls: int = 0
    head_seconds: float = 0.0


def finish_stats(
    stats: ExitStats, costs: _Costs, work_now: dict, prefill: dict, tally: Tally, decode_tokens: int,
    plain_steps: int,
) -> None:
    """Fill the work fields of `stats`: the decoding after the prompt pass (which plain decoding does alike),
    against the plain model's `decode_tokens` one-token passes in `plain_steps` batch steps."""
    work = {key: [a - b for a, b in zip(values, prefill[key], strict=True)] for key, values in work_now.items()}
    num_layers = len(costs.layers)
    stats.layer_tokens = sum(work["tokens"])
    stats.layer_tokens_full = decode_tokens * num_layers
    stats.kv_fill_tokens = sum(work["kv_tokens"])
    stats.head_tokens = sum(tally.head_tokens)
    kv = costs.kv() if stats.kv_fill_tokens else [Cost(0, 0)] * num_layers

    def spent(attr: str, counts: list[tuple[list[Cost], list[int]]]) -> int:
        return sum(getattr(c, attr) * t for parts, ts in counts for c, t in zip(parts, ts, strict=True))

    stats.macs = spent("macs", [
        (costs.layers, work["tokens"]), (kv, work["kv_tokens"]), (costs.heads, tally.head_tokens),
        ([costs.final], [tally.final_tokens]),
    ])
    stats.weight_bytes = spent("weight_bytes", [
        (costs.layers, work["calls"]), (kv, work["kv_calls"]), (costs.heads, tally.head_calls),
        ([costs.final], [tally.final_calls]),
    ])
    stats.macs_full = costs.full.macs * decode_tokens
    stats.weight_bytes_full = costs.full.weight_bytes * plain_steps


def plan_exits(model, eps: float, kv_fill: str = "recompute") -> list[bool]:
    """Which exits are worth checking at `eps` (`exit_policy="auto"`).

    Every check costs a head evaluation; an exit that seldom fires at this ε costs more than it saves. On the
    calibration tokens (per-token scores, aligned across heads), every subset of the exits that have a threshold is
    simulated (a token leaves at the first checked exit that fires) and the subset with the fewest weight bytes
    read per token is kept: decoding one token at a time is bound by reading weights. Skipped layers cost nothing
    more with `recompute` (their catch-up rides along with the next deep token's weight reads) and their KV-only
    projections with `propagate`. Without aligned calibration statistics, every exit with a threshold is checked.
    """
    thresholds = model.thresholds_for(eps)
    usable = [tau is not None for tau in thresholds]
    stats = model.calibration_stats
    if not any(usable) or not stats or "aligned" not in stats:
        return usable
    costs = _costs(model)
    scores = torch.stack([stats[f"score.{j}"].double() for j in range(len(thresholds))], dim=1)  # (N, K)
    fires = torch.zeros_like(scores, dtype=torch.bool)
    for j, tau in enumerate(thresholds):
        if tau is not None:
            fires[:, j] = scores[:, j] >= tau
    layer_bytes = [c.weight_bytes for c in costs.layers]
    kv_bytes = [c.weight_bytes for c in costs.kv()] if kv_fill == "propagate" else [0] * len(layer_bytes)
    full = float(costs.full.weight_bytes)
    exit_layers = model.config.exit_layers
    candidates = [j for j, ok in enumerate(usable) if ok]
    best, best_cost = usable, None
    for mask in range(1 << len(candidates)):
        chosen = [candidates[b] for b in range(len(candidates)) if mask >> b & 1]
        cost = torch.full((scores.shape[0],), full, dtype=torch.double)
        left = torch.zeros(scores.shape[0], dtype=torch.bool)
        checked = 0.0
        for j in chosen:
            checked += costs.heads[j].weight_bytes
            layer = exit_layers[j]
            leave = fires[:, j] & ~left
            cost[leave] = sum(layer_bytes[:layer]) + sum(kv_bytes[layer:]) + checked
            left |= leave
        cost[~left] = full + checked
        mean = float(cost.mean())
        if best_cost is None or mean < best_cost:
            best_cost = mean
            best = [j in chosen for j in range(len(thresholds))]
    return best


def head_logits_full_vocab(head: ExitHead, logits: Tensor, vocab_size: int) -> Tensor:
    """`(n, head_vocab)` head logits -> `(n, vocab)` float32 scores over the model vocabulary.

    A draft-vocabulary head's tokens get their logits and every other token `-inf` (its `OTHER` class is dropped:
    a head only exits when its top class is a real token).
    """
    logits = logits.float()
    if not head.is_draft:
        return logits
    full = logits.new_full((logits.shape[0], vocab_size), float("-inf"))
    full[:, head.token_ids] = logits[:, : len(head.token_ids)]
    return full


@dataclass
class ExitPlan:
    """The exit rule of one generate call: thresholds at ε, which exits are checked, the metric."""

    thresholds: list[float | None]
    active: list[bool]
    metric: str

    @classmethod
    def build(cls, model, eps: float, policy: str, kv_fill: str = "recompute") -> ExitPlan:
        thresholds = model.thresholds_for(eps)
        if policy == "auto":
            active = plan_exits(model, eps, kv_fill)
        else:
            active = [tau is not None for tau in thresholds]
        return cls(thresholds, active, model.config.metric)

    @property
    def last(self) -> int:
        """Index of the deepest checked exit (-1: none)."""
        return max((j for j, on in enumerate(self.active) if on), default=-1)

    @property
    def needs_hidden(self) -> bool:
        return self.metric == "hidden_similarity"


@dataclass
class CascadeResult:
    """Outcome of `exit_cascade` for `n` rows."""

    fired: Tensor  # (n,) bool: the row left at some exit
    exit_index: Tensor  # (n,) long: that exit (len(exits) where none fired)
    logits: Tensor  # (n, vocab) float32: the exiting head's logits over the model vocabulary (rows that fired)
    depth: int | None  # the layer every row had left by, or None when some row passed every checked exit


def exit_cascade(model, state, plan: ExitPlan, todo: Tensor, tokens: Tensor, tally: Tally) -> CascadeResult:
    """Run the newest position of `state` up the exits; each row in `todo` leaves at the first checked exit whose
    head is confident (its top class a real token). Stops at the exit by which every row in `todo` has left.

    Args:
        todo: `(n,)` bool, rows that may leave (others are carried along).
        tokens: `(n,)` the newest tokens (the first exit's hidden-state similarity compares with their embedding).
    """
    engine = model.engine
    n = todo.shape[0]
    num_exits = len(plan.thresholds)
    vocab_size = engine.config.vocab_size
    decided = ~todo
    fired = torch.zeros(n, dtype=torch.bool, device=todo.device)
    exit_index = torch.full((n,), num_exits, dtype=torch.long, device=todo.device)
    logits = torch.empty(n, vocab_size, dtype=torch.float32, device=todo.device)
    previous = model.get_input_embeddings()(tokens) if plan.needs_hidden else None
    last = plan.last
    for j, (layer, head, tau) in enumerate(zip(model.config.exit_layers, model.exit_heads, plan.thresholds,
                                               strict=True)):
        if j > last:
            break
        if not plan.active[j] and not plan.needs_hidden:
            continue
        hidden = engine.run_to(state, layer)[:, -1]  # (n, hidden): the newest token after `layer` layers
        if plan.active[j]:
            rows = (~decided).nonzero().squeeze(1)
            started = time.perf_counter()
            head_logits = head(hidden[rows])  # (m, head_vocab)
            tally.head_tokens[j] += len(rows)
            tally.head_calls[j] += 1
            score = confidence(
                plan.metric, logits=head_logits, hidden=hidden[rows],
                previous_hidden=previous[rows] if previous is not None else None,
            )
            real_token = head.to_token_ids(head_logits.argmax(dim=-1)) >= 0
            fire = (score >= tau) & real_token
            tally.head_seconds += time.perf_counter() - started
            if bool(fire.any()):
                chosen = rows[fire]
                logits[chosen] = head_logits_full_vocab(head, head_logits[fire], vocab_size)
                decided[chosen] = True
                fired[chosen] = True
                exit_index[chosen] = j
            if bool(decided.all()):
                return CascadeResult(fired, exit_index, logits, layer)
        previous = hidden
    return CascadeResult(fired, exit_index, logits, None)


@torch.no_grad()
def early_exit_decode(
    model,
    input_ids: Tensor,
    logits_processor,
    stopping_criteria,
    generation_config,
    synced_gpus: bool = False,
    streamer=None,
    *,
    ee_model,
    ee_eps: float,
    ee_kv_fill: str,
    ee_exit_policy: str = "auto",
    **model_kwargs,
):
    """The decoding loop HF `generate()` calls (as `custom_generate`) for early-exit generation.

    `model` is the base model HF prepared the inputs for; `ee_model` the `EarlyExitForCausalLM` holding the heads.
    """
    if generation_config.num_beams > 1:
        beams = generation_config.num_beams
        raise ValueError(f"early-exit generation decodes greedily or by sampling; got num_beams={beams}")
    engine = ee_model.engine
    exit_layers = list(ee_model.config.exit_layers)
    num_exits, num_layers = len(exit_layers), engine.num_layers
    plan = ExitPlan.build(ee_model, ee_eps, ee_exit_policy, ee_kv_fill)
    costs = _costs(ee_model)

    pad_token = generation_config._pad_token_tensor
    do_sample = generation_config.do_sample
    return_dict = generation_config.return_dict_in_generate
    keep_scores = return_dict and generation_config.output_scores
    keep_logits = return_dict and generation_config.output_logits
    has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    batch_size = input_ids.shape[0]
    device = input_ids.device

    mask = model_kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(input_ids)
    state = engine.start(input_ids, mask)
    logits = engine.final_logits(engine.run_to(state, num_layers)[:, -1]).float()  # (batch, vocab)
    prefill = {key: list(values) for key, values in state.work.items()}  # the prompt pass, as in plain decoding
    stats = ExitStats(exit_layers=exit_layers, num_layers=num_layers, checked_exits=[
        layer for layer, on in zip(exit_layers, plan.active, strict=True) if on
    ])
    tally = Tally([0] * num_exits, [0] * num_exits)
    exit_index_now = torch.full((batch_size,), num_exits, dtype=torch.long, device=device)

    rows = torch.arange(batch_size, device=device)  # engine rows -> batch rows
    unfinished = torch.ones(batch_size, dtype=torch.long, device=device)
    scores_seen, logits_seen, trace = (), (), []
    dropped = False
    while True:
        full_scores = logits.new_zeros(batch_size, logits.shape[-1])
        full_scores[rows] = logits
        next_scores = logits_processor(input_ids, full_scores)
        if keep_scores:
            scores_seen += (next_scores,)
        if keep_logits:
            logits_seen += (full_scores,)
        if do_sample:
            next_tokens = torch.multinomial(torch.softmax(next_scores, dim=-1), num_samples=1).squeeze(1)
        else:
            next_tokens = next_scores.argmax(dim=-1)
        if has_eos:
            next_tokens = next_tokens * unfinished + pad_token * (1 - unfinished)
        step_exits = torch.full((batch_size,), -1, dtype=torch.long, device=device)
        step_exits[rows] = exit_index_now
        trace.append(step_exits)
        for j in exit_index_now.tolist():
            stats.exit_counts[j] += 1
        stats.tokens += len(rows)
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        unfinished = unfinished & ~stopping_criteria(input_ids, scores_seen)
        if unfinished.max() == 0:
            break
        keep = unfinished[rows].bool()
        if not bool(keep.all()):
            kept = keep.nonzero().squeeze(1)
            state = engine.select_rows(state, kept)
            rows = rows[kept]
            dropped = True

        # one decoding step for the rows still running
        tokens = next_tokens[rows]  # (n,)
        engine.append(state, tokens[:, None])
        stats.steps += 1
        result = exit_cascade(ee_model, state, plan, torch.ones_like(tokens, dtype=torch.bool), tokens, tally)
        exit_index_now, logits = result.exit_index, result.logits
        depth = num_layers if result.depth is None else result.depth
        if result.depth is None:
            todo = (~result.fired).nonzero().squeeze(1)
            hidden = engine.run_to(state, num_layers)[:, -1]
            logits[todo] = engine.final_logits(hidden[todo]).float()
            tally.final_tokens += len(todo)
            tally.final_calls += 1
        elif ee_kv_fill == "propagate":
            engine.fill_kv(state, depth)
        exit_depth = torch.tensor(exit_layers + [num_layers], device=device)[exit_index_now]
        stats.wasted_layer_tokens += int((depth - exit_depth).sum())

    if streamer is not None:
        streamer.end()

    finish_stats(stats, costs, state.work, prefill, tally, stats.tokens - batch_size, stats.steps)
    ee_model.exit_stats.add(stats)

    if not return_dict:
        return input_ids
    cache = None
    if not dropped:
        if ee_kv_fill == "recompute":
            engine.flush(state)
        cache = state.cache
    return EarlyExitGenerateOutput(
        sequences=input_ids,
        scores=scores_seen if keep_scores else None,
        logits=logits_seen if keep_logits else None,
        cache=cache,
        exit_stats=stats,
        exit_index=torch.stack(trace, dim=1),
    )


def early_exit_generate(
    ee_model, inputs: Tensor | None = None, *, eps: float, kv_fill: str = "recompute", exit_policy: str = "auto",
    **kwargs,
):
    """`generate()` with early exits: HF prepares everything, `early_exit_decode` runs the loop."""
    if kv_fill not in KV_FILLS:
        raise ValueError(f"kv_fill={kv_fill!r} is not one of {', '.join(KV_FILLS)}")
    if exit_policy not in EXIT_POLICIES:
        raise ValueError(f"exit_policy={exit_policy!r} is not one of {', '.join(EXIT_POLICIES)}")
    ee_model.thresholds_for(eps)  # checks eps and that the heads are calibrated, before any work
    return run_decoding_loop(ee_model, early_exit_decode, "early-exit generation", inputs, kwargs,
                             ee_eps=float(eps), ee_kv_fill=kv_fill, ee_exit_policy=exit_policy)


def run_decoding_loop(ee_model, loop, what: str, inputs: Tensor | None, kwargs: dict, **loop_kwargs):
    """Let the base model's `generate()` prepare everything (configs, processors, stopping criteria) and run `loop`
    as its `custom_generate` decoding loop."""
    for key in ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit", "custom_generate"):
        if kwargs.get(key) is not None:
            raise ValueError(f"{key} cannot be combined with {what}")
    _move_stop_strings(ee_model, kwargs)
    # HF hands a callable loop neither the streamer nor the tokenizer, so the streamer is bound here
    decode = functools.partial(loop, streamer=kwargs.get("streamer"), ee_model=ee_model, **loop_kwargs)
    return ee_model.backbone.generate(inputs, custom_generate=decode, **kwargs)


def _move_stop_strings(ee_model, kwargs: dict) -> None:
    """HF drops the tokenizer before a `custom_generate` loop is prepared, so stop strings become our own stopping
    criterion here (same class HF uses)."""
    config = kwargs.get("generation_config")
    stop_strings = kwargs.pop("stop_strings", None)
    if stop_strings is None and config is not None and getattr(config, "stop_strings", None):
        config = copy.deepcopy(config)
        stop_strings, config.stop_strings = config.stop_strings, None
        kwargs["generation_config"] = config
    tokenizer = kwargs.pop("tokenizer", None) or getattr(ee_model, "tokenizer", None)
    if not stop_strings:
        return
    if tokenizer is None:
        raise ValueError("stop_strings needs a tokenizer: pass tokenizer=... to generate()")
    criteria = StoppingCriteriaList(kwargs.pop("stopping_criteria", None) or [])
    criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings))
    kwargs["stopping_criteria"] = criteria
