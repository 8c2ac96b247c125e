"""Heads as small Hub adapters: push (captured: only `HfApi`'s network methods are patched), cards, load by repo id.

The Hub is unreachable here. Pushes build the real folder and the fake `upload_folder` copies what would be
uploaded; "downloads" come from a Hugging Face cache filled with those folders (the normal `cached_file` path with
`local_files_only` / `HF_HUB_OFFLINE`), in this process and in a fresh one that cannot import hf_earlyexit.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results
from safetensors.torch import load_file, save_file
from test_decoding import set_median_thresholds
from test_modeling import BLOCK_IMPORT, perturb_heads
from tiny import batch, save_tiny_base, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from hf_earlyexit import EarlyExitConfig, EarlyExitForCausalLM, HeadsMismatchError
from hf_earlyexit.commands import cli
from hf_earlyexit.modeling.base_earlyexit import embedded_revision
from hf_earlyexit.modeling.configuration_earlyexit import FORMAT_VERSION, UnsupportedFormatError
from hf_earlyexit.modeling.folder_earlyexit import tensor_files
from hf_earlyexit.publish.card import render_card, validate_card
from hf_earlyexit.publish.hub import PushArgs, check_heads_folder

PACKAGE = Path(__file__).resolve().parents[1] / "hf_earlyexit" / "modeling"
CODE_FILES = {p.name for p in PACKAGE.glob("*_earlyexit.py")}
HEADS_FILES = {"config.json", "exit_heads.safetensors", "calibration.safetensors", "README.md", "tokenizer.json",
               "tokenizer_config.json"} | CODE_FILES
BASE_ID = "tiny-org/tiny-llama"
HEADS_ID = "me/tiny-heads"
TRAINING = {
    "steps": 3, "train_config": {"steps": 3, "batch_size": 2, "learning_rate": 1e-3, "lam": 0.1, "loss": "ce"},
    "data": {"prompts": ["Once upon a time", "The weather"], "max_new_tokens": 8, "temperature": 1.0, "top_k": 50,
             "sequences": 4, "tokens": 32, "text_files": None},
    "held_out": [{"exit": 1, "agreement": 0.25, "entropy": 2.0, "tokens": 10},
                 {"exit": 2, "agreement": 0.5, "entropy": 1.5, "tokens": 10}],
}
BENCH = {"dtype": "float32", "batch_size": 1, "max_new_tokens": 8, "threads": 2, "sets": {"varied": {"rows": [
    {"family": "plain", "label": "plain", "tokens_per_s": 10.0, "speedup": 1.0},
    {"family": "early_exit", "label": "early exit ε=0.5", "tokens_per_s": 13.5, "speedup": 1.35, "agreement": 0.9,
     "identical_sequences": 3, "macs_fraction": 0.8}]}}}
LM_EVAL = {"results": {"ee_capitals": {"alias": "ee_capitals", "acc,none": 0.5, "acc_stderr,none": 0.1}},
           "config": {"early_exit": {"eps": 0.5}}, "configs": {"ee_capitals": {"dataset_path": "json"}}}


# -- fixtures: a fake Hub (network methods only) and a Hub cache ---------------------------------------------------


class FakeHub:
    """Records `HfApi` network calls; `upload_folder` copies the folder it was given (what would be uploaded)."""

    def __init__(self, root: Path) -> None:
        self.root, self.calls, self.uploads = root, [], []

    def install(self, monkeypatch) -> None:
        hub = self

        def create_repo(api, repo_id, *, private=None, exist_ok=False, **kwargs):
            hub.calls.append(("create_repo", repo_id, {"private": private, "exist_ok": exist_ok, "token": api.token}))
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_branch(api, repo_id, *, branch, exist_ok=False, **kwargs):
            hub.calls.append(("create_branch", repo_id, {"branch": branch, "exist_ok": exist_ok}))

        def upload_folder(api, *, repo_id, folder_path, commit_message=None, revision=None, **kwargs):
            target = hub.root / f"upload{len(hub.uploads)}"
            ignore = shutil.ignore_patterns(*kwargs.get("ignore_patterns") or [])
            shutil.copytree(folder_path, target, ignore=lambda d, names: {n for n in names if n.startswith(".")}
                            | set(ignore(d, names)))
            hub.uploads.append(target)
            hub.calls.append(("upload_folder", repo_id, {"commit_message": commit_message, "revision": revision}))
            url = f"https://huggingface.co/{repo_id}/commit/{'0' * 40}"
            return CommitInfo(commit_url=url, commit_message=commit_message, commit_description="", oid="0" * 40)

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_branch", create_branch)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)

    @property
    def last(self) -> Path:
        assert len(self.uploads) >= 1, "nothing was uploaded"
        return self.uploads[-1]

    def names(self) -> list[str]:
        return [call[0] for call in self.calls]


@pytest.fixture()
def fake_hub(tmp_path, monkeypatch) -> FakeHub:
    hub = FakeHub(tmp_path / "uploaded")
    hub.install(monkeypatch)
    return hub


def put_in_cache(cache: Path, repo_id: str, folder: Path, commit: str) -> None:
    """Lay `folder` out as huggingface_hub's cache holds a downloaded repo at `commit` (the `main` branch)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


