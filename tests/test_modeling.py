"""EarlyExitForCausalLM: forward against the base model, heads, save/load round trips and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_decoding import set_median_thresholds
from tiny import ARCHS, batch, save_tiny_base, tiny_model
from transformers import AutoModelForCausalLM, OPTConfig

import hf_earlyexit
from hf_earlyexit import EarlyExitConfig, EarlyExitForCausalLM, HeadsMismatchError, UnsupportedArchitectureError
from hf_earlyexit.modeling.base_earlyexit import (
    is_legacy_fingerprint,
    legacy_weight_fingerprint,
    weight_fingerprint,
)
from hf_earlyexit.modeling.fingerprint_earlyexit import fingerprint_mismatch

HEAD_SETUPS = {
    "paper_full": {"head": "paper"},
    "paper_draft_scratch": {"head": "paper", "head_init": "scratch", "draft_token_ids": list(range(40, 90))},
    "shared_lowrank_draft": {"head": "shared", "adapter_rank": 4, "draft_token_ids": list(range(10, 60))},
    "shared_full": {"head": "shared"},
    "context_lowrank": {"head": "context", "adapter_rank": 4, "context_rank": 3},
    "context_draft": {"head": "context", "adapter_rank": 4, "draft_token_ids": list(range(5, 70)),
                      "block_delta_bits": 6},  # blocks stored as quantised changes: remote code reads them too
    "context_last_full": {"head": "context", "context_init": "last"},
}


def positions(mask):
    return (mask.cumsum(1) - 1).clamp(min=0)


def perturb_heads(model: EarlyExitForCausalLM, seed: int = 0) -> None:
    """Make every head differ from its initial value, so that a round trip that loses weights is caught."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.heads.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_returns_base_logits_and_exit_logits(arch):
    base = tiny_model(arch)
    model = EarlyExitForCausalLM.from_base(base, exit_layers=[1, 3])
    ids, mask = batch([9, 5, 7])
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask, position_ids=positions(mask), output_hidden_states=True)
        out = model(ids, attention_mask=mask, output_hidden_states=True)
    m = mask.bool()
    torch.testing.assert_close(out.logits[m], ref.logits[m], rtol=1e-5, atol=1e-5)
    assert model.get_base_model() is base
    for j, k in enumerate([1, 3]):
        torch.testing.assert_close(out.exit_hidden_states[j][m], ref.hidden_states[k][m])
        # a paper head copied from the LM head is the model's own final norm + head applied early
        expected = model.engine.final_logits(ref.hidden_states[k])
        torch.testing.assert_close(out.exit_logits[j][m], expected[m], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("setup", HEAD_SETUPS.values(), ids=HEAD_SETUPS.keys())
def test_draft_vocab_heads_are_the_matching_columns(setup):
    base = tiny_model("llama")
    model = EarlyExitForCausalLM.from_base(base, exit_layers=[2], **setup)
    ids, _ = batch([6])
    with torch.no_grad():
        # a context head's block starts as a copy of the next layer: the model's own state one layer deeper
        depth = 3 if setup["head"] == "context" else 2
        hidden = base(input_ids=ids, output_hidden_states=True).hidden_states[depth]
        head_logits = model(ids).exit_logits[0]
        head = model.exit_heads[0]
        if setup.get("head_init") != "scratch" and setup.get("context_init", "next") == "next":
            # copied / shared heads start as the model's head applied early
            full = model.engine.final_logits(hidden)
            ids_ = setup.get("draft_token_ids")
            if ids_ is None:
                torch.testing.assert_close(head_logits, full)
            else:  # the draft columns, plus one "other" logit that starts at 0
                torch.testing.assert_close(head_logits[..., :-1], full[..., ids_])
                assert torch.equal(head_logits[..., -1], torch.zeros_like(head_logits[..., -1]))
    ids_ = setup.get("draft_token_ids")
    if ids_ is None:
        assert head_logits.shape[-1] == base.config.vocab_size and not head.is_draft
        assert head.to_token_ids(torch.tensor([0, 96])).tolist() == [0, 96]
    else:
        assert head_logits.shape[-1] == len(ids_) + 1 and head.is_draft
        assert head.to_token_ids(torch.tensor([0, len(ids_) - 1, len(ids_)])).tolist() == [ids_[0], ids_[-1], -1]


def test_shared_head_does_not_own_or_save_the_lm_head(tmp_path):
    base = tiny_model("llama")
    model = EarlyExitForCausalLM.from_base(base, exit_layers=[1, 2], head="shared", adapter_rank=4)
    keys = list(model.heads.state_dict())
    assert not any("lm_head" in k for k in keys)
    assert sum(p.numel() for p in model.heads.parameters()) < base.lm_head.weight.numel()
    assert not any(p.requires_grad for p in base.parameters())


def test_cost_table_counts_layers_and_heads():
    model = EarlyExitForCausalLM.from_base(tiny_model("llama"), exit_layers=[1, 3], draft_token_ids=list(range(20)))
    rows = model.cost_table()
    layer = sum(p.numel() for p in model.backbone.model.layers[0].parameters() if p.dim() == 2)
    hidden = model.config.text_config.hidden_size
    assert [r["exit"] for r in rows] == ["exit@1", "exit@3", "full"]
    assert rows[0]["layer_macs"] == layer and rows[1]["layer_macs"] == 3 * layer and rows[2]["layer_macs"] == 4 * layer
    assert rows[0]["head_macs"] == 20 * hidden + hidden  # draft rows + the "other" logit
    assert rows[2]["head_macs"] == model.config.text_config.vocab_size * hidden


# -- save / load ---------------------------------------------------------------------------------------------------

BLOCK_IMPORT = textwrap.dedent(
    """
    import importlib.abc, sys
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "hf_earlyexit" or name.startswith("hf_earlyexit."):
                raise ImportError("hf_earlyexit is blocked in this process")
    sys.meta_path.insert(0, _Block())
    """
)

FRESH_LOAD = textwrap.dedent(
    """
    import json, sys, torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel, AutoModelForCausalLM
    try:
        import hf_earlyexit
        raise SystemExit("hf_earlyexit should not be importable here")
    except ImportError:
        pass
    jobs = json.loads(sys.argv[1])
    for job in jobs:
        inputs = load_file(job["inputs"])
        for auto in (AutoModelForCausalLM, AutoModel):
            model = auto.from_pretrained(job["folder"], trust_remote_code=True)
            assert type(model).__name__ == "EarlyExitForCausalLM", type(model)
            with torch.no_grad():
                out = model(inputs["ids"], attention_mask=inputs["mask"])
                early = model.generate(inputs["ids"], attention_mask=inputs["mask"], max_new_tokens=6, eps=0.5,
                                       do_sample=False, pad_token_id=0, eos_token_id=None)
            save_file({f"exit{j}": t.contiguous() for j, t in enumerate(out.exit_logits)} | {"logits": out.logits}
                      | {"early_exit": early},
                      job["folder"] + f"/../out_{auto.__name__}.safetensors")
    """
)


@pytest.fixture(scope="module")
def saved_folders(tmp_path_factory):
    """For every architecture: a saved base, heads saved from it, the inputs and the expected outputs."""
    root = tmp_path_factory.mktemp("roundtrip")
    jobs, expected = [], {}
    for i, arch in enumerate(ARCHS):
        work = root / arch
        base_path = save_tiny_base(arch, work / "base", seed=i)
        setup = list(HEAD_SETUPS.values())[i % len(HEAD_SETUPS)]
        model = EarlyExitForCausalLM.from_base(base_path, exit_layers=[1, 2], **setup)
        perturb_heads(model, seed=i)
        set_median_thresholds(model, key="0.5")
        model.save_pretrained(work / "heads")
        if setup.get("block_delta_bits"):  # stored lossily: the reference is what our own loader reads back
            model = EarlyExitForCausalLM.from_pretrained(work / "heads")
        ids, mask = batch([9, 5, 7])
        save_file({"ids": ids, "mask": mask}, work / "inputs.safetensors")
        with torch.no_grad():
            expected[arch] = model(ids, attention_mask=mask)
        expected[arch, "early_exit"] = model.generate(ids, attention_mask=mask, max_new_tokens=6, eps=0.5,
                                                      do_sample=False, pad_token_id=0, eos_token_id=None)
        jobs.append({"folder": str(work / "heads"), "inputs": str(work / "inputs.safetensors")})
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_IMPORT + FRESH_LOAD, json.dumps(jobs)],
        capture_output=True, text=True, env=env, cwd=root, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return root, expected


