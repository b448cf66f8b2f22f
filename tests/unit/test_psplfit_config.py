"""Choosing and configuring the decision rule: config keys, CLI options, validation."""
from __future__ import annotations

from dataclasses import asdict

import pytest

import config as cfg
from broker.rule_psplfit import params_from_settings
from training import psplfit
from ulens import cli


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_of_config_and_code_agree():
    s = cfg.load(env={})
    assert s.consumer.rule == "pspl-fit" and s.consumer.rules == ("pspl-fit",)
    # default.yaml, the settings dataclass and the rule's own defaults are one set of values
    assert params_from_settings(s) == psplfit.Params()
    assert asdict(s.consumer.pspl_fit) == asdict(cfg.PsplFitSettings())


@pytest.mark.parametrize("rule, rules", [("pspl-fit", ("pspl-fit",)), ("both", ("tdcnn", "pspl-fit")),
                                         ("tdcnn", ("tdcnn",))])
def test_rule_choice(tmp_path, rule, rules):
    s = cfg.load(write(tmp_path, f"consumer:\n  rule: {rule}\n  pspl_fit:\n    threshold: 80\n"), env={})
    assert s.consumer.rules == rules and params_from_settings(s).threshold == 80.0


@pytest.mark.parametrize("text, needle", [
    ("consumer:\n  rule: cnn\n", "consumer.rule must be one of ['tdcnn', 'pspl-fit', 'both']"),
    ("consumer:\n  pspl_fit:\n    treshold: 3\n", "unknown key consumer.pspl_fit.treshold"),
    ("consumer:\n  pspl_fit:\n    robust_c: 0\n", "consumer.pspl_fit.robust_c = 0"),
    ("consumer:\n  pspl_fit:\n    window_max: 512\n", "consumer.pspl_fit.window_max = 512 is out of range"),
    ("consumer:\n  pspl_fit:\n    min_points: 2.5\n", "consumer.pspl_fit.min_points must be an integer"),
    ("consumer:\n  pspl_fit:\n    window_min: 16\n    window_max: 4\n",
     "consumer.pspl_fit.window_min = 16 must be <= window_max = 4"),
    ("consumer:\n  pspl_fit:\n    threshold: 10\n    refit_level: 20\n",
     "consumer.pspl_fit.threshold = 10.0 must be >= refit_level = 20.0"),
])
def test_bad_rule_settings_name_the_key_and_the_file(tmp_path, text, needle):
    p = write(tmp_path, text)
    with pytest.raises(cfg.ConfigError) as e:
        cfg.load(p, env={})
    assert needle in str(e.value) and str(p) in str(e.value)


def test_consume_rule_option(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["consume", "--rule", "cnn"])
    assert e.value.code == 2
    assert "invalid choice: 'cnn'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["consume", "--help"])
    assert "pspl-fit" in capsys.readouterr().out


def test_evaluate_rule_options(tmp_path, capsys):
    assert cli.main(["evaluate", "--data", str(tmp_path / "x.npz")]) == 3
    assert "--model is required with --rule tdcnn" in capsys.readouterr().err
    assert cli.main(["evaluate", "--rule", "both", "--data", str(tmp_path / "x.npz")]) == 3
    assert "--rule both needs --model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["evaluate", "--rule", "fit", "--data", "x.npz"])
    assert e.value.code == 2
