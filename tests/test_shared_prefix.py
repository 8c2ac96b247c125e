"""Scoring runs a context shared by several requests once (`backbone_states`): every scored position's log-probabilities
of its candidate tokens and head outputs are what the unmodified model computes over each request alone, on every
family (sliding windows crossed), with paper and context heads."""

from __future__ import annotations

import pytest
import torch
from test_decoding import ee_model
from tiny import ARCHS, VOCAB

from hf_earlyexit.evaluation.scoring import forward_scored, token_scores

# (context length, continuation lengths): a document's choices of different lengths, a one-token choice, a request
# alone and a context of one token (lm-eval's prefix token before a rolling window)
DOCS = [(12, [3, 5, 1]), (6, [4]), (1, [7, 2])]


def requests(seed: int = 3) -> tuple[torch.Tensor, list[int], list[int]]:
    """Right-padded model inputs (context + continuation minus its last token), their lengths and continuation
    lengths, for `DOCS`."""
    g = torch.Generator().manual_seed(seed)
    inputs, contlens = [], []
    for context_len, conts in DOCS:
        context = torch.randint(1, VOCAB, (context_len,), generator=g).tolist()
        for n in conts:
            inputs.append(context + torch.randint(1, VOCAB, (n,), generator=g).tolist()[:-1])
            contlens.append(n)
    inps = torch.zeros((len(inputs), max(map(len, inputs))), dtype=torch.long)
    for r, tokens in enumerate(inputs):
        inps[r, :len(tokens)] = torch.tensor(tokens)
    return inps, [len(t) for t in inputs], contlens


@pytest.mark.parametrize("head", ["paper", "context"])
@pytest.mark.parametrize("arch", ARCHS)
def test_a_shared_context_runs_once_and_scores_as_each_request_alone(arch, head):
    kw = {"head": "context", "adapter_rank": 4} if head == "context" else {}
    model = ee_model(arch, exits=[1, 2], **kw).eval()
    inps, lengths, contlens = requests()
    base = model.get_base_model()
    expected = []  # per request, its scored positions' log-probabilities over the request alone (the oracle)
    for r in range(len(lengths)):
        with torch.no_grad():
            out = base(inps[r:r + 1, :lengths[r]])
        expected.append(torch.log_softmax(out.logits[0, lengths[r] - contlens[r]:lengths[r]], dim=-1))
    expected = torch.cat(expected)
    # candidates per position: the oracle's greedy token, another token, and an unused slot
    other = (expected.argmax(dim=-1) + 1 + torch.arange(len(expected)) % (VOCAB - 1)) % VOCAB
    tokens = torch.stack([expected.argmax(dim=-1), other, torch.full_like(other, -1)], dim=1)
    seen, whole = [], []
    layer = model.engine.parts.layers[0]
    hooks = [layer.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0] * args[0].shape[1]))]
    for exit_head in model.exit_heads:  # a context block's whole layer (a keys-and-values-only call never returns)
        if exit_head.has_context:
            hooks.append(exit_head.block.register_forward_hook(
                lambda m, args, out: whole.append(args[0].shape[0] * args[0].shape[1])))
    try:
        with torch.no_grad():
            scores, heads, spans = forward_scored(model, inps, lengths, contlens, [True, True], tokens)
    finally:
        for hook in hooks:
            hook.remove()
    # the three contexts once (left-padded to the longest), then every request's own tokens after them
    assert sum(seen) == 3 * 12 + len(lengths) * (max(contlens) - 1) < inps.numel()
    # a context block runs whole only at the scored positions (each row padded to the longest continuation)
    assert whole == ([len(lengths) * max(contlens)] * 2 if head == "context" else [])
    torch.testing.assert_close(scores.log_probs[:, :2], expected.gather(1, tokens[:, :2]), rtol=1e-5, atol=1e-5,
                               msg=arch)
    assert scores.greedy[:, 0].all() and not scores.greedy[:, 1:].any()
    for r, span in enumerate(spans):
        alone = inps[r:r + 1, :lengths[r]]
        with torch.no_grad():
            out = base(alone, output_hidden_states=True)
        scored = slice(lengths[r] - contlens[r], lengths[r])
        for j, (exit_layer, exit_head) in enumerate(zip(model.config.exit_layers, model.exit_heads, strict=True)):
            with torch.no_grad():
                head_logits = exit_head(out.hidden_states[exit_layer])[0, scored]
            torch.testing.assert_close(heads[j][0][span], head_logits, rtol=1e-5, atol=1e-5,
                                       msg=f"{arch} request {r} exit {exit_layer}")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("chunk,block,softcap", [(7, 5, None), (32, 64, 3.0), (None, None, None)])
def test_streamed_lm_head_scores_equal_whole_log_softmax_rows(arch, chunk, block, softcap):
    """`token_scores` streams the LM head in chunks of its rows (blocks of positions) and keeps only each candidate's
    log-probability and greediness: equal to HFLM's `log_softmax` of the whole row (to float rounding) and its
    `argmax == token` exactly, soft-capping and an LM-head bias (Phi) included, across exact ties (two equal rows of
    the head: the lower token id is greedy) and near-ties (rows a hair apart)."""
    model = ee_model(arch, exits=[1, 2]).eval()
    model.engine.config.final_logit_softcapping = softcap
    head = model.engine.parts.lm_head
    g = torch.Generator().manual_seed(5)
    normed = torch.randn(23, head.weight.shape[1], generator=g)

    def oracle() -> torch.Tensor:  # the logits as the model computes them, written out here
        logits = torch.nn.functional.linear(normed, head.weight, head.bias)
        return torch.log_softmax(torch.tanh(logits / softcap) * softcap if softcap else logits, dim=-1)

    with torch.no_grad():
        top = oracle().argmax(dim=-1)
        low = [t - 1 if t > 0 else t + 1 for t in top[:2].tolist()]
        head.weight[low[0]] = head.weight[top[0]]  # position 0: an exact tie between two token ids
        head.weight[low[1]] = head.weight[top[1]] * (1 - 1e-7)  # position 1: a near-tie
        if head.bias is not None:
            head.bias[low[0]], head.bias[low[1]] = head.bias[top[0]], head.bias[top[1]]
        rows = oracle()
        argmax = rows.argmax(dim=-1)
        tokens = torch.stack([argmax, torch.randint(0, VOCAB, (23,), generator=g), top, torch.full_like(top, -1)], 1)
        tokens[0, 1], tokens[1, 1] = low[0], low[1]
        scores = token_scores(model, normed, tokens, chunk=chunk, block=block)
    valid = tokens >= 0
    torch.testing.assert_close(scores.log_probs[valid], rows.gather(1, tokens.clamp(min=0))[valid], rtol=1e-5,
                               atol=1e-5, msg=arch)
    assert torch.equal(scores.greedy, (tokens == argmax.unsqueeze(1)) & valid)
    assert scores.greedy[0].tolist()[:3] == [True, low[0] < top[0], low[0] > top[0]]  # the lower id wins
    assert torch.isnan(scores.log_probs[:, 3]).all()
