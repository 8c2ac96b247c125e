"""Self-speculative decoding (DSSD) is lossless: its output is the base model's, whatever the heads do."""

from __future__ import annotations

import pytest
import torch
from test_decoding import GREEDY, ee_model, set_median_thresholds
from tiny import ARCHS, VOCAB, batch, tiny_model

from hf_earlyexit import EarlyExitForCausalLM
from hf_earlyexit.modeling.architectures_earlyexit import model_parts
from hf_earlyexit.modeling.drafters_earlyexit import next_cap

NEW = 20
BATCHES = {"batch1": [7], "batch4_left_padded": [9, 5, 7, 3]}


def plain(model, ids, mask, new=NEW):
    return model.get_base_model().generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, **GREEDY)


def perfect_heads(arch: str, exit_layer: int = 2) -> EarlyExitForCausalLM:
    """The layers above `exit_layer` do nothing (all their weights zero: each adds 0 to the residual stream), and
    the head is a copy of the model's final norm + LM head: it predicts exactly what the full model predicts."""
    base = tiny_model(arch)
    with torch.no_grad():
        for layer in model_parts(base).layers[exit_layer:]:
            for p in layer.parameters():
                p.zero_()
    model = EarlyExitForCausalLM.from_base(base, exit_layers=[exit_layer], head="paper", head_init="lm_head")
    model.config.thresholds = {"0.5": [-1.0]}  # always confident
    return model


@pytest.mark.parametrize("lengths", BATCHES.values(), ids=BATCHES.keys())
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_dssd_equals_plain_greedy(arch, lengths):
    model = ee_model(arch)
    set_median_thresholds(model, quantile=0.3)
    ids, mask = batch(lengths)
    expected = plain(model, ids, mask)
    for eps, cap in [(0.5, 1), (0.5, 4), (0.5, 16), (1.0, 4)]:
        key = f"{eps:g}"
        if key != "1":
            model.config.thresholds = {key: model.config.thresholds[next(iter(model.config.thresholds))]}
        model.reset_exit_stats()
        got = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, mode="dssd", eps=eps, max_draft=cap,
                             **GREEDY)
        assert torch.equal(got, expected), (eps, cap)
        stats = model.exit_stats
        assert stats.tokens == len(lengths) * NEW
        if eps == 1.0:
            assert stats.drafted == 0
        else:
            assert stats.drafted > 0


@pytest.mark.parametrize("lengths", BATCHES.values(), ids=BATCHES.keys())
@pytest.mark.parametrize("arch", ARCHS)
def test_bad_heads_everything_rejected_output_unchanged(arch, lengths):
    torch.manual_seed(0)
    model = EarlyExitForCausalLM.from_base(tiny_model(arch), exit_layers=[1, 2], head="paper", head_init="scratch")
    model.config.thresholds = {"0.5": [-1.0, -1.0]}  # always confident, usually wrong
    ids, mask = batch(lengths)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, mode="dssd", eps=0.5, max_draft=5,
                         return_dict_in_generate=True, **GREEDY)
    assert torch.equal(out.sequences, plain(model, ids, mask))
    stats = out.exit_stats
    assert stats.drafted > 0 and stats.acceptance_rate < 0.3


@pytest.mark.parametrize("lengths", BATCHES.values(), ids=BATCHES.keys())
@pytest.mark.parametrize("arch", ARCHS)
def test_perfect_heads_everything_accepted(arch, lengths):
    model = perfect_heads(arch)
    ids, mask = batch(lengths)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, mode="dssd", eps=0.5, max_draft=6,
                         return_dict_in_generate=True, **GREEDY)
    assert torch.equal(out.sequences, plain(model, ids, mask))
    stats = out.exit_stats
    assert stats.drafted > 0 and stats.accepted == stats.drafted
    # rounds of 6 drafts + the bonus token: 19 tokens after the first need 3 rounds per row
    assert stats.rounds == len(lengths) * 3
    # every accepted token still runs every layer (in the verify pass), but the weights are read once per round
    assert stats.layer_tokens == stats.layer_tokens_full
    assert stats.steps == 3 and stats.weight_bytes < stats.weight_bytes_full


def test_eos_and_max_length_stop_each_row():
    model = ee_model("llama")
    set_median_thresholds(model, quantile=0.3)
    ids, mask = batch([9, 5, 7, 3])
    reference = plain(model, ids, mask)
    eos = int(reference[1, ids.shape[1] + 4])
    kw = {"do_sample": False, "pad_token_id": 0, "eos_token_id": eos}
    expected = model.get_base_model().generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, **kw)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, mode="dssd", eps=0.5, **kw)
    assert torch.equal(got, expected)


