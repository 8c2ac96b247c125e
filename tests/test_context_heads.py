"""Context heads (a copy of a decoder layer in front of a shared head): their own KV cache stays what a fresh pass
over the same tokens computes, whatever the decoding did (exits, catch-up, rollback, rows), on every family."""

from __future__ import annotations

import pytest
import torch
from test_decoding import GREEDY, ee_model, set_median_thresholds
from tiny import ARCHS, batch

from hf_earlyexit.training.data import Corpus
from hf_earlyexit.training.train import TrainConfig, evaluate_heads, train_heads

EXITS = [1, 2, 3]


def context_model(arch: str, **kw):
    return ee_model(arch, exits=EXITS, head="context", adapter_rank=4, **kw)


def context_slots(model) -> list[int]:
    return [model.num_layers + m for m in range(len(model.engine.contexts))]


def fresh_cache(model, ids: torch.Tensor, mask: torch.Tensor):
    """Every layer, context layers included, over `ids` `(batch, n)` in one pass."""
    engine = model.engine
    state = engine.start(ids, mask, contexts=tuple(range(len(engine.contexts))))
    engine.run_to(state, engine.num_layers)
    return state


def assert_same_cache(model, state, ids, mask, atol=1e-5) -> None:
    """The context slots of `state` hold, at real positions, what a fresh pass over `ids`, `mask` writes."""
    reference = fresh_cache(model, ids, mask)
    real = mask.bool()
    for j in context_slots(model):
        assert state.done[j] == ids.shape[1], (j, state.done[j])
        for name in ("keys", "values"):
            got = getattr(state.cache.layers[j], name)  # (batch, heads, kept, head_dim)
            expected = getattr(reference.cache.layers[j], name)
            # a sliding-window slot keeps only its last window (all of it when recording for rollback)
            kept = min(got.shape[2], expected.shape[2])
            got, expected, where = got[:, :, -kept:], expected[:, :, -kept:], real[:, -kept:]
            torch.testing.assert_close(got.transpose(1, 2)[where], expected.transpose(1, 2)[where], rtol=1e-4,
                                       atol=atol, msg=f"context slot {j} {name}")


@pytest.mark.parametrize("arch", ARCHS)
def test_context_cache_equals_a_fresh_pass_after_exits_at_every_depth(arch):
    """Tokens that stop at different depths (the skipped layers catch up later, with the next deeper token): each
    context layer takes every position once, as it reaches its exit, and ends up with a fresh pass's cache."""
    model = context_model(arch)
    engine = model.engine
    ids, mask = batch([9, 5, 7])
    with torch.no_grad():
        state = engine.start(ids, mask, contexts=(0, 1, 2))
        engine.run_to(state, engine.num_layers)
        tokens = torch.randint(1, 90, (3, 6), generator=torch.Generator().manual_seed(1))
        for step, depth in enumerate([1, 3, 2, 1, engine.num_layers, 2]):
            engine.append(state, tokens[:, step: step + 1])
            hidden = engine.run_to(state, depth)
            if depth in EXITS:  # the context head of this exit read the newest position through its block
                m = EXITS.index(depth)
                assert state.context_out[m].shape[1] >= 1 and hidden.shape[1] >= 1
        engine.flush(state)
    assert_same_cache(model, state, torch.cat([ids, tokens], 1), torch.cat([mask, torch.ones_like(tokens)], 1))


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2"])
def test_context_cache_after_rollback_and_row_selection(arch):
    """DSSD's per-row rollback (`compact`) and dropping rows keep each context cache equal to a fresh pass over the
    tokens each row kept (rows shifted behind left padding)."""
    model = context_model(arch)
    engine = model.engine
    ids, mask = batch([6, 4, 5])
    drafts = torch.randint(1, 90, (3, 4), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        state = engine.start(ids, mask, rollback=True, contexts=(0, 1, 2))
        engine.run_to(state, engine.num_layers)
        base = state.length
        engine.append(state, drafts)
        engine.run_to(state, 2)  # drafted up to exit 2, then verified in one pass
        engine.run_to(state, engine.num_layers)
        keep = torch.tensor([4, 1, 2])  # positions of the round each row keeps
        engine.compact(state, base + keep)
        state = engine.select_rows(state, torch.tensor([0, 2]))
        more = torch.randint(1, 90, (2, 1), generator=torch.Generator().manual_seed(3))
        engine.append(state, more)
        engine.run_to(state, 1)
        engine.flush(state)
    rows = []
    for r, kept in zip([0, 2], [4, 2], strict=True):
        real = ids[r][mask[r].bool()]
        rows.append(torch.cat([real, drafts[r, :kept], more[len(rows)]]))
    width = state.length  # the state's own layout: each row right-aligned behind left padding
    expected_ids = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long), r]) for r in rows])
    expected_mask = torch.stack([torch.cat([torch.zeros(width - len(r)), torch.ones(len(r))]).long() for r in rows])
    assert torch.equal(state.attention_mask, expected_mask)
    assert_same_cache(model, state, expected_ids, expected_mask)