@pytest.mark.parametrize("auto", ["AutoModelForCausalLM", "AutoModel"])
@pytest.mark.parametrize("arch", ARCHS)
def test_fresh_process_remote_code_load_gives_identical_heads(saved_folders, arch, auto):
    from safetensors.torch import load_file

    root, expected = saved_folders
    got = load_file(root / arch / f"out_{auto}.safetensors")
    for j, logits in enumerate(expected[arch].exit_logits):
        assert torch.equal(got[f"exit{j}"], logits)
    assert torch.equal(got["logits"], expected[arch].logits)
    assert torch.equal(got["early_exit"], expected[arch, "early_exit"])  # early-exit decoding travels with the code


def test_saved_folder_is_small_and_safe(saved_folders):
    root, _ = saved_folders
    folder = root / "llama" / "heads"
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "exit_heads.safetensors", "modeling_earlyexit.py", "configuration_earlyexit.py"} <= names
    assert "adapter_config.json" not in names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    assert "tokenizer.json" in names  # the base was loaded by name, so its tokenizer travels with the heads
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_earlyexit.EarlyExitForCausalLM"
    assert config["base_model_name_or_path"].endswith("base")


def test_attach_saved_heads_to_a_base_you_hold(saved_folders):
    root, expected = saved_folders
    base = AutoModelForCausalLM.from_pretrained(root / "gpt2" / "base")
    model = EarlyExitForCausalLM.from_pretrained(root / "gpt2" / "heads", base_model=base)
    assert model.get_base_model() is base
    ids, mask = batch([9, 5, 7])
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
    for got, want in zip(out.exit_logits, expected["gpt2"].exit_logits, strict=True):
        assert torch.equal(got, want)