def _next_token_marginals(base, prompt: torch.Tensor, depth: int) -> list[torch.Tensor]:
    """Exact distributions of generated tokens 1..depth under plain sampling (temperature 1), by enumeration."""
    marginals = []
    seqs, weights = prompt[None], torch.ones(1, dtype=torch.float64)
    for _ in range(depth):
        with torch.no_grad():
            probs = torch.softmax(base(input_ids=seqs).logits[:, -1].double(), dim=-1)  # (k, vocab)
        joint = weights[:, None] * probs  # (k, vocab)
        marginals.append(joint.sum(0))
        seqs = torch.cat([seqs.repeat_interleave(VOCAB, 0), torch.arange(VOCAB).repeat(len(seqs))[:, None]], dim=1)
        weights = joint.reshape(-1)
    return marginals


def test_sampling_dssd_follows_the_base_distribution():
    """Speculative sampling (accept with min(1, p/q), resample the residual) leaves the distribution unchanged:
    the empirical distribution of generated tokens 2 and 3 over many rows matches the exact one, while the heads'
    own (different) distribution would not."""
    model = ee_model("llama")
    model.config.thresholds = {"0.5": [-1.0, -1.0, -1.0]}  # the first exit always drafts
    with torch.no_grad():
        for p in model.exit_heads[0].parameters():
            p.add_(torch.randn_like(p) * 0.3)  # a draft distribution clearly unlike the model's
    prompt = torch.tensor([5, 17, 33, 8, 61])
    rows = 3000
    torch.manual_seed(1)
    out = model.generate(prompt.repeat(rows, 1), max_new_tokens=3, mode="dssd", eps=0.5, max_draft=2,
                         do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0, eos_token_id=None,
                         return_dict_in_generate=True)
    stats = out.exit_stats
    assert 0.05 < stats.acceptance_rate < 0.95, "both accept and reject paths must be exercised"
    exact = _next_token_marginals(model.get_base_model(), prompt, 3)
    generated = out.sequences[:, len(prompt):]
    for position in (1, 2):
        observed = torch.bincount(generated[:, position], minlength=VOCAB).double()
        assert chi_square_p(observed, exact[position]) > 1e-3, position
    # power: had the drafts been taken as they are, token 2 would follow a distribution the test rejects outright
    seqs = torch.cat([prompt.repeat(VOCAB, 1), torch.arange(VOCAB)[:, None]], dim=1)
    with torch.no_grad():
        q = torch.softmax(model(seqs).exit_logits[0][:, -1].double(), dim=-1)  # (vocab t1, vocab t2)
    drafts_only = (exact[0][:, None] * q).sum(0)
    assert chi_square_p(drafts_only * rows, exact[1]) < 1e-6


def chi_square_p(observed: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Pearson's goodness-of-fit p-value, pooling the categories expected fewer than 5 times into one."""
    from scipy.stats import chisquare

    expected = expected_probs * observed.sum()
    small = expected < 5
    obs, exp = observed[~small], expected[~small]
    if bool(small.any()):
        obs = torch.cat([obs, observed[small].sum()[None]])
        exp = torch.cat([exp, expected[small].sum()[None]])
    return float(chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue)


def test_stop_strings_and_streamer_match_plain_generate():
    """Column-wise emission: stopping criteria see the whole batch as in plain decoding (rows that stop without
    EOS keep generating until all have stopped, as HF does), and a streamer gets the same columns."""
    from test_decoding import Collect
    from tiny import tiny_tokenizer

    model = ee_model("llama")
    set_median_thresholds(model, quantile=0.3)
    tok = tiny_tokenizer()
    ids, mask = batch([9, 5, 7, 3])
    reference = plain(model, ids, mask)
    new = reference[0, ids.shape[1]:].tolist()
    stop = tok.decode(new[4:6])
    kw = {"max_new_tokens": NEW, "do_sample": False, "pad_token_id": 0, "eos_token_id": None,
          "stop_strings": [stop], "tokenizer": tok}
    expected = model.get_base_model().generate(input_ids=ids, attention_mask=mask, **kw)
    streamer = Collect()
    got = model.generate(ids, attention_mask=mask, mode="dssd", eps=0.5, streamer=streamer, **kw)
    assert torch.equal(got, expected)
    columns = torch.tensor(streamer.chunks[1:]).T  # (batch, new)
    assert torch.equal(columns, got[:, ids.shape[1]:]) and streamer.ended


def test_lookup_token_takes_the_follower_of_the_latest_longest_match():
    from hf_earlyexit.modeling.drafters_earlyexit import lookup_token

    assert lookup_token([1, 2, 3, 9, 2, 4, 1, 2], 2, pad=0) == 3  # the bigram (1, 2) occurred: 3 followed it
    assert lookup_token([7, 2, 5, 2, 6, 2], 2, pad=0) == -1  # a single-token match is not enough beside bigrams
    assert lookup_token([7, 2, 5, 2, 6, 2], 1, pad=0) == 6  # n=1: the latest earlier 2 was followed by 6
    assert lookup_token([1, 2, 3, 4], 3, pad=0) == -1  # nothing repeats
    assert lookup_token([0, 5, 0, 0, 5], 1, pad=0) == -1  # 5 was followed by padding: no draft
    assert lookup_token([4], 2, pad=0) == -1


REPEATING = torch.tensor([[3, 8, 11, 3, 8, 11, 3, 8, 11, 3, 8, 11, 3, 8]])


@pytest.mark.parametrize("rows", [1, 4], ids=["batch1", "batch4_left_padded"])
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_dssd_with_prompt_lookup_equals_plain_greedy(arch, rows):
    model = ee_model(arch)
    set_median_thresholds(model, quantile=0.3)
    ids = REPEATING.repeat(rows, 1)
    mask = torch.ones_like(ids)
    for r in range(1, rows):  # left padding of different lengths, and different repeats per row
        mask[r, : 2 * r] = 0
        ids[r, : 2 * r] = 0
        ids[r, -1] = 5 + r
    expected = plain(model, ids, mask)
    # batch rules: a row drafts by lookup without running layers, so several of its slots wait at layer 0 ("row")
    for lookup, cap, rule in [(1, 4, "row"), (3, 16, "row"), (1, 4, "step")]:
        model.reset_exit_stats()
        got = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, mode="dssd", eps=0.5, max_draft=cap,
                             lookup=lookup, batch_exit=rule, **GREEDY)
        assert torch.equal(got, expected), (lookup, cap, rule)
        stats = model.exit_stats
        looked, kept = stats.drafted_by.get("lookup", 0), stats.accepted_by.get("lookup", 0)
        assert kept <= looked <= stats.drafted
        assert sum(stats.drafted_by.values()) == stats.drafted and sum(stats.accepted_by.values()) == stats.accepted
        if lookup == 1:  # every token of the prompt repeats: single-token matches always draft
            assert looked > 0
        assert stats.tokens == rows * NEW


