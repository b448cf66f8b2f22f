"""The `ulens` dispatcher."""
import subprocess
import sys

import pytest

from ulens import cli


def test_top_level_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


def test_every_command_module_has_the_contract():
    import importlib
    for name, (mod, help_) in cli.COMMANDS.items():
        m = importlib.import_module(mod)
        assert help_ and m.HELP and callable(m.add_arguments) and callable(m.run), name


def test_unknown_command(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_bad_config_is_a_clean_error(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("consumer:\n  groop: x\n")
    assert cli.main(["services", "--config", str(p), "status"]) == 2
    err = capsys.readouterr().err
    assert "unknown key consumer.groop" in err and "Traceback" not in err


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "ulens.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "services" in out.stdout
