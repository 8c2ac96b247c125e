"""The plugin inside a real vLLM engine (run in the vLLM venv; see README "Serving with vLLM"), on the embedded Gemma 3
270M and the shipped heads. Oracles: vLLM's own Gemma 3 (ε = 1 must give its tokens exactly) and hf-earlyexit's own
early-exit decoding (`hf_oracle.py`, run with `HF_EARLYEXIT_PYTHON`: a Python that has hf-earlyexit installed), which
the plugin must reproduce token for token in float32, one sequence at a time and as a batch.

    HF_EARLYEXIT_PYTHON=/path/to/venv/bin/python python -m pytest vllm_plugin/tests
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: errors surface here
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

vllm = pytest.importorskip("vllm", reason="the plugin's engine tests run in a vLLM environment")

import hf_earlyexit_vllm  # noqa: E402
from hf_earlyexit_vllm.heads import HeadsFolderError  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BASE = Path(os.environ.get("HF_EARLYEXIT_VLLM_BASE", "~/.cache/hf_earlyexit/gemma-3-270m-dense-1.0.0")).expanduser()
HEADS = Path(os.environ.get("HF_EARLYEXIT_VLLM_HEADS", REPO / "hf_earlyexit" / "shipped_heads" / "gemma3-270m"))
ORACLE = os.environ.get("HF_EARLYEXIT_PYTHON")
TEXTS = [
    "The history of the printing press begins",
    "A good recipe for bread needs flour, water and",
    "In the mountains, the weather changes quickly because",
    "She opened the old letter and read the first line:",
]
NEW = 40

pytestmark = pytest.mark.skipif(not (BASE / "config.json").is_file() or not (HEADS / "config.json").is_file(),
                                reason=f"needs the embedded model's dense folder at {BASE} (run hf-earlyexit once; "
                                       f"or set HF_EARLYEXIT_VLLM_BASE) and the heads at {HEADS}")


def _engine(earlyexit: dict | None):
    kwargs = {}
    if earlyexit is not None:
        kwargs = {"hf_overrides": {"architectures": ["Gemma3EarlyExitForCausalLM"],
                                   "earlyexit": {"heads": str(HEADS), **earlyexit}},
                  "worker_extension_cls": hf_earlyexit_vllm.WORKER_EXTENSION}
    return vllm.LLM(model=str(BASE), dtype="float32", enforce_eager=True, max_model_len=512, seed=0, **kwargs)


def _close(llm) -> None:
    llm.llm_engine.engine_core.shutdown()


def _prompts(llm) -> list[list[int]]:
    tokenizer = llm.get_tokenizer()
    return [tokenizer(text)["input_ids"] for text in TEXTS]


def _generate(llm, prompts: list[list[int]], batched: bool) -> list[list[int]]:
    params = vllm.SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    groups = [prompts] if batched else [[p] for p in prompts]
    out = []
    for group in groups:
        results = llm.generate([vllm.inputs.TokensPrompt(prompt_token_ids=p) for p in group], params, use_tqdm=False)
        out += [list(r.outputs[0].token_ids) for r in results]
    return out


def _oracle(heads, eps, new: int, prompts: list[list[int]], batched: bool, batch_exit: str = "step"):
    """hf-earlyexit's own early exit of `prompts` (`hf_oracle.py`, run with `HF_EARLYEXIT_PYTHON`)."""
    return json.loads(subprocess.run(
        [ORACLE, str(Path(__file__).with_name("hf_oracle.py")), str(heads), str(eps), str(new), "1" if batched else "0",
         batch_exit], input=json.dumps(prompts), capture_output=True, text=True, check=True).stdout)


@pytest.fixture(scope="module")
def plain_tokens():
    llm = _engine(None)
    try:
        prompts = _prompts(llm)
        return prompts, _generate(llm, prompts, batched=True)
    finally:
        _close(llm)


