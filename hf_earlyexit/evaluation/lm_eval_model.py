"""lm-eval-harness model type `ee-hf`: any harness task with early exits, exit counts in the results.

`EarlyExitLM` subclasses lm-eval's `HFLM` and overrides only what it must:

- loading: the heads folder (or a base model with fresh heads, or `embedded`) through `hf_earlyexit.load`;
- `_loglikelihood_tokens` (loglikelihood, loglikelihood_rolling): HFLM's steps, with one pass of the base model's
  layers per batch and the LM head, exit heads and confidence metrics only at scored positions; each scored position
  takes its distribution from the first exit whose confidence passes τ_k(ε) (with the default
  `scoring_rule="top_token"`, only where that head's top token is the token scored there and its confidence passes
  the head's scoring gate for `scoring_delta`), else the full model's;
- `_model_generate` (generate_until): our `generate()` in the chosen mode.

Exits are counted only on scored positions, per task, and land in `results["config"]["early_exit"]` through
`get_model_info()`. `start_scoring_sweep` / `replay_scoring` score a whole ε grid from one pass (`scoring.py`).
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import functools
import inspect
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace

import torch
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.models.utils_hf import pad_and_concat
from tqdm.auto import tqdm

from ..formatting import num
from ..loading import load
from ..modeling.base_earlyexit import parse_dtype
from ..modeling.configuration_earlyexit import METRICS
from ..modeling.continuous_earlyexit import continuous_generate
from ..modeling.exits_earlyexit import ExitRule
from ..modeling.metrics_earlyexit import DEFAULT_SCORING_DELTA
from ..modeling.options_earlyexit import DecodingOptions, check_eps
from ..modeling.stats_earlyexit import ExitStats
from .scoring import (
    SCORING_REVIEW_POSITIONS,
    ScoringSweep,
    TokenScores,
    candidate_tokens,
    check_scoring_delta,
    check_scoring_rule,
    count_exits,
    exit_index,
    exits_taken,
    forward_scored,
    review_exits,
    reviewed,
    score_positions,
    scored_tokens,
)

logger = logging.getLogger(__name__)
_NO_LOGITS = torch.empty((1, 0, 0))  # what HFLM's request cache passes along in place of a row's logits

MODES = ("early_exit", "dssd", "full")
# what HFLM itself passes on to `_create_model`; any other `--model_args` key is unknown
_HFLM_MODEL_ARGS = frozenset(inspect.signature(HFLM._create_model).parameters) - {"self", "kwargs"}


def _longest_first_by_context(requests) -> Callable[[tuple], tuple]:
    """HFLM's request order (longest context + continuation first: batches padded to their first member, the
    largest batch first), with the requests of one context kept together (a document's choices share one batch, so
    `backbone_states` runs their context once): contexts by their longest request, then longest first."""
    longest: dict[tuple[int, ...], int] = {}
    for _, context, continuation in requests:
        key = tuple(context)
        longest[key] = max(longest.get(key, 0), len(context) + len(continuation))

    def order(request) -> tuple:
        context, continuation = tuple(request[1]), tuple(request[2])
        return -longest[context], context, -len(continuation), continuation

    return order


def _one_token_group(request) -> list[int]:
    """HFLM's groups of requests sharing one model input (one-token continuations of one context)."""
    return request[-2] + request[-1][:-1]