def test_load_returns_model_and_tokenizer(saved_folders):
    root, expected = saved_folders
    model, tokenizer = hf_earlyexit.load(str(root / "phi" / "heads"))
    assert isinstance(model, EarlyExitForCausalLM) and tokenizer.decode(tokenizer("ab")["input_ids"]) == "ab"
    fresh, tok2 = hf_earlyexit.load(str(root / "phi" / "base"), exit_layers=[2])
    assert fresh.config.exit_layers == [2] and tok2 is not None


# -- bad input -----------------------------------------------------------------------------------------------------


def test_unknown_architecture_lists_supported_ones():
    config = OPTConfig(vocab_size=50, hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2,
                       word_embed_proj_dim=16, max_position_embeddings=32)
    base = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedArchitectureError, match="model_type='opt'.*gemma3_text.*gpt2.*gpt_neox.*llama"):
        EarlyExitForCausalLM.from_base(base, exit_layers=[1])


@pytest.mark.parametrize(
    ("layers", "message"),
    [([0], "exit layer 0 is outside 1..3"), ([4], "exit layer 4 is outside 1..3"), ([2, 2], "duplicates"),
     ([3, 1], "increasing"), ([], "empty")],
)
def test_bad_exit_layers_are_refused(layers, message):
    with pytest.raises(ValueError, match=message):
        EarlyExitForCausalLM.from_base(tiny_model("llama"), exit_layers=layers)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("head", "mlp", "head_type='mlp' is not one of paper, shared"), ("eps", 1.5, r"eps=1.5 must lie in \(0, 1\]"),
     ("metric", "vibes", "metric='vibes'"), ("draft_vocab_size", 1000, "draft_vocab_size=1000 must lie in 1..97"),
     ("draft_token_ids", [5, 5], "duplicates"), ("draft_token_ids", [1, 500], "0..96")],
)
def test_bad_head_options_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        EarlyExitForCausalLM.from_base(tiny_model("llama"), exit_layers=[1], **{field: value})


