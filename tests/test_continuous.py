"""Continuous batching (`continuous_generate`): every request decodes exactly as it would alone."""

from __future__ import annotations

import pytest
import torch
from test_decoding import set_median_thresholds
from tiny import ARCHS, tiny_model

from hf_earlyexit import EarlyExitForCausalLM
from hf_earlyexit.modeling.continuous_earlyexit import continuous_generate
from hf_earlyexit.modeling.options_earlyexit import DecodingOptions

LENGTHS = [5, 9, 3, 12, 7, 4, 10]  # prompts longer and shorter than the running rows join mid-flight
BUDGETS = [6, 3, 9, 4, 7, 2, 5]  # requests finish at different steps


def _prompts(seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 90, (n,), generator=gen).tolist() for n in LENGTHS]


def _heads(arch: str, head: str = "context") -> EarlyExitForCausalLM:
    base = tiny_model(arch)
    model = EarlyExitForCausalLM.from_base(base, exit_layers=[1, 2], head=head, adapter_rank=4)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.heads.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    set_median_thresholds(model)  # about half the tokens exit at ε = 0.5
    return model


def _alone(model, prompt, budget, **options) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=budget, do_sample=False, pad_token_id=0,
                         eos_token_id=None, **options)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_eps_one_gives_each_request_plain_greedy_alone(arch):
    model = _heads(arch)
    prompts = _prompts()
    options = DecodingOptions(mode="early_exit", eps=1.0)
    got = continuous_generate(model, prompts, BUDGETS, batch_size=3, options=options)
    base = model.get_base_model()
    for prompt, budget, tokens in zip(prompts, BUDGETS, got, strict=True):
        expected = base.generate(torch.tensor([prompt]), max_new_tokens=budget, do_sample=False, pad_token_id=0,
                                 eos_token_id=None)[0, len(prompt):].tolist()
        assert tokens == expected


@pytest.mark.parametrize("head", ["context", "shared"])
@pytest.mark.parametrize("arch", ARCHS)
def test_early_exit_gives_each_request_what_it_decodes_alone(arch, head):
    """kv_fill="recompute" is exact: a request's tokens (and exits) do not depend on which requests share its
    steps, so the queue gives what `generate()` gives for the request alone."""
    model = _heads(arch, head)
    prompts = _prompts(2)
    model.reset_exit_stats()
    options = DecodingOptions(mode="early_exit", eps=0.5)
    got = continuous_generate(model, prompts, BUDGETS, batch_size=3, options=options)
    stats = model.exit_stats
    assert stats.tokens == sum(BUDGETS) and 0 < stats.exit_counts[-1] < stats.tokens  # some tokens exit
    for prompt, budget, tokens in zip(prompts, BUDGETS, got, strict=True):
        assert tokens == _alone(model, prompt, budget, eps=0.5)


@pytest.mark.parametrize("arch", ["gemma3_text", "gpt2"])
def test_propagate_one_at_a_time_equals_generate(arch):
    """With `kv_fill="propagate"` a step's copy starts at the depth of the step (batch-dependent by design), so only
    a queue of batch 1 can be held to the request alone."""
    model = _heads(arch)
    prompts = _prompts(3)[:4]
    options = DecodingOptions(mode="early_exit", eps=0.5, kv_fill="propagate")
    got = continuous_generate(model, prompts, BUDGETS[:4], batch_size=1, options=options)
    for prompt, budget, tokens in zip(prompts, BUDGETS[:4], got, strict=True):
        assert tokens == _alone(model, prompt, budget, eps=0.5, kv_fill="propagate")


def test_plain_options_run_the_loop_without_exits():
    model = _heads("qwen3")
    prompts = _prompts(5)
    model.reset_exit_stats()
    plain = continuous_generate(model, prompts, BUDGETS, batch_size=4, options=DecodingOptions())
    assert model.exit_stats.exit_counts[-1] == model.exit_stats.tokens == sum(BUDGETS)
    assert plain == continuous_generate(model, prompts, BUDGETS, batch_size=4,
                                        options=DecodingOptions(mode="early_exit", eps=1.0))


def test_eos_and_stop_callbacks_end_a_request_after_their_token():
    model = _heads("llama")
    prompts = _prompts(4)
    free = continuous_generate(model, prompts, 8, batch_size=2, options=DecodingOptions(mode="early_exit", eps=1.0))
    eos = free[0][2]  # request 0's third token ends it; others end wherever that id comes up first
    ended = continuous_generate(model, prompts, 8, batch_size=2, eos_token_id=eos,
                                options=DecodingOptions(mode="early_exit", eps=1.0))
    for tokens, alone in zip(ended, free, strict=True):
        cut = alone.index(eos) + 1 if eos in alone else len(alone)
        assert tokens == alone[:cut]
    stopped = continuous_generate(model, prompts, 8, batch_size=2, stop=lambda i, tokens: len(tokens) == i + 1,
                                  options=DecodingOptions(mode="early_exit", eps=1.0))
    assert [len(t) for t in stopped] == [min(i + 1, 8) for i in range(len(prompts))]
    assert all(t == alone[: len(t)] for t, alone in zip(stopped, free, strict=True))


def test_bad_requests_are_named():
    model = _heads("llama")
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        continuous_generate(model, [[5, 6], []], 3)
    with pytest.raises(ValueError, match="max_new_tokens has 1 values for 2 prompts"):
        continuous_generate(model, [[5], [6]], [3])
    with pytest.raises(ValueError, match=r"max_new_tokens=0 for prompts\[0\] must be at least 1"):
        continuous_generate(model, [[5]], 0)
    with pytest.raises(ValueError, match="batch_size=0 must be at least 1"):
        continuous_generate(model, [[5]], 2, batch_size=0)
    with pytest.raises(ValueError, match="decodes by early exit with the step rule; got mode='dssd'"):
        continuous_generate(model, [[5]], 2, options=DecodingOptions(mode="dssd"))
