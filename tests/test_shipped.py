"""The heads shipped inside the package: intact (manifest), small, loadable on the embedded model, and drafting."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import save_tiny_base

from hf_earlyexit import EarlyExitForCausalLM, load, load_tokenizer, shipped_dir
from hf_earlyexit.loading import MANIFEST, verify
from hf_earlyexit.publish.ship import LEFT_OUT, ShipArgs, ship


def test_shipped_files_match_their_manifest_and_hold_only_the_heads_own():
    manifest = verify()
    files = set(manifest["files"])
    assert {"config.json", "exit_heads.safetensors", "calibration.safetensors", "README.md"} <= files
    assert not files & set(LEFT_OUT) and not any(name.endswith("_earlyexit.py") for name in files)
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl", ".gguf")) for name in files)
    size = sum((shipped_dir() / name).stat().st_size for name in files)
    # context heads: per exit a full decoder block stored as 6-bit changes from the layer it copies, its norms and a
    # rank-64 adapter in bfloat16 (18.6 MB for four exits; whole bf16 blocks took 45.8 MB, float32 91 MB). Every file
    # stays under the repository's 20 MB limit for tracked files.
    assert size < 20 * 2**20, f"shipped heads take {size / 2**20:.1f} MiB"
    assert manifest["command"][:2] == ["hf-earlyexit", "ship"]
    assert f"\n# {shipped_dir().name}\n" in (shipped_dir() / "README.md").read_text()  # not its staging name


def test_a_changed_or_extra_shipped_file_is_named(tmp_path):
    copy = tmp_path / "heads"
    shutil.copytree(shipped_dir(), copy)
    weights = copy / "exit_heads.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="exit_heads.safetensors has SHA-256"):
        verify(copy)
    shutil.copyfile(shipped_dir() / "exit_heads.safetensors", weights)
    verify(copy)
    (copy / "notes.txt").write_text("extra")
    with pytest.raises(ValueError, match="notes.txt"):
        verify(copy)
    (copy / "notes.txt").unlink()
    (copy / MANIFEST).unlink()
    with pytest.raises(FileNotFoundError, match="MANIFEST.json"):
        verify(copy)


@pytest.mark.parametrize("tamper", ["threshold", "weights"])
def test_loading_tampered_shipped_heads_is_refused_before_the_base_loads(tmp_path, monkeypatch, tamper):
    """`load("shipped")` checks the manifest every time: a changed threshold or head tensor is refused by file name."""
    import hf_earlyexit.loading as loading

    copy = tmp_path / "heads"
    shutil.copytree(shipped_dir(), copy)
    if tamper == "threshold":
        config = json.loads((copy / "config.json").read_text())
        config["thresholds"]["0.9"][0] = -1.0
        (copy / "config.json").write_text(json.dumps(config, indent=2))
        name = "config.json"
    else:
        tensors = load_file(copy / "exit_heads.safetensors")
        key = sorted(tensors)[0]
        tensors[key] = torch.zeros_like(tensors[key])
        save_file(tensors, copy / "exit_heads.safetensors", metadata={"format": "pt"})
        name = "exit_heads.safetensors"
    monkeypatch.setattr(loading, "shipped_dir", lambda: copy)

    def never(*args, **kwargs):
        raise AssertionError("the shipped heads were loaded without checking their manifest")

    monkeypatch.setattr(loading.EarlyExitForCausalLM, "from_pretrained", never)
    monkeypatch.setattr(loading.EarlyExitForCausalLM, "from_base", never)
    with pytest.raises(ValueError, match=rf"shipped file {name} has SHA-256 .* reinstall"):
        load("shipped", dtype=torch.float32)


def test_ship_refuses_heads_that_are_not_calibrated_heads_of_the_embedded_model(tmp_path):
    model = EarlyExitForCausalLM.from_base(save_tiny_base("llama", tmp_path / "base"), exit_layers=[1, 2])
    model.config.training = {"steps": 1}
    model.save_pretrained(tmp_path / "heads")
    with pytest.raises(ValueError, match="calibrated heads of 'embedded'"):
        ship(ShipArgs(model=str(tmp_path / "heads"), target=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_shipped_heads_load_on_the_embedded_model_draft_and_stay_lossless(tmp_path):
    model, tokenizer = load("shipped", dtype=torch.float32)  # the config's weight fingerprint is checked here
    assert model.config.base_model_name_or_path == "embedded" and model.config.training
    assert model.config.thresholds and model.calibration_stats
    text = "The capital of France is"
    assert tokenizer(text)["input_ids"] == load_tokenizer("embedded")(text)["input_ids"]  # the base's, not empty
    assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"]
    inputs = tokenizer([text], return_tensors="pt")
    plain = model.generate(**inputs, mode="plain", max_new_tokens=24, do_sample=False)
    model.reset_exit_stats()
    dssd = model.generate(**inputs, mode="dssd", eps=0.8, max_new_tokens=24, do_sample=False)
    assert torch.equal(plain, dssd)
    assert model.exit_stats.accepted > 0  # trained heads draft tokens the full model keeps

    # shipping again from a complete saved folder gives the same heads, without tokenizer and code
    model.save_pretrained(tmp_path / "saved")
    manifest = ship(ShipArgs(model=str(tmp_path / "saved"), target=str(tmp_path / "again")))
    shipped = verify()["files"]
    for name in ("config.json", "exit_heads.safetensors", "calibration.safetensors"):
        assert manifest["files"][name] == shipped[name], name
    assert not set(manifest["files"]) & set(LEFT_OUT)
    assert "\n# again\n" in (tmp_path / "again" / "README.md").read_text()
    with pytest.raises(FileExistsError, match="--overwrite"):
        ship(ShipArgs(model=str(tmp_path / "saved"), target=str(tmp_path / "again")))
