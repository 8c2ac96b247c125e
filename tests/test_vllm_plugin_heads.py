"""The vLLM plugin's own reader of heads folders (vllm_plugin/hf_earlyexit_vllm: torch + safetensors only, no vLLM
needed here), checked against hf-earlyexit's loader: the same block weights, the same base fingerprint, the same
thresholds, and damaged folders refused by name. The plugin's forward inside vLLM is tested in its own venv
(vllm_plugin/tests)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import tiny_model

from hf_earlyexit import EarlyExitForCausalLM
from hf_earlyexit.modeling.architectures_earlyexit import model_parts
from hf_earlyexit.modeling.base_earlyexit import weight_fingerprint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "vllm_plugin"))
from hf_earlyexit_vllm.heads import HeadsFolderError, confidence, read_heads_folder  # noqa: E402
from hf_earlyexit_vllm.model import _FingerprintStream  # noqa: E402

from hf_earlyexit.modeling.metrics_earlyexit import confidence as our_confidence  # noqa: E402


def _heads(arch: str, tmp_path: Path, **setup) -> tuple[EarlyExitForCausalLM, Path]:
    base = tiny_model(arch)
    model = EarlyExitForCausalLM.from_base(base, exit_layers=[1, 2], adapter_rank=4, draft_vocab_size=50, **setup)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.heads.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model.config.thresholds = {"0.9": [0.3, None], "0.5": [0.1, 0.2]}
    model.save_pretrained(tmp_path / "heads")
    return model, tmp_path / "heads"


@pytest.mark.parametrize("setup", [
    {"head": "context", "block_delta_bits": 6},
    {"head": "context"},
    {"head": "context", "context_rank": 2},
    {"head": "shared"},
    {"head": "context", "block_delta_bits": 6, "arch": "gpt2"},
    {"head": "context", "block_delta_bits": 6, "arch": "gpt_neox"},
    {"head": "context", "arch": "phi"},
], ids=["context_6bit", "context_whole", "context_rank2", "shared", "gpt2_context_6bit", "gpt_neox_context_6bit",
        "phi_context_whole"])
def test_plugin_reads_the_blocks_hf_earlyexit_loads(setup, tmp_path):
    """Every block weight the plugin rebuilds (base layer + stored change / low-rank delta, or stored whole) equals
    what hf-earlyexit's own loader puts in the head; thresholds and metric are the config's."""
    setup = dict(setup)
    model, folder = _heads(setup.pop("arch", "gemma3_text"), tmp_path, **setup)
    ours = EarlyExitForCausalLM.from_pretrained(folder, base_model=model.get_base_model())
    heads = read_heads_folder(folder)
    assert heads.exit_layers == [1, 2] and heads.metric == ours.config.metric
    assert heads.thresholds_at(0.9) == [0.3, None] and heads.thresholds_at(1.0) == [None, None]
    layers = model_parts(model.get_base_model()).layers  # GPT-2: `transformer.h`
    for j, exit_layer in enumerate(heads.exit_layers):
        if setup["head"] != "context":
            assert not heads.head_tensors(j, "block.")
            continue
        assert heads.block_source[j] == exit_layer  # context_init "next": the layer right after the exit
        base_layer = {name: p.detach() for name, p in layers[exit_layer].named_parameters()}
        rebuilt = heads.block_weights(j, base_layer)
        block = ours.heads[j].block
        expected = {}
        for name, module in block.named_modules():
            if hasattr(module, "down") and hasattr(module, "base"):  # a low-rank delta over the frozen projection
                expected[f"{name}.weight"] = module.base.weight + module.up.weight @ module.down.weight
        for name, p in block.named_parameters():
            if ".down." not in name and ".up." not in name:
                expected[name] = p
        assert set(rebuilt) == set(expected)
        for name, value in expected.items():
            torch.testing.assert_close(rebuilt[name].float(), value.detach().float(), rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ["gemma3_text", "llama", "qwen3", "gpt2", "gpt_neox", "phi"])
def test_plugin_fingerprint_of_streamed_checkpoint_tensors_equals_ours(arch):
    """The fingerprint computed from HF-named tensors as they stream past (in checkpoint order, tied weights named
    once, under the names checkpoints keep: GPT-NeoX's LM head as `embed_out`) is hf-earlyexit's
    `weight_fingerprint` of the loaded model; a changed tensor changes it."""
    base = tiny_model(arch)
    stream = _FingerprintStream(base.config)
    state = base.state_dict()
    saved_as = {"lm_head.weight": "embed_out.weight"} if arch == "gpt_neox" else {}
    for name in sorted(state):  # checkpoint files list tensors by name, not in module order
        if name == "lm_head.weight" and base.config.tie_word_embeddings:
            continue
        stream.add(saved_as.get(name, name), state[name])
    assert stream.result() == weight_fingerprint(base)
    other = _FingerprintStream(base.config)
    for name in sorted(state):
        other.add(name, state[name] * (1.5 if ".layers.1." in name or ".h.1." in name else 1.0))
    assert other.result() != weight_fingerprint(base)


def test_plugin_confidence_equals_ours():
    logits = torch.randn(5, 51, generator=torch.Generator().manual_seed(3))
    for metric in ("breaking_ties", "max_prob", "entropy"):
        torch.testing.assert_close(confidence(metric, logits), our_confidence(metric, logits=logits))


def test_plugin_refuses_damaged_folders_by_name(tmp_path):
    _, folder = _heads("gemma3_text", tmp_path, head="context", block_delta_bits=6)
    config = json.loads((folder / "config.json").read_text())

    def damaged(name: str, change_config=None, change_tensors=None) -> Path:
        target = tmp_path / name
        target.mkdir()
        cfg = json.loads(json.dumps(config))
        if change_config:
            change_config(cfg)
        (target / "config.json").write_text(json.dumps(cfg))
        tensors = load_file(folder / "exit_heads.safetensors")
        if change_tensors:
            change_tensors(tensors)
        save_file(tensors, target / "exit_heads.safetensors")
        return target

    with pytest.raises(HeadsFolderError, match="is not a folder"):
        read_heads_folder(tmp_path / "missing")
    with pytest.raises(HeadsFolderError, match="format_version=9; this plugin reads formats 1..2"):
        read_heads_folder(damaged("newer", lambda c: c.update(format_version=9)))
    with pytest.raises(HeadsFolderError, match=r"exit_layers=\[2, 1\]: expected increasing"):
        read_heads_folder(damaged("order", lambda c: c.update(exit_layers=[2, 1])))
    with pytest.raises(HeadsFolderError, match="metric='hidden_similarity'"):
        read_heads_folder(damaged("metric", lambda c: c.update(metric="hidden_similarity")))
    with pytest.raises(HeadsFolderError, match=r"thresholds\['0.9'\]=\[0.3\]: expected 2 numbers"):
        read_heads_folder(damaged("thresholds", lambda c: c["thresholds"].update({"0.9": [0.3]})))
    with pytest.raises(HeadsFolderError, match="tensor '7.norm.weight' belongs to no exit"):
        read_heads_folder(damaged("stray", change_tensors=lambda t: t.update({"7.norm.weight": torch.ones(32)})))
    with pytest.raises(HeadsFolderError, match="0.token_ids must be distinct int64 token ids"):
        read_heads_folder(damaged("ids", change_tensors=lambda t: t.update(
            {"0.token_ids": torch.full_like(t["0.token_ids"], 10**6)})))
    with pytest.raises(HeadsFolderError, match="holds non-finite values"):
        read_heads_folder(damaged("nan", change_tensors=lambda t: t.update(
            {"1.norm.weight": torch.full_like(t["1.norm.weight"], float("nan"))})))
    with pytest.raises(HeadsFolderError, match="eps=0.7 is not calibrated"):
        read_heads_folder(folder).thresholds_at(0.7)
    pickled = damaged("pickle")
    (pickled / "exit_heads.safetensors").write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(HeadsFolderError, match="not a readable safetensors file"):
        read_heads_folder(pickled)
    heads = read_heads_folder(folder)
    with pytest.raises(HeadsFolderError, match="which the base layer it copies does not have"):
        heads.block_weights(0, {})


def test_plugin_draft_folder_names_the_family_class_and_links_the_base(tmp_path):
    """`write_draft_folder` writes the base's config with the plugin's class for the family and the drafter's exit,
    and links (not copies) the base's weights; a family without an early-exit class, or a non-integer exit, is refused
    by name."""
    import hf_earlyexit_vllm

    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    out = hf_earlyexit_vllm.write_draft_folder(base, tmp_path / "heads", 4, tmp_path / "draft")
    config = json.loads((Path(out) / "config.json").read_text())
    assert config["architectures"] == ["LlamaEarlyExitForCausalLM"]
    assert config["earlyexit"] == {"heads": str((tmp_path / "heads").resolve()), "draft_exit": 4}
    assert config["num_hidden_layers"] == json.loads((base / "config.json").read_text())["num_hidden_layers"]
    weights = Path(out) / "model.safetensors"
    assert weights.is_symlink() and weights.resolve() == (base / "model.safetensors").resolve()
    other = json.loads((base / "config.json").read_text())
    other["architectures"] = ["MambaForCausalLM"]
    (base / "config.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match=r"architectures \['MambaForCausalLM'\] have no early-exit class here"):
        hf_earlyexit_vllm.write_draft_folder(base, tmp_path / "heads", 4, tmp_path / "draft2")
    with pytest.raises(ValueError, match=r"exit_layer='4': expected the layer number"):
        hf_earlyexit_vllm.write_draft_folder(tmp_path / "draft", tmp_path / "heads", "4", tmp_path / "draft3")
