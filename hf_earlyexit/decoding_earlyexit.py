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

    def __post_init__(self) -> None:
        if not self.exit_counts:
            self.exit_counts = [0] * (len(self.exit_layers) + 1)

    def add(self, other: ExitStats) -> None:
        """Accumulate `other` (same exits) into this one."""
        if other.exit_layers != self.exit_layers:
            raise ValueError(f"cannot add stats for exits {other.exit_layers} to stats for {self.exit_layers}")
        for name in ("tokens", "steps", "layer_tokens", "layer_tokens_full", "kv_fill_tokens",
                     "wasted_layer_tokens", "head_tokens", "macs", "macs_full", "weight_bytes", "weight_bytes_full"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.exit_counts = [a + b for a, b in zip(self.exit_counts, other.exit_counts, strict=True)]
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
        return out

    def summary(self) -> str:
        """One line: exits per head, and work vs the plain model."""
        total = max(self.tokens, 1)
        exits = ", ".join(f"{n} {c} ({c / total:.0%})" for n, c in zip(self.exit_names, self.exit_counts, strict=True))
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
    heads = ee_model.exit_heads
    exit_layers = list(ee_model.config.exit_layers)
    num_exits, num_layers = len(exit_layers), engine.num_layers
    thresholds = ee_model.thresholds_for(ee_eps)
    metric = ee_model.config.metric
    needs_hidden = metric == "hidden_similarity"
    if ee_exit_policy == "auto":
        active = plan_exits(ee_model, ee_eps, ee_kv_fill)
    else:
        active = [tau is not None for tau in thresholds]
    last_exit = max((j for j in range(num_exits) if active[j]), default=-1)
    vocab_size = engine.config.vocab_size
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
        layer for layer, on in zip(exit_layers, active, strict=True) if on
    ])
    head_tokens = [0] * num_exits
    head_calls = [0] * num_exits
    final_tokens = final_calls = 0
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
        tokens = next_tokens[rows][:, None]  # (n, 1)
        engine.append(state, tokens)
        n = len(rows)
        stats.steps += 1
        decided = torch.zeros(n, dtype=torch.bool, device=device)
        exit_index_now = torch.full((n,), num_exits, dtype=torch.long, device=device)
        logits = torch.empty(n, vocab_size, dtype=torch.float32, device=device)
        previous = ee_model.get_input_embeddings()(tokens[:, 0]) if needs_hidden else None
        depth = num_layers
        for j, (layer, head, tau) in enumerate(zip(exit_layers, heads, thresholds, strict=True)):
            if j > last_exit:
                break
            if not active[j] and not needs_hidden:
                continue
            hidden = engine.run_to(state, layer)[:, -1]  # (n, hidden): the new token after `layer` layers
            if active[j]:
                todo = (~decided).nonzero().squeeze(1)
                head_logits = head(hidden[todo])  # (m, head_vocab)
                head_tokens[j] += len(todo)
                head_calls[j] += 1
                score = confidence(
                    metric, logits=head_logits, hidden=hidden[todo],
                    previous_hidden=previous[todo] if previous is not None else None,
                )
                real_token = head.to_token_ids(head_logits.argmax(dim=-1)) >= 0
                fire = (score >= tau) & real_token
                if bool(fire.any()):
                    chosen = todo[fire]
                    logits[chosen] = head_logits_full_vocab(head, head_logits[fire], vocab_size)
                    decided[chosen] = True
                    exit_index_now[chosen] = j
                    stats.wasted_layer_tokens -= layer * len(chosen)
                if bool(decided.all()):
                    depth = layer
                    break
            previous = hidden
        if depth == num_layers:
            todo = (~decided).nonzero().squeeze(1)
            hidden = engine.run_to(state, num_layers)[:, -1]
            logits[todo] = engine.final_logits(hidden[todo]).float()
            final_tokens += len(todo)
            final_calls += 1
        elif ee_kv_fill == "propagate":
            engine.fill_kv(state, depth)
        stats.wasted_layer_tokens += depth * int(decided.sum())

    if streamer is not None:
        streamer.end()

    # the work of the decoding steps (the prompt pass is the same as plain decoding's, so it is left out)
    work = {key: [a - b for a, b in zip(values, prefill[key], strict=True)] for key, values in state.work.items()}
    decode_tokens = stats.tokens - batch_size
    stats.layer_tokens = sum(work["tokens"])
    stats.layer_tokens_full = decode_tokens * num_layers
    stats.kv_fill_tokens = sum(work["kv_tokens"])
    stats.head_tokens = sum(head_tokens)
    kv = costs.kv() if stats.kv_fill_tokens else [Cost(0, 0)] * num_layers

    def spent(attr: str, counts: list[tuple[list[Cost], list[int]]]) -> int:
        return sum(getattr(c, attr) * t for parts, ts in counts for c, t in zip(parts, ts, strict=True))

    stats.macs = spent("macs", [
        (costs.layers, work["tokens"]), (kv, work["kv_tokens"]), (costs.heads, head_tokens),
        ([costs.final], [final_tokens]),
    ])
    stats.weight_bytes = spent("weight_bytes", [
        (costs.layers, work["calls"]), (kv, work["kv_calls"]), (costs.heads, head_calls),
        ([costs.final], [final_calls]),
    ])
    stats.macs_full = costs.full.macs * decode_tokens
    stats.weight_bytes_full = costs.full.weight_bytes * stats.steps
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
    for key in ("assistant_model", "prompt_lookup_num_tokens", "custom_generate"):
        if kwargs.get(key) is not None:
            raise ValueError(f"{key} cannot be combined with early-exit generation")
    _move_stop_strings(ee_model, kwargs)
    decode = functools.partial(
        early_exit_decode, streamer=kwargs.get("streamer"), ee_model=ee_model, ee_eps=float(eps), ee_kv_fill=kv_fill,
        ee_exit_policy=exit_policy,
    )
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
