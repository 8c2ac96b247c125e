"""Scoring runs a context shared by several requests once (`backbone_states`): every scored position's
log-probabilities and head outputs are what the unmodified model computes over each request alone, on every family
(sliding windows crossed), with paper and context heads."""

from __future__ import annotations

import pytest
import torch
from test_decoding import ee_model
from tiny import ARCHS, VOCAB

from hf_earlyexit.evaluation.scoring import forward_scored

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
    seen, whole = [], []
    layer = model.engine.parts.layers[0]
    hooks = [layer.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0] * args[0].shape[1]))]
    for exit_head in model.exit_heads:  # a context block's whole layer (a keys-and-values-only call never returns)
        if exit_head.has_context:
            hooks.append(exit_head.block.register_forward_hook(
                lambda m, args, out: whole.append(args[0].shape[0] * args[0].shape[1])))
    try:
        with torch.no_grad():
            log_probs, heads, spans = forward_scored(model, inps, lengths, contlens, [True, True])
    finally:
        for hook in hooks:
            hook.remove()
    # the three contexts once (left-padded to the longest), then every request's own tokens after them
    assert sum(seen) == 3 * 12 + len(lengths) * (max(contlens) - 1) < inps.numel()
    # a context block runs whole only at the scored positions (each row padded to the longest continuation)
    assert whole == ([len(lengths) * max(contlens)] * 2 if head == "context" else [])
    base = model.get_base_model()
    for r, span in enumerate(spans):
        alone = inps[r:r + 1, :lengths[r]]
        with torch.no_grad():
            out = base(alone, output_hidden_states=True)
        scored = slice(lengths[r] - contlens[r], lengths[r])
        expected = torch.log_softmax(out.logits[0, scored], dim=-1)
        torch.testing.assert_close(log_probs[span], expected, rtol=1e-5, atol=1e-5, msg=f"{arch} request {r}")
        for j, (exit_layer, exit_head) in enumerate(zip(model.config.exit_layers, model.exit_heads, strict=True)):
            with torch.no_grad():
                head_logits = exit_head(out.hidden_states[exit_layer])[0, scored]
            torch.testing.assert_close(heads[j][0][span], head_logits, rtol=1e-5, atol=1e-5,
                                       msg=f"{arch} request {r} exit {exit_layer}")
