"""The `hf-earlyexit` command line."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from tiny import save_tiny_base

from hf_earlyexit.cli import COMMANDS, main


def test_console_script_help():
    exe = shutil.which("hf-earlyexit")
    assert exe, "the console script is installed by `pip install -e .`"
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True)
    for name in COMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "--model" in capsys.readouterr().out


def test_info_prints_exits_and_costs(tmp_path, capsys):
    base = save_tiny_base("gpt_neox", tmp_path / "base")
    assert main(["info", "--model", base, "--exit_layers", "1", "3", "--head", "shared", "--adapter_rank", "4"]) == 0
    out = capsys.readouterr().out
    assert "gpt_neox, 4 layers" in out and "after layers [1, 3]" in out and "head shared" in out
    assert "exit@1" in out and "exit@3" in out and "full" in out


def test_bad_choice_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["info", "--head", "mlp"])
    assert "invalid choice: 'mlp'" in capsys.readouterr().err
