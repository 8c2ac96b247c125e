"""Row-sparse depth (`batch_exit="row"`): in a batch each row runs only the layers up to its own exit, so a row
decodes exactly as it does alone; checked against the unmodified base model and batch-1 runs on every family."""

from __future__ import annotations

import pytest
import torch
from test_decoding import EXITS, GREEDY, LayerCounter, set_median_thresholds
from tiny import ARCHS, batch, tiny_model

from hf_earlyexit import EarlyExitForCausalLM

NEW = 12
LENGTHS = [9, 5, 7, 3]


def model_for(arch: str, attn: str = "sdpa") -> EarlyExitForCausalLM:
    torch.manual_seed(0)
    model = EarlyExitForCausalLM.from_base(tiny_model(arch, attn=attn), exit_layers=EXITS)
    for head in model.exit_heads:  # untrained heads start as the model's own head; make them disagree a little
        for p in head.parameters():
            p.data.add_(torch.randn_like(p) * 0.05)
    set_median_thresholds(model)
    return model


def early_eos(model: EarlyExitForCausalLM, ids: torch.Tensor, mask: torch.Tensor, **kw) -> int:
    """A token that ends row 0 after three tokens, so rows finish at different steps."""
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, **kw, **GREEDY)
    return int(out[0, ids.shape[1] + 2])


def until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


# the row rule builds its own attention masks: every family under sdpa, and eager on three of them
ATTNS = [(arch, "sdpa") for arch in ARCHS] + [(arch, "eager") for arch in ("llama", "gemma3_text", "gpt2")]


@pytest.mark.parametrize("arch, attn", ATTNS)
def test_row_rule_at_eps_one_is_plain_greedy(arch, attn):
    model = model_for(arch, attn)
    ids, mask = batch(LENGTHS)
    eos = early_eos(model, ids, mask, mode="plain")
    kw = {"max_new_tokens": NEW, "do_sample": False, "pad_token_id": 0, "eos_token_id": eos}
    expected = model.get_base_model().generate(input_ids=ids, attention_mask=mask, **kw)
    got = model.generate(ids, attention_mask=mask, eps=1.0, batch_exit="row", return_dict_in_generate=True, **kw)
    assert torch.equal(got.sequences, expected)
    finished = [eos in row for row in expected[:, ids.shape[1]:].tolist()]
    assert any(finished) and not all(finished), "rows should finish at different steps"


@pytest.mark.parametrize("kv_fill", ["recompute", "propagate"])
@pytest.mark.parametrize("arch", ARCHS)
def test_each_row_decodes_as_it_does_alone(arch, kv_fill):
    """ε < 1, left padding, rows finishing at different steps: a row's tokens and exits are those it gets in a
    batch of one (fp32), with either KV fill."""
    model = model_for(arch)
    ids, mask = batch(LENGTHS)
    kw = {"eps": 0.5, "kv_fill": kv_fill, "batch_exit": "row", "return_dict_in_generate": True}
    eos = early_eos(model, ids, mask, eps=0.5, kv_fill=kv_fill, batch_exit="row")
    run = {"max_new_tokens": NEW, "do_sample": False, "pad_token_id": 0, "eos_token_id": eos}
    together = model.generate(ids, attention_mask=mask, **kw, **run)
    width = ids.shape[1]
    lengths = []
    for row, n in enumerate(LENGTHS):
        alone = model.generate(ids[row:row + 1, -n:], **kw, **run)
        mine = until_eos(together.sequences[row, width:].tolist(), eos)
        assert mine == alone.sequences[0, n:].tolist(), row
        assert together.exit_index[row, : len(mine)].tolist() == alone.exit_index[0].tolist(), row
        lengths.append(len(mine))
    assert len(set(lengths)) > 1, "rows should finish at different steps"
    exits = together.exit_index[together.exit_index >= 0]
    assert (exits < len(EXITS)).any() and (exits == len(EXITS)).any(), "some tokens should exit, others not"


