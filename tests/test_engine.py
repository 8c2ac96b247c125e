"""The layer-by-layer engine against its oracle: the unmodified HF model, for every supported family."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from tiny import ARCHS, VOCAB, batch, tiny_model

from hf_earlyexit import LayerEngine
from hf_earlyexit.modeling import products_earlyexit as products
from hf_earlyexit.modeling.products_earlyexit import kept
from hf_earlyexit.training import lm_topk
from hf_earlyexit.training.lm_topk import final_topk

BATCHES = {"batch1": [7], "batch3_left_padded": [9, 5, 7]}
NEW_TOKENS = 10


def hf_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as HF `generate()` derives them from a left-padded mask."""
    return (mask.cumsum(1) - 1).clamp(min=0)


def real(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Only the real (non-pad) positions of a `(batch, seq, ...)` tensor."""
    return x[mask.bool()]


def engine_greedy(engine: LayerEngine, ids, mask, steps: int, use_cache: bool) -> torch.Tensor:
    """Greedy decoding driven through the engine: one `append` + `run_to(L)` per token, or a fresh pass per token."""
    out = ids
    state = engine.start(ids, mask)
    for _ in range(steps):
        if use_cache:
            last = engine.final_logits(engine.run_to(state, engine.num_layers)[:, -1])
        else:
            last = engine.forward(out, mask)[:, -1]
        token = last.argmax(-1, keepdim=True)  # (batch, 1)
        out = torch.cat([out, token], dim=1)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        if use_cache:
            engine.append(state, token)
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("lengths", BATCHES.values(), ids=BATCHES.keys())
@pytest.mark.parametrize("arch", ARCHS)
def test_full_depth_logits_match_hf(arch, lengths, attn):
    model = tiny_model(arch, attn=attn)
    ids, mask = batch(lengths)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
        got = LayerEngine(model).forward(ids, mask)
    torch.testing.assert_close(real(got, mask), real(expected, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_stop_after_layer_k_matches_hf_hidden_states(arch):
    model = tiny_model(arch)
    ids, mask = batch([9, 5, 7])
    with torch.no_grad():
        hidden = model(
            input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask), output_hidden_states=True
        ).hidden_states
        engine = LayerEngine(model)
        for k in range(1, engine.num_layers):  # hidden_states[k] is the raw output of layer k-1
            state = engine.start(ids, mask)
            torch.testing.assert_close(real(engine.run_to(state, k), mask), real(hidden[k], mask))


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
@pytest.mark.parametrize("lengths", BATCHES.values(), ids=BATCHES.keys())
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_hf_generate(arch, lengths, use_cache):
    model = tiny_model(arch)
    ids, mask = batch(lengths)
    with torch.no_grad():
        expected = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
            pad_token_id=0, eos_token_id=None,
        )
        got = engine_greedy(LayerEngine(model), ids, mask, NEW_TOKENS, use_cache)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_lagging_layers_catch_up_exactly(arch, attn):
    """Tokens stop at random depths (stop after k), later ones continue to full depth and drag the lagging
    positions along; the final outputs equal one full pass over the whole sequence."""
    model = tiny_model(arch, attn=attn)
    ids, mask = batch([12, 8, 10], seed=3)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
        engine = LayerEngine(model)
        state = engine.start(ids[:, :4], mask[:, :4])
        engine.run_to(state, 1)
        outputs = [engine.final_logits(engine.run_to(state, engine.num_layers))]  # positions 0..3
        for t in range(4, ids.shape[1]):
            engine.append(state, ids[:, t : t + 1], mask[:, t : t + 1])
            depth = int(torch.randint(0, engine.num_layers, (1,), generator=gen))
            engine.run_to(state, depth)  # stop early: deeper layers lag behind
            engine.run_to(state, depth)  # a repeated call computes nothing new
            if t % 3 == 0 or t == ids.shape[1] - 1:
                outputs.append(engine.final_logits(engine.run_to(state, engine.num_layers)))
        got = torch.cat(outputs, dim=1)
    assert state.done == [ids.shape[1]] * engine.num_layers
    torch.testing.assert_close(real(got, mask), real(expected, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_subset_of_rows_continues_exactly(arch):
    """Rows selected mid-generation (with lagging layers) continue as if decoded alone."""
    model = tiny_model(arch)
    ids, mask = batch([9, 5, 7])
    with torch.no_grad():
        engine = LayerEngine(model)
        state = engine.start(ids, mask)
        engine.run_to(state, 2)  # layers >= 2 lag behind
        rows = torch.tensor([2, 0])
        sub = engine.select_rows(state, rows)
        extra = torch.randint(3, VOCAB, (2, 3), generator=torch.Generator().manual_seed(5))
        engine.append(sub, extra)
        got = engine.final_logits(engine.run_to(sub, engine.num_layers))  # (2, 12, vocab)
        full_ids = torch.cat([ids[rows], extra], dim=1)
        full_mask = torch.cat([mask[rows], torch.ones_like(extra)], dim=1)
        expected = model(input_ids=full_ids, attention_mask=full_mask, position_ids=hf_positions(full_mask)).logits
        # the parent state is untouched and still runs to completion
        parent = engine.final_logits(engine.run_to(state, engine.num_layers))
        parent_expected = model(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
    torch.testing.assert_close(real(got, full_mask), real(expected, full_mask), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(real(parent, mask), real(parent_expected, mask), rtol=1e-5, atol=1e-5)


def test_run_to_rejects_bad_layer_index():
    engine = LayerEngine(tiny_model("llama"))
    state = engine.start(torch.tensor([[5, 6, 7]]))
    with pytest.raises(ValueError, match="k=9 is outside 0..4"):
        engine.run_to(state, 9)


@pytest.mark.parametrize("arch", ARCHS)
def test_truncate_and_compact_roll_back_to_the_cache_of_the_kept_tokens(arch):
    """Append extra tokens, roll them back (per row a different number), continue: the next logits equal a fresh
    pass over the kept tokens (left-padded the same way)."""
    model = tiny_model(arch)
    engine = LayerEngine(model)
    ids, mask = batch([9, 5, 7])
    extra = torch.randint(3, VOCAB, (3, 6), generator=torch.Generator().manual_seed(3))
    keep = torch.tensor([2, 6, 0])  # tokens of `extra` each row keeps
    nxt = torch.randint(3, VOCAB, (3, 1), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        state = engine.start(ids, mask, rollback=True)
        engine.run_to(state, engine.num_layers)
        engine.append(state, extra)
        engine.run_to(state, engine.num_layers)
        engine.compact(state, ids.shape[1] + keep)
        engine.append(state, nxt)
        got = engine.final_logits(engine.run_to(state, engine.num_layers)[:, -1])
        # oracle: each row alone, kept tokens only, no padding
        for row in range(3):
            real = ids[row][mask[row].bool()]
            seq = torch.cat([real, extra[row, : keep[row]], nxt[row]])[None]
            want = model(input_ids=seq).logits[:, -1]
            torch.testing.assert_close(got[row:row + 1], want, rtol=1e-4, atol=1e-4)


def test_truncate_drops_pending_positions_too():
    model = tiny_model("llama")
    engine = LayerEngine(model)
    ids, mask = batch([6])
    with torch.no_grad():
        state = engine.start(ids, mask, rollback=True)
        engine.run_to(state, engine.num_layers)
        engine.append(state, torch.tensor([[5, 6, 7]]))
        engine.run_to(state, 2)  # layers 0-1 hold 9 positions, layers 2-3 hold 6, 3 wait at layer 2
        engine.truncate(state, 7)
        assert state.done == [7, 7, 6, 6] and state.frontier[2].shape[1] == 1
        out = engine.final_logits(engine.run_to(state, engine.num_layers))[:, -1]
        want = model(input_ids=torch.cat([ids, torch.tensor([[5]])], dim=1)).logits[:, -1]
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def make_ties(engine: LayerEngine, hidden: torch.Tensor) -> int:
    """Edit the LM head so that two tokens tie exactly at the top of row 0 of `hidden` `(2, hidden)` (ids 3 and 7
    become copies of its winner) and row 1's runner-up sits a hair (1e-6) under its winner; returns row 0's winner."""
    head = engine.parts.lm_head
    winner = int(engine.final_logits(hidden[:1]).argmax())
    for twin in (3, 7):
        head.weight[twin] = head.weight[winner]
        if head.bias is not None:
            head.bias[twin] = head.bias[winner]
    logits = engine.final_logits(hidden[1:2])[0]
    first, second = logits.topk(2).indices.tolist()
    direction = engine.parts.norm(hidden[1:2])[0]
    gap = float(logits[first] - logits[second])
    head.weight[second] += (gap - 1e-6) / float(direction.norm()) ** 2 * direction
    return winner


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("pieces", [(64, 4096), (7, 16)])
def test_final_topk_screen_keeps_the_exact_top_tokens(arch, pieces, monkeypatch):
    """The teacher's top k (`lm_topk.final_topk`): through the bfloat16 screen, the same tokens as the exact
    logits' top k, float32 values, the exact top token also where two logits tie exactly or a rounding apart, and a
    normaliser within bf16 rounding; without it, the exact logits' own. Also with the candidates' rows and the
    normaliser's columns taken in uneven pieces (the tiny vocabulary is one piece at the real sizes)."""
    monkeypatch.setattr(products, "ROWS_PER_GATHER", pieces[0])
    monkeypatch.setattr(lm_topk, "COLUMNS_PER_SUM", pieces[1])
    model = tiny_model(arch)
    engine = LayerEngine(model)
    torch.manual_seed(4)
    hidden = torch.randn(2, 40, model.config.get_text_config().hidden_size) * 4
    with torch.no_grad():
        logits = engine.final_logits(hidden).float()
        want_ids = logits.topk(8, dim=-1).indices
        lse = torch.logsumexp(logits, dim=-1)
        exact = final_topk(engine, hidden, 8, "off")
        assert torch.equal(exact[1], want_ids) and torch.equal(exact[2], lse)
        values, ids, got_lse = final_topk(engine, hidden, 8, "bf16")
        assert values.shape == ids.shape == (2, 40, 8) and got_lse.shape == (2, 40)
        assert torch.equal(ids[..., 0], logits.argmax(dim=-1))
        assert torch.equal(ids.sort(dim=-1).values, want_ids.sort(dim=-1).values)
        torch.testing.assert_close(values, logits.gather(-1, ids), rtol=0, atol=1e-5)
        assert bool((values[..., :-1] >= values[..., 1:]).all())
        torch.testing.assert_close(got_lse, lse, rtol=2.0**-7, atol=1e-4)
        assert torch.equal(final_topk(engine, hidden, 1, "bf16")[1][..., 0], logits.argmax(dim=-1))
        flat = hidden.reshape(-1, hidden.shape[-1])
        make_ties(engine, flat[:2])
        off = final_topk(engine, flat[:2], 8, "off")
        screened = final_topk(engine, flat[:2], 8, "bf16")
        assert torch.equal(screened[1][:, 0], off[1][:, 0])  # the exact way's own pick among exact ties (`topk`)
    with pytest.raises(ValueError, match="screen='fast'"):
        final_topk(engine, hidden, 8, "fast")


@pytest.mark.parametrize("arch", ARCHS)
def test_sampling_head_gives_the_exact_top_k_and_nothing_else(arch, monkeypatch):
    """`lm_topk.sampling_head`, forced on with screen="bf16": inside the block the model's logits are its exact top
    k (the same tokens, float32 values) and -inf elsewhere; a row whose k-th place falls in a crowd of tokens the
    screen scores equal cannot be proved and gets all its exact logits; heads the screen does not cover
    (soft-capping, bias) are left alone. The model's own head is back after the block, also after an error. (16
    candidates beyond the k, as at the real vocabulary's size fewer than its tokens: here 256 would take them all.)"""
    monkeypatch.setattr(lm_topk, "SAMPLING_EXTRA", 16)
    model = tiny_model(arch)
    engine, head, k = LayerEngine(model), model.lm_head, 8
    ids, mask = batch([9, 6])
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits  # (2, 9, vocab)
        with lm_topk.sampling_head(model, k, "bf16") as used:
            got = model(input_ids=ids, attention_mask=mask).logits
        assert model.lm_head is head and (used is not None) == engine.lm_head_screenable
        if not used:
            assert torch.equal(got, want)
            return
        top = want.topk(k, dim=-1).indices  # (2, 9, k)
        assert bool(torch.isfinite(got).sum(dim=-1).eq(k).all())
        assert torch.equal(got.topk(k, dim=-1).indices.sort(dim=-1).values, top.sort(dim=-1).values)
        torch.testing.assert_close(got.gather(-1, top), want.gather(-1, top), rtol=0, atol=1e-5)
        torch.manual_seed(6)
        hidden = torch.randn(2, model.config.hidden_size) * 4
        make_crowd(engine, hidden[0], range(40, 80))  # the top 40 of row 0, scored equal by the screen
        head.weight[5] = head.weight[79] * 1.5  # and a clear winner above them: the top token alone is provable
        x = engine.parts.norm(hidden)  # (2, hidden)
        out, exact = lm_topk.SampledHead(engine, k)(x), head(x)  # (2, vocab) each
        assert int(exact[0].argmax()) == 5 and torch.equal(out[0], exact[0])
        assert torch.equal(out[1].topk(k).indices.sort().values, exact[1].topk(k).indices.sort().values)
    with pytest.raises(RuntimeError, match="inside"), lm_topk.sampling_head(model, k, "bf16"):
        raise RuntimeError("inside")
    assert model.lm_head is head
    with lm_topk.sampling_head(model, k, "off") as used, lm_topk.sampling_head(model, VOCAB, "bf16") as whole:
        assert used is None and whole is None and model.lm_head is head
    with pytest.raises(ValueError, match="screen='fast'"), lm_topk.sampling_head(model, k, "fast"):
        pass


def screened_engine(arch: str, seed: int, rows: int) -> tuple[LayerEngine, torch.Tensor]:
    """A tiny model's engine with the bf16 screen forced on (any CPU) and `fastest`'s choices forgotten, so that
    its ways are all tried again; and `rows` random hidden states."""
    products._times.clear()
    products._choice.clear()
    model = tiny_model(arch)
    engine = LayerEngine(model)
    engine.lm_screen = "bf16"
    torch.manual_seed(seed)
    return engine, torch.randn(rows, model.config.hidden_size) * 4


@pytest.mark.parametrize("arch", ARCHS)
def test_final_argmax_is_the_argmax_of_the_final_logits(arch):
    """The fast LM-head argmax picks exactly the token of the exact logits' argmax, also where two logits tie
    exactly (two equal LM-head rows: the lower id wins, as in `argmax`) and where they are a rounding apart, through
    every way it has (`fastest` tries each in turn before it keeps the fastest): float32 products taken three ways,
    and, for a head without bias, the bfloat16 screen (forced here with `lm_screen="bf16"`, so that it runs on any
    CPU) the same three ways."""
    engine, hidden = screened_engine(arch, seed=3, rows=8)
    with torch.no_grad():
        winner = make_ties(engine, hidden[:2])
        expected = engine.final_logits(hidden).argmax(dim=-1)
        assert int(expected[0]) == min(3, winner)
        for rows in (1, 2, 8):  # rows 0 and 1 tie
            ways = 2 * len(products.products_for(rows))  # at most
            for _ in range(ways * products.TRIES + 1):
                assert torch.equal(engine.final_argmax(hidden[:rows]), expected[:rows])
        fast = not getattr(engine.config, "final_logit_softcapping", None)  # soft-capped logits: the exact way
        keys = [key for key in products._times if key[0] == "final_argmax"]
        assert len(keys) == (3 if fast else 0)
        for key in keys:
            tried = products._times[key]
            names = products.products_for(key[2])
            kinds = ("float32", "bf16") if engine.parts.lm_head.bias is None else ("float32",)
            assert set(tried) == {f"{kind}_{name}" for kind in kinds for name in names}
            assert all(len(times) >= products.TRIES for times in tried.values()) and products._choice[key] in tried
        for rows in (1, 2, 5, 8):
            expected = engine.final_logits(hidden[2:2 + rows]).argmax(dim=-1)
            for _ in range(4 * products.TRIES + 1):
                assert torch.equal(engine.final_argmax(hidden[2:2 + rows]), expected)


def make_crowd(engine: LayerEngine, hidden: torch.Tensor, ids: range) -> int:
    """Edit the LM head so that the tokens `ids` lead at `hidden` `(hidden,)` with the same bfloat16 rows (so the
    bf16 screen scores them equal) while their float32 logits rise with the id by well over the float32 rounding
    bound: the winner is the last id, which a screen keeping fewer candidates than `len(ids)` may leave out."""
    head = engine.parts.lm_head
    x = engine.parts.norm(hidden[None])[0]
    base = (x * 40 / float(x.norm())).to(torch.bfloat16).float()  # a row each of whose elements is a bf16 value
    ulp = torch.finfo(torch.bfloat16).eps * 2.0 ** torch.floor(torch.log2(base.abs().clamp_min(1e-30)))
    step = ulp * torch.sign(x) / (4 * len(ids))  # (len(ids) - 1) steps stay under half a bf16 ulp
    for i, token in enumerate(ids):
        head.weight[token] = base + i * step
        if head.bias is not None:
            head.bias[token] = 0.0
    assert torch.equal(head.weight[ids.start].to(torch.bfloat16), head.weight[ids.stop - 1].to(torch.bfloat16))
    return ids.stop - 1


@pytest.mark.parametrize("arch", ARCHS)
def test_screen_finds_a_winner_it_scores_below_its_candidates(arch):
    """Forty tokens the bf16 screen scores equal, the exact winner among them the last: more than the screen's
    candidates (`1 + SCREEN_EXTRA` for the argmax, `8 + SCREEN_EXTRA` for a top 8), so a screen that trusted its
    candidates could miss it; the bound sends those rows to the exact logits, through every way of `final_argmax`."""
    engine, hidden = screened_engine(arch, seed=5, rows=2)
    with torch.no_grad():
        winner = make_crowd(engine, hidden[0], range(40, 80))
        expected = engine.final_logits(hidden).argmax(dim=-1)
        capped = getattr(engine.config, "final_logit_softcapping", None)  # the crowd's logits all cap to one value
        assert int(expected[0]) == winner or capped
        for rows in (1, 2):
            for _ in range(2 * len(products.products_for(rows)) * products.TRIES + 1):
                assert torch.equal(engine.final_argmax(hidden[:rows]), expected[:rows])
        if not capped:
            top = final_topk(engine, hidden, 8, "bf16")[1]
            assert torch.equal(top[:, 0], expected)
            assert torch.equal(top[0].sort().values, torch.arange(72, 80))


def test_learn_final_argmax_settles_every_row_bucket_up_front():
    """`learn_final_argmax` (a bench's warm-up) leaves a chosen way for each row bucket asked, so that timed calls
    try none; a bfloat16 LM head has no ways to learn (it reads the exact logits) and is left alone."""
    engine, _ = screened_engine("llama", seed=6, rows=1)
    engine.learn_final_argmax(rows=(1, 3, 8))
    assert sorted(key[2] for key in products._choice if key[0] == "final_argmax") == [1, 4, 8]
    products._choice.clear()
    engine.model.to(torch.bfloat16)
    engine.learn_final_argmax(rows=(1, 3, 8))
    assert not products._choice


def test_final_argmax_screens_only_where_asked():
    """`lm_screen="off"` keeps `final_argmax` to float32 products; "bf16" adds the screen's ways; "auto" adds them
    only where the CPU multiplies bfloat16 natively."""
    model = tiny_model("llama")
    engine = LayerEngine(model)
    hidden = torch.randn(3, model.config.hidden_size)
    expected = engine.final_logits(hidden).argmax(dim=-1)
    for screen in ("off", "bf16", "auto"):
        products._times.clear()
        products._choice.clear()
        engine.lm_screen = screen
        with torch.no_grad():
            assert torch.equal(engine.final_argmax(hidden), expected)
        (key,) = products._times
        screened = any(name.startswith("bf16_") for name in key[3])
        assert screened == (screen == "bf16" or (screen == "auto" and products.native_bf16()))
    with pytest.raises(ValueError, match="lm_screen='fp16' is not one of auto, bf16, off"):
        engine.lm_screen = "fp16"
    assert engine.lm_screen == "auto"


def test_kept_values_are_remade_when_their_tensors_change():
    """`kept` (the cache of values derived from frozen weights: the LM head's norms, its bf16 copy, a head's rows)
    makes a value once, and again after an in-place change, a replaced tensor, a `.data` swap or a dtype move; tags
    keep separate values; the values go with their owner."""
    layer = torch.nn.Linear(4, 3)
    made = []

    def total(tag="sum", owner=layer):
        return kept(owner, tag, (owner.weight, owner.bias),
                    lambda: made.append(tag) or float(owner.weight.detach().sum()))

    first = total()
    assert total() == first and made == ["sum"]
    assert total("other") == first and made == ["sum", "other"]
    with torch.no_grad():
        layer.weight.add_(1.0)
    assert total() == pytest.approx(first + 12) and len(made) == 3
    layer.weight.data = torch.zeros(3, 4)
    assert total() == 0.0 and len(made) == 4
    layer.weight = torch.nn.Parameter(torch.ones(3, 4))
    assert total() == 12.0 and len(made) == 5
    layer.double()
    assert total() == 12.0 and len(made) == 6
    with torch.no_grad():
        layer.bias.zero_()
    total()
    assert len(made) == 7
    owner = torch.nn.Linear(4, 3)
    value = kept(owner, "tensor", (owner.weight,), lambda: torch.ones(2))
    gone = weakref.ref(value)
    del value, owner
    gc.collect()
    assert gone() is None
