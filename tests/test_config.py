"""Config loading: YAML + dotted overrides, and errors that name the field and what was expected."""
import subprocess
import sys

import pytest

from distar.config import ConfigError, load_config


def test_builtin_config_loads_and_overrides_apply():
    cfg = load_config("gaussian2d", ["loss.alpha_rew=2.5", "train.steps=7", "reward.terms=[{name: region}]",
                                     "train.generator_optim.betas=[0.5, 0.9]"])
    assert cfg.loss.alpha_rew == 2.5 and cfg.train.steps == 7
    assert cfg.reward.terms[0].name == "region"
    assert cfg.train.generator_optim.betas == (0.5, 0.9)
    with pytest.raises(Exception):
        cfg.loss.alpha_rew = 3.0  # frozen


@pytest.mark.parametrize("override, expected", [
    (["loss.alpha_rew=-1"], r"loss.alpha_rew: .*greater than or equal to 0"),
    (["loss.bogus=1"], r"loss.bogus: unknown key"),
    (["train.steps=many"], r"train.steps: .*integer.*'many'"),
    (["loss.divergence=js"], r"loss.divergence: .*'score', 'kl' or 'none'"),
    (["loss.t_min=900", "loss.t_max=100"], r"loss.t_min \(900\) must be <= loss.t_max \(100\)"),
    (["loss.alpha_rew=1"], r"alpha_rew > 0 needs at least one entry in reward.terms"),
    (["loss.divergence=none"], r"divergence='none' with loss.alpha_rew=0 trains nothing"),
    (["model.world=sdxl"], r"model.reference: Field required"),
    (["model.hidden=0"], r"model.hidden: .*greater than 0"),
    (["train"], r"expected KEY=VALUE"),
])
def test_bad_values_name_the_field(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config("gaussian2d", override)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such file, and not a built-in config"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(lst)


def test_cli_reports_config_errors_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "distar.cli", "train", "--config", "gaussian2d", "loss.c=-2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "loss.c:" in proc.stderr and "greater than 0" in proc.stderr
    assert "Traceback" not in proc.stderr
