"""The engine and the wrapper on the embedded default (Gemma 3 270M), against the unmodified model."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hf_earlyexit import EarlyExitForCausalLM, LayerEngine, load_base_model, load_tokenizer

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "In Python, a list is", "My name is"]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def tokenizer():
    tok = load_tokenizer("embedded")
    tok.padding_side = "left"
    return tok


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def base(request):
    return load_base_model("embedded", dtype=torch.float32, attn_implementation=request.param)


def _inputs(tokenizer, prompts):
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["batch1", "batch3_left_padded"])
def test_embedded_engine_logits_match(base, tokenizer, prompts):
    ids, mask = _inputs(tokenizer, prompts)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = base(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        got = LayerEngine(base).forward(ids, mask)
    m = mask.bool()
    torch.testing.assert_close(got[m], expected[m], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["batch1", "batch3_left_padded"])
def test_embedded_greedy_matches_generate(base, tokenizer, prompts, use_cache):
    from test_engine import engine_greedy

    ids, mask = _inputs(tokenizer, prompts)
    with torch.no_grad():
        expected = base.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
            eos_token_id=None, pad_token_id=tokenizer.pad_token_id,
        )
        got = engine_greedy(LayerEngine(base), ids, mask, NEW_TOKENS, use_cache)
    assert torch.equal(got, expected), tokenizer.batch_decode(torch.cat([got, expected]))


def test_embedded_heads_round_trip_in_a_fresh_process(tmp_path, tokenizer):
    """Heads saved on the fp32 embedded model load through remote code in a process without hf_earlyexit and
    give identical outputs; the base in bf16 is accepted too (the weight fingerprint survives the cast)."""
    model = EarlyExitForCausalLM.from_base("embedded", exit_layers=[4, 9], head="shared", adapter_rank=8,
                                           draft_token_ids=list(range(4096)))
    with torch.no_grad():
        for p in model.heads.parameters():
            p.add_(0.01)
    model.save_pretrained(tmp_path / "heads")
    ids, _ = _inputs(tokenizer, PROMPTS[:1])
    with torch.no_grad():
        expected = model(ids).exit_logits
    script = textwrap.dedent(
        """
        import sys, torch
        sys.modules["hf_earlyexit"] = None  # not importable here
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32)
        ids = torch.tensor([[int(t) for t in sys.argv[2].split(",")]])
        with torch.no_grad():
            out = model(ids)
        from safetensors.torch import save_file
        save_file({f"e{j}": t.contiguous() for j, t in enumerate(out.exit_logits)}, sys.argv[1] + "/../out.safetensors")
        """
    )
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "heads"), ",".join(map(str, ids[0].tolist()))],
        check=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=600,
    )
    from safetensors.torch import load_file

    got = load_file(tmp_path / "out.safetensors")
    for j, logits in enumerate(expected):
        assert torch.equal(got[f"e{j}"], logits)
    bf16 = EarlyExitForCausalLM.from_pretrained(tmp_path / "heads", dtype=torch.bfloat16)
    assert bf16.get_base_model().dtype == torch.bfloat16


BATCH4 = PROMPTS + ["Welcome to the jungle, we have"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("prompts", [PROMPTS[:1], BATCH4], ids=["batch1", "batch4_left_padded"])
def test_embedded_eps_one_is_plain_greedy(tokenizer, prompts, dtype):
    base = load_base_model("embedded", dtype=dtype)
    model = EarlyExitForCausalLM.from_base(base, head="shared", adapter_rank=8, draft_token_ids=list(range(4096)))
    ids, mask = _inputs(tokenizer, prompts)
    kw = {"max_new_tokens": 16, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    expected = base.generate(input_ids=ids, attention_mask=mask, **kw)
    got = model.generate(ids, attention_mask=mask, eps=1.0, **kw)
    assert torch.equal(got, expected), tokenizer.batch_decode(torch.cat([got, expected]))


def test_embedded_forced_exit_skips_layers(tokenizer):
    """Every token leaves at exit@4: the layers above it run only for the prompt (and once more at the end, to
    complete the cache that `return_dict_in_generate` hands back)."""
    model = EarlyExitForCausalLM.from_base("embedded", exit_layers=[4, 9], head="shared", adapter_rank=8)
    model.config.thresholds = {"0.5": [-1.0, None]}
    calls = [0] * model.num_layers
    hooks = [layer.mlp.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(model.engine.parts.layers)]
    ids, mask = _inputs(tokenizer, PROMPTS[:1])
    out = model.generate(ids, attention_mask=mask, eps=0.5, max_new_tokens=8, do_sample=False,
                         return_dict_in_generate=True)
    for h in hooks:
        h.remove()
    assert out.exit_index[0, 1:].tolist() == [0] * 7
    assert calls[:4] == [8] * 4 and calls[4:] == [2] * (model.num_layers - 4)
    assert out.exit_stats.layers_computed_fraction == pytest.approx(4 / model.num_layers)


def test_embedded_ee_hf_at_eps_one_matches_lm_eval_hf():
    """`--model ee-hf` with ε = 1 gives exactly `--model hf`'s metrics, greedy flags and generations on the embedded
    model, and its log-likelihoods to float rounding (the LM head runs on the scored rows only, a shared context
    once)."""

    import lm_eval
    from lm_eval.tasks import TaskManager

    from hf_earlyexit.evaluation.lm_eval_plugin import register
    from hf_earlyexit.modeling.base_earlyexit import embedded_dir

    register()
    tasks_dir = Path(__file__).resolve().parents[1] / "lm_eval_tasks"
    common = {"tasks": ["ee_capitals", "ee_sequences"], "device": "cpu", "batch_size": 4, "limit": 4,
              "log_samples": True, "task_manager": TaskManager(include_path=str(tasks_dir))}
    hf = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={embedded_dir()},dtype=float32", **common)
    ours = lm_eval.simple_evaluate(model="ee-hf", model_args="pretrained=embedded,eps=1,dtype=float32", **common)
    for task in common["tasks"]:
        assert ours["results"][task] == hf["results"][task]
        def answers(results, task=task):
            return [r for s in results["samples"][task] for r in s["filtered_resps"]]

        for got, expected in zip(answers(ours), answers(hf), strict=True):
            if isinstance(expected, (list, tuple)):  # (log-likelihood, is_greedy)
                # float rounding: `--model hf` itself moves a position's log-probability by up to ~1e-4 between
                # batch compositions on this model (one row alone vs in a batch of 16)
                assert got[1] == expected[1] and got[0] == pytest.approx(expected[0], rel=1e-5, abs=1e-3)
            else:
                assert got == expected


def test_heads_over_a_linked_embedded_cache_still_name_the_base_embedded(tmp_path, monkeypatch):
    """A cache whose converted folder is a link to a copy elsewhere: heads built on it record `"embedded"` and the
    version, not the link's target (ship refuses heads whose base is not `"embedded"`)."""
    from tiny import save_tiny_base
    from transformers import AutoModelForCausalLM

    from hf_earlyexit.modeling.base_earlyexit import canonical_name

    real = save_tiny_base("llama", tmp_path / "elsewhere" / "gemma-3-270m-dense-9.9.9")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "gemma-3-270m-dense-9.9.9").symlink_to(real, target_is_directory=True)
    monkeypatch.setenv("HF_EARLYEXIT_CACHE", str(cache))
    model = AutoModelForCausalLM.from_pretrained(str(cache / "gemma-3-270m-dense-9.9.9"))
    assert canonical_name(model) == ("embedded", "9.9.9")
    assert canonical_name(AutoModelForCausalLM.from_pretrained(real))[0] == str(Path(real).resolve())


