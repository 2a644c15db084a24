"""csp-export: ONNX Runtime parity with the PyTorch reference, TensorRT readiness, polygraphy, errors."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cspkv.engines.onnx_runtime import OrtEngine
from cspkv.export.exporter import ExportError, ExportPlan, export_model
from cspkv.export.manifest import model_fingerprint
from cspkv.runtime.manifest import ManifestError
from cspkv.export.polygraphy_io import write_polygraphy_inputs
from cspkv.export.readiness import check_export
from cspkv.models.llava import LlavaReference
from cspkv.models.tiny import multi_image_prompt, tiny_llava
from cspkv.pruning import get_policy
from cspkv.pruning.spec import parse_policy
from cspkv.engines.onnx_runtime import OnnxPipeline

from conftest import DECODE_SLOTS, P_MAX

NEW_TOKENS = 32
CASES = [("gqa", policy, budget) for policy in ("csp", "snapkv", "streaming_llm") for budget in (1.0, 0.5, 0.2)]
CASES += [("mha", "csp", budget) for budget in (1.0, 0.5, 0.2)]
# the recent window capped below beta x W, and layer-adaptive budgets (the tiny model's 2 layers keep
# 1.5 C and 0.5 C): both settings of every window policy, here through CSP
CASES += [("gqa", "csp(recent_cap=0.25)", 0.2), ("gqa", "csp(pyramid=0.5)", 0.5)]


def reference_run(model, policy, budget, ids, pixels, n_slots, new_tokens=NEW_TOKENS, eviction="ring", decode_n=0.0):
    ref = LlavaReference(model)
    spec = parse_policy(policy)
    prefill = ref.prefill(ids, pixels, {policy: spec.policy})
    pruned = ref.prune(prefill, policy, budget)
    # the export's S slots are shared: a shorter prompt leaves S - C slots for generated tokens
    null = 1 if decode_n > 0 else 0
    decoded = ref.decode(pruned, int(prefill.logits[0].argmax()), new_tokens, eviction=eviction,
                         decode_slots=n_slots - null - pruned.n_entries, decode_n=decode_n)
    return pruned, [prefill.logits[0].numpy()] + [l.numpy() for l in decoded.logits], decoded.tokens


@pytest.mark.parametrize("arch,policy,budget", CASES)
def test_onnx_runtime_matches_the_reference(models, exports, arch, policy, budget):
    model = models[arch]
    engine = OrtEngine(exports(arch, policy, budget))
    pipeline = OnnxPipeline(engine)
    for n_images in (1, 3, 8):                                  # all shorter than P_max
        ids, pixels = multi_image_prompt(n_images, seed=n_images + 10)
        assert ids.shape[1] < P_MAX
        result = pipeline.generate(ids[0].numpy(), pixels.numpy(), max_new_tokens=NEW_TOKENS)
        pruned, ref_logits, ref_tokens = reference_run(model, policy, budget, ids, pixels, engine.n_slots)
        counts = pruned.layer_counts
        assert sum(counts) == len(counts) * math.ceil(budget * ids.shape[1])
        assert result.kept.shape[-1] == max(counts)
        np.testing.assert_array_equal(result.kept, pruned.positions.numpy())
        worst = max(float(np.abs(a - b).max()) for a, b in zip(result.logits, ref_logits))
        assert worst < 1e-4, (n_images, worst)
        assert result.tokens == ref_tokens


def test_graphs_are_tensorrt_ready(exports):
    folder = exports("gqa", "csp", 0.5)
    manifest = json.loads((folder / "manifest.json").read_text())
    for role, report in check_export(folder, manifest).items():
        assert report.ok, (role, report.problems)
    ops = check_export(folder, manifest)["prefill"].op_counts
    assert "TopK" not in ops and ops["ScatterElements"] and ops["CumSum"]   # the selection is sort-free


def test_readiness_flags_what_tensorrt_would_reject(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from cspkv.export.readiness import check_graph

    k = helper.make_tensor("k", TensorProto.INT64, [1], [4000])
    nodes = [helper.make_node("TopK", ["x", "k"], ["v", "i"], sorted=0, name="topk"),
             helper.make_node("NonZero", ["x"], ["nz"], name="nonzero")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 5000])],
                              [helper.make_tensor_value_info("v", TensorProto.FLOAT, None)], [k])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    problems = "\n".join(check_graph(path).problems)
    for expected in ("opset 17", "sorted=1", "K=4000", "NonZero", "dynamic dimension"):
        assert expected in problems


def test_polygraphy_runs_every_graph_and_compares_two_exports(exports, models, tmp_path):
    first = exports("gqa", "csp", 0.5)
    second = tmp_path / "again"
    export_model(models["gqa"], second, ExportPlan.make(models["gqa"], "csp", {}, 0.5, P_MAX, DECODE_SLOTS, 0.0),
                 "tiny-gqa", force=True)
    manifest = json.loads((first / "manifest.json").read_text())
    inputs = write_polygraphy_inputs(manifest, tmp_path / "inputs")
    polygraphy = [str(Path(sys.executable).parent / "polygraphy")]
    for role, name in manifest["graphs"].items():
        saved = tmp_path / f"{role}_outputs.json"
        run = subprocess.run([*polygraphy, "run", "--onnxrt", str(first / name), "--load-inputs",
                              str(inputs[role]), "--save-outputs", str(saved)], capture_output=True, text=True)
        assert run.returncode == 0, run.stdout + run.stderr
        compare = subprocess.run([*polygraphy, "run", "--onnxrt", str(second / name), "--load-inputs",
                                  str(inputs[role]), "--load-outputs", str(saved), "--atol", "1e-5",
                                  "--rtol", "1e-5"], capture_output=True, text=True)
        assert compare.returncode == 0 and "PASSED" in compare.stdout + compare.stderr, compare.stdout + compare.stderr


def test_bad_export_requests_say_what_to_do(models, tmp_path):
    model = models["gqa"]
    with pytest.raises(ExportError, match="budget must be a number in \\(0, 1\\]"):
        ExportPlan.make(model, "csp", {}, 0.0, 128, 8, 0.0)
    with pytest.raises(ExportError, match="exceeds the model's context of 1024"):
        ExportPlan.make(model, "csp", {}, 0.5, 2000, 8, 0.0)
    with pytest.raises(ExportError, match="unknown policy"):
        ExportPlan.make(model, "best", {}, 0.5, 128, 8, 0.0)
    with pytest.raises(ExportError, match="'paper'"):
        ExportPlan.make(model, "csp", {"variant": "paper"}, 0.5, 128, 8, 0.0)
    with pytest.raises(ExportError, match="not LLaVA-like"):
        ExportPlan.make(model.model.language_model, "csp", {}, 0.5, 128, 8, 0.0)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    plan = ExportPlan.make(model, "csp", {}, 0.5, 128, 8, 0.0)
    with pytest.raises(ExportError, match="already exists.*--force"):
        export_model(model, tmp_path / "taken", plan, "tiny")


def test_cli_errors_and_help():
    from cspkv.cli.export import main

    runner = CliRunner()
    assert runner.invoke(main, ["--help"]).exit_code == 0
    for args, message in ((["--model", "/nonexistent/llava"], "unknown model"),
                          (["--model", "llava"], "CSPKV_LLAVA_PATH"),
                          (["--model", "tiny", "--budget", "1.5"], "budget must be"),
                          (["--model", "tiny", "--pyramid", "1.5"], "pyramid (the layer budgets' slope) must be in [0, 1)"),
                          (["--model", "tiny", "--recent-cap", "-1"], "recent_cap must be a share of the budget"),
                          (["--model", "tiny", "--max-prompt", "4000"], "exceeds the model's context")):
        result = runner.invoke(main, [*args, "--out", "/tmp/cspkv-never-written"], env={"CSPKV_LLAVA_PATH": ""})
        assert result.exit_code != 0 and message in result.output, result.output


def test_engine_refuses_missing_corrupt_or_foreign_folders(exports, tmp_path):
    source = exports("gqa", "csp", 0.5)
    with pytest.raises(ManifestError, match="not a folder"):
        OrtEngine(tmp_path / "absent")
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="corrupt"):
        OrtEngine(copy)
    shutil.copy(source / "manifest.json", copy / "manifest.json")
    data = bytearray((copy / "decode.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "decode.onnx").write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="does not match its manifest hash"):
        OrtEngine(copy)
    manifest = json.loads((source / "manifest.json").read_text())
    manifest["manifest_version"] = 99
    shutil.copy(source / "decode.onnx", copy / "decode.onnx")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="manifest version 99"):
        OrtEngine(copy)


def test_layer_budgets_in_the_manifest_are_checked_against_the_budget(exports, tmp_path):
    source = exports("gqa", "csp(pyramid=0.5)", 0.5)
    manifest = json.loads((source / "manifest.json").read_text())
    layer_keep = manifest["plan"]["layer_keep"]
    assert sum(layer_keep) == 2 * math.ceil(0.5 * P_MAX) and manifest["plan"]["max_keep"] == max(layer_keep) > layer_keep[1]
    for changed, message in (([layer_keep[0] + 1, layer_keep[1]], "more than 2 layers x"),
                             ([layer_keep[0]], "must list 2 entry counts"),
                             ([layer_keep[0] - 1, layer_keep[1] + 1], "plan.max_keep is")):
        copy = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(source, copy)
        (copy / "manifest.json").write_text(json.dumps({**manifest, "plan": {**manifest["plan"], "layer_keep": changed}}))
        with pytest.raises(ManifestError, match=message):
            OrtEngine(copy)


def test_pipeline_rejects_oversized_prompts_and_wrong_images(exports):
    engine = OrtEngine(exports("gqa", "csp", 0.5))
    pipeline = OnnxPipeline(engine)
    ids, pixels = multi_image_prompt(12)
    with pytest.raises(ValueError, match="at most 256"):
        pipeline.generate(ids[0].numpy(), pixels.numpy(), max_new_tokens=2)
    ids, pixels = multi_image_prompt(2)
    with pytest.raises(ValueError, match="resize them to 28x28"):
        pipeline.generate(ids[0].numpy(), pixels[:, :, :20].numpy(), max_new_tokens=2)
    with pytest.raises(ValueError, match="32 image tokens but 1 images of 16 tokens"):
        pipeline.generate(ids[0].numpy(), pixels[:1].numpy(), max_new_tokens=2)
    # still usable afterwards
    assert len(pipeline.generate(ids[0].numpy(), pixels.numpy(), max_new_tokens=3).tokens) == 3


def test_model_fingerprint_names_the_weights_not_where_they_were_loaded_from(tmp_path):
    """The same weights saved and read back from two folders have one fingerprint, though their
    configs now carry the folder and a dtype; one ULP or another dtype is another fingerprint."""
    import torch
    from transformers import LlavaForConditionalGeneration

    model = tiny_llava(seed=3)
    fingerprint = model_fingerprint(model)
    copies = []
    for folder in ("a", "b"):
        model.save_pretrained(tmp_path / folder)
        copies.append(LlavaForConditionalGeneration.from_pretrained(tmp_path / folder, dtype=torch.float32))
    assert copies[0].config._name_or_path != copies[1].config._name_or_path
    assert [model_fingerprint(copy) for copy in copies] == [fingerprint, fingerprint]
    with torch.no_grad():
        copies[0].lm_head.weight[0, 0] = torch.nextafter(copies[0].lm_head.weight[0, 0], torch.tensor(1.0))
    assert model_fingerprint(copies[0]) != fingerprint
    # bfloat16 values widen exactly to float32, so only the hashed dtype tells the two apart
    rounded = tiny_llava(seed=3).to(torch.bfloat16).float()
    as_float32 = model_fingerprint(rounded)
    assert model_fingerprint(rounded.to(torch.bfloat16)) != as_float32     # Module.to converts in place