@pytest.mark.parametrize("rank", [None, 2], ids=["full_block", "low_rank_block"])
@pytest.mark.parametrize("lengths", [[7], [9, 5, 7, 3]], ids=["batch1", "batch4"])
@pytest.mark.parametrize("arch", ARCHS)
def test_dssd_with_context_heads_is_plain_greedy(arch, lengths, rank):
    model = context_model(arch, context_rank=rank)
    set_median_thresholds(model)
    ids, mask = batch(lengths)
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=12, mode="plain", **GREEDY)
    for kw in ({}, {"lookup": 2}, {"max_draft": 3, "adaptive_draft": False}):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=12, mode="dssd", eps=0.5,
                             return_dict_in_generate=True, **kw, **GREEDY)
        assert torch.equal(out.sequences, plain), kw
        assert out.exit_stats.drafted > 0
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=12, eps=1.0, **GREEDY), plain)


@pytest.mark.parametrize("batch_exit", ["step", "row"])
@pytest.mark.parametrize("kv_fill", ["recompute", "propagate"])
@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt_neox"])
def test_early_exit_tokens_are_what_the_context_head_says_on_a_full_pass(arch, kv_fill, batch_exit):
    """Each token that left at exit j is the argmax of that context head run over the whole sequence so far: the
    head saw every earlier position, including those that left earlier (exact with `recompute`; with `propagate`
    the skipped layers' states are copies, so only the first exit's context is exact)."""
    model = context_model(arch)
    set_median_thresholds(model)
    ids, mask = batch([8, 6])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=10, eps=0.5, kv_fill=kv_fill,
                         batch_exit=batch_exit, return_dict_in_generate=True, **GREEDY)
    width = ids.shape[1]
    full_mask = torch.cat([mask, torch.ones_like(out.sequences[:, width:])], 1)
    with torch.no_grad():
        full = model(out.sequences, attention_mask=full_mask)
    exits = out.exit_index  # (batch, new): token t + 1 came from position width + t - 1
    checked = 0
    for r in range(exits.shape[0]):
        for t in range(1, exits.shape[1]):
            j = int(exits[r, t])
            if j >= len(EXITS) or (kv_fill == "propagate" and j > 0):
                continue
            head = model.exit_heads[j]
            predicted = head.to_token_ids(full.exit_logits[j][r, width + t - 1].argmax())
            assert int(out.sequences[r, width + t]) == int(predicted), (r, t, j)
            checked += 1
    assert checked > 0


@pytest.mark.parametrize("arch, batch_exit", [("llama", "step"), ("llama", "row"), ("gemma3_text", "row"),
                                              ("gpt_neox", "row")])
def test_dssd_drafts_are_what_the_context_head_says_on_a_full_pass(arch, batch_exit):
    """Batched DSSD with context heads under both batch rules: the output is plain greedy, and every accepted draft
    that came from exit j is the argmax of that context head run over the whole sequence so far, so the head's own
    cache stayed right through rejected drafts cut from it, rows re-aligned each round and finished rows leaving.
    The middle exit is not checked, so its context layer is never fed."""
    model = context_model(arch)
    set_median_thresholds(model)
    model.config.thresholds = {key: [tau if j != 1 else None for j, tau in enumerate(taus)]
                               for key, taus in model.config.thresholds.items()}
    ids, mask = batch([8, 6, 9, 4])
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=12, mode="plain", **GREEDY)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12, mode="dssd", eps=0.5, max_draft=4,
                         batch_exit=batch_exit, return_dict_in_generate=True, **GREEDY)
    assert torch.equal(out.sequences, plain)
    assert out.exit_stats.accepted < out.exit_stats.drafted  # some drafts were cut
    width = ids.shape[1]
    full_mask = torch.cat([mask, torch.ones_like(out.sequences[:, width:])], 1)
    with torch.no_grad():
        full = model(out.sequences, attention_mask=full_mask)
    checked = 0
    for r in range(out.exit_index.shape[0]):
        for t in range(1, out.exit_index.shape[1]):
            j = int(out.exit_index[r, t])
            if 0 <= j < len(EXITS):
                predicted = model.exit_heads[j].to_token_ids(full.exit_logits[j][r, width + t - 1].argmax())
                assert int(out.sequences[r, width + t]) == int(predicted), (r, t, j)
                checked += 1
    assert checked > 0


def test_context_heads_train_and_are_charged_for_their_block(tmp_path):
    model = context_model("llama")
    ids = torch.randint(1, 90, (24, 16), generator=torch.Generator().manual_seed(4))
    corpus = Corpus(ids, torch.ones_like(ids))
    before = evaluate_heads(model, corpus)
    train_heads(model, corpus, TrainConfig(steps=30, lam=0.1, learning_rate=1e-2, log_every=10,
                                           checkpoint_every=30), tmp_path)
    after = evaluate_heads(model, corpus)
    assert all(a["agreement"] > b["agreement"] for a, b in zip(after, before, strict=True)), (before, after)
    assert all(p.requires_grad for head in model.exit_heads for p in head.block.parameters())
    assert not any(p.requires_grad for p in model.backbone.parameters())
    costs = model.costs
    layer = costs.layers[0]
    assert costs.contexts == [layer] * 3  # a block costs one decoder layer
    assert costs.heads[0].macs == costs.tails[0].macs + layer.macs
    set_median_thresholds(model)
    ids, mask = batch([6])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, eps=0.5, exit_policy="all",
                         return_dict_in_generate=True, **GREEDY)
    stats = out.exit_stats
    plain_macs = costs.full.macs * stats.tokens
    assert stats.macs_full <= plain_macs and stats.macs > 0