@pytest.fixture(scope="module", autouse=True)
def offline():
    """Reads come from the cache only (transformers would otherwise retry the unreachable Hub for optional files);
    writes go to the fake Hub."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny base "downloaded" from the Hub (in a cache), trained-looking calibrated heads on it."""
    root = tmp_path_factory.mktemp("hub")
    cache = root / "cache"
    put_in_cache(cache, BASE_ID, Path(save_tiny_base("llama", root / "base-src", seed=3)), "b" * 40)
    model = EarlyExitForCausalLM.from_base(BASE_ID, exit_layers=[1, 2], draft_token_ids=list(range(10, 60)),
                                           tokenizer=tiny_tokenizer(), cache_dir=cache, local_files_only=True)
    perturb_heads(model, seed=3)
    trained(model)
    return {"root": root, "cache": cache, "model": model}


def trained(model: EarlyExitForCausalLM) -> EarlyExitForCausalLM:
    """Give heads the provenance and calibration that train + calibrate would (the numbers are made up)."""
    layers = model.config.exit_layers
    model.config.training = json.loads(json.dumps(TRAINING))
    taus = set_median_thresholds(model, key="0.5")
    model.config.thresholds["0.9"] = [None] * (len(layers) - 1) + [taus[-1] + 1.0]
    model.config.calibration = {
        "metric": model.config.metric, "prompts": ["p"], "sequences": 2, "tokens": 80, "check_tokens": 80,
        "check": [{"eps": eps, "exit": k, "threshold": 0.1, "coverage": 0.4, "agreement": 0.8}
                  for eps in (0.5, 0.9) for k in layers],
        "cascade": [{"eps": eps, "exited": 0.5, "agreement_exited": 0.8, "agreement_all": 0.9} for eps in (0.5, 0.9)],
    }
    gen = torch.Generator().manual_seed(0)
    model.calibration_stats = {"aligned": torch.ones(1, dtype=torch.uint8)}
    for j in range(len(layers)):
        model.calibration_stats[f"score.{j}"] = torch.rand(50, generator=gen)
        model.calibration_stats[f"agree.{j}"] = (torch.rand(50, generator=gen) > 0.5).to(torch.uint8)
    return model


def write_json(path: Path, payload) -> Path:
    path.write_text(json.dumps(payload))
    return path


# -- push -------------------------------------------------------------------------------------------------------


def test_push_to_hub_uploads_exactly_the_heads_folder_in_one_commit(world, fake_hub):
    info = world["model"].push_to_hub(HEADS_ID, private=True, token="hf_test", commit_message="first heads")
    assert fake_hub.calls == [
        ("create_repo", HEADS_ID, {"private": True, "exist_ok": True, "token": "hf_test"}),
        ("upload_folder", HEADS_ID, {"commit_message": "first heads", "revision": None}),
    ]
    files = {p.relative_to(fake_hub.last).as_posix() for p in fake_hub.last.rglob("*") if p.is_file()}
    assert files == HEADS_FILES
    assert tensor_files(fake_hub.last) == []  # no base weights, nothing else holding tensors
    assert "adapter_config.json" not in files
    config = json.loads((fake_hub.last / "config.json").read_text())
    # written in the lowest format that holds it (1: no quantised blocks), so older versions still read it
    assert config["format_version"] == 1 < FORMAT_VERSION and config["base_model_name_or_path"] == BASE_ID
    assert config["base_revision"] == "b" * 40  # the exact commit the base was downloaded at
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_earlyexit.EarlyExitForCausalLM"
    assert info.commit_url.startswith(f"https://huggingface.co/{HEADS_ID}/commit/")