def test_sampling_with_prompt_lookup_follows_the_base_distribution():
    """Looked-up drafts are a one-hot q: accepted with probability p(draft), else resampled from p without it."""
    model = ee_model("llama")
    model.config.thresholds = {"0.5": [None, None, None]}  # heads never draft: every draft is a lookup
    # every token once: whatever a row samples occurred before, so single-token lookup drafts for every row
    prompt = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(0))
    rows = 3000
    torch.manual_seed(2)
    out = model.generate(prompt.repeat(rows, 1), max_new_tokens=3, mode="dssd", eps=0.5, max_draft=2, lookup=1,
                         do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0, eos_token_id=None,
                         return_dict_in_generate=True)
    stats = out.exit_stats
    assert stats.drafted == stats.drafted_by["lookup"] > rows // 2 and "heads" not in stats.drafted_by
    assert 0.0 < stats.acceptance_rate < 0.5, "the tiny model seldom agrees with the lookup: both paths exercised"
    exact = _next_token_marginals(model.get_base_model(), prompt, 3)
    generated = out.sequences[:, len(prompt):]
    for position in (0, 1, 2):
        observed = torch.bincount(generated[:, position], minlength=VOCAB).double()
        assert chi_square_p(observed, exact[position]) > 1e-3, position


def test_bad_lookup_is_refused():
    model = ee_model("llama")
    set_median_thresholds(model)
    ids, mask = batch([5])
    with pytest.raises(ValueError, match="lookup=-1 must be a non-negative integer"):
        model.generate(ids, attention_mask=mask, max_new_tokens=3, mode="dssd", eps=0.5, lookup=-1, **GREEDY)


def test_draft_cap_adapts_to_what_rounds_accept():
    assert next_cap(4, 4, 4, 16) == 8 and next_cap(8, 8, 8, 16) == 16 and next_cap(16, 16, 16, 16) == 16
    assert next_cap(8, 8, 2, 16) == 3 and next_cap(8, 5, 0, 16) == 1  # a rejection: one past what was kept
    assert next_cap(8, 3, 3, 16) == 8  # the heads stopped drafting before the cap: no evidence either way


@pytest.mark.parametrize("adaptive, rounds", [(True, 3), (False, 2)])
def test_perfect_heads_rounds_follow_the_draft_schedule(adaptive, rounds):
    """19 tokens after the first: a fixed cap of 16 takes 17 + 2; the adaptive cap grows 4 -> 8 -> 16: 5 + 9 + 5."""
    model = perfect_heads("llama")
    ids, mask = batch(BATCHES["batch1"])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, mode="dssd", eps=0.5, max_draft=16,
                         adaptive_draft=adaptive, return_dict_in_generate=True, **GREEDY)
    assert torch.equal(out.sequences, plain(model, ids, mask))
    assert out.exit_stats.rounds == rounds and out.exit_stats.accepted == out.exit_stats.drafted
