"""Early-exit generation against its oracle, the unmodified base model, on tiny models of every family."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from tiny import ARCHS, VOCAB, batch, save_tiny_base, tiny_model, tiny_tokenizer
from transformers import DynamicCache
from transformers.generation.streamers import BaseStreamer

from hf_earlyexit import EarlyExitForCausalLM
from hf_earlyexit.modeling.metrics_earlyexit import confidence

EXITS = [1, 2, 3]
NEW = 12
GREEDY = {"do_sample": False, "pad_token_id": 0, "eos_token_id": None}
BATCHES = {"batch1": [7], "batch4_left_padded": [9, 5, 7, 3]}


def ee_model(arch: str, exits=EXITS, **kw) -> EarlyExitForCausalLM:
    torch.manual_seed(0)
    model = EarlyExitForCausalLM.from_base(tiny_model(arch), exit_layers=exits, **kw)
    for head in model.exit_heads:  # untrained heads start as the model's own head; make them disagree a little
        for p in head.parameters():
            p.data.add_(torch.randn_like(p) * 0.05)
    return model


def set_median_thresholds(model: EarlyExitForCausalLM, key: str = "0.5", quantile: float = 0.5) -> list[float]:
    """Thresholds at the `quantile` of each head's confidence on some random text, so some tokens exit and others
    do not (what calibration would produce for some ε; the decoding mechanics are what is tested here)."""
    ids, mask = batch([40, 40], seed=7)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_hidden_states=True)
    previous = model.get_input_embeddings()(ids)
    taus = []
    for logits, hidden in zip(out.exit_logits, out.exit_hidden_states, strict=True):
        score = confidence(model.config.metric, logits=logits, hidden=hidden, previous_hidden=previous)
        taus.append(float(score.flatten().quantile(quantile)))
        previous = hidden
    model.config.thresholds = {key: taus}
    return taus


def save_median_heads(root: Path, strict_key: str | None = None) -> tuple[str, str]:
    """A tiny Llama base and a heads folder (exits after layers 1-3, the tiny tokenizer) whose thresholds for ε = 0.5
    sit at each head's median confidence (and, with `strict_key`, at the 0.8 quantile for that ε): `(base, heads)`."""
    base = save_tiny_base("llama", root / "base")
    model = EarlyExitForCausalLM.from_base(base, exit_layers=[1, 2, 3], tokenizer=tiny_tokenizer())
    strict = set_median_thresholds(model, key=strict_key, quantile=0.8) if strict_key else None
    set_median_thresholds(model, key="0.5")
    if strict_key:
        model.config.thresholds[strict_key] = strict
    model.save_pretrained(root / "heads")
    return base, str(root / "heads")


class LayerCounter:
    """Counts, per decoder layer, completed forward calls and the positions they processed, and MLP calls."""

    def __init__(self, model: EarlyExitForCausalLM) -> None:
        self.calls = [0] * model.num_layers
        self.positions = [0] * model.num_layers
        self.mlp = [0] * model.num_layers
        self.handles = []
        for i, layer in enumerate(model.engine.parts.layers):
            self.handles.append(layer.register_forward_hook(self._layer(i)))
            self.handles.append(layer.mlp.register_forward_hook(self._mlp(i)))

    def _layer(self, i):
        def hook(module, args, output):
            self.calls[i] += 1
            self.positions[i] += args[0].shape[0] * args[0].shape[1]  # rows x positions
        return hook

    def _mlp(self, i):
        def hook(module, args, output):
            self.mlp[i] += 1
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# -- ε = 1 is plain decoding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("lengths", BATCHES.values(), ids=BATCHES.keys())
@pytest.mark.parametrize("arch", ARCHS)
def test_eps_one_is_plain_greedy(arch, lengths):
    model = ee_model(arch)
    ids, mask = batch(lengths)
    expected = model.get_base_model().generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, **GREEDY)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eps=1.0, **GREEDY)
    assert torch.equal(got, expected)
    assert model.exit_stats.exit_counts[:-1] == [0, 0, 0]


def test_eps_one_needs_no_calibration_and_other_eps_do():
    model = ee_model("llama")
    ids, mask = batch([5])
    model.generate(ids, attention_mask=mask, max_new_tokens=3, eps=1.0, **GREEDY)
    with pytest.raises(ValueError, match="not calibrated"):
        model.generate(ids, attention_mask=mask, max_new_tokens=3, eps=0.9, **GREEDY)