def test_eps_1_is_vllms_own_model(plain_tokens):
    prompts, expected = plain_tokens
    llm = _engine({"eps": 1.0})
    try:
        assert _generate(llm, prompts, batched=True) == expected
        assert _generate(llm, prompts, batched=False) == expected
        (stats,) = hf_earlyexit_vllm.exit_stats(llm)
        assert stats["exits_checked"] == [] and stats["decode_tokens"] == 0  # vLLM's own forward ran
    finally:
        _close(llm)


@pytest.mark.skipif(not ORACLE, reason="set HF_EARLYEXIT_PYTHON to a Python with hf-earlyexit for the oracle")
@pytest.mark.parametrize("eps", [0.9, 0.7])
def test_exits_reproduce_hf_earlyexit(plain_tokens, eps):
    """Token for token what hf-earlyexit's own early exit (KV of skipped layers propagated, every exit checked)
    decodes, per sequence and as one batch (the iteration-level rule); most tokens leave early, and the exit counts
    add up."""
    prompts, plain = plain_tokens
    llm = _engine({"eps": eps, "max_batch": None})  # every step checks its exits, as hf-earlyexit's batch does
    try:
        for batched in (False, True):
            expected = _oracle(HEADS, eps, NEW, prompts, batched)
            before = hf_earlyexit_vllm.exit_stats(llm)[0]
            got = _generate(llm, prompts, batched)
            after = hf_earlyexit_vllm.exit_stats(llm)[0]
            assert got == expected, batched
            exited = sum(after["exit_tokens"].values()) - sum(before["exit_tokens"].values())
            decoded = after["decode_tokens"] - before["decode_tokens"]
            assert decoded == len(prompts) * (NEW - 1)  # the first token of each comes from its prefill
            assert after["full_tokens"] - before["full_tokens"] + exited == decoded
            assert exited > 0.3 * decoded, after
        assert got != plain  # lossy: the exits changed some tokens
    finally:
        _close(llm)


@pytest.mark.skipif(not ORACLE, reason="set HF_EARLYEXIT_PYTHON to a Python with hf-earlyexit for the oracle")
def test_row_exit_reproduces_hf_earlyexit_row_rule(plain_tokens):
    """`batch_exit="row"`: a sequence leaves the batch at its own exit (its skipped layers' keys and values from its
    own exit state), and the deeper layers run for the others alone, attending over their own sequences. One batch of
    4 gives hf-earlyexit's row rule token for token, which on these prompts differs from the step rule's."""
    prompts, _ = plain_tokens
    llm = _engine({"eps": 0.9, "max_batch": None, "batch_exit": "row"})
    try:
        got = _generate(llm, prompts, batched=True)
        (stats,) = hf_earlyexit_vllm.exit_stats(llm)
    finally:
        _close(llm)
    expected = _oracle(HEADS, 0.9, NEW, prompts, True, "row")
    assert got == expected
    assert expected != _oracle(HEADS, 0.9, NEW, prompts, True, "step")  # the rules differ here: the test can fail
    assert sum(stats["exit_tokens"].values()) > 0.3 * stats["decode_tokens"], stats
    assert stats["early_steps"] < stats["decode_steps"]  # some steps had sequences leaving while others went on


@pytest.mark.parametrize("exit_layer", [4, 12])
def test_a_drafter_from_one_exit_is_lossless(plain_tokens, exit_layer, tmp_path):
    """Lossless speculative decoding through vLLM's draft-model hook: the drafter is the base's layers below one exit
    plus that exit's head (`write_draft_folder`), vLLM's own model verifies. The tokens are vLLM's own, one sequence
    at a time and as one batch, and some drafts are accepted. (Gemma 3's sliding and full attention layers must
    share one KV cache group for vLLM's drafter: `disable_hybrid_kv_cache_manager`.)"""
    prompts, expected = plain_tokens
    draft = hf_earlyexit_vllm.write_draft_folder(BASE, HEADS, exit_layer, tmp_path / "draft")
    llm = vllm.LLM(model=str(BASE), dtype="float32", enforce_eager=True, max_model_len=512, seed=0,
                   disable_hybrid_kv_cache_manager=True, disable_log_stats=False,
                   speculative_config={"method": "draft_model", "model": draft, "num_speculative_tokens": 3})
    try:
        assert _generate(llm, prompts, batched=True) == expected
        assert _generate(llm, prompts, batched=False) == expected
        metrics = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}
        assert 0 < metrics["vllm:spec_decode_num_accepted_tokens"] < metrics["vllm:spec_decode_num_draft_tokens"]
    finally:
        _close(llm)


