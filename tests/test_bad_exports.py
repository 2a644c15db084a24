"""An export folder is checked against itself and its graphs before the first inference: every
manifest field and graph file is mutated in turn, and each mutation gives a one-line error or
(for fields the runtime does not read) exactly the unmutated answer, never a traceback and never
a different answer."""

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from cspkv.cli.run import main as csp_run
from cspkv.runtime.manifest import STAMP_KEY, file_sha256

# Fields that describe the export for people (or for re-conversion) and that nothing at run time
# reads: changing them must change nothing. Every other field must be refused when it changes.
INFORMATIONAL = {
    ("export_seconds",), ("exporter",), ("graph_code",), ("opset",), ("versions",), ("model", "id"),
    ("model", "eos_token_id"),
    ("model", "text_model_type"), ("slots", "kept_at_budget"),
}


def _informational(path: tuple) -> bool:
    return any(path[:len(prefix)] == prefix for prefix in INFORMATIONAL)


def _leaves(value, path=()):
    """Every leaf of the manifest (a list of numbers, e.g. a shape, is one leaf)."""
    if isinstance(value, dict) and value:
        for key, item in value.items():
            yield from _leaves(item, path + (key,))
    else:
        yield path


def _mutated(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 + 0.25
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return value[:-1] + [value[-1] + 1] if value else [1]
    return 1                                                     # None (e.g. processor, eos_token_id)


def _set(manifest: dict, path: tuple, value) -> dict:
    changed = copy.deepcopy(manifest)
    node = changed
    for key in path[:-1]:
        node = node[key]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return changed


_DELETE = object()


def _run(folder: Path):
    return CliRunner().invoke(csp_run, ["--engine", str(folder), "--max-new-tokens", "4"])


def _assert_refused(result, *fragments):
    """A clean refusal: exit code 1 or 2 from click, one 'Error:' line, no traceback."""
    assert result.exit_code in (1, 2), (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def export(exports, tmp_path_factory):
    """A tiny export with a null slot (so plan.decode_n matters) and its answer, first line only."""
    folder = exports("gqa", "csp", 0.5, decode_n=1.0)
    result = _run(folder)
    assert result.exit_code == 0, result.output
    return folder, json.loads((folder / "manifest.json").read_text()), result.output.splitlines()[0]


def test_every_manifest_field_is_checked_or_changes_nothing(export, tmp_path):
    folder, manifest, answer = export
    work = tmp_path / "export"
    shutil.copytree(folder, work)
    paths = list(_leaves(manifest))
    cases = [(path, _mutated(_get(manifest, path))) for path in paths]
    cases += [((key,), _DELETE) for key in manifest]                                  # a section gone
    cases += [(("model", key), _DELETE) for key in manifest["model"]]
    cases += [(("plan", key), _DELETE) for key in manifest["plan"]]
    refused, unchanged = [], []
    for path, value in cases:
        (work / "manifest.json").write_text(json.dumps(_set(manifest, path, value)))
        result = _run(work)
        if _informational(path):
            assert result.exit_code == 0 and result.output.splitlines()[0] == answer, (path, result.output)
            unchanged.append(path)
        else:
            line = _assert_refused(result)
            assert "csp-export" in line or "re-export" in line, (path, line)   # says what to do
            refused.append(path)
    assert len(refused) > 80 and unchanged                                  # the whole manifest was walked


def _get(manifest, path):
    for key in path:
        manifest = manifest[key]
    return manifest


@pytest.mark.parametrize("field,value,message", [
    ("plan.n_slots", 999, "plan.n_slots is 999, expected"),
    ("model.layers", 3, "model.layers = 3, but"),
    ("plan.decode_n", 2.0, "plan.decode_n = 2.0, but vision.onnx was exported with 1.0"),
    ("graphs.decode", "../decode.onnx", "graphs.decode names '../decode.onnx', which is not a file name inside"),
])
def test_mismatched_manifest_fields_are_named_with_both_values(export, tmp_path, field, value, message):
    folder, manifest, _ = export
    work = tmp_path / "export"
    shutil.copytree(folder, work)
    (work / "manifest.json").write_text(json.dumps(_set(manifest, tuple(field.split(".")), value)))
    _assert_refused(_run(work), message)


def _replace_graph(work: Path, manifest: dict, role: str, source: Path) -> None:
    """Put ``source`` in place of the role's graph and update its hash and size, as someone
    swapping files by hand would."""
    name = manifest["graphs"][role]
    shutil.copyfile(source, work / name)
    changed = copy.deepcopy(manifest)
    changed["files"][name] = {"sha256": file_sha256(work / name), "bytes": (work / name).stat().st_size}
    (work / "manifest.json").write_text(json.dumps(changed))


def _restamped(source: Path, target: Path, stamp: str | None) -> Path:
    model = onnx.load(str(source))
    props = [p for p in model.metadata_props if p.key != STAMP_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(props)
    if stamp is not None:
        model.metadata_props.add(key=STAMP_KEY, value=stamp)
    onnx.save(model, str(target))
    return target


def test_graph_files_of_another_role_export_or_model_are_refused(export, exports, tmp_path):
    folder, manifest, _ = export
    work = tmp_path / "export"
    other = exports("gqa", "csp", 0.2, decode_n=1.0)            # same model, another budget
    mha = exports("mha", "csp", 0.5)                             # another model
    stamp_of = {role: onnx.load(str(folder / f"{role}.onnx"), load_external_data=False).metadata_props
                for role in ("decode",)}
    this_stamp = next(p.value for p in stamp_of["decode"] if p.key == STAMP_KEY)
    cases = [
        ("decode", folder / "prefill.onnx", "is the prefill graph, but manifest.json uses it as the decode graph"),
        ("prefill", folder / "vision.onnx", "is the vision graph"),
        ("decode", other / "decode.onnx", "plan.budget = 0.5, but decode.onnx was exported with 0.2"),
        ("decode", mha / "decode.onnx", "model.fingerprint"),
        ("decode", _restamped(folder / "decode.onnx", tmp_path / "unstamped.onnx", None), "carries no cspkv stamp"),
        # another export's graph with this export's stamp forged onto it: its shapes still give it away
        ("decode", _restamped(other / "decode.onnx", tmp_path / "forged.onnx", this_stamp),
         "but manifest.json says float32"),
    ]
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    cases.append(("decode", corrupt, "cannot be loaded by onnxruntime"))
    for role, source, message in cases:
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(folder, work)
        _replace_graph(work, manifest, role, source)
        _assert_refused(_run(work), message)
    # truncated, and deleted, with the manifest untouched
    shutil.rmtree(work)
    shutil.copytree(folder, work)
    data = (work / "decode.onnx").read_bytes()
    (work / "decode.onnx").write_bytes(data[: len(data) // 2])
    _assert_refused(_run(work), "truncated or replaced")
    (work / "decode.onnx").unlink()
    _assert_refused(_run(work), "decode.onnx is missing")