def test_push_to_a_branch_creates_it(world, fake_hub):
    world["model"].push_to_hub(HEADS_ID, revision="experiment")
    assert fake_hub.calls[1] == ("create_branch", HEADS_ID, {"branch": "experiment", "exist_ok": True})
    assert fake_hub.calls[2][2]["revision"] == "experiment"


def test_merged_push_ships_a_base_copy_that_loads_alone(tmp_path, fake_hub):
    base_dir = save_tiny_base("gpt2", tmp_path / "gpt2-base", seed=5)
    model = trained(EarlyExitForCausalLM.from_base(base_dir, exit_layers=[1, 2]))
    model.push_to_hub(HEADS_ID, merged=True)
    folder = fake_hub.last
    assert "base/model.safetensors" in tensor_files(folder) and (folder / "base" / "config.json").is_file()
    assert json.loads((folder / "config.json").read_text())["base_subfolder"] == "base"
    assert fake_hub.calls[-1][2]["commit_message"] == "Upload early-exit heads and base model copy"
    shutil.rmtree(base_dir)  # the recorded base is gone: only the copy can serve
    loaded = EarlyExitForCausalLM.from_pretrained(folder)
    ids, mask = batch([7, 4])
    with torch.no_grad():
        got, want = loaded(ids, attention_mask=mask), model(ids, attention_mask=mask)
    assert torch.equal(got.logits, want.logits) and torch.equal(got.exit_logits[1], want.exit_logits[1])


def test_card_metadata_validates_and_model_index_round_trips(world, fake_hub, tmp_path):
    extra = {"bench.json": write_json(tmp_path / "b.json", BENCH), "eval_results.json": write_json(
        tmp_path / "e.json", LM_EVAL)}
    world["model"].push_to_hub(HEADS_ID, extra_files=extra)
    card = validate_card(fake_hub.last / "README.md")
    loaded = ModelCard.load(fake_hub.last / "README.md", ignore_metadata_errors=False)
    meta = loaded.data.to_dict()
    assert meta["base_model"] == BASE_ID and meta["base_model_relation"] == "adapter"
    assert meta["library_name"] == "transformers" and "hf-earlyexit" in meta["tags"] and meta["license"]
    name, results = model_index_to_eval_results(meta["model-index"])
    assert name == "tiny-heads" and eval_results_to_model_index(name, results) == meta["model-index"]
    values = {(r.metric_type, r.metric_name): r.metric_value for r in results}
    assert values["tokens_per_second", "early exit ε=0.5: tokens_per_second"] == 13.5
    assert values["acc", "acc (ε=0.5)"] == 0.5
    text = card.text
    for needle in ("exit@1", "exit@2", "| 0.5 |", "| 0.9 | never |", "λ", "| 3 | 2 | 0.001 | 0.1 |",
                   "0.400 / 0.800", f'from_pretrained("{HEADS_ID}", trust_remote_code=True)',
                   f"pretrained={HEADS_ID},eps=", f"--model {HEADS_ID}", "Limitations and license"):
        assert needle in text, needle


def test_a_broken_model_index_fails_validation(world, tmp_path):
    world["model"].save_pretrained(tmp_path / "heads")
    card = (tmp_path / "heads" / "README.md").read_text()
    bad = card.replace("library_name: transformers", "library_name: transformers\nmodel-index:\n- results: []", 1)
    with pytest.raises(ValueError, match="model.index"):
        validate_card(bad)


# -- load by repo id, in this process and in a fresh one without hf_earlyexit ------------------------------------