def test_eps_one_sampling_matches_plain_sampling():
    model = ee_model("qwen3")
    ids, mask = batch([9, 5])
    kw = {"do_sample": True, "temperature": 0.7, "top_k": 10, "top_p": 0.9, "max_new_tokens": NEW, "pad_token_id": 0}
    torch.manual_seed(123)
    expected = model.get_base_model().generate(input_ids=ids, attention_mask=mask, **kw)
    torch.manual_seed(123)
    got = model.generate(ids, attention_mask=mask, eps=1.0, **kw)
    assert torch.equal(got, expected)


# -- exits really skip layers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_fill", ["recompute", "propagate"])
@pytest.mark.parametrize("arch", ARCHS)
def test_exit_skips_the_layers_above_it(arch, kv_fill):
    model = ee_model(arch)
    set_median_thresholds(model)
    ids, mask = batch([8])
    counter = LayerCounter(model)
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=NEW, eps=0.5, kv_fill=kv_fill, return_dict_in_generate=False,
        **GREEDY,
    )
    counter.remove()
    # the output's exit trace comes from the stats object; rebuild depth per decoding step from a second, identical
    # run that returns it (greedy is deterministic)
    trace = model.generate(
        ids, attention_mask=mask, max_new_tokens=NEW, eps=0.5, kv_fill=kv_fill, return_dict_in_generate=True,
        **GREEDY,
    )
    assert torch.equal(trace.sequences, out)
    # decoding step t (after the prompt pass) produced token t + 1; its depth is where it left
    depth = [EXITS[j] if j < len(EXITS) else model.num_layers for j in trace.exit_index[0, 1:].tolist()]
    exits = trace.exit_index[0].tolist()
    assert 0 < sum(j < len(EXITS) for j in exits) < NEW, "thresholds should make some tokens exit and some not"
    for i in range(model.num_layers):
        deep_steps = sum(d > i for d in depth)
        # every MLP call is a real layer computation: the prompt pass, then only steps that needed layer i
        assert counter.mlp[i] == 1 + deep_steps, (i, counter.mlp, depth)
        if kv_fill == "recompute":
            # catch-up: a deep step also runs the positions that skipped layer i before it (one call, more positions)
            last_deep = max((t for t, d in enumerate(depth) if d > i), default=-1)
            assert counter.positions[i] == ids.shape[1] + last_deep + 1


def test_layer_counts_match_exit_stats():
    model = ee_model("llama")
    set_median_thresholds(model)
    ids, mask = batch([9, 5, 7])
    model.reset_exit_stats()
    counter = LayerCounter(model)
    model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eps=0.5, **GREEDY)
    counter.remove()
    stats = copy.deepcopy(model.exit_stats)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eps=0.5, return_dict_in_generate=True,
                         **GREEDY)
    prompt = ids.shape[0] * ids.shape[1]
    assert stats.layer_tokens == sum(counter.positions) - prompt * model.num_layers
    assert stats.tokens == ids.shape[0] * NEW == sum(stats.exit_counts)
    assert stats.layer_tokens < stats.layer_tokens_full
    assert 0 < stats.macs < stats.macs_full and 0 < stats.weight_bytes < stats.weight_bytes_full
    first_steps = torch.tensor([row.count(len(EXITS)) for row in out.exit_index.tolist()])
    assert int(first_steps.sum()) == stats.exit_counts[-1]


# -- the KV cache of skipped layers ---------------------------------------------------------------------------------


def oracle_cache(model: EarlyExitForCausalLM, sequences: torch.Tensor, mask: torch.Tensor) -> DynamicCache:
    """The cache the unmodified model stores for `sequences` (one full forward, same position ids)."""
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.get_base_model().config)
    with torch.no_grad():
        model.get_base_model()(input_ids=sequences, attention_mask=mask, position_ids=positions, cache=cache,
                               use_cache=True)
    return cache


@pytest.mark.parametrize("batch_exit", ["row", "step"])
@pytest.mark.parametrize("lengths", BATCHES.values(), ids=BATCHES.keys())
@pytest.mark.parametrize("arch", ARCHS)
def test_recompute_cache_equals_full_forward(arch, lengths, batch_exit):
    model = ee_model(arch)
    set_median_thresholds(model)
    ids, mask = batch(lengths)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eps=0.5, kv_fill="recompute",
                         batch_exit=batch_exit, return_dict_in_generate=True, **GREEDY)
    assert (out.exit_index < len(EXITS)).any()
    fed = out.sequences[:, :-1]  # the last token is never fed back
    fed_mask = torch.cat([mask, torch.ones(len(lengths), NEW - 1, dtype=mask.dtype)], dim=1)
    expected = oracle_cache(model, fed, fed_mask)
    for i, (got, want) in enumerate(zip(out.cache.layers, expected.layers, strict=True)):
        torch.testing.assert_close(got.keys, want.keys, rtol=1e-5, atol=1e-5, msg=f"keys of layer {i}")
        torch.testing.assert_close(got.values, want.values, rtol=1e-5, atol=1e-5, msg=f"values of layer {i}")


