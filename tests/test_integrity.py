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