FRESH = textwrap.dedent(
    """
    import json, sys, torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        import hf_earlyexit
        raise SystemExit("hf_earlyexit should not be importable here")
    except ImportError:
        pass
    job = json.loads(sys.argv[1])
    inputs = load_file(job["inputs"])
    out = {}
    for name, source in (("folder", job["folder"]), ("repo", job["repo_id"])):
        model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=True)
        assert type(model).__name__ == "EarlyExitForCausalLM", type(model)
        with torch.no_grad():
            result = model(inputs["ids"], attention_mask=inputs["mask"])
        out[f"{name}.exit1"], out[f"{name}.logits"] = result.exit_logits[1].contiguous(), result.logits
        out[f"{name}.early"] = model.generate(inputs["ids"], attention_mask=inputs["mask"], max_new_tokens=5,
                                              eps=0.5, do_sample=False, pad_token_id=0, eos_token_id=None)
    tokenizer = AutoTokenizer.from_pretrained(job["repo_id"])
    assert tokenizer.decode(tokenizer("ab")["input_ids"]) == "ab"
    model.save_pretrained(job["resaved"])  # remote code alone: a short card
    save_file(out, job["out"])
    """
)


@pytest.fixture(scope="module")
def pushed(world, tmp_path_factory):
    """The folder a push would upload, put in the cache as `HEADS_ID` (as if downloaded)."""
    root = tmp_path_factory.mktemp("pushed")
    hub = FakeHub(root / "uploaded")
    with pytest.MonkeyPatch.context() as patch:
        hub.install(patch)
        world["model"].push_to_hub(HEADS_ID)
    put_in_cache(world["cache"], HEADS_ID, hub.last, "c" * 40)
    return hub.last


def test_load_by_repo_id_through_the_hub_cache(world, pushed):
    model = EarlyExitForCausalLM.from_pretrained(HEADS_ID, cache_dir=world["cache"], local_files_only=True)
    assert model.config.base_model_name_or_path == BASE_ID and model.config.base_revision == "b" * 40
    ids, mask = batch([6, 3])
    with torch.no_grad():
        got, want = model(ids, attention_mask=mask), world["model"](ids, attention_mask=mask)
    for a, b in zip(got.exit_logits, want.exit_logits, strict=True):
        assert torch.equal(a, b)
    assert model.thresholds_for(0.5) == world["model"].thresholds_for(0.5)


def test_fresh_process_loads_the_uploaded_folder_and_repo_id_without_hf_earlyexit(world, pushed, tmp_path):
    ids, mask = batch([7, 5])
    save_file({"ids": ids, "mask": mask}, tmp_path / "inputs.safetensors")
    job = {"folder": str(pushed), "repo_id": HEADS_ID, "inputs": str(tmp_path / "inputs.safetensors"),
           "out": str(tmp_path / "out.safetensors"), "resaved": str(tmp_path / "resaved")}
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(world["cache"]),
               HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", BLOCK_IMPORT + FRESH, json.dumps(job)], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = load_file(tmp_path / "out.safetensors")
    model = world["model"]
    with torch.no_grad():
        want = model(ids, attention_mask=mask)
    early = model.generate(ids, attention_mask=mask, max_new_tokens=5, eps=0.5, do_sample=False, pad_token_id=0,
                           eos_token_id=None)
    for source in ("folder", "repo"):
        assert torch.equal(got[f"{source}.exit1"], want.exit_logits[1])
        assert torch.equal(got[f"{source}.logits"], want.logits)
        assert torch.equal(got[f"{source}.early"], early)
    short = validate_card(tmp_path / "resaved" / "README.md")  # the fallback card is valid too
    assert short.data.base_model == BASE_ID


# -- the base check and its override ------------------------------------------------------------------------------


def test_other_base_weights_fail_unless_overridden(pushed, caplog):
    other = tiny_model("llama", seed=99)
    with pytest.raises(HeadsMismatchError, match="weight fingerprint.*ignore_base_mismatch=True"):
        EarlyExitForCausalLM.from_pretrained(pushed, base_model=other)
    with caplog.at_level(logging.WARNING):
        model = EarlyExitForCausalLM.from_pretrained(pushed, base_model=other, ignore_base_mismatch=True)
    assert model.get_base_model() is other and "loading anyway" in caplog.text
    bigger = tiny_model("gpt2")  # another shape: never loads
    with pytest.raises(HeadsMismatchError, match="model_type"):
        EarlyExitForCausalLM.from_pretrained(pushed, base_model=bigger, ignore_base_mismatch=True)


