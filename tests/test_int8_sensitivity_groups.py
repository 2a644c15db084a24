"""The int8 sensitivity tool's group parser: a typo must be refused, not silently measured as "nothing kept"."""

import pytest

from cspkv.quantize import sensitivity as sensitivity_module


@pytest.fixture(scope="module")
def sensitivity():
    return sensitivity_module


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


def test_forced_agreement_counts_each_flipped_position(sensitivity):
    import numpy as np

    want = [[np.array([3.0, 0.0, 0.0]), np.array([0.0, 3.0, 0.0])]]
    same = sensitivity.forced_agreement(want, want, [[0, 1]])
    assert same == {"forced_flip_rate": 0.0, "forced_answer_kl": 0.0, "forced_positions": 2}
    # the second position now prefers token 2: one flip of two, and a positive KL there only
    got = [[want[0][0], np.array([0.0, 3.0, 3.5])]]
    flipped = sensitivity.forced_agreement(got, want, [[0, 1]])
    assert flipped["forced_flip_rate"] == 0.5
    assert flipped["forced_answer_kl"] == pytest.approx(sensitivity.kl(want[0][1], got[0][1]) / 2)
    assert flipped["forced_answer_kl"] > 0