@pytest.mark.parametrize("arch", ARCHS)
def test_layers_above_a_rows_exit_run_without_it(arch):
    """With propagate (no lag), each decoding step runs decoder layer i in full for exactly the rows whose token
    left above layer i (counted on the layers' own forward hooks); the step rule runs it for every row whenever one
    needs it."""
    model = model_for(arch)
    ids, mask = batch(LENGTHS)
    work = {}
    for rule in ("row", "step"):
        counter = LayerCounter(model)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eps=0.5, kv_fill="propagate",
                             batch_exit=rule, return_dict_in_generate=True, **GREEDY)
        counter.remove()
        work[rule] = [p - ids.numel() for p in counter.positions]  # decoding steps only (one prompt pass)
        if rule == "row":
            exits = out.exit_index[:, 1:]  # (batch, NEW - 1): step t made token t + 1
            depth = torch.tensor([*EXITS, model.num_layers])[exits]  # (batch, NEW - 1)
            for i in range(model.num_layers):
                assert work["row"][i] == int((depth > i).sum()), (i, work["row"], depth)
            assert len(set(depth.flatten().tolist())) > 1
    assert sum(work["row"]) < sum(work["step"])


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2"])
def test_recompute_computes_every_slot_once_per_layer(arch):
    """A row whose token left early computes that slot's skipped layers later, with its own next token that climbs
    past them: over the whole generation (the cache completed at the end) every fed slot of every row runs every
    layer exactly once, plus the padding of rows that lagged less than others in a call, which is counted as waste
    (the cache itself is compared with a fresh pass in test_decoding)."""
    model = model_for(arch)
    ids, mask = batch(LENGTHS)
    counter = LayerCounter(model)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eps=0.5, batch_exit="row",
                         return_dict_in_generate=True, **GREEDY)
    counter.remove()
    assert (out.exit_index[:, 1:] < len(EXITS)).any()
    decoded = sum(counter.positions) - ids.numel() * model.num_layers  # row-slots run after the prompt pass
    fed = len(LENGTHS) * (NEW - 1)  # the last token is never fed back
    # the stats cover the decoding steps; the final catch-up that completes the returned cache (uncharged, as with
    # the step rule) may add padding of its own
    assert decoded >= fed * model.num_layers + out.exit_stats.wasted_layer_tokens
    assert out.exit_stats.wasted_layer_tokens > 0  # rows lagged by different amounts here


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"eps": 0.5, "batch_exit": "column"}, "batch_exit='column' is not one of row, step"),
        ({"mode": "plain", "batch_exit": "row"}, "batch_exit='row' does not apply to mode='plain'"),
    ],
)
def test_bad_batch_exit_is_named(kwargs, message):
    model = model_for("llama")
    ids, mask = batch([5])
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, **{**GREEDY, **kwargs})


# -- self-speculative decoding with row-sparse depth -------------------------------------------------------------------


def _layer_row_positions(model: EarlyExitForCausalLM, **kw) -> tuple[torch.Tensor, int]:
    """Sequences and the decoder-layer row-positions the call ran (prompt pass included), counted by hooks on the
    base model's own layers."""
    counter = LayerCounter(model)
    try:
        out = model.generate(**kw, return_dict_in_generate=True)
    finally:
        counter.remove()
    return out.sequences, sum(counter.positions)


@pytest.mark.parametrize("arch, attn", ATTNS)
def test_row_sparse_dssd_is_plain_greedy(arch, attn):
    """Batch 4, left padding, rows finishing at different steps (EOS), heads that draft often and are often wrong:
    DSSD with row-sparse depth returns exactly the base model's greedy output (fp32), for several draft caps."""
    model = model_for(arch, attn)
    ids, mask = batch(LENGTHS)
    eos = early_eos(model, ids, mask, mode="plain")
    kw = {"max_new_tokens": NEW, "do_sample": False, "pad_token_id": 0, "eos_token_id": eos}
    expected = model.get_base_model().generate(input_ids=ids, attention_mask=mask, **kw)
    finished = [eos in row for row in expected[:, ids.shape[1]:].tolist()]
    assert any(finished) and not all(finished), "rows should finish at different steps"
    for cap in (1, 16):
        model.reset_exit_stats()
        got = model.generate(ids, attention_mask=mask, mode="dssd", eps=0.5, max_draft=cap, batch_exit="row", **kw)
        assert torch.equal(got, expected), cap
        assert model.exit_stats.drafted > 0 and model.exit_stats.accepted < model.exit_stats.drafted


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_row_sparse_dssd_runs_no_fillers(arch):
    """The same call under both batch rules: identical output, and the row rule runs fewer decoder-layer
    row-positions (no fillers for rows that stopped drafting, no verification beyond a row's own drafts)."""
    model = model_for(arch)
    ids, mask = batch(LENGTHS)
    kw = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": NEW, "mode": "dssd", "eps": 0.5,
          "max_draft": 8, **GREEDY}
    step_out, step_work = _layer_row_positions(model, batch_exit="step", **kw)
    row_out, row_work = _layer_row_positions(model, batch_exit="row", **kw)
    assert torch.equal(row_out, step_out)
    assert torch.equal(row_out, model.get_base_model().generate(input_ids=ids, attention_mask=mask,
                                                                max_new_tokens=NEW, **GREEDY))
    assert row_work < step_work


def test_row_sparse_dssd_with_perfect_heads_accepts_everything():
    """Heads that predict exactly what the full model does: every draft is kept, under the row rule too."""
    from test_speculative import perfect_heads, plain

    model = perfect_heads("llama")
    ids, mask = batch(LENGTHS)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=20, mode="dssd", eps=0.5, max_draft=6,
                         batch_exit="row", return_dict_in_generate=True, **GREEDY)
    assert torch.equal(out.sequences, plain(model, ids, mask))
    assert out.exit_stats.drafted > 0 and out.exit_stats.accepted == out.exit_stats.drafted