def test_steps_above_max_batch_run_the_whole_model(plain_tokens):
    """Decode steps of more sequences than `max_batch` check no exit: a batch of 4 decodes vLLM's own tokens exactly
    (the context blocks' caches still written, keys and values only), while one sequence alone still leaves early."""
    prompts, expected = plain_tokens
    llm = _engine({"eps": 0.9, "max_batch": 2})
    try:
        assert _generate(llm, prompts, batched=True) == expected
        (stats,) = hf_earlyexit_vllm.exit_stats(llm)
        assert stats["unchecked_steps"] == stats["decode_steps"] == NEW - 1, stats
        assert sum(stats["exit_tokens"].values()) == 0 and stats["full_tokens"] == len(prompts) * (NEW - 1)
        _generate(llm, prompts[:1], batched=False)
        (after,) = hf_earlyexit_vllm.exit_stats(llm)
        assert after["unchecked_steps"] == NEW - 1 and sum(after["exit_tokens"].values()) > 0.3 * (NEW - 1), after
    finally:
        _close(llm)


def test_sampling_and_a_chosen_exit_subset_run():
    llm = _engine({"eps": 0.9, "exits": [12, 15], "log_every": 5, "max_batch": None})
    try:
        params = vllm.SamplingParams(temperature=0.8, top_p=0.95, max_tokens=24, seed=1, ignore_eos=True)
        results = llm.generate(TEXTS, params, use_tqdm=False)
        assert all(len(r.outputs[0].token_ids) == 24 for r in results)
        (stats,) = hf_earlyexit_vllm.exit_stats(llm)
        assert stats["exits_checked"] == [12, 15] and stats["exit_tokens"][4] == stats["exit_tokens"][8] == 0
        assert stats["exit_tokens"][12] + stats["exit_tokens"][15] > 0
    finally:
        _close(llm)


@pytest.mark.parametrize(("settings", "message"), [
    ({"eps": 0.75}, "eps=0.75 is not calibrated in .*: expected one of 0.5, 0.6"),
    ({"eps": 0.9, "exits": [5]}, r"exits=\[5\]: expected a list of these heads' exit layers \[4, 8, 12, 15\]"),
    ({"eps": 0.9, "speed": 2}, r"earlyexit settings \['speed'\] are unknown"),
    ({"eps": 0.9, "max_batch": 0}, r"max_batch=0: expected a whole number of sequences >= 1, or None"),
    ({"eps": 0.9, "batch_exit": "token"}, r"batch_exit='token': expected one of step, row"),
    ({"draft_exit": 5}, r"draft_exit=5: expected one of these heads' exit layers \[4, 8, 12, 15\]"),
    ({"draft_exit": 4, "exits": [12]}, r"exits=\[12\] with draft_exit=4: a drafter leaves at its one exit"),
])
def test_bad_settings_are_named(settings, message):
    with pytest.raises(Exception, match=message) as caught:
        _engine(settings)
    assert isinstance(caught.value, HeadsFolderError) or message.split()[0] in str(caught.value)