@pytest.fixture()
def llama_heads(tmp_path):
    base_path = save_tiny_base("llama", tmp_path / "base", seed=0)
    model = EarlyExitForCausalLM.from_base(base_path, exit_layers=[1, 2])
    model.save_pretrained(tmp_path / "heads")
    return tmp_path / "heads"


def _other_llama(**changes):
    config = tiny_model("llama").config
    for key, value in changes.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize(
    ("changes", "message"),
    [({"hidden_size": 48}, "hidden_size=32.*hidden_size=48"), ({"vocab_size": 120}, "vocab_size=97.*vocab_size=120"),
     ({"num_hidden_layers": 5}, "num_hidden_layers=4.*num_hidden_layers=5")],
)
def test_heads_for_another_base_name_both_values(llama_heads, changes, message):
    with pytest.raises(HeadsMismatchError, match=message):
        EarlyExitForCausalLM.from_pretrained(llama_heads, base_model=_other_llama(**changes))


def test_heads_for_other_weights_of_the_same_shape_are_refused(llama_heads):
    other = tiny_model("llama", seed=123)
    message = r"weight fingerprint part 0 \(embedding\) is .* for the recorded base '.*base' but .* attached to"
    with pytest.raises(HeadsMismatchError, match=message):
        EarlyExitForCausalLM.from_pretrained(llama_heads, base_model=other)