@pytest.mark.parametrize("arch", ARCHS)
def test_propagate_fills_skipped_layers_with_projections_of_the_exit_state(arch):
    model = ee_model(arch)
    model.config.thresholds = {"0.5": [0.0, None, None]}  # every decoding step leaves at the first exit
    exit_layer = EXITS[0]
    captured = []
    handle = model.exit_heads[0].register_forward_pre_hook(lambda module, args: captured.append(args[0].clone()))
    ids, mask = batch([6])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eps=0.5, kv_fill="propagate",
                         return_dict_in_generate=True, **GREEDY)
    handle.remove()
    assert out.exit_index[0, 1:].tolist() == [0] * (NEW - 1)
    parts = model.engine.parts
    layer_types = model.engine.layer_types
    prompt = ids.shape[1]
    for step, hidden in enumerate(captured):  # hidden: (1, hidden) the exit state of the token at this position
        position = torch.tensor([[prompt + step]])
        for i in range(exit_layer, model.num_layers):
            fresh = DynamicCache(config=model.get_base_model().config)
            kwargs = {}
            if parts.rotary is not None:
                args = (layer_types[i],) if parts.spec.rotary_per_layer_type else ()
                kwargs["position_embeddings"] = parts.rotary(hidden[None], position, *args)
            with torch.no_grad():
                kwargs[model.engine._cache_kwarg] = fresh
                parts.layers[i](hidden[None], attention_mask=None, position_ids=position, use_cache=True, **kwargs)
            stored = out.cache.layers[i]
            length = stored.keys.shape[2]
            offset = length - (prompt + NEW - 1)  # sliding-window layers keep only their last entries
            at = prompt + step + offset
            if at < 0:
                continue
            torch.testing.assert_close(stored.keys[:, :, at], fresh.layers[i].keys[:, :, 0], msg=f"layer {i}")
            torch.testing.assert_close(stored.values[:, :, at], fresh.layers[i].values[:, :, 0], msg=f"layer {i}")
    assert out.exit_stats.kv_fill_tokens == (NEW - 1) * (model.num_layers - exit_layer)


# -- batching -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2"])
def test_batched_early_exit_equals_rows_alone(arch):
    """With exact caches (recompute), a row's tokens do not depend on the batch it runs in, even under the step rule
    (row-sparse depth: test_batch_exit.py)."""
    model = ee_model(arch)
    set_median_thresholds(model)
    lengths = [9, 5, 7, 3]
    ids, mask = batch(lengths)
    together = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eps=0.5, batch_exit="step",
                              return_dict_in_generate=True, **GREEDY)
    for row, n in enumerate(lengths):
        alone = model.generate(ids[row:row + 1, -n:], max_new_tokens=NEW, eps=0.5, batch_exit="step",
                               return_dict_in_generate=True, **GREEDY)
        assert torch.equal(together.sequences[row, -NEW:], alone.sequences[0, -NEW:]), row
        assert torch.equal(together.exit_index[row], alone.exit_index[0]), row
    # rows that left early rode along until every row had exited: that work is counted as waste
    assert together.exit_stats.wasted_layer_tokens > 0


def test_finished_rows_leave_the_batch():
    model = ee_model("llama")
    set_median_thresholds(model)
    ids, mask = batch([9, 5, 7, 3])
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eps=0.5, **GREEDY)
    eos = int(plain[0, ids.shape[1] + 2])  # the third token of row 0 becomes EOS: row 0 stops there
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eps=0.5, return_dict_in_generate=True,
                         do_sample=False, pad_token_id=0, eos_token_id=eos)
    generated = out.sequences[:, ids.shape[1]:]
    real = 0
    for row in generated.tolist():
        stop = row.index(eos) + 1 if eos in row else len(row)
        assert all(t == 0 for t in row[stop:])
        real += stop
    assert out.exit_stats.tokens == real  # pad tokens after EOS cost nothing
    assert (out.exit_index == -1).sum() == generated.numel() - real


# -- sampling and the HF generate() surface ----------------------------------------------------------------------


def test_sampling_draws_from_the_exiting_head():
    model = ee_model("llama", draft_token_ids=list(range(10, 40)))
    model.config.thresholds = {"0.5": [0.0, None, None]}
    ids, mask = batch([6])
    torch.manual_seed(0)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eps=0.5, do_sample=True, temperature=1.5,
                         pad_token_id=0, return_dict_in_generate=True)
    decoded = out.sequences[0, ids.shape[1] + 1:]  # after the first (full-model) token
    assert ((decoded >= 10) & (decoded < 40)).all()
    assert len(set(decoded.tolist())) > 1