def test_asking_for_another_base_revision_is_a_mismatch(world, pushed, caplog):
    with pytest.raises(HeadsMismatchError, match=r"revision 'b{40}'.*base_model_revision='d{40}'"):
        EarlyExitForCausalLM.from_pretrained(pushed, base_model_revision="d" * 40, cache_dir=world["cache"],
                                             local_files_only=True)


def test_another_version_of_the_embedded_base_is_a_mismatch(tmp_path, monkeypatch, caplog):
    """Heads recorded for another version of the embedded package than the one installed (its dense cache is
    stood in for by a tiny model), whether the base is held or loaded by the heads."""
    monkeypatch.setenv("HF_EARLYEXIT_CACHE", str(tmp_path / "ee-cache"))
    version = embedded_revision()
    dense = Path(save_tiny_base("llama", tmp_path / "ee-cache" / f"gemma-3-270m-dense-{version}"))
    (dense / "COMPLETE").write_text("stand-in\n")
    held = AutoModelForCausalLM.from_pretrained(dense)
    model = trained(EarlyExitForCausalLM.from_base(held, exit_layers=[2]))
    assert (model.config.base_model_name_or_path, model.config.base_revision) == ("embedded", version)
    model.config.base_revision = "0.0.1"
    model.save_pretrained(tmp_path / "heads")
    message = rf"revision '0.0.1' of 'embedded'; this base is revision '{version}'.*ignore_base_mismatch=True"
    with pytest.raises(HeadsMismatchError, match=message):
        EarlyExitForCausalLM.from_pretrained(tmp_path / "heads", base_model=held)
    with pytest.raises(HeadsMismatchError, match=message):
        EarlyExitForCausalLM.from_pretrained(tmp_path / "heads")
    with caplog.at_level(logging.WARNING):
        loaded = EarlyExitForCausalLM.from_pretrained(tmp_path / "heads", ignore_base_mismatch=True)
    assert "loading anyway" in caplog.text and loaded.config.base_revision == "0.0.1"


# -- hf-earlyexit push <folder> <repo_id> --------------------------------------------------------------------------


def test_cli_push_uploads_the_folder_as_is_with_its_card_for_the_repo(world, fake_hub, tmp_path):
    folder = tmp_path / "heads"
    world["model"].save_pretrained(folder, extra_files={"train_log.csv": write_json(tmp_path / "log", [])})
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    bench = write_json(tmp_path / "bench.json", BENCH)
    cli.main(["push", str(folder), "me/cli-heads", "--private", "--revision", "dev", "--commit_message", "hi",
              "--bench_file", str(bench)])
    assert fake_hub.names() == ["create_repo", "create_branch", "upload_folder"]
    assert fake_hub.calls[0][2]["private"] is True and fake_hub.calls[2][2] == {"commit_message": "hi",
                                                                               "revision": "dev"}
    uploaded = {p.name for p in fake_hub.last.iterdir()}
    assert uploaded == HEADS_FILES | {"train_log.csv", "bench.json"}
    card = validate_card(fake_hub.last / "README.md")
    assert 'from_pretrained("me/cli-heads"' in card.text and card.data.eval_results
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # the folder itself is untouched


def test_cli_push_keeps_a_hand_written_card(world, fake_hub, tmp_path):
    folder = tmp_path / "heads"
    world["model"].save_pretrained(folder)
    (folder / "README.md").write_text("---\nlicense: mit\n---\n\n# My heads\n")
    cli.main(["push", "--model", str(folder), "--repo_id", "me/mine"])
    assert (fake_hub.last / "README.md").read_text() == "---\nlicense: mit\n---\n\n# My heads\n"


# -- bad input ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("repo_id", ["", "a/b/c", "bad repo", "x--y", "-lead/name", "me/name.git", "me/.hidden"])
def test_malformed_repo_id_is_refused_before_any_network_call(world, fake_hub, repo_id):
    with pytest.raises(ValueError, match="Hub repo id"):
        world["model"].push_to_hub(repo_id)
    with pytest.raises(ValueError, match="Hub repo id"):
        PushArgs(model="x", repo_id=repo_id)
    assert fake_hub.calls == []


