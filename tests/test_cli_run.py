"""csp-run checks its own inputs before any model work: options an export fixed, image paths,
prompt text, and the prompt's size against P_max before the vision graph runs."""

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cspkv.cli.run import main as csp_run
from cspkv.engines.onnx_runtime import OrtEngine
from cspkv.models.tiny import multi_image_prompt
from cspkv.engines.onnx_runtime import OnnxPipeline


def _error_line(result) -> str:
    assert result.exit_code in (1, 2) and isinstance(result.exception, SystemExit), (result.output, result.exception)
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.fixture
def no_vision(monkeypatch):
    """Fails the test if the vision graph runs: refusals must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the vision graph ran before the request was refused")

    monkeypatch.setattr(OrtEngine, "image_features", refuse)


@pytest.mark.parametrize("args,message", [
    (["--budget", "0.2"], "--budget 0.2 differs from this export's 0.5 (plan.budget), which was fixed when it was "
                          "exported: drop --budget, or re-run csp-export with --budget 0.2"),
    (["--policy", "snapkv"], "--policy snapkv differs from this export's csp (plan.policy)"),
    (["--policy", "nonsense"], "--policy nonsense differs from this export's csp (plan.policy)"),
    (["--decode-slots", "7"], "--decode-slots 7 differs from this export's 12 (plan.decode_slots)"),
    (["--budget", "2"], "--budget': 2.0 is not in the range 0<x<=1"),
    (["--budget", "0"], "--budget': 0.0 is not in the range 0<x<=1"),
    (["--decode-slots", "-5"], "-5 is not in the range x>=1"),
    (["--max-new-tokens", "0"], "0 is not in the range x>=1"),
    (["--eviction", "unbounded"], "an engine has a fixed number of slots"),
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt", "   "], "--prompt is empty"),
    (["--prompt", "caf\udce9?"], "--prompt is not valid UTF-8 text (byte 0xe9 at character 3)"),
])
def test_engine_options_and_prompt_are_checked_first(exports, no_vision, args, message):
    result = CliRunner().invoke(csp_run, ["--engine", str(exports("gqa", "csp", 0.5)), *args])
    assert message in _error_line(result)


def test_options_equal_to_the_exports_own_are_accepted(exports):
    folder = exports("gqa", "csp", 0.5)
    plain = CliRunner().invoke(csp_run, ["--engine", str(folder), "--max-new-tokens", "3"])
    same = CliRunner().invoke(csp_run, ["--engine", str(folder), "--max-new-tokens", "3", "--budget", "0.5",
                                        "--policy", "csp", "--decode-slots", "12"])
    assert plain.exit_code == same.exit_code == 0
    assert plain.output.splitlines()[0] == same.output.splitlines()[0]


def test_image_paths_are_checked_before_the_model(exports, tmp_path, no_vision):
    folder = str(exports("gqa", "csp", 0.5))
    (tmp_path / "dir").mkdir()
    (tmp_path / "notes.txt").write_text("not an image")
    runner = CliRunner()
    assert "is a directory" in _error_line(runner.invoke(csp_run, ["--engine", folder, "--image", str(tmp_path / "dir"),
                                                                   "--prompt", "q"]))
    assert "does not exist" in _error_line(runner.invoke(csp_run, ["--engine", folder, "--image",
                                                                   str(tmp_path / "gone.png"), "--prompt", "q"]))
    assert "--image needs a --prompt" in _error_line(runner.invoke(csp_run, ["--engine", folder, "--image",
                                                                             str(tmp_path / "notes.txt")]))


def test_too_many_images_are_refused_before_any_is_encoded(exports, tmp_path, no_vision):
    """17 images of 16 tokens need 272 prompt tokens; the export takes 256."""
    paths = []
    for i in range(17):
        paths += ["--image", str(tmp_path / f"{i}.png")]
        Image.fromarray(np.full((28, 28, 3), i, np.uint8)).save(tmp_path / f"{i}.png")
    result = CliRunner().invoke(csp_run, ["--engine", str(exports("gqa", "csp", 0.5)), *paths, "--prompt", "which?"])
    assert "17 images take 17 x 16 = 272 prompt tokens, but this export takes at most 256" in _error_line(result)


def test_the_pipeline_checks_sizes_before_the_vision_graph(exports, no_vision):
    pipeline = OnnxPipeline(exports("gqa", "csp", 0.5))
    too_long, pixels = multi_image_prompt(12)
    with pytest.raises(ValueError, match="at most 256"):
        pipeline.generate(too_long[0].numpy(), pixels.numpy())
    ids, pixels = multi_image_prompt(3)
    with pytest.raises(ValueError, match="48 image tokens but 2 images of 16 tokens were given"):
        pipeline.generate(ids[0].numpy(), pixels[:2].numpy())


def test_a_corrupt_image_file_is_one_line(tmp_path):
    from cspkv.models.prompting import load_images

    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    with pytest.raises(ValueError, match="truncated.png cannot be decoded as an image"):
        load_images([truncated], 28)
    with pytest.raises(ValueError, match="is a folder, not an image file"):
        load_images([tmp_path], 28)


def test_two_processes_on_one_export_folder_answer_as_one(exports):
    """The export folder is only read: two csp-run processes at once give the single run's tokens."""
    import subprocess
    import sys

    folder = str(exports("gqa", "csp", 0.5))
    command = [sys.executable, "-m", "cspkv.cli.run", "--engine", folder, "--max-new-tokens", "8"]
    alone = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    both = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate()[0] for p in both]
    assert [p.returncode for p in both] == [0, 0]
    assert outputs == [alone, alone] and alone.strip()
