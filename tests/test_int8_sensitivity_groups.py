"""The sensitivity script's group parser: a typo must be refused, not silently measured as "nothing kept"."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "int8_sensitivity.py"


@pytest.fixture(scope="module")
def sensitivity():
    spec = importlib.util.spec_from_file_location("int8_sensitivity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_layer_range_parses_ranges_and_single_layers(sensitivity):
    assert sensitivity.layer_range("layers:0-1") == (0, 1)
    assert sensitivity.layer_range("layers:29") == (29, 29)


@pytest.mark.parametrize("part", ["layers:", "layers:3-1", "layers:-2", "layers:a", "layer:1", "down_proj"])
def test_layer_range_refuses_malformed(sensitivity, part):
    with pytest.raises(ValueError):
        sensitivity.layer_range(part)


def test_unknown_group_is_a_usage_error(sensitivity, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sensitivity.main(["--fp32", "/nonexistent", "--groups", "down_proj+layers:5-2"])
    assert exit_info.value.code == 2
    assert "unknown group layers:5-2" in capsys.readouterr().err
