"""`csp-run --engine` needs only the base install: a run in a fresh process whose importer refuses
torch and transformers generates and never asks for either; the processor entry of manifest.json that
the runtime relies on is checked like every other field."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from tiny_processor import tiny_processor

from cspkv.cli.run import main as csp_run
from cspkv.export.exporter import save_processor
from cspkv.export.manifest import finish_manifest, write_manifest

# Runs csp-run with an importer in front of every other that refuses torch and transformers, and
# reports at exit every such import that was attempted (a refused optional import would not fail the run).
GUARDED_RUN = """
import atexit, sys
BANNED = ("torch", "transformers")
attempts = []

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BANNED:
            attempts.append(name)
            raise ImportError(f"{name} is imported on the runtime path")
        return None

sys.meta_path.insert(0, Refuse())
atexit.register(lambda: print("banned imports:", sorted(set(attempts)),
                              sorted(m for m in sys.modules if m.partition(".")[0] in BANNED), file=sys.stderr))
from cspkv.cli.run import main
main(sys.argv[1:], prog_name="csp-run")
"""


def guarded_run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", GUARDED_RUN, *map(str, args)], capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def with_processor(exports, tmp_path_factory):
    """A tiny export with a processor folder, written by the exporter's own save_processor and manifest
    writer (graphs, hashes and all)."""
    folder = tmp_path_factory.mktemp("tiny-with-processor") / "export"
    shutil.copytree(exports("gqa", "csp", 0.5), folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["processor"] = save_processor(tiny_processor(), folder)
    write_manifest(folder, finish_manifest(folder, manifest))
    return folder


def test_guarded_run_refuses_torch():
    """The guard works: the PyTorch reference, which needs torch, fails under it."""
    run = guarded_run("--model", "tiny", "--max-new-tokens", "2")
    assert run.returncode != 0 and "torch is imported on the runtime path" in run.stderr


def test_engine_without_processor_runs_without_torch(exports):
    run = guarded_run("--engine", exports("gqa", "csp", 0.5), "--max-new-tokens", "5")
    assert run.returncode == 0, run.stderr
    assert "banned imports: [] []" in run.stderr
    assert len(run.stdout.split()) == 5 and "tokens/s" in run.stderr


def test_engine_with_processor_runs_without_torch(with_processor, tmp_path):
    demo = guarded_run("--engine", with_processor, "--max-new-tokens", "4")
    assert demo.returncode == 0, demo.stderr
    assert "banned imports: [] []" in demo.stderr and "tokens/s" in demo.stderr and demo.stdout.strip()
    paths = []
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        paths += ["--image", tmp_path / f"{i}.png"]
        Image.fromarray(np.full((40, 30, 3), colour, np.uint8)).save(tmp_path / f"{i}.png")
    asked = guarded_run("--engine", with_processor, *paths, "--prompt", "Which image shows a red square?",
                        "--max-new-tokens", "4")
    assert asked.returncode == 0, asked.stderr
    assert "banned imports: [] []" in asked.stderr and "prompt" in asked.stderr


def test_the_guarded_answer_is_the_in_process_answer(with_processor):
    """Without the guard (torch importable, in this process) the same export gives the same tokens."""
    plain = CliRunner().invoke(csp_run, ["--engine", str(with_processor), "--max-new-tokens", "4"])
    guarded = guarded_run("--engine", with_processor, "--max-new-tokens", "4")
    assert plain.exit_code == 0, plain.output
    assert plain.output.splitlines()[0] == guarded.stdout.splitlines()[0]


def _refused_with(folder, tmp_path, change, message):
    work = tmp_path / "export"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(folder, work)
    manifest = json.loads((work / "manifest.json").read_text())
    change(manifest["processor"])
    (work / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(csp_run, ["--engine", str(work), "--max-new-tokens", "2"])
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 1 and len(errors) == 1 and "Traceback" not in result.output, result.output
    assert message in errors[0] and "re-run csp-export" in errors[0], errors[0]


@pytest.mark.parametrize("change,message", [
    (lambda p: p.update(image_size=224), "processor.image_size is 224, expected 28 (= plan.image_size)"),
    (lambda p: p.update(image_tokens=256), "processor.image_tokens is 256, expected 16 (= plan.image_tokens)"),
    (lambda p: p.update(image_token_id=98), "processor.image_token_id is 98, expected 99 (= model.image_token_id)"),
    (lambda p: p.update(image_token=""), "processor.image_token is '', expected the image placeholder's text"),
    (lambda p: p.update(image_token="<img>"), "gives '<img>' the id None, but manifest.json's "
                                              "processor.image_token_id is 99"),
    (lambda p: p.update(image_mean=[0.5, 0.5]), "processor.image_mean is [0.5, 0.5], expected 3 finite numbers"),
    (lambda p: p.update(image_std=[0.2, 0.0, 0.2]), "processor.image_std is [0.2, 0.0, 0.2], expected 3 positive"),
    (lambda p: p.update(image_std=[0.2, "0.2", 0.2]), "processor.image_std is [0.2, '0.2', 0.2], expected 3"),
    (lambda p: p.update(resize_filter="cubic"), "processor.resize_filter is 'cubic', expected one of nearest, "
                                                "bilinear, bicubic, lanczos"),
    (lambda p: p.pop("image_mean"), "processor.image_mean is missing"),
    (lambda p: p.pop("resize_filter"), "processor.resize_filter is missing"),
])
def test_bad_processor_entries_are_refused_in_one_line(with_processor, tmp_path, change, message):
    _refused_with(with_processor, tmp_path, change, message)


def test_an_export_of_an_older_manifest_version_is_refused(with_processor, tmp_path):
    work = tmp_path / "old"
    shutil.copytree(with_processor, work)
    manifest = json.loads((work / "manifest.json").read_text())
    manifest["manifest_version"] = 3
    for key in ("image_size", "image_mean", "image_std", "image_token", "image_token_id", "image_tokens",
                "resize_filter"):
        del manifest["processor"][key]
    (work / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(csp_run, ["--engine", str(work)])
    assert result.exit_code == 1 and "has manifest version 3; this cspkv reads version 5: re-export" in result.output