def test_embedded_scoring_runs_only_the_exits_decoding_checks():
    """Scored positions may leave only at the exits generation checks at this ε (`exit_policy`, "auto" by default,
    which drops the shipped heads' seldom-paying shallow exits at ε = 0.9); the other heads are not even run."""
    from lm_eval.api.instance import Instance

    from hf_earlyexit.evaluation.lm_eval_model import EarlyExitLM
    from hf_earlyexit.modeling.exits_earlyexit import ExitRule

    requests = [("The capital of France is", " Paris, a city on the Seine."), ("One, two, three,", " four")]
    for policy in ("auto", "all"):
        lm = EarlyExitLM(pretrained="shipped", eps=0.9, exit_policy=policy, dtype="float32", batch_size=2)
        checked = ExitRule.for_model(lm.model, 0.9, policy).checked
        calls = [0] * len(checked)
        def count(j, calls=calls):
            return lambda module, args, out: calls.__setitem__(j, calls[j] + 1)

        hooks = [head.norm.register_forward_hook(count(j)) for j, head in enumerate(lm.model.exit_heads)]
        try:
            lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)])
        finally:
            for hook in hooks:
                hook.remove()
        assert [c > 0 for c in calls] == list(checked), policy
        calibrated = [tau is not None for tau in lm.model.thresholds_for(0.9)]  # a head may never reach ε alone
        if policy == "all":
            assert list(checked) == calibrated
        else:  # auto leaves some calibrated exit out at ε = 0.9
            assert all(c <= t for c, t in zip(checked, calibrated, strict=True)) and sum(checked) < sum(calibrated)