@pytest.mark.skipif(not ORACLE, reason="set HF_EARLYEXIT_PYTHON to a Python with hf-earlyexit for the oracle")
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gpt2", "gpt_neox", "phi"])
def test_other_families_reproduce_hf_earlyexit(family, tmp_path):
    """The same mechanism on vLLM's Llama / Qwen 2 / Qwen 3 / GPT-2 classes and, for GPT-NeoX and Phi, its
    Transformers backend, with a tiny random base and context heads written by hf-earlyexit (`hf_tiny.py`): ε = 1 is
    vLLM's own class; at ε 0.5 (about half the tokens exit) the tokens equal hf-earlyexit's own early exit, one
    sequence at a time and as a batch, under both batch rules."""
    here = Path(__file__).parent
    made = json.loads(subprocess.run([ORACLE, str(here / "hf_tiny.py"), family, str(tmp_path)], capture_output=True,
                                     text=True, check=True).stdout)
    prompts = [[1, 5, 9, 200, 33, 7, 140], [2, 8, 120, 130, 5], [3, 300, 301, 302, 110, 111, 112, 113, 9]]
    params = vllm.SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, detokenize=False)
    arch = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "gpt2": "GPT2", "gpt_neox": "GPTNeoX",
            "phi": "Phi"}[family]

    def engine(earlyexit):
        kwargs = {} if earlyexit is None else {
            "hf_overrides": {"architectures": [f"{arch}EarlyExitForCausalLM"],
                             "earlyexit": {"heads": made["heads"], **earlyexit}},
            "worker_extension_cls": hf_earlyexit_vllm.WORKER_EXTENSION}
        return vllm.LLM(model=made["base"], dtype="float32", enforce_eager=True, max_model_len=256, seed=0,
                        skip_tokenizer_init=True, **kwargs)

    def decode(llm, batched):
        groups = [prompts] if batched else [[p] for p in prompts]
        return [list(r.outputs[0].token_ids) for g in groups
                for r in llm.generate([vllm.inputs.TokensPrompt(prompt_token_ids=p) for p in g], params,
                                      use_tqdm=False)]

    llm = engine(None)
    try:
        plain = decode(llm, True)
    finally:
        _close(llm)
    llm = engine({"eps": 1.0})
    try:
        assert decode(llm, True) == plain
    finally:
        _close(llm)
    llm = engine({"eps": 0.5, "max_batch": None})
    try:
        for batched in (False, True):
            assert decode(llm, batched) == _oracle(made["heads"], 0.5, 16, prompts, batched), batched
        (stats,) = hf_earlyexit_vllm.exit_stats(llm)
        assert sum(stats["exit_tokens"].values()) > 0.2 * stats["decode_tokens"], stats
    finally:
        _close(llm)
    llm = engine({"eps": 0.5, "max_batch": None, "batch_exit": "row"})  # each sequence leaves on its own
    try:
        assert decode(llm, True) == _oracle(made["heads"], 0.5, 16, prompts, True, "row")
    finally:
        _close(llm)
    # the same heads on a base whose first layer changed: the fingerprint taken as vLLM streams the checkpoint
    # tells, and the engine refuses them by name
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(Path(made["base"]) / "config.json", other / "config.json")
    weights = load_file(str(Path(made["base"]) / "model.safetensors"))
    name = next(n for n, t in weights.items() if t.dim() == 2 and (".layers.0." in n or ".h.0." in n))
    weights[name] = weights[name].flip(0).contiguous()  # same values, norm and mean: only the order moves
    save_file(weights, str(other / "model.safetensors"))
    made["base"] = str(other)
    with pytest.raises(Exception, match="trained on other base weights") as caught:
        engine({"eps": 0.5})
    assert isinstance(caught.value, HeadsFolderError) or "ignore_base_mismatch" in str(caught.value)


def test_vllm_command_line_runs_on_the_cpu_build():
    """`python -m hf_earlyexit_vllm.cli` is vLLM's own command line (`vllm serve ...`), which on the CPU build
    (distribution `vllm-cpu`) fails at its version lookup; the wrapper answers it."""
    import importlib.metadata

    done = subprocess.run([sys.executable, "-m", "hf_earlyexit_vllm.cli", "--version"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == importlib.metadata.version("vllm-cpu") + "+cpu"


def test_tools_importable_without_hf_earlyexit():
    """The plugin runs beside vLLM alone: hf-earlyexit (which needs a newer transformers) is not importable here."""
    code = "import importlib.util, sys; sys.exit(importlib.util.find_spec('hf_earlyexit') is not None)"
    assert subprocess.run([sys.executable, "-c", code], cwd="/").returncode == 0
