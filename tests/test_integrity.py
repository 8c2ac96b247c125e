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
