"""Trust nothing from disk or the command line (issue 19): paths stay inside their folder, interrupted saves lose
nothing and leave nothing behind, hand-edited files and bad values fail with one clear line naming them."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import save_tiny_base

from hf_earlyexit import EarlyExitForCausalLM
from hf_earlyexit.modeling import folder_earlyexit
from hf_earlyexit.modeling.folder_earlyexit import STAGING_MARK, backup_of


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return Path(save_tiny_base("llama", tmp_path_factory.mktemp("integrity") / "base"))


@pytest.fixture()
def heads(base_dir, tmp_path) -> Path:
    model = EarlyExitForCausalLM.from_base(str(base_dir), exit_layers=[1, 2])
    model.save_pretrained(tmp_path / "heads")
    return tmp_path / "heads"


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


# -- item 8: the base a heads folder names stays inside it, or is recorded so the folder loads from anywhere ---------


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_base_subfolder_outside_the_heads_folder_is_refused(heads, base_dir, where):
    outside = heads.parent / "outside"
    shutil.copytree(base_dir, outside)
    edit_config(heads, base_subfolder="../outside" if where == "parent" else str(outside))
    with pytest.raises(ValueError, match=r"base_subfolder=.*outside.* must be a relative path inside the heads folder"):
        EarlyExitForCausalLM.from_pretrained(heads)


def test_base_subfolder_linked_outside_the_heads_folder_is_refused(heads, base_dir):
    (heads / "base").symlink_to(base_dir, target_is_directory=True)
    edit_config(heads, base_subfolder="base")
    with pytest.raises(ValueError, match="base_subfolder='base' leads outside the heads folder"):
        EarlyExitForCausalLM.from_pretrained(heads)


def test_a_relative_base_path_is_recorded_so_the_folder_loads_from_anywhere(base_dir, tmp_path, monkeypatch):
    work = tmp_path / "work"
    shutil.copytree(base_dir, work / "models" / "base")
    monkeypatch.chdir(work)
    model = EarlyExitForCausalLM.from_base("models/base", exit_layers=[1, 2])
    assert model.config.base_model_name_or_path == str((work / "models" / "base").resolve())
    model.save_pretrained("heads")
    monkeypatch.chdir(tmp_path)
    loaded = EarlyExitForCausalLM.from_pretrained(work / "heads")
    assert loaded.config.base_model_name_or_path == model.config.base_model_name_or_path


def test_a_missing_local_path_is_named_as_a_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"heads folder path '.*nowhere' does not exist"):
        EarlyExitForCausalLM.from_pretrained(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"base model path '\./nowhere' does not exist"):
        EarlyExitForCausalLM.from_base("./nowhere")


# -- item 9: extra files stay inside the folder and never replace the heads' own files -----------------------------


@pytest.mark.parametrize("name, message", [
    ("../../escaped.txt", "must be a relative path inside the heads folder"),
    ("{tmp}/escaped.txt", "must be a relative path inside the heads folder"),
    ("logs/../../escaped.txt", "must be a relative path inside the heads folder"),
    ("config.json", "would replace a file the heads folder writes itself"),
    ("exit_heads.safetensors", "would replace a file the heads folder writes itself"),
    ("modeling_earlyexit.py", "would replace a file the heads folder writes itself"),
    ("weights.bin", "looks like serialized tensors"),
])
def test_extra_files_outside_the_folder_or_over_its_own_files_are_refused(heads, tmp_path, name, message):
    model = EarlyExitForCausalLM.from_pretrained(heads)
    source = tmp_path / "log.txt"
    source.write_text("log")
    name = name.format(tmp=tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match=rf"extra_files name={re.escape(repr(name))} {message}"):
        model.save_pretrained(tmp_path / "deep" / "out", extra_files={name: source})
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, inside or outside


def test_extra_files_may_go_into_subfolders(heads, tmp_path):
    model = EarlyExitForCausalLM.from_pretrained(heads)
    (tmp_path / "curve.png").write_bytes(b"png")
    model.save_pretrained(tmp_path / "out", extra_files={"plots/curve.png": tmp_path / "curve.png"})
    assert (tmp_path / "out" / "plots" / "curve.png").read_bytes() == b"png"


# -- item 11: the save_pretrained swap loses nothing and leaves nothing behind --------------------------------------


def failing_renames(monkeypatch, *, restore: bool):
    """`Path.rename` fails for the staging folder's move into place (and, unless `restore`, for the backup's move
    back): a crash or a full disk between the two renames of a swap."""
    original = Path.rename

    def rename(self, target):
        if self.name.startswith(".heads-") or (not restore and self.name == ".heads.old"):
            raise OSError("simulated failure")
        return original(self, target)

    monkeypatch.setattr(Path, "rename", rename)


def test_a_swap_that_fails_between_its_renames_puts_the_old_folder_back(heads, monkeypatch):
    before = (heads / "exit_heads.safetensors").read_bytes()
    model = EarlyExitForCausalLM.from_pretrained(heads)
    failing_renames(monkeypatch, restore=True)
    with pytest.raises(OSError, match=r"could not move the new contents .* keeps its previous contents"):
        model.save_pretrained(heads, overwrite=True)
    assert (heads / "exit_heads.safetensors").read_bytes() == before
    assert sorted(p.name for p in heads.parent.iterdir()) == ["heads"]  # no backup, no staging


def test_when_the_old_folder_cannot_be_put_back_the_error_names_it_and_the_next_save_restores_it(heads, monkeypatch):
    before = (heads / "exit_heads.safetensors").read_bytes()
    model = EarlyExitForCausalLM.from_pretrained(heads)
    with monkeypatch.context() as patch:
        failing_renames(patch, restore=False)
        with pytest.raises(OSError, match=rf"previous contents .* are in {backup_of(heads)}; rename that folder"):
            model.save_pretrained(heads, overwrite=True)
    assert not heads.exists() and (backup_of(heads) / "exit_heads.safetensors").read_bytes() == before
    with pytest.raises(FileNotFoundError, match=rf"interrupted save left its previous contents in {backup_of(heads)}"):
        EarlyExitForCausalLM.from_pretrained(heads)
    with pytest.raises(FileExistsError, match="overwrite=True"):  # the previous contents are back, so protected
        model.save_pretrained(heads)
    assert (heads / "exit_heads.safetensors").read_bytes() == before and not backup_of(heads).exists()


def test_a_backup_left_beside_a_complete_folder_is_removed_by_the_next_save(heads):
    shutil.copytree(heads, backup_of(heads))  # a crash after the second rename, before the backup was deleted
    EarlyExitForCausalLM.from_pretrained(heads).save_pretrained(heads, overwrite=True)
    assert sorted(p.name for p in heads.parent.iterdir()) == ["heads"]


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_staging_folders_of_killed_saves_are_removed_and_running_ones_kept(heads):
    def staging(name: str, owner: dict | None) -> Path:
        folder = heads.parent / name
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        if owner is not None:
            (folder / STAGING_MARK).write_text(json.dumps(owner))
        return folder

    import socket

    killed = staging(".heads-killed", {"host": socket.gethostname(), "pid": dead_pid()})
    running = staging(".heads-running", {"host": socket.gethostname(), "pid": os.getppid()})
    elsewhere = staging(".heads-elsewhere", {"host": "another-host", "pid": dead_pid()})
    unmarked = staging(".heads-unmarked", None)
    EarlyExitForCausalLM.from_pretrained(heads).save_pretrained(heads, overwrite=True)
    assert not killed.exists() and running.exists() and elsewhere.exists() and unmarked.exists()
    assert not (heads / STAGING_MARK).exists()


def test_a_file_target_is_refused_and_left_alone(heads, tmp_path):
    target = tmp_path / "model.txt"
    target.write_text("not a folder")
    model = EarlyExitForCausalLM.from_pretrained(heads)
    with pytest.raises(NotADirectoryError, match="model.txt is a file, not a folder"):
        model.save_pretrained(target, overwrite=True)
    assert target.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heads", "model.txt"]


def test_a_backup_that_cannot_be_deleted_is_named(heads, monkeypatch, caplog):
    monkeypatch.setattr(folder_earlyexit, "remove_tree", lambda path: False)
    with caplog.at_level(logging.WARNING):
        EarlyExitForCausalLM.from_pretrained(heads).save_pretrained(heads, overwrite=True)
    assert f"could not be removed from {backup_of(heads)}" in caplog.text


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may delete read-only entries anyway")
def test_read_only_previous_contents_are_removed_after_the_swap(heads):
    (heads / "sub").mkdir()
    (heads / "sub" / "note.txt").write_text("x")
    (heads / "sub").chmod(0o555)
    EarlyExitForCausalLM.from_pretrained(heads).save_pretrained(heads, overwrite=True)
    assert sorted(p.name for p in heads.parent.iterdir()) == ["heads"]


# -- item 10: the training checkpoint swap: resume finds the newest complete checkpoint in every crash state ---------


@pytest.fixture(scope="module")
def corpus(base_dir):
    from hf_earlyexit.training.data import GenerationSpec, generate_corpus

    model = EarlyExitForCausalLM.from_base(str(base_dir), exit_layers=[1, 2])
    return generate_corpus(model.backbone, model.tokenizer, GenerationSpec(num_sequences=8, max_new_tokens=8),
                           "tiny", cache=False)


def heads_for_training(base_dir) -> EarlyExitForCausalLM:
    torch.manual_seed(0)
    return EarlyExitForCausalLM.from_base(str(base_dir), exit_layers=[1, 2], head="shared", adapter_rank=4)


def config_for(steps: int):
    from hf_earlyexit.training.train import TrainConfig

    return TrainConfig(steps=steps, batch_size=2, checkpoint_every=2, log_every=1, learning_rate=1e-2)


@pytest.fixture(scope="module")
def checkpoints(base_dir, corpus, tmp_path_factory) -> dict[int, Path]:
    """Complete checkpoints of one run at steps 2 and 4."""
    from hf_earlyexit.training.train import train_heads

    root = tmp_path_factory.mktemp("checkpoints")
    found = {}
    for steps in (2, 4):
        train_heads(heads_for_training(base_dir), corpus, config_for(steps), root / "work", resume=steps > 2)
        found[steps] = root / f"step{steps}"
        shutil.copytree(root / "work" / "checkpoint", found[steps])
    return found


def place(checkpoints, work: Path, **states) -> None:
    """Lay out a work dir as a crash leaves it: `checkpoint`, `checkpoint.partial`, `checkpoint.old` each a copy of
    the checkpoint at step N, or `"incomplete"` (its state file not yet written)."""
    for suffix, state in states.items():
        target = work / ("checkpoint" + ("" if suffix == "current" else f".{suffix}"))
        shutil.copytree(checkpoints[4 if state == "incomplete" else state], target)
        if state == "incomplete":
            (target / "trainer_state.json").unlink()


CRASH_STATES = {
    "staging_half_written": ({"current": 2, "partial": "incomplete"}, 2),
    "between_the_renames": ({"old": 2, "partial": 4}, 4),
    "old_not_yet_deleted": ({"current": 4, "old": 2}, 4),
    "stale_old_of_an_earlier_crash": ({"current": 2, "old": 4}, 4),
    "only_the_old_one_complete": ({"old": 2, "partial": "incomplete"}, 2),
}


@pytest.mark.parametrize("states, newest", CRASH_STATES.values(), ids=CRASH_STATES.keys())
def test_resume_finds_the_newest_complete_checkpoint_in_every_crash_state(base_dir, corpus, checkpoints, tmp_path,
                                                                           caplog, states, newest):
    from hf_earlyexit.training.train import find_checkpoint, train_heads

    work = tmp_path / "work"
    place(checkpoints, work, **states)
    assert json.loads((find_checkpoint(work / "checkpoint") / "trainer_state.json").read_text())["step"] == newest
    with caplog.at_level(logging.INFO, logger="hf_earlyexit.training.train"):
        train_heads(heads_for_training(base_dir), corpus, config_for(6), work, resume=True)
    assert f"Resuming from step {newest} " in caplog.text
    assert sorted(p.name for p in work.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint"]
    assert json.loads((work / "checkpoint" / "trainer_state.json").read_text())["step"] == 6


def test_a_fresh_run_refuses_leftovers_of_an_interrupted_one(base_dir, corpus, checkpoints, tmp_path):
    from hf_earlyexit.training.train import train_heads

    place(checkpoints, tmp_path / "work", old=2, partial=4)
    with pytest.raises(FileExistsError, match=r"checkpoint\.partial exists; pass resume=True"):
        train_heads(heads_for_training(base_dir), corpus, config_for(2), tmp_path / "work")


def test_a_checkpoint_swap_that_fails_names_where_the_previous_checkpoint_is(base_dir, corpus, checkpoints, tmp_path,
                                                                             monkeypatch):
    from hf_earlyexit.training.train import find_checkpoint, train_heads

    work = tmp_path / "work"
    place(checkpoints, work, current=4)
    original = Path.rename

    def rename(self, target):
        if self.name == "checkpoint.partial":
            raise OSError("simulated failure")
        return original(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match=r"the previous checkpoint is in .*checkpoint\.old; --resume finds"):
        train_heads(heads_for_training(base_dir), corpus, config_for(6), work, resume=True)
    step = json.loads((find_checkpoint(work / "checkpoint") / "trainer_state.json").read_text())["step"]
    assert step == 6  # the new one, complete in checkpoint.partial, is what a resume continues


# -- item 6: resume compares the data the corpus is built from -----------------------------------------------------


@pytest.fixture()
def train_run(base_dir, tmp_path, monkeypatch):
    """A finished `run_train` job (2 steps) on generated text and a text file, and what to build it again."""
    from hf_earlyexit.training.data import GenerationSpec
    from hf_earlyexit.training.pipeline import TrainJob, run_train

    monkeypatch.setenv("HF_EARLYEXIT_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "text.txt"
    text.write_text("a short text that the heads also read. " * 8)
    job = TrainJob(model=str(base_dir), output_dir=str(tmp_path / "heads"), exit_layers=[1, 2], adapter_rank=4,
                   draft_vocab_size=0, text_files=[str(text)], seq_len=16)
    run_train(job, GenerationSpec(num_sequences=4, max_new_tokens=6), config_for(2))
    job.resume = True
    return job, text


@pytest.mark.parametrize("change, message", [
    ({"num_sequences": 6}, "data num_sequences: checkpoint 4 vs now 6"),
    ({"sampling_seed": 7}, "data sampling_seed: checkpoint 0 vs now 7"),
    ({"prompts": ["Another prompt"]}, r"data prompts \(sha256\): checkpoint '[0-9a-f]+' vs now '[0-9a-f]+'"),
    ({"text": "other text"}, r"data text_files \(sha256\)"),
    ({"seq_len": 32}, "data seq_len: checkpoint 16 vs now 32"),
])
def test_resume_with_other_data_is_refused_before_any_model_work(train_run, monkeypatch, change, message):
    from hf_earlyexit.training import pipeline
    from hf_earlyexit.training.data import GenerationSpec

    job, text = train_run
    spec = GenerationSpec(num_sequences=4, max_new_tokens=6)
    for key, value in change.items():
        if key == "text":
            text.write_text(value)
        elif hasattr(job, key):
            setattr(job, key, value)
        else:
            setattr(spec, key, value)

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the data settings were compared")

    monkeypatch.setattr(pipeline, "_base_of", no_model)
    with pytest.raises(ValueError, match=rf"cannot resume .*checkpoint with different settings: .*{message}"):
        pipeline.run_train(job, spec, config_for(4))


def test_resume_with_the_same_data_continues(train_run):
    from hf_earlyexit.training.data import GenerationSpec
    from hf_earlyexit.training.pipeline import run_train

    job, _ = train_run
    model, _ = run_train(job, GenerationSpec(num_sequences=4, max_new_tokens=6), config_for(4))
    assert model.config.training["steps"] == 4


# -- item 12: user errors are one line naming the value and what was expected ---------------------------------------


def cli_error(capsys, argv: list[str]) -> str:
    """Run `hf-earlyexit argv`; assert exit status 2 and one line on stderr without a traceback; return it."""
    from hf_earlyexit.commands import cli

    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("hf-earlyexit: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def train_argv(base_dir, tmp_path, *extra) -> list[str]:
    return ["train", "--model", str(base_dir), "--output_dir", str(tmp_path / "out"), "--exit_layers", "1", "2",
            "--adapter_rank", "4", "--draft_vocab_size", "0", "--max_new_tokens", "4", "--steps", "2", *extra]


@pytest.mark.parametrize("extra, message", [
    (["--checkpoint_every", "0"], "checkpoint_every=0 must be a positive number of steps"),
    (["--log_every", "0"], "log_every=0 must be a positive number of steps"),
    (["--num_sequences", "0"], "num_sequences=0 gives too little text.*at least 2"),
    (["--num_sequences", "1"], "num_sequences=1 gives too little text.*at least 2"),
    (["--num_sequences", "-3"], "num_sequences=-3 must be an integer >= 0"),
    (["--held_out_fraction", "1.5"], "held_out_fraction=1.5 must lie strictly between 0 and 1"),
    (["--held_out_fraction", "0"], "held_out_fraction=0.0 must lie strictly between 0 and 1"),
    (["--prompt_file", "missing.txt"], "prompt file missing.txt does not exist"),
])
def test_cli_train_refuses_bad_values_in_one_line(base_dir, tmp_path, capsys, monkeypatch, extra, message):
    from hf_earlyexit.training import pipeline

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(pipeline, "_base_of", no_model)
    monkeypatch.chdir(tmp_path)
    assert re.search(message, cli_error(capsys, train_argv(base_dir, tmp_path, *extra)))


def test_cli_train_stores_bfloat16_heads_when_asked(base_dir, tmp_path, monkeypatch):
    from safetensors import safe_open

    from hf_earlyexit.commands import cli

    monkeypatch.setenv("HF_EARLYEXIT_CACHE", str(tmp_path / "cache"))
    assert cli.main(train_argv(base_dir, tmp_path, "--num_sequences", "4", "--heads_dtype", "bfloat16")) == 0
    with safe_open(tmp_path / "out" / "exit_heads.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["heads_dtype"] == "bfloat16"


def test_cli_train_stores_quantised_block_changes_when_asked(base_dir, tmp_path, monkeypatch, capsys):
    from hf_earlyexit.commands import cli

    line = cli_error(capsys, train_argv(base_dir, tmp_path, "--num_sequences", "4", "--block_delta_bits", "6"))
    assert "block_delta_bits=6 stores full context blocks; expected --head context without --context_rank" in line
    monkeypatch.setenv("HF_EARLYEXIT_CACHE", str(tmp_path / "cache"))
    assert cli.main(train_argv(base_dir, tmp_path, "--num_sequences", "4", "--head", "context",
                               "--block_delta_bits", "6")) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["block_delta_bits"] == 6
    from safetensors import safe_open

    with safe_open(tmp_path / "out" / "exit_heads.safetensors", "pt") as f:
        assert any(k.endswith(".block.mlp.down_proj.weight.delta_codes") for k in f.keys())
    assert EarlyExitForCausalLM.from_pretrained(tmp_path / "out").config.block_delta_bits == 6


def test_cli_train_refuses_an_output_dir_that_is_a_file(base_dir, tmp_path, capsys):
    (tmp_path / "out").write_text("a file")
    line = cli_error(capsys, train_argv(base_dir, tmp_path, "--num_sequences", "4"))
    assert re.search(r"output_dir='.*out' is a file; expected a folder", line)
    assert (tmp_path / "out").read_text() == "a file"


def test_cli_calibrate_refuses_too_few_sequences(capsys, tmp_path):
    line = cli_error(capsys, ["calibrate", "--model", str(tmp_path), "--num_sequences", "1"])
    assert "num_sequences=1 must be at least 2" in line
    line = cli_error(capsys, ["calibrate", "--model", str(tmp_path), "--generation_batch_size", "0"])
    assert "generation_batch_size=0 must be a positive number of sequences" in line


def test_cli_calibrate_generates_in_the_batches_it_is_given(base_dir, tmp_path, monkeypatch):
    """`calibrate --generation_batch_size` reaches the sampler: the cached calibration text records its batches,
    and the folder gets thresholds."""
    from safetensors import safe_open

    from hf_earlyexit.commands.cli import main

    monkeypatch.setenv("HF_EARLYEXIT_CACHE", str(tmp_path / "cache"))
    assert main(train_argv(base_dir, tmp_path, "--num_sequences", "4")) == 0
    assert main(["calibrate", "--model", str(tmp_path / "out"), "--num_sequences", "12", "--max_new_tokens", "24",
                 "--generation_batch_size", "5", "--min_tokens", "10"]) == 0
    sources = []
    for path in (tmp_path / "cache" / "data").glob("generated-*.safetensors"):
        with safe_open(path, "pt") as f:
            sources.append(json.loads(f.metadata()["source"]))
    calibration = [source for source in sources if source["num_sequences"] == 12]
    assert len(calibration) == 1 and calibration[0]["generation_batch_size"] == 5
    assert EarlyExitForCausalLM.from_pretrained(tmp_path / "out").config.thresholds


def test_cli_names_a_missing_path_and_debug_shows_the_traceback(capsys, tmp_path):
    from hf_earlyexit.commands import cli

    missing = str(tmp_path / "nowhere")
    assert f"model path '{missing}' does not exist" in cli_error(capsys, ["info", "--model", missing])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cli.main(["info", "--model", missing, "--debug"])


@pytest.mark.parametrize("options, message", [
    ({"eps": "abc"}, "eps='abc' must be a number in"),
    ({"eps": True}, "eps=True must be a number in"),
    ({"mode": "dssd", "max_draft": True}, "max_draft=True must be a positive integer"),
    ({"mode": "dssd", "lookup": True}, "lookup=True must be a non-negative integer"),
    ({"mode": "dssd", "adaptive_draft": "yes"}, "adaptive_draft='yes' must be True or False"),
])
def test_decoding_values_of_the_wrong_type_are_named(options, message):
    from hf_earlyexit import DecodingOptions

    with pytest.raises(ValueError, match=message):
        DecodingOptions.build(**options)


@pytest.mark.parametrize("eps", ["abc", True, float("nan"), 1.5])
def test_thresholds_for_names_a_bad_eps(heads, eps):
    model = EarlyExitForCausalLM.from_pretrained(heads)
    with pytest.raises(ValueError, match=rf"eps={re.escape(repr(eps))} must be a number in \[0, 1\]"):
        model.thresholds_for(eps)


@pytest.mark.parametrize("field, value, message", [
    ("exit_layers", [1.5, 2, 3], r"exit_layers=\[1.5, 2, 3\] must be a list of layer numbers"),
    ("exit_layers", "12", "exit_layers='12' must be a list of layer numbers"),
    ("exit_layers", [True, 2], r"exit_layers=\[True, 2\] must be a list of layer numbers"),
    ("thresholds", [0.5, 0.5], r"thresholds=\[0.5, 0.5\] must map ε"),
    ("thresholds", {"high": [0.5, 0.5]}, "thresholds key 'high' must be an ε in"),
    ("thresholds", {"0.9": ["a", 0.5]}, r"thresholds\['0.9'\]=\['a', 0.5\] must be a list of numbers"),
    ("draft_vocab_size", "5", "draft_vocab_size='5' must be a positive integer or null"),
    ("adapter_rank", 2.5, "adapter_rank=2.5 must be a positive integer or null"),
    ("eps", "high", "eps='high' must be a number"),
    ("head_type", 3, "head_type=3 must be a string"),
    ("training", "yes", "training='yes' must be a JSON object or null"),
    ("base_fingerprint", "abc", "base_fingerprint='abc' must be a list of numbers per part"),
    ("base_model_name_or_path", 5, "base_model_name_or_path=5 must be a model id or path"),
    ("text_config", "llama", "text_config='llama' must be the base model's config"),
])
def test_config_fields_of_the_wrong_type_are_named_with_the_folder(heads, field, value, message):
    edit_config(heads, **{field: value})
    with pytest.raises(ValueError, match=rf"config.json of the heads in {re.escape(str(heads))} is invalid: {message}"):
        EarlyExitForCausalLM.from_pretrained(heads)


def test_a_calibration_file_with_other_keys_is_named(heads):
    from safetensors.torch import save_file

    save_file({"score0": torch.zeros(4), "agree0": torch.ones(4)}, heads / "calibration.safetensors")
    with pytest.raises(ValueError, match=r"calibration file calibration.safetensors in .* lacks \['score.0', "
                                         r"'agree.0', .*\].*expected score.j and agree.j for each of the 2 exits"):
        EarlyExitForCausalLM.from_pretrained(heads)
    save_file({"score.0": torch.zeros(4), "agree.0": torch.ones(3), "score.1": torch.zeros(4),
               "agree.1": torch.ones(4)}, heads / "calibration.safetensors")
    with pytest.raises(ValueError, match=r"score.0 \(4,\) and agree.0 \(3,\) must be 1-D of equal length"):
        EarlyExitForCausalLM.from_pretrained(heads)


def test_draft_token_ids_outside_the_vocabulary_are_refused_on_load(base_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from hf_earlyexit import HeadsMismatchError

    model = EarlyExitForCausalLM.from_base(str(base_dir), exit_layers=[1, 2], draft_token_ids=list(range(10)))
    model.save_pretrained(tmp_path / "heads")
    state = load_file(tmp_path / "heads" / "exit_heads.safetensors")
    key = next(k for k in state if k.endswith("token_ids"))
    state[key][3] = 500
    save_file(state, tmp_path / "heads" / "exit_heads.safetensors")
    with pytest.raises(HeadsMismatchError, match=rf"head tensor '{re.escape(key)}' in .*: draft_token_ids must lie in "
                                                 r"0..96, got ids from 0 to 500"):
        EarlyExitForCausalLM.from_pretrained(tmp_path / "heads")


def test_an_attention_mask_of_the_wrong_shape_is_named(heads):
    from test_decoding import GREEDY, set_median_thresholds

    model = EarlyExitForCausalLM.from_pretrained(heads)
    set_median_thresholds(model)
    ids = torch.randint(3, 90, (1, 6))
    mask = torch.ones(1, 5, dtype=torch.long)
    message = r"attention_mask has shape \(1, 5\); expected the shape of input_ids, \(1, 6\)"
    for mode in ("early_exit", "dssd"):
        with pytest.raises(ValueError, match=message):
            model.generate(ids, attention_mask=mask, max_new_tokens=2, mode=mode, eps=0.5, **GREEDY)
    with pytest.raises(ValueError, match=message):
        model(ids, attention_mask=mask)


def test_a_config_without_model_type_is_named_instead_of_asking_to_run_code(heads):
    from hf_earlyexit import load

    config = json.loads((heads / "config.json").read_text())
    del config["model_type"]
    (heads / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json of .*heads has no model_type; a heads folder's config.json "
                                         r"has model_type 'earlyexit'"):
        load(str(heads))


def test_mismatch_errors_name_the_recorded_base_and_the_given_one(heads, base_dir):
    from tiny import tiny_model
    from transformers import AutoModelForCausalLM

    from hf_earlyexit import HeadsMismatchError

    config = tiny_model("llama").config
    config.hidden_size = 48
    other = AutoModelForCausalLM.from_config(config)
    other.config.name_or_path = "someone/other-model"
    with pytest.raises(HeadsMismatchError, match=rf"saved for the base '{re.escape(str(base_dir))}' with "
                                                 r"hidden_size=32; the base model they are attached to "
                                                 r"\('someone/other-model'\) has hidden_size=48"):
        EarlyExitForCausalLM.from_pretrained(heads, base_model=other)


# -- lm-eval: items 3, 4, 5, 12 and 13 (refused at start-up, naming the value) -------------------------------------


@pytest.fixture()
def calibrated(heads) -> Path:
    from test_decoding import set_median_thresholds
    from tiny import tiny_tokenizer

    model = EarlyExitForCausalLM.from_pretrained(heads)
    set_median_thresholds(model, key="0.5")
    model.save_pretrained(heads, overwrite=True, tokenizer=tiny_tokenizer())
    return heads


def ee_hf(**args):
    from hf_earlyexit.evaluation.lm_eval_model import EarlyExitLM

    return EarlyExitLM(device="cpu", batch_size=1, dtype="float32", **args)


def test_lm_eval_metric_other_than_the_calibrated_one_is_refused(calibrated):
    lm = ee_hf(pretrained=str(calibrated), eps=0.5, metric="breaking_ties")  # the heads' own: accepted
    assert lm.early_exit_report()["metric"] == "breaking_ties"
    with pytest.raises(ValueError, match=r"metric='max_prob': these heads were calibrated for metric 'breaking_ties' "
                                         r"and their calibration statistics hold no max_prob scores"):
        ee_hf(pretrained=str(calibrated), eps=0.5, metric="max_prob")


@pytest.mark.parametrize("args, message", [
    ({"metric": "vibes"}, "metric='vibes' is not one of"),
    ({"kv_fill": "copy"}, "kv_fill='copy' is not one of"),
    ({"mode": "dssd", "max_draft": True}, "max_draft=True must be a positive integer"),
    ({"mode": "dssd", "max_draft": 0}, "max_draft=0 must be a positive integer"),
    ({"mode": "dssd", "kv_fill": "propagate"}, "kv_fill='propagate' does not apply to mode='dssd'"),
    ({"max_draft": 4}, "max_draft=4 does not apply to mode='early_exit'"),
    ({"lookup": 2}, "lookup=2 does not apply to mode='early_exit'"),
    ({"mode": "full", "kv_fill": "propagate"}, "kv_fill='propagate' does not apply to mode='plain'"),
    ({"eps": "abc"}, "eps='abc' must be a number in"),
    ({"eps": True}, "eps=True must be a number in"),
])
def test_lm_eval_options_are_checked_at_start_up_before_the_model_loads(calibrated, monkeypatch, args, message):
    from hf_earlyexit.evaluation import lm_eval_model

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(lm_eval_model, "load", no_model)
    with pytest.raises(ValueError, match=message):
        ee_hf(pretrained=str(calibrated), **args)


def test_lm_eval_refuses_unknown_model_args_naming_its_own(calibrated):
    with pytest.raises(TypeError, match=r"--model_args \['epsilon'\] are not arguments of ee-hf; its own are eps"):
        ee_hf(pretrained=str(calibrated), epsilon=0.5)


def test_lm_eval_names_a_pretrained_path_that_does_not_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"model path '{re.escape(str(tmp_path))}/nowhere' does not exist"):
        ee_hf(pretrained=str(tmp_path / "nowhere"))


# -- item 2: the draft vocabulary comes from the user's prompts, read before any work --------------------------------


def test_train_job_draft_vocabulary_comes_from_the_prompt_file(base_dir, tmp_path, monkeypatch):
    from hf_earlyexit.training import pipeline
    from hf_earlyexit.training.data import GenerationSpec
    from hf_earlyexit.training.pipeline import TrainJob, run_train

    monkeypatch.setenv("HF_EARLYEXIT_CACHE", str(tmp_path / "cache"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("zzzzzzzzzzzzzzzzzzzzzzzz\nzzzzzzzzzzzzzzzzzzzz zz\n")
    job = TrainJob(model=str(base_dir), output_dir=str(tmp_path / "heads"), exit_layers=[1, 2], adapter_rank=4,
                   draft_vocab_size=4, prompt_file=str(prompts))
    model, _ = run_train(job, GenerationSpec(num_sequences=4, max_new_tokens=4), config_for(2))
    assert model.tokenizer.convert_tokens_to_ids("z") in model.exit_heads[0].token_ids.tolist()
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    job.prompt_file, job.output_dir = str(tmp_path / "latin1.txt"), str(tmp_path / "again")

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the prompt file was read")

    monkeypatch.setattr(pipeline, "_base_of", no_model)
    with pytest.raises(ValueError, match="latin1.txt is not UTF-8"):
        run_train(job, GenerationSpec(num_sequences=4, max_new_tokens=4), config_for(2))
