"""The `ulens` dispatcher: exit codes, --config after any action, help texts."""
import argparse
import importlib
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
    readme = (REPO / "README.md").read_text()
    for code in cli.EXIT_CODES:
        assert re.search(rf"^\| `{code}` \|", readme, re.M), f"README: no row for exit code {code}"


def test_usage_error_exits_2():
    out = ulens("events", "show")                      # the ID is missing
    assert out.returncode == cli.EXIT_USAGE == 2 and "required" in out.stderr
    assert ulens("consume", "--no-such-option").returncode == 2
    assert ulens().returncode == 2 and ulens("frobnicate").returncode == 2


def test_bad_config_file_exits_3(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("services:\n  redis_port: 70000\n")
    out = ulens("events", "list", "--config", str(bad))
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


def test_client_errors_of_kafka_and_redis():
    import redis
    from confluent_kafka import KafkaError, KafkaException
    assert cli.exit_code_for(KafkaException(KafkaError(KafkaError._TRANSPORT))) == 4
    assert cli.exit_code_for(KafkaException(KafkaError(KafkaError._ALL_BROKERS_DOWN))) == 4
    assert cli.exit_code_for(KafkaException(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED))) is None
    assert cli.exit_code_for(redis.ConnectionError("Error 111 connecting")) == 4
    assert cli.exit_code_for(redis.TimeoutError("Timeout reading")) == 4
    assert cli.exit_code_for(redis.AuthenticationError("invalid password")) == 3
    assert cli.exit_code_for(redis.ResponseError("ERR unknown command")) is None


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
    text = ulens("services", "status", "--config", str(conf), env=env)
    js = ulens("services", "status", "--json", "--config", str(conf), env=env)
    for out in (text, js):
        assert out.returncode == cli.EXIT_UNAVAILABLE, out.stderr
        assert "hunter2" not in out.stdout + out.stderr and "kpass" not in out.stdout + out.stderr
    assert "redis://ops:***@redis.example.org:6380/0" in text.stdout
    assert json.loads(js.stdout)["config_uses"] == {"kafka": "SASL_SSL://svc:***@kafka.example.org:9093",
                                                    "redis": "redis://ops:***@redis.example.org:6380/0"}


# --- --config after any action --------------------------------------------------------------
def _nested_actions():
    for name, (mod, _) in cli.COMMANDS.items():
        parser = cli.build_parser(name, importlib.import_module(mod))
        for sub in cli._nested_parsers(parser):
            yield name, parser, sub


def test_config_is_accepted_after_every_nested_action(tmp_path):
    f = str(tmp_path / "f.yaml")
    found = set()
    for name, parser, sub in _nested_actions():
        words = sub.prog.split()[2:]                 # "ulens events show" -> ["show"]
        args = {"show": ["1"]}.get(words[-1], [])
        found.add(" ".join([name, *words]))
        assert parser.parse_args([*words, *args, "--config", f]).config == f, sub.prog
        assert parser.parse_args(["--config", f, *words, *args]).config == f, sub.prog   # not reset
        assert parser.parse_args([*words, *args]).config is None
    assert {"events show", "events list", "services status", "services up"} <= found


def test_events_show_takes_config_after_the_id(tmp_path, capsys):
    (port,) = free_ports(1)
    conf = tmp_path / "c.yaml"
    conf.write_text(f"redis:\n  url: redis://127.0.0.1:{port}/0\n")
    # the file's Redis (nothing listens there) is used: --config after the id is not refused
    assert cli.main(["events", "show", "1", "--config", str(conf)]) == cli.EXIT_UNAVAILABLE
    assert f"127.0.0.1:{port}" in capsys.readouterr().err


# --- --help: every option explained, each default once ------------------------------------------
def _all_parsers():
    for name, (mod, _) in cli.COMMANDS.items():
        parser = cli.build_parser(name, importlib.import_module(mod))
        yield parser
        yield from cli._nested_parsers(parser)


def test_help_states_each_default_once_and_explains_every_option():
    for parser in _all_parsers():
        text = parser.format_help()
        for block in re.split(r"\n(?=  -)", text.split("options:", 1)[-1]):
            assert block.count("(default") <= 1, (parser.prog, block)
            assert "(default: None)" not in block, (parser.prog, block)
        for a in parser._actions:
            if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
                assert a.help, f"{parser.prog} {'/'.join(a.option_strings) or a.dest}: no help text"


def test_help_formatter_adds_a_meaningful_default_only():
    p = argparse.ArgumentParser(formatter_class=cli.HelpFormatter)
    p.add_argument("--n", type=int, default=5, help="how many")
    p.add_argument("--group", default=None, help="the group (default: consumer.group)")
    p.add_argument("--dir", default="x", help="where [default <cache>/x]")
    p.add_argument("--flag", action="store_true", help="a switch")
    p.add_argument("--opt", default=None, help="optional")
    text = " ".join(p.format_help().split())
    assert "how many (default: 5)" in text
    assert "the group (default: consumer.group) --dir" in text
    assert "where [default <cache>/x] --flag" in text
    assert "a switch --opt" in text and "optional" in text and "(default: None)" not in text
    assert "(default: False)" not in text