def permuted(model):
    """`model` with the elements of every weight tensor shuffled: every mean |w| and norm stays the same."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            flat = param.flatten()
            param.copy_(flat[torch.randperm(flat.numel(), generator=g)].view_as(param))
    return model


def test_heads_for_permuted_weights_are_refused(llama_heads):
    """Means survive a permutation of a tensor's elements; the fingerprint's projections do not."""
    base = AutoModelForCausalLM.from_pretrained(llama_heads.parent / "base")
    EarlyExitForCausalLM.from_pretrained(llama_heads, base_model=base)  # the same weights load
    with pytest.raises(HeadsMismatchError, match=r"weight fingerprint part 0 \(embedding\)"):
        EarlyExitForCausalLM.from_pretrained(llama_heads, base_model=permuted(base))
    fingerprint = weight_fingerprint(tiny_model("llama"))
    assert len(fingerprint) == 4 + 3 and all(len(part) == 5 for part in fingerprint)


@pytest.mark.parametrize("arch", ARCHS)
def test_fingerprint_survives_dtype_casts_and_tells_permutations_apart(arch):
    model = tiny_model(arch)
    fingerprint = weight_fingerprint(model)
    for dtype in (torch.bfloat16, torch.float16):
        assert fingerprint_mismatch(fingerprint, weight_fingerprint(tiny_model(arch).to(dtype))) is None, dtype
    assert fingerprint_mismatch(fingerprint, weight_fingerprint(permuted(tiny_model(arch)))) is not None
    assert fingerprint_mismatch(fingerprint, weight_fingerprint(tiny_model(arch, seed=1))) == 0


def test_configs_with_the_legacy_fingerprint_still_load_and_are_checked(llama_heads):
    """Folders written before the projections record one mean |w| per part: they load on their base (also in bf16)
    and other weights are still refused."""
    base = AutoModelForCausalLM.from_pretrained(llama_heads.parent / "base")
    config = json.loads((llama_heads / "config.json").read_text())
    config["base_fingerprint"] = legacy_weight_fingerprint(base)
    assert is_legacy_fingerprint(config["base_fingerprint"])
    (llama_heads / "config.json").write_text(json.dumps(config))
    model = EarlyExitForCausalLM.from_pretrained(llama_heads)
    assert model.config.base_fingerprint == config["base_fingerprint"]
    EarlyExitForCausalLM.from_pretrained(llama_heads, base_model=base.to(torch.bfloat16))
    with pytest.raises(HeadsMismatchError, match="weight fingerprint part 0 .* for the recorded base"):
        EarlyExitForCausalLM.from_pretrained(llama_heads, base_model=tiny_model("llama", seed=123))


def test_fingerprint_survives_a_bf16_base(llama_heads):
    """The fingerprint tells checkpoints apart but not dtypes: bf16 weights of the same base are accepted."""
    base = AutoModelForCausalLM.from_pretrained(llama_heads.parent / "base", dtype=torch.bfloat16)
    model = EarlyExitForCausalLM.from_pretrained(llama_heads, base_model=base)
    reference = EarlyExitForCausalLM.from_pretrained(llama_heads)
    ids, _ = batch([6])
    with torch.no_grad():
        got, want = model(ids).exit_logits[0], reference(ids).exit_logits[0]
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)


def test_pickled_heads_are_refused(llama_heads):
    weights = llama_heads / "exit_heads.safetensors"
    torch.save({"x": torch.zeros(1)}, llama_heads / "exit_heads.bin")
    weights.unlink()
    with pytest.raises(ValueError, match=r"exit_heads.bin.*never unpickles"):
        EarlyExitForCausalLM.from_pretrained(llama_heads)


def test_a_pickle_named_safetensors_is_refused(llama_heads):
    torch.save({"x": torch.zeros(1)}, llama_heads / "exit_heads.safetensors")
    with pytest.raises(ValueError, match="corrupt or not a safetensors file"):
        EarlyExitForCausalLM.from_pretrained(llama_heads)


def test_truncated_head_file_is_a_clear_error(llama_heads):
    weights = llama_heads / "exit_heads.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or not a safetensors file"):
        EarlyExitForCausalLM.from_pretrained(llama_heads)


def test_head_file_with_wrong_shapes_names_the_tensor(llama_heads):
    weights = llama_heads / "exit_heads.safetensors"
    from safetensors.torch import load_file

    state = load_file(weights)
    key = next(k for k in state if k.endswith("linear.weight"))
    state[key] = torch.zeros(3, 3)
    save_file(state, weights)
    with pytest.raises(HeadsMismatchError, match=rf"{key}.*\(3, 3\).*expected \(97, 32\)"):
        EarlyExitForCausalLM.from_pretrained(llama_heads)


def test_saving_over_a_non_empty_folder_needs_overwrite(llama_heads, tmp_path):
    model = EarlyExitForCausalLM.from_pretrained(llama_heads)
    target = tmp_path / "occupied"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save_pretrained(target)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "heads", "occupied"]  # no staging left behind
    model.save_pretrained(target, overwrite=True)
    assert (target / "exit_heads.safetensors").exists() and not (target / "notes.txt").exists()


def test_failed_save_leaves_nothing_behind(llama_heads, tmp_path, monkeypatch):
    model = EarlyExitForCausalLM.from_pretrained(llama_heads)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("hf_earlyexit.modeling.modeling_earlyexit.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "new")
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(llama_heads, overwrite=True)
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "heads"]
    assert (llama_heads / "exit_heads.safetensors").exists()


def test_config_validates_itself():
    text = tiny_model("llama").config
    with pytest.raises(ValueError, match="thresholds.*has 1 values but there are 2 exits"):
        EarlyExitConfig(text_config=text, exit_layers=[1, 2], thresholds={"0.9": [0.5]})
    assert EarlyExitConfig(text_config=text).exit_layers == [1, 2, 3]


def test_default_exits_are_regular_intervals():
    from hf_earlyexit.modeling.configuration_earlyexit import default_exit_layers

    assert default_exit_layers(32) == [6, 12, 18, 24]  # the paper's Phi-2 placement
    assert default_exit_layers(18) == [3, 6, 9, 12]
    assert default_exit_layers(2) == [1]


@pytest.mark.parametrize("arch", ARCHS)
def test_low_rank_context_blocks_save_only_their_deltas_and_norms(arch, tmp_path):
    base = tiny_model(arch)
    full = EarlyExitForCausalLM.from_base(base, exit_layers=[1, 2], head="context", adapter_rank=4)
    low = EarlyExitForCausalLM.from_base(base, exit_layers=[1, 2], head="context", adapter_rank=4, context_rank=2)
    ids, mask = batch([7, 5])
    with torch.no_grad():  # deltas start at zero: the same head as a full copy
        for a, b in zip(full(ids, attention_mask=mask).exit_logits, low(ids, attention_mask=mask).exit_logits,
                        strict=True):
            torch.testing.assert_close(a[mask.bool()], b[mask.bool()], rtol=1e-5, atol=1e-5)
    full_size = sum(p.numel() for p in full.heads.parameters())
    low_size = sum(p.numel() for p in low.heads.parameters())
    assert low_size < full_size / 2
    from hf_earlyexit.modeling.costs_earlyexit import module_cost
    from hf_earlyexit.modeling.heads_earlyexit import LowRankDelta

    for head, full_cost, low_cost in zip(low.exit_heads, full.costs.contexts, low.costs.contexts, strict=True):
        deltas = sum((module_cost(m) for m in head.block.modules() if isinstance(m, LowRankDelta)),
                     module_cost(torch.nn.Identity()))
        assert deltas.macs > 0 and low_cost == full_cost + deltas  # the block still reads the layer's projections
    perturb_heads(low)
    low.save_pretrained(tmp_path / "heads")
    again = EarlyExitForCausalLM.from_pretrained(tmp_path / "heads", base_model=base)
    assert again.config.context_rank == 2
    with torch.no_grad():
        for a, b in zip(low(ids, attention_mask=mask).exit_logits, again(ids, attention_mask=mask).exit_logits,
                        strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("arch", ["gemma3_text", "gpt2"])
def test_bfloat16_storage_halves_the_file_and_only_rounds_the_weights(arch, tmp_path):
    base = tiny_model(arch)
    model = EarlyExitForCausalLM.from_base(base, exit_layers=[1, 2], head="context", adapter_rank=4,
                                           draft_vocab_size=50, heads_dtype="bfloat16")
    perturb_heads(model)
    model.save_pretrained(tmp_path / "bf16")
    model.config.heads_dtype = "float32"
    model.save_pretrained(tmp_path / "fp32")
    from safetensors import safe_open

    with safe_open(tmp_path / "bf16" / "exit_heads.safetensors", "pt") as f:
        stored = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert stored == {"BF16", "I64"}  # floating weights halve; the draft vocabulary ids stay exact
    sizes = [(tmp_path / name / "exit_heads.safetensors").stat().st_size for name in ("bf16", "fp32")]
    assert sizes[0] < 0.6 * sizes[1]
    again = EarlyExitForCausalLM.from_pretrained(tmp_path / "bf16", base_model=base)
    assert again.config.heads_dtype == "bfloat16"
    for key, value in model.heads.state_dict().items():  # loaded in the model's dtype, each weight rounded once
        loaded = again.heads.state_dict()[key]
        assert loaded.dtype == value.dtype
        expected = value.to(torch.bfloat16).to(value.dtype) if value.is_floating_point() else value
        assert torch.equal(loaded, expected), key
    again.save_pretrained(tmp_path / "again")  # a second save keeps the storage dtype and rounds nothing more
    assert (tmp_path / "again" / "exit_heads.safetensors").read_bytes() == \
        (tmp_path / "bf16" / "exit_heads.safetensors").read_bytes()


@pytest.mark.parametrize("arch", ARCHS)
def test_block_delta_storage_keeps_each_block_weight_within_half_a_step(arch, tmp_path):
    """Full context blocks stored as their quantised change from the layer they copy: a fraction of the bytes, each
    block matrix within half a quantisation step of the trained one, everything else as `heads_dtype` stores it."""
    from hf_earlyexit.modeling.storage_earlyexit import DELTA_GROUP

    base = tiny_model(arch)
    model = EarlyExitForCausalLM.from_base(base, exit_layers=[1, 2], head="context", adapter_rank=4,
                                           draft_vocab_size=50, heads_dtype="bfloat16")
    perturb_heads(model)
    model.save_pretrained(tmp_path / "whole")
    origins = model._block_origins()
    assert origins and all(".block." in key for key in origins)
    ids, mask = batch([7, 4])
    for bits in (4, 8):
        model.config.block_delta_bits = bits
        model.save_pretrained(tmp_path / f"b{bits}")
        assert json.loads((tmp_path / f"b{bits}" / "config.json").read_text())["format_version"] == 2
        again = EarlyExitForCausalLM.from_pretrained(tmp_path / f"b{bits}", base_model=base)
        assert again.config.block_delta_bits == bits
        trained, loaded = model.heads.state_dict(), again.heads.state_dict()
        for key, value in trained.items():
            assert loaded[key].dtype == value.dtype, key
            if key in origins:  # within half a step of its group's scale (absmax / (2^(bits-1) - 1)), plus rounding
                delta = (value - origins[key]).reshape(-1)
                delta = torch.nn.functional.pad(delta, (0, -delta.numel() % DELTA_GROUP)).view(-1, DELTA_GROUP)
                step = delta.abs().amax(dim=1, keepdim=True) / (2 ** (bits - 1) - 1)
                error = torch.nn.functional.pad((loaded[key] - value).reshape(-1), (0, -value.numel() % DELTA_GROUP))
                assert (error.view(-1, DELTA_GROUP).abs() <= 0.51 * step + 1e-6).all(), key
                assert not torch.equal(loaded[key], origins[key]), key  # the change was kept, not dropped
            else:
                expected = value.to(torch.bfloat16).to(value.dtype) if value.is_floating_point() else value
                assert torch.equal(loaded[key], expected), key
        with torch.no_grad():
            for a, b in zip(model(ids, attention_mask=mask).exit_logits, again(ids, attention_mask=mask).exit_logits,
                            strict=True):
                torch.testing.assert_close(b, a, rtol=0.1, atol=0.1 if bits == 4 else 0.02)
    sizes = {name: (tmp_path / name / "exit_heads.safetensors").stat().st_size for name in ("whole", "b4", "b8")}
    assert sizes["b4"] < sizes["b8"] < sizes["whole"]


def test_block_delta_storage_refuses_bad_settings_and_damaged_entries(tmp_path):
    base = tiny_model("llama")
    with pytest.raises(ValueError, match="block_delta_bits=2 must be a number of bits in 3..8"):
        EarlyExitForCausalLM.from_base(base, exit_layers=[1], head="context", block_delta_bits=2)
    with pytest.raises(ValueError, match="block_delta_bits=4 stores full context blocks; these heads have none "
                                         r"\(head_type='shared'"):
        EarlyExitForCausalLM.from_base(base, exit_layers=[1], head="shared", block_delta_bits=4)
    with pytest.raises(ValueError, match="context_rank=2"):
        EarlyExitForCausalLM.from_base(base, exit_layers=[1], head="context", context_rank=2, block_delta_bits=4)
    model = EarlyExitForCausalLM.from_base(base, exit_layers=[1, 2], head="context", block_delta_bits=5)
    perturb_heads(model)
    model.save_pretrained(tmp_path / "heads")
    path = tmp_path / "heads" / "exit_heads.safetensors"
    state = load_file(path)
    key = next(k for k in state if k.endswith(".delta_codes"))
    name = key.removesuffix(".delta_codes")
    for damage, message in (
        (lambda s: s.pop(key), f"'{name}.delta_codes' and '{name}.delta_scales' are expected"),
        (lambda s: s.update({key: s[key][:-1]}), f"'{name}': codes are torch.uint8 of shape"),
        (lambda s: s.update({name + ".delta_scales": s[name + ".delta_scales"].float()}), "expected bfloat16"),
        (lambda s: s.update({name: torch.zeros(1)}), f"'{name}' is stored whole"),
    ):
        broken = dict(state)
        damage(broken)
        save_file(broken, path)
        with pytest.raises(HeadsMismatchError, match=message):
            EarlyExitForCausalLM.from_pretrained(tmp_path / "heads", base_model=base)


def test_unknown_heads_dtype_is_refused():
    with pytest.raises(ValueError, match="heads_dtype='float16' is not one of float32, bfloat16"):
        EarlyExitForCausalLM.from_base(tiny_model("llama"), exit_layers=[1], heads_dtype="float16")