class EarlyExitLM(HFLM):
    """`lm_eval --model ee-hf --model_args pretrained=<heads folder | base id | embedded>,eps=0.9[,mode=...]`.

    Args (besides `HFLM`'s):
        eps: accuracy target ε in [0, 1] (1 = the full model everywhere).
        mode: `early_exit` (default), `dssd` (generation is lossless; scoring still exits), or `full`.
        metric: confidence metric (default and, for calibrated heads, the only one accepted: the metric their
            thresholds were calibrated for).
        scoring_rule: which confident scored positions leave (`scoring.SCORING_RULES`): `top_token` (default; only
            where the head's top token is the scored token) or `confidence` (every one, the paper's way).
        scoring_delta: under `top_token`, a scored position reads its head only where the head's confidence also
            passes that head's scoring gate: the lowest confidence above which, on the calibration tokens, the head's
            log-probability of the token it names lies within this many nats of the full model's at rate ≥ ε
            (default 0.1; `inf`: no gates; heads calibrated before these errors were recorded have none).
        scoring_review: with `exit_policy="auto"` (the default), after this many scored positions of a task
            (default 512; 0: never) an exit whose positions leave there too seldom to pay for checking it is no
            longer checked for the rest of the task (`review_exits`).
        kv_fill, batch_exit, max_draft, exit_policy, lookup: decoding options of generation tasks
            (`DecodingOptions`); one that does not apply to the mode is refused. `exit_policy` also decides the
            exits scored positions check.
        continuous: generation tasks decode with continuous batching (`continuous_generate`: up to `batch_size`
            requests at once, a finished request's place taken by the next at the next step); early exit (or the
            same loop without exits at ε = 1), greedy requests only (others decode as without it).
    """

    def __init__(self, pretrained: str = "embedded", eps=0.9, mode: str = "early_exit", metric: str | None = None,
                 kv_fill: str | None = None, max_draft: int | None = None, exit_policy: str | None = None,
                 lookup: int | None = None, batch_exit: str | None = None, scoring_rule: str = "top_token",
                 scoring_delta=DEFAULT_SCORING_DELTA, scoring_review=SCORING_REVIEW_POSITIONS,
                 continuous: bool | str = False, **kwargs) -> None:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {', '.join(MODES)}")
        self.ee_continuous = _as_bool("continuous", continuous)
        if self.ee_continuous and (mode == "dssd" or batch_exit == "row"):
            raise ValueError(f"continuous=True decodes by early exit with the step rule; got mode={mode!r}, "
                             f"batch_exit={batch_exit!r}")
        if metric is not None and metric not in METRICS:
            raise ValueError(f"metric={metric!r} is not one of {', '.join(METRICS)}")
        self.ee_eps = 1.0 if mode == "full" else check_eps(eps)
        self.ee_mode = mode
        # generation's decoding options, validated before the model loads (an option for another mode is refused)
        self.ee_options = DecodingOptions.build(
            mode="plain" if mode == "full" else mode, eps=None if mode == "full" else self.ee_eps, kv_fill=kv_fill,
            max_draft=max_draft, exit_policy=exit_policy, lookup=lookup, batch_exit=batch_exit)
        self.ee_metric = metric
        self.ee_scoring_rule = check_scoring_rule(scoring_rule)
        self.ee_scoring_delta = check_scoring_delta(scoring_delta)
        self.ee_scoring_review = _as_count("scoring_review", scoring_review)
        self.ee_task = None
        self.ee_scoring: dict[str, ExitStats] = {}
        self.ee_generation: dict[str, ExitStats] = {}
        self.ee_seconds: dict[str, float] = {}
        self._conts: dict[tuple, list[tuple[tuple, tuple]]] = {}  # model input -> the requests it scores
        self.ee_sweep: ScoringSweep | None = None
        self._ee_dtype_value = parse_dtype(None if kwargs.get("dtype") == "auto" else kwargs.get("dtype"))
        kwargs.setdefault("backend", "causal")
        kwargs.setdefault("device", "cpu" if not torch.cuda.is_available() else "cuda")
        super().__init__(pretrained=str(pretrained), **kwargs)
        self._join_data_parallel()
        if metric is not None and metric != self._model.config.metric:
            self._use_metric(metric)
        self._model.thresholds_for(self.ee_eps)  # fails early, naming ε, when the heads are not calibrated
        if self.rank == 0:
            atexit.register(self._print_report)  # after lm-eval's own results table

    def _use_metric(self, metric: str) -> None:
        """Score confidence with `metric` instead of the heads' own. Thresholds belong to the metric they were
        calibrated for and the calibration statistics hold that metric's scores only, so calibrated heads are
        refused: thresholds of one metric applied to another's scores would exit at a different ε than reported."""
        config = self._model.config
        if config.thresholds or self._model.calibration_stats:
            raise ValueError(
                f"metric={metric!r}: these heads were calibrated for metric {config.metric!r} and their calibration "
                f"statistics hold no {metric} scores, so no thresholds for {metric} can be derived; leave metric= "
                f"out, or calibrate a copy for it (hf-earlyexit calibrate --metric {metric})")
        config.metric = metric

    @property
    def generation_options(self) -> DecodingOptions:
        """How `generate_until` decodes: the chosen mode at this ε, or the base model's own `generate()` at ε = 1
        (exactly `--model hf`)."""
        return DecodingOptions() if self.ee_eps >= 1.0 else self.ee_options

    def _join_data_parallel(self) -> None:
        """Split requests over every `accelerate launch` process, also on CPU.

        HFLM keeps the `Accelerator` of a multi-process launch but takes its ranks only when it counts more than one
        GPU; under `--cpu` (gloo) every process would evaluate the whole dataset and write results as rank 0. The
        model is never wrapped (no DDP/FSDP), so nothing else changes. A single process never gets here.
        """
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None and accelerator.num_processes > 1 and self._world_size == 1:
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes

    def set_eps(self, eps) -> None:
        """Move to another ε (an ε sweep keeps one loaded model) and start the exit counts afresh."""
        eps = check_eps(eps)
        self._model.thresholds_for(eps)
        self.ee_eps = eps
        self.ee_sweep = None  # a one-pass sweep's record is served only through `replay_scoring`
        if self.ee_options.mode != "plain":
            self.ee_options = DecodingOptions.build(self.ee_options, eps=eps)
        self.ee_scoring, self.ee_generation, self.ee_seconds = {}, {}, {}
        self._ee_global = None

    def _print_report(self) -> None:
        report = self.early_exit_report()
        if report["tasks"]:
            print("\n" + report_table(report))

    # -- loading: our model instead of AutoModelForCausalLM -------------------------------------------------------

    def _get_config(self, pretrained: str, *, revision: str = "main", trust_remote_code: bool = False,
                    gguf_file: str | None = None, subfolder: str = "") -> None:
        self._ee_loaded = load(pretrained, dtype=self._ee_dtype)
        self._config = self._ee_loaded[0].config

    def _create_model(self, pretrained: str, revision: str | None = "main", dtype=None, **kwargs) -> None:
        unknown = sorted(set(kwargs) - _HFLM_MODEL_ARGS)
        if unknown:
            raise TypeError(f"--model_args {unknown} are not arguments of ee-hf; its own are eps, mode, metric, "
                            "scoring_rule, scoring_delta, kv_fill, batch_exit, max_draft, exit_policy, lookup, "
                            "continuous (besides those of --model hf)")
        model = self._ee_loaded[0]
        self._model = model.to(self._device) if str(self._device) != "cpu" else model

    def _create_tokenizer(self, pretrained, tokenizer, *args, **kwargs) -> None:
        if tokenizer is not None:
            super()._create_tokenizer(pretrained, tokenizer, *args, **kwargs)
            return
        self.tokenizer = self._ee_loaded[1]

    @property
    def _ee_dtype(self):
        return getattr(self, "_ee_dtype_value", None)

    # -- scoring ----------------------------------------------------------------------------------------------------

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        """The base model's logits (HFLM's batch-size detection calls this; scoring runs `_score_chunk`)."""
        with torch.no_grad():
            return self.model.get_base_model()(inps).logits

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """HFLM's loglikelihood steps (its order, batches, one-token-continuation groups, truncation, cache and
        answers), with the model's heads evaluated only at the positions each request scores (`forward_scored`)."""
        sweep = self.ee_sweep
        if sweep is not None and sweep.replaying is not None:
            answers = sweep.replay(self.ee_task or "all", requests)
            for (strings, _, _), value in zip(requests, answers, strict=True):
                if strings is not None:
                    self.cache_hook.add_partial("loglikelihood", strings, value)
            return answers
        # which requests each model input serves (HFLM's own input: context + continuation, minus the last token)
        self._conts = {}
        for _, context, continuation in requests:
            if len(context) + len(continuation) > self.max_length + 1:
                logger.warning("context (%d) + continuation (%d) tokens exceed the model's %d: truncated from the "
                               "left", len(context), len(continuation), self.max_length)
            self._conts.setdefault(self._input_of(context, continuation), []).append(
                (tuple(context), tuple(continuation)))
        re_ord = Collator(requests, sort_fn=_longest_first_by_context(requests),
                          group_by="contexts" if self.logits_cache else None, group_fn=_one_token_group)
        batch_size = self.batch_size if self.batch_size != "auto" else override_bs or 0
        batch_fn = self._batch_scheduler if self.batch_size == "auto" and len(re_ord) and not override_bs else None
        if batch_fn is not None:
            self.batch_sizes = {}  # detect afresh for these requests (as HFLM does)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="Running loglikelihood requests")
        results = []
        try:
            for chunk in re_ord.get_batched(n=batch_size, batch_fn=batch_fn):
                for (strings, context, continuation), scores in zip(chunk, self._score_chunk(chunk), strict=True):
                    # HFLM's cache of one-token continuations sharing this input: each reads the same scores (the
                    # logits it passes along are a placeholder; the scores hold every candidate token)
                    for request, cont_toks, _ in re_ord.get_cache(req_str=strings, cxt_toks=context,
                                                                  cont_toks=continuation, logits=_NO_LOGITS):
                        value = scores.answer(cont_toks)
                        results.append(value)
                        if request is not None:  # loglikelihood_rolling's windows carry no strings
                            self.cache_hook.add_partial("loglikelihood", request, value)
                        bar.update(1)
        finally:
            bar.close()
            self._conts = {}
            if sweep is not None:
                sweep.batch = None
        return re_ord.get_original(results)

    def _input_of(self, context, continuation) -> tuple[int, ...]:
        """HFLM's model input for a request: context + continuation, cut to the window from the left, minus the last
        token."""
        return tuple((list(context) + list(continuation))[-(self.max_length + 1):][:-1])

    def _score_chunk(self, chunk) -> list[TokenScores]:
        """One batch of requests: per request, the `TokenScores` of its scored positions (for every request sharing
        its input), the full model's where a position stays and its exit head's where it leaves; exits counted
        there."""
        model = self.model
        inputs = [self._input_of(context, continuation) for _, context, continuation in chunk]
        contlens = [len(continuation) for _, _, continuation in chunk]
        if min(map(len, inputs)) == 0 or max(contlens) > self.max_length or min(contlens) == 0:
            raise ValueError(f"a loglikelihood request with continuation lengths {contlens} and input lengths "
                             f"{[len(i) for i in inputs]}: expected non-empty ones within {self.max_length} tokens")
        inps = pad_and_concat(max(map(len, inputs)), [torch.tensor(i, dtype=torch.long, device=self.device)
                                                      for i in inputs], padding_side="right")
        rule = self._exit_rule(self.ee_eps)
        sweep = self._recording_sweep
        task = self.ee_task or "all"
        if sweep is None:  # without the exits this task's scoring found not to pay (`review_exits`)
            rule = reviewed(model, rule, self.ee_scoring.get(task))
        wanted = list(rule.checked)  # heads to run: this ε's, or every ε's of a one-pass sweep
        if sweep is not None:
            wanted = [any(r.checked[j] for r in sweep.rules(model).values()) for j in range(rule.num_exits)]
        sharing = [self._conts.get(inp) or [(tuple(context), tuple(continuation))]
                   for inp, (_, context, continuation) in zip(inputs, chunk, strict=True)]
        tokens = candidate_tokens([[c for _, c in requests] for requests in sharing], contlens)
        # rule "top_token": the token scored at each position (NO_TOKEN where the requests sharing it differ)
        scored = scored_tokens(tokens).to(inps.device) if self.ee_scoring_rule == "top_token" else None
        index = None

        def stays(heads):  # this ε's exits, decided before the LM head: it runs only where a position stays
            nonlocal index
            if sweep is not None:  # every ε of the grid's exit index; each reads the full model at every position
                sweep.record_batch(model, task, heads, sum(contlens), inps.device)
                index = sweep.batch["index"].get(self.ee_eps)
                if index is None and any(rule.checked):  # recording at an ε outside the grid
                    index = exit_index(model, rule, heads, (sum(contlens),), inps.device)
                return None
            if not any(rule.checked):
                return None
            index = exit_index(model, rule, heads, (sum(contlens),), inps.device)
            index = exits_taken(model, heads, index, scored)  # final: the rows below need no scored tokens
            return index == rule.num_exits

        with torch.no_grad():
            full, heads, spans = forward_scored(model, inps, [len(i) for i in inputs], contlens, wanted, tokens,
                                                self.softmax_dtype, stays)
        out = []
        for span, requests in zip(spans, sharing, strict=True):
            row_scored = None if scored is None else scored[span]
            scores, exits = score_positions(model, full[span], heads, index, span,
                                            row_scored if sweep is not None else None)
            count_exits(self._task_stats(self.ee_scoring), model, exits)
            if sweep is not None:
                sweep.record_row(model, task, span, full[span], requests, row_scored)
            out.append(scores)
        if self.ee_options.exit_policy == "auto" and self.ee_scoring_review:  # once per task, after a sample
            if sweep is not None:
                sweep.review(model, task, self.ee_scoring_review)
            else:
                review_exits(model, self._task_stats(self.ee_scoring), rule.checked, self.ee_scoring_review)
        return out

    # -- one-pass ε sweep of scored requests ------------------------------------------------------------------------

    def _exit_rule(self, eps: float) -> ExitRule:
        """The exits scored positions may leave at, at `eps`: those decoding checks (`exit_policy`, `"auto"` by
        default: an exit that seldom pays at this ε is not run), under `top_token` with the scoring gates of
        `scoring_delta` (none where the calibration statistics hold no log-probability errors)."""
        rule = ExitRule.for_model(self.model, eps, self.ee_options.exit_policy, self.ee_options.kv_fill)
        if self.ee_scoring_rule != "top_token" or not any(rule.checked):
            return rule
        gates = self.model.scoring_gates_for(eps, self.ee_scoring_delta)
        return rule if gates is None else replace(rule, gates=gates)

    def _reported_delta(self) -> float | None:
        """The scoring gates' error bound in effect (`None`: no gates: rule `confidence`, an infinite bound, or heads
        calibrated before log-probability errors were recorded)."""
        if self.ee_scoring_rule != "top_token" or self.model.scoring_gates_for(0.5, self.ee_scoring_delta) is None:
            return None
        return self.ee_scoring_delta

    def start_scoring_sweep(self, grid: list[float]) -> None:
        """Record the scoring answers of every ε in `grid` during the next evaluation (run at the current ε): one
        forward pass per batch serves them all. Later, `replay_scoring(ε)` answers scored requests from the record."""
        for eps in grid:
            self._model.thresholds_for(check_eps(eps))  # fails early, naming ε, for an uncalibrated one
        self.ee_sweep = ScoringSweep(grid=[float(e) for e in grid], rule_of=self._exit_rule)

    def replay_scoring(self, eps) -> None:
        """Move to `eps` (one of the recorded grid) and answer scored requests from the record, exit counts too;
        generation requests still decode at `eps`."""
        sweep = self.ee_sweep
        if sweep is None or check_eps(eps) not in sweep.grid:
            raise ValueError(f"eps={eps} was not recorded by a one-pass sweep (recorded: "
                             f"{sweep.grid if sweep else 'none'})")
        self.set_eps(eps)
        self.ee_sweep, sweep.replaying = sweep, self.ee_eps
        self.ee_scoring = copy.deepcopy(sweep.scoring.get(self.ee_eps, {}))

    @property
    def _recording_sweep(self) -> ScoringSweep | None:
        sweep = getattr(self, "ee_sweep", None)
        return sweep if sweep is not None and sweep.replaying is None else None

    def _task_stats(self, table: dict[str, ExitStats]) -> ExitStats:
        key = self.ee_task or "all"
        if key not in table:
            table[key] = ExitStats(exit_layers=list(self.model.config.exit_layers), num_layers=self.model.num_layers)
        return table[key]

    # -- generation -------------------------------------------------------------------------------------------------

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
        model = self.model
        model.reset_exit_stats()
        started = time.perf_counter()
        # HFLM passes every keyword on to `generate()`, where `decoding` selects our mode and options
        options = self.generation_options
        out = super()._model_generate(context, max_length, stop, decoding=options, **generation_kwargs)
        key = self.ee_task or "all"
        self.ee_seconds[key] = self.ee_seconds.get(key, 0.0) + time.perf_counter() - started
        stats = self._task_stats(self.ee_generation)
        if options.mode != "plain":
            stats.add(model.exit_stats)
        else:
            new = int((out[:, context.shape[1]:] != self.tokenizer.pad_token_id).sum())
            stats.tokens += new
            stats.exit_counts[-1] += new
        return out

    # -- per task ---------------------------------------------------------------------------------------------------

    def _per_task(self, method, requests, **kwargs):
        """Run `method` one task at a time (exit counts per task), results back in the original order.

        Under data parallelism the evaluator pads a rank's requests with copies of its last one so that all ranks
        run equally many; a copy is answered from its original here, never run or counted.
        """
        self._ee_global = None  # until lm-eval's next gather brings every rank's counts
        real, copies = split_padding(requests) if self.world_size > 1 else (range(len(requests)), {})
        order: dict[str, list[int]] = {}
        for i in real:
            order.setdefault(getattr(requests[i], "task_name", None) or "all", []).append(i)
        results = [None] * len(requests)
        for task, indices in order.items():
            self.ee_task = task
            try:
                with self._rank_local():
                    for i, value in zip(indices, method([requests[i] for i in indices], **kwargs), strict=True):
                        results[i] = value
            finally:
                self.ee_task = None
        for i, original in copies.items():
            results[i] = results[original]
        return results

    @contextlib.contextmanager
    def _rank_local(self) -> Iterator[None]:
        """Run one task's share on this rank alone.

        HFLM's cross-rank steps inside a request call (padding rolling windows, agreeing on an `auto` batch size)
        assume all ranks call with the same tasks; one task at a time they need not (a rank may hold none of a
        task's documents) and would deadlock. The model is never wrapped, so ranks need no equal forward passes.
        """
        world, self._world_size = self._world_size, 1
        try:
            yield
        finally:
            self._world_size = world

    def gather_object(self, obj, dst: int = 0):
        """lm-eval's own gather, which every rank calls after all requests (a rank that got none too): this rank's
        exit counts ride along to `dst`, so counting adds no collective of its own."""
        if self.world_size <= 1:
            return super().gather_object(obj, dst=dst)
        tables = (self.ee_scoring, self.ee_generation, self.ee_seconds)
        gathered = super().gather_object((obj, tables), dst=dst)
        if gathered is None:  # not `dst`
            return None
        self._ee_global = merge_rank_tables([rank_tables for _, rank_tables in gathered])
        return [rank_obj for rank_obj, _ in gathered]

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self._per_task(super().loglikelihood, requests, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return self._per_task(super().loglikelihood_rolling, requests, disable_tqdm=disable_tqdm)

    def generate_until(self, requests, disable_tqdm: bool = False):
        method = self._generate_continuous if self.ee_continuous else super().generate_until
        return self._per_task(method, requests, disable_tqdm=disable_tqdm)

    def _stopped(self, stops: list[str], _: int, tokens: list[int]) -> bool:
        """Whether a request's new `tokens` hold one of its stop sequences."""
        text = self.tok_decode(tokens)
        return any(term in text for term in stops)

    def _generate_continuous(self, requests, disable_tqdm: bool = False) -> list[str]:
        """`generate_until` with continuous batching: HFLM's encoding (truncation, special tokens), stop sequences
        (+ EOS) and post-processing, but every greedy request of a task in one queue, `batch_size` at a time."""
        args = [request.args for request in requests]
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        groups: dict[str, list[int]] = {}
        for i, (_, gen_kwargs) in enumerate(args):
            groups.setdefault(repr(sorted(gen_kwargs.items())), []).append(i)
        results: list[str | None] = [None] * len(requests)
        batch_size = self.batch_size if isinstance(self.batch_size, int) else 8
        options = DecodingOptions.build(self.ee_options, mode="early_exit", eps=self.ee_eps)
        stats = self._task_stats(self.ee_generation)
        key = self.ee_task or "all"
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                    desc="Running generate_until requests (continuous batching)")
        for indices in groups.values():
            gen_kwargs = args[indices[0]][1]
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs.pop("max_gen_toks")
            sampling = kwargs.pop("do_sample", False) or kwargs.pop("temperature", 0.0)
            if sampling or kwargs:  # sampling or other knobs: HFLM's own batched path
                subset = [requests[i] for i in indices]
                for i, text in zip(indices, super().generate_until(subset, disable_tqdm=True), strict=True):
                    results[i] = text
                pbar.update(len(indices))
                continue
            contexts = [args[i][0] for i in indices]
            encoded, mask = self.tok_batch_encode(contexts, left_truncate_len=self.max_length - max_gen_toks,
                                                  truncation=self.truncation)
            prompts = [row[m.bool()].tolist() for row, m in zip(encoded, mask, strict=True)]
            stop = functools.partial(self._stopped, [term for term in until if term])

            model = self.model
            model.reset_exit_stats()
            started = time.perf_counter()
            outputs = continuous_generate(model, prompts, max_gen_toks, batch_size=batch_size, stop=stop,
                                          eos_token_id=self.eot_token_id, options=options, progress=pbar.update)
            self.ee_seconds[key] = self.ee_seconds.get(key, 0.0) + time.perf_counter() - started
            stats.add(model.exit_stats)
            for i, context, tokens in zip(indices, contexts, outputs, strict=True):
                if isinstance(self.think_end_token, int) and self.think_end_token in tokens:
                    tokens = tokens[len(tokens) - tokens[::-1].index(self.think_end_token):]
                text = self.tok_decode(tokens)
                if isinstance(self.think_end_token, int):
                    text = text.lstrip()
                text = postprocess_generated_text(
                    generation=text, stop=until,
                    think_end_token=self.think_end_token if isinstance(self.think_end_token, str) else None)
                results[i] = text
                self.cache_hook.add_partial("generate_until", (context, args[i][1]), text)
        pbar.close()
        return results

    # -- reporting --------------------------------------------------------------------------------------------------

    def early_exit_report(self) -> dict:
        """Per task: exit counts and fractions on scored positions, layers / multiply-adds saved, generation speed
        and DSSD acceptance."""
        names = [f"exit@{k}" for k in self.model.config.exit_layers] + ["full"]
        report = {"eps": self.ee_eps, "mode": self.ee_mode, "metric": self.model.config.metric,
                  "scoring_rule": self.ee_scoring_rule, "scoring_delta": self._reported_delta(),
                  "tasks": {}, "ranks": self.world_size}
        scoring, generation, seconds = getattr(self, "_ee_global", None) or (
            self.ee_scoring, self.ee_generation, self.ee_seconds)
        for kind, table in (("scoring", scoring), ("generation", generation)):
            for task, stats in table.items():
                total = max(stats.tokens, 1)
                entry = {
                    "tokens": stats.tokens,
                    "exit_counts": dict(zip(names, stats.exit_counts, strict=True)),
                    "exit_fractions": {n: c / total for n, c in zip(names, stats.exit_counts, strict=True)},
                    "layers_saved": 1 - stats.layers_computed_fraction if stats.layer_tokens_full else None,
                    "macs_saved": 1 - stats.macs_fraction if stats.macs_full else None,
                }
                if kind == "scoring" and stats.checked_exits is not None:  # `review_exits` reviewed them
                    entry["checked_exits"] = [f"exit@{k}" for k in stats.checked_exits]
                if kind == "generation":
                    spent = seconds.get(task)
                    entry["tokens_per_s"] = stats.tokens / spent if spent else None
                    if stats.rounds:
                        entry["acceptance_rate"] = stats.acceptance_rate
                        entry["mean_accepted"] = stats.mean_accepted
                report["tasks"].setdefault(task, {})[kind] = entry
        return report

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info["early_exit"] = self.early_exit_report()
        return info