def test_folder_from_a_newer_format_is_refused(world, fake_hub, tmp_path):
    folder = tmp_path / "heads"
    world["model"].save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["format_version"] = FORMAT_VERSION + 1
    (folder / "config.json").write_text(json.dumps(config))
    message = rf"newer hf-earlyexit, format {FORMAT_VERSION + 1}; this version reads up to format {FORMAT_VERSION}"
    with pytest.raises(UnsupportedFormatError, match=message):
        EarlyExitForCausalLM.from_pretrained(folder)
    with pytest.raises(UnsupportedFormatError, match=message):
        cli.main(["push", str(folder), HEADS_ID, "--debug"])
    assert fake_hub.calls == []
    del config["format_version"]  # a folder from before the field existed reads as format 1
    (folder / "config.json").write_text(json.dumps(config))
    loaded = EarlyExitForCausalLM.from_pretrained(folder, cache_dir=world["cache"], local_files_only=True)
    assert loaded.config.format_version == 1
    with pytest.raises(UnsupportedFormatError, match="not a format version"):
        EarlyExitConfig(text_config=tiny_model("llama").config, format_version="2")


def test_missing_thresholds_warn_that_heads_never_exit(world, fake_hub, caplog):
    model = world["model"]
    saved = model.config.thresholds, model.config.calibration, model.calibration_stats
    model.config.thresholds = model.config.calibration = model.calibration_stats = None
    try:
        with caplog.at_level(logging.WARNING):
            model.push_to_hub(HEADS_ID)
    finally:
        model.config.thresholds, model.config.calibration, model.calibration_stats = saved
    assert "no calibrated thresholds: they never exit" in caplog.text
    assert "**Not calibrated**" in (fake_hub.last / "README.md").read_text()
    assert "calibration.safetensors" not in {p.name for p in fake_hub.last.iterdir()}


def test_untrained_heads_are_refused_unless_forced(world, fake_hub, tmp_path):
    model = EarlyExitForCausalLM.from_base(tiny_model("llama"), exit_layers=[2])
    with pytest.raises(ValueError, match="never trained.*force=True"):
        model.push_to_hub(HEADS_ID)
    model.save_pretrained(tmp_path / "untrained")
    with pytest.raises(ValueError, match="never trained"):
        cli.main(["push", str(tmp_path / "untrained"), HEADS_ID, "--debug"])
    assert fake_hub.calls == []
    model.push_to_hub(HEADS_ID, force=True)
    assert "These heads are untrained" in (fake_hub.last / "README.md").read_text()
    cli.main(["push", str(tmp_path / "untrained"), HEADS_ID, "--force"])
    assert fake_hub.names().count("upload_folder") == 2


def test_folders_with_base_weights_or_no_heads_are_refused(world, fake_hub, tmp_path):
    folder = tmp_path / "heads"
    world["model"].save_pretrained(folder)
    save_file({"w": torch.zeros(2)}, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"not the heads' own: \['model.safetensors'\]"):
        check_heads_folder(folder)
    (folder / "model.safetensors").unlink()
    (folder / "base").mkdir()
    save_file({"w": torch.zeros(2)}, folder / "base" / "model.safetensors")
    with pytest.raises(ValueError, match="full copy of the base model.*--merged"):
        cli.main(["push", str(folder), HEADS_ID, "--debug"])
    shutil.rmtree(folder / "base")
    (folder / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="adapter_config.json"):
        check_heads_folder(folder)
    base = save_tiny_base("llama", tmp_path / "a-base")
    with pytest.raises(ValueError, match="holds a 'llama' model, not early-exit heads"):
        cli.main(["push", base, HEADS_ID, "--debug"])
    assert fake_hub.calls == []


def test_card_renders_for_a_folder_without_optional_files(world, tmp_path):
    world["model"].save_pretrained(tmp_path / "heads")
    for name in ("README.md", "calibration.safetensors", "tokenizer.json"):
        (tmp_path / "heads" / name).unlink()
    card = validate_card(render_card(tmp_path / "heads"))
    assert card.data.eval_results is None and "## Speed" not in card.text