class Collect(BaseStreamer):
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.reshape(-1).tolist())

    def end(self):
        self.ended = True


def test_streamer_stop_strings_and_scores():
    model = ee_model("llama")
    set_median_thresholds(model)
    tok = tiny_tokenizer()
    ids, _ = batch([6])
    streamer = Collect()
    out = model.generate(ids, max_new_tokens=NEW, eps=0.5, streamer=streamer, return_dict_in_generate=True,
                         output_scores=True, **GREEDY)
    assert streamer.ended and streamer.chunks[0] == ids[0].tolist()
    assert sum(streamer.chunks[1:], []) == out.sequences[0, ids.shape[1]:].tolist()
    assert len(out.scores) == NEW and out.scores[0].shape == (1, VOCAB)
    new = out.sequences[0, ids.shape[1]:].tolist()
    at = next(p for p in range(3, NEW) if min(new[p - 1], new[p]) > 3)  # two ordinary characters
    stop = tok.decode(new[at - 1: at + 1])
    cut = model.generate(ids, max_new_tokens=NEW, eps=0.5, stop_strings=[stop], tokenizer=tok, **GREEDY)
    assert tok.decode(cut[0, ids.shape[1]:]).endswith(stop)
    assert cut.shape[1] < out.sequences.shape[1]


def test_exit_stats_accumulate_and_reset():
    model = ee_model("gpt2")
    set_median_thresholds(model)
    ids, mask = batch([6])
    model.reset_exit_stats()
    a = model.generate(ids, attention_mask=mask, max_new_tokens=5, eps=0.5, return_dict_in_generate=True, **GREEDY)
    b = model.generate(ids, attention_mask=mask, max_new_tokens=7, eps=0.5, return_dict_in_generate=True, **GREEDY)
    assert model.exit_stats.tokens == 12 == a.exit_stats.tokens + b.exit_stats.tokens
    pairs = zip(a.exit_stats.exit_counts, b.exit_stats.exit_counts, strict=True)
    assert model.exit_stats.exit_counts == [x + y for x, y in pairs]
    model.reset_exit_stats()
    assert model.exit_stats.tokens == 0 and sum(model.exit_stats.exit_counts) == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"eps": 1.5}, "eps=1.5"),
        ({"eps": 0.5, "kv_fill": "copy"}, "kv_fill='copy'"),
        ({"eps": 0.5, "num_beams": 2}, "num_beams=2"),
        ({"mode": "fast"}, "mode='fast'"),
        ({"mode": "plain", "eps": 0.5}, "eps=0.5"),
    ],
)
def test_bad_generate_arguments_are_named(kwargs, message):
    model = ee_model("llama")
    set_median_thresholds(model)
    ids, mask = batch([5])
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        model.generate(ids, attention_mask=mask, max_new_tokens=3, **{**GREEDY, **kwargs})


def test_exit_policy_skips_exits_that_do_not_pay():
    """`exit_policy="auto"` simulates the exit rule on the calibration tokens and drops exits that cost more than
    they save; `"all"` checks every exit that has a threshold."""
    model = ee_model("llama", exits=[1, 2, 3], draft_token_ids=list(range(20)))  # cheap heads
    n = 200
    g = torch.Generator().manual_seed(0)
    never = torch.zeros(n)  # exit@1 never passes its threshold
    often = (torch.rand(n, generator=g) < 0.8).float()  # exit@2 passes for 80% of the tokens
    model.calibration_stats = {
        "aligned": torch.ones(1, dtype=torch.uint8),
        "score.0": never, "agree.0": torch.ones(n, dtype=torch.uint8),
        "score.1": often, "agree.1": torch.ones(n, dtype=torch.uint8),
        "score.2": often, "agree.2": torch.ones(n, dtype=torch.uint8),  # fires exactly where exit@2 already did
    }
    model.config.thresholds = {"0.5": [0.5, 0.5, 0.5]}
    from hf_earlyexit.modeling.exits_earlyexit import ExitRule

    assert ExitRule.for_model(model, 0.5, "auto").checked == (False, True, False)
    ids, mask = batch([6])
    auto = model.generate(ids, attention_mask=mask, max_new_tokens=6, eps=0.5, return_dict_in_generate=True, **GREEDY)
    every = model.generate(ids, attention_mask=mask, max_new_tokens=6, eps=0.5, exit_policy="all",
                           return_dict_in_generate=True, **GREEDY)
    assert auto.exit_stats.checked_exits == [2] and every.exit_stats.checked_exits == [1, 2, 3]
    assert auto.exit_stats.head_tokens < every.exit_stats.head_tokens
    with pytest.raises(ValueError, match="exit_policy='some'"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, eps=0.5, exit_policy="some", **GREEDY)