def _as_count(name: str, value) -> int:
    """A model argument that counts something (lm-eval passes model args as text): a non-negative int."""
    try:
        count = int(value) if not isinstance(value, bool) and float(value) == int(float(value)) else -1
    except (TypeError, ValueError):
        count = -1
    if count < 0:
        raise ValueError(f"{name}={value!r} must be a whole number >= 0")
    return count


def _as_bool(name: str, value) -> bool:
    """A model_args flag: a bool, or `true` / `false` as lm-eval may pass it."""
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise ValueError(f"{name}={value!r} must be true or false")


def split_padding(requests: list) -> tuple[list[int], dict[int, int]]:
    """Indices of the real requests, and `{index of a padding copy: index of its original}`.

    The evaluator lists each request `repeats` times (the same object) and, under data parallelism, appends more
    copies of a rank's last one; any occurrence of an object past its `repeats` is such a copy.
    """
    first: dict[int, int] = {}
    seen: Counter[int] = Counter()
    real, copies = [], {}
    for i, req in enumerate(requests):
        first.setdefault(id(req), i)
        seen[id(req)] += 1
        if seen[id(req)] > getattr(req, "repeats", 1):
            copies[i] = first[id(req)]
        else:
            real.append(i)
    return real, copies


def merge_rank_tables(tables: list[tuple[dict, dict, dict]]) -> tuple[dict, dict, dict]:
    """Per-rank `(scoring, generation, seconds)` tables -> one: exit counts summed, generation time the slowest
    rank's (ranks run side by side)."""
    scoring, generation, seconds = {}, {}, {}
    for rank_scoring, rank_generation, rank_seconds in tables:
        for merged, table in ((scoring, rank_scoring), (generation, rank_generation)):
            for task, stats in table.items():
                if task in merged:
                    merged[task].add(stats)
                else:
                    merged[task] = copy.deepcopy(stats)
        for task, value in rank_seconds.items():
            seconds[task] = max(seconds.get(task, 0.0), value)
    return scoring, generation, seconds


def report_table(report: dict) -> str:
    """The exit report as a small Markdown table (printed after lm-eval's own)."""
    lines = [f"early exit: eps={report['eps']} mode={report['mode']} metric={report['metric']} "
             f"scoring_rule={report.get('scoring_rule')} scoring_delta={report.get('scoring_delta')}",
             "(scoring rows: the layers / MACs token-by-token decoding would save on the scored positions; the "
             "scoring pass itself runs every layer, and the LM head where a position stays)", "",
             "| task | kind | tokens | exits | layers saved | MACs saved | tok/s | acceptance |",
             "|---|---|---|---|---|---|---|---|"]
    for task, kinds in sorted(report["tasks"].items()):
        for kind, e in kinds.items():
            exits = " ".join(f"{n}:{f:.0%}" for n, f in e["exit_fractions"].items())
            lines.append(f"| {task} | {kind} | {e['tokens']} | {exits} | {num(e['layers_saved'], '.1%')} | "
                         f"{num(e['macs_saved'], '.1%')} | {num(e.get('tokens_per_s'), '.1f')} | "
                         f"{num(e.get('acceptance_rate'), '.1%')} |")
    return "\n".join(lines)
