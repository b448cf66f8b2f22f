"""The `ulens` dispatcher: exit codes, --config after any action, help texts."""
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from tests.helpers import free_ports
from ulens import cli

REPO = Path(__file__).resolve().parents[2]


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
    assert cli.main(["services", "--config", str(p), "status"]) == cli.EXIT_BAD_INPUT == 3
    err = capsys.readouterr().err
    assert "unknown key consumer.groop" in err and "Traceback" not in err


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "ulens.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "services" in out.stdout


# --- exit codes ---------------------------------------------------------------------------
def ulens(*argv, env=None, timeout=120):
    """`python -m ulens.cli ARGV` as its own process (the status the shell sees)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("ULENS_")}
    return subprocess.run([sys.executable, "-m", "ulens.cli", *argv], capture_output=True, text=True,
                          cwd=REPO, env={**base, **(env or {})}, timeout=timeout)


def test_exit_code_table_is_the_documented_one(capsys):
    assert cli.EXIT_CODES.keys() == {0, 1, 2, 3, 4, 130}
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for code, what in cli.EXIT_CODES.items():
        assert re.search(rf"^  {code} +{re.escape(what[:30])}", out, re.M), (code, out)


def test_usage_error_exits_2():
    out = ulens("events", "show")                      # the ID is missing
    assert out.returncode == cli.EXIT_USAGE == 2 and "required" in out.stderr
    assert ulens("consume", "--no-such-option").returncode == 2
    assert ulens().returncode == 2 and ulens("frobnicate").returncode == 2


def test_bad_config_file_exits_3(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("services:\n  redis_port: 70000\n")
    out = ulens("events", "--config", str(bad), "list")
    assert out.returncode == cli.EXIT_BAD_INPUT == 3, out.stderr
    assert "services.redis_port = 70000 is out of range" in out.stderr and str(bad) in out.stderr
    assert "Traceback" not in out.stderr


def test_unreachable_redis_exits_4_fast_with_the_password_masked():
    (port,) = free_ports(1)                            # nothing listens there
    out = ulens("events", "list", env={"ULENS_REDIS_URL": f"redis://:hunter2@127.0.0.1:{port}/0"})
    assert out.returncode == cli.EXIT_UNAVAILABLE == 4, out.stderr
    assert f"127.0.0.1:{port}" in out.stderr and "Connection refused" in out.stderr
    assert "Traceback" not in out.stderr and "hunter2" not in out.stderr + out.stdout


def _fake_command(monkeypatch, run):
    mod = types.ModuleType("tests_fake_ulens_command")
    mod.HELP, mod.add_arguments, mod.run = "a fake command", lambda parser: None, run
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setitem(cli.COMMANDS, "fake", (mod.__name__, mod.HELP))


def test_interrupt_exits_130(monkeypatch, capsys):
    def run(args):
        raise KeyboardInterrupt
    _fake_command(monkeypatch, run)
    assert cli.main(["fake"]) == cli.EXIT_INTERRUPTED == 130
    assert "interrupted" in capsys.readouterr().err


def _raised_in(package: str, base: type, **attrs) -> BaseException:
    return type("Failure", (base,), {"__module__": f"{package}.somewhere", **attrs})("it failed")


@pytest.mark.parametrize("exc, code", [
    (_raised_in("broker", Exception, exit_code=4), 4),       # the project's exceptions say their code
    (_raised_in("replay", ValueError, exit_code=4), 4),
    (_raised_in("training", ValueError), 3),                 # else: ValueError/OSError = bad input
    (_raised_in("ulens", OSError), 3),
    (_raised_in("broker", RuntimeError), None),              # anything else is a bug: raised
    (_raised_in("numpy", ValueError, exit_code=3), None),    # another package's attribute means nothing
])
def test_exceptions_map_to_the_table(monkeypatch, capsys, exc, code):
    def run(args):
        raise exc
    _fake_command(monkeypatch, run)
    assert cli.exit_code_for(exc) == code
    if code is None:
        with pytest.raises(type(exc)):
            cli.main(["fake"])
        return
    assert cli.main(["fake"]) == code
    err = capsys.readouterr().err
    assert "it failed" in err and "Traceback" not in err


FAKE = ("import sys, types\n"
        "from ulens import cli\n"
        "mod = types.ModuleType('fake_cmd')\n"
        "mod.HELP, mod.add_arguments = 'fake', lambda p: None\n"
        "def run(args):\n"
        "    raise {exc}\n"
        "mod.run = run\n"
        "sys.modules['fake_cmd'] = mod\n"
        "cli.COMMANDS['fake'] = ('fake_cmd', 'fake')\n"
        "sys.exit(cli.main(['fake']))\n")


@pytest.mark.parametrize("exc, code, says", [
    ("KeyboardInterrupt", 130, "interrupted"),
    ("RuntimeError('a bug')", 1, "Traceback"),
])
def test_interrupt_and_bug_as_the_shell_sees_them(exc, code, says):
    out = subprocess.run([sys.executable, "-c", FAKE.format(exc=exc)], capture_output=True, text=True,
                         cwd=REPO, timeout=60)
    assert out.returncode == code and says in out.stderr, out.stderr


def test_project_error_classes_carry_their_code():
    import config
    from replay.producer import KafkaUnavailable
    from ulens.services import PortInUse, ServiceError
    assert config.ConfigError.exit_code == 3
    assert ServiceError.exit_code == PortInUse.exit_code == KafkaUnavailable.exit_code == 4


def test_services_status_exits_4_and_masks_credentials(tmp_path):
    kport, cport, rport = free_ports(3)               # nothing runs there
    conf = tmp_path / "c.yaml"
    conf.write_text(f"services:\n  state_dir: {tmp_path / 'state'}\n  kafka_port: {kport}\n"
                    f"  kafka_controller_port: {cport}\n  redis_port: {rport}\n")
    env = {"ULENS_REDIS_URL": "redis://ops:hunter2@redis.example.org:6380/0",
           "ULENS_KAFKA_BOOTSTRAP": "SASL_SSL://svc:kpass@kafka.example.org:9093"}
    text = ulens("services", "--config", str(conf), "status", env=env)
    js = ulens("services", "--config", str(conf), "status", "--json", env=env)
    for out in (text, js):
        assert out.returncode == cli.EXIT_UNAVAILABLE, out.stderr
        assert "hunter2" not in out.stdout + out.stderr and "kpass" not in out.stdout + out.stderr
    assert "redis://ops:***@redis.example.org:6380/0" in text.stdout
    assert json.loads(js.stdout)["config_uses"] == {"kafka": "SASL_SSL://svc:***@kafka.example.org:9093",
                                                    "redis": "redis://ops:***@redis.example.org:6380/0"}
