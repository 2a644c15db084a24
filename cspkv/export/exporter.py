"""Export a LLaVA model into a folder of static-shape ONNX graphs plus manifest.json."""

from __future__ import annotations

import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from cspkv.export.graphs import DecodeGraph, PrefillGraph, VisionGraph, decode_input_names
from cspkv.export.manifest import build_manifest, write_manifest
from cspkv.export.onnx_ops import CUSTOM_TRANSLATIONS
from cspkv.export.weights import share_weights
from cspkv.models.llava import check_llava_like
from cspkv.models.default_model import DefaultProcessor
from cspkv.models.prompting import RESIZE_FILTER
from cspkv.models.static_llama import DecoderShape
from cspkv.pruning import check_budget, get_policy, keep_count
from cspkv.runtime.slot_reference import null_slot_logit

OPSET = 18
# onnxscript's full optimizer (its pattern rewriter) takes tens of minutes on a 30-layer prefill graph
# on this CPU. Constant folding alone is fast and is what removes the exporter's CastLike nodes
# (TensorRT's parser does not take them); ONNX Runtime applies its own fusions at session creation.
OPTIMIZE = False

def graph_inputs(n_layers: int) -> dict[str, list[str]]:
    return {
        "vision": ["pixel_values"],
        "prefill": ["input_ids", "image_embeds", "modality", "valid_length"],
        "decode": decode_input_names(n_layers),
    }


OUTPUTS = {
    "vision": ["image_features"],
    "prefill": ["logits", "kv", "slot_position", "slot_modality", "slot_valid", "slot_mass"],
    "decode": ["logits", "new_kv", "mass"],
}


class ExportError(ValueError):
    """A bad export request; the message says what to do."""


@dataclass
class ExportPlan:
    """Every static size of an export, derived from the request and the model."""

    policy: str
    policy_params: dict
    budget: float
    max_prompt: int
    decode_slots: int
    decode_n: float
    max_keep: int          # C_max = ceil(budget * P_max), the widest layer's with layer-adaptive budgets
    n_slots: int           # S = C_max + G (+1 n-softmax null slot)
    vision_batch: int
    image_size: int
    image_tokens: int
    layer_keep: list | None = None   # entries each layer keeps at P_max (the policy's layer budgets)

    @classmethod
    def make(cls, model, policy: str, policy_params: dict | None, budget: float, max_prompt: int,
             decode_slots: int, decode_n: float, vision_batch: int = 1) -> "ExportPlan":
        try:
            check_llava_like(model)
            check_budget(budget)
            pruning = get_policy(policy, **(policy_params or {}))
        except ValueError as exc:
            raise ExportError(str(exc)) from None
        if getattr(pruning, "variant", "distinct") == "paper":
            raise ExportError("csp variant 'paper' stores keys twice and has no static keep mask; "
                              "export the default 'distinct' variant")
        if getattr(pruning, "merge", False):
            raise ExportError("lookm merge=True changes K/V values after selection and is not exported; "
                              "export lookm without merge")
        context = getattr(model.config.text_config, "max_position_embeddings", None)
        if not isinstance(max_prompt, int) or max_prompt < 2:
            raise ExportError(f"--max-prompt must be an integer >= 2, got {max_prompt!r}")
        if decode_slots < 1:
            raise ExportError(f"--decode-slots must be >= 1, got {decode_slots}")
        if context is not None and max_prompt + decode_slots > context:
            raise ExportError(f"--max-prompt {max_prompt} + --decode-slots {decode_slots} exceeds the "
                              f"model's context of {context} positions: lower them")
        if decode_n < 0:
            raise ExportError(f"--n-decode must be >= 0, got {decode_n}")
        layer_keep = [int(c) for c in pruning.layer_keep_counts(
            keep_count(budget, max_prompt), model.config.text_config.num_hidden_layers, n_valid=max_prompt)]
        max_keep = max(layer_keep)
        n_slots = max_keep + decode_slots + (1 if null_slot_logit(decode_n) is not None else 0)
        vision = model.config.vision_config
        image_tokens = _image_tokens(model)
        return cls(policy, pruning.params(), budget, max_prompt, decode_slots, decode_n, max_keep,
                   n_slots, vision_batch, vision.image_size, image_tokens, layer_keep)


def _image_tokens(model) -> int:
    vision = model.config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    strategy = getattr(model.config, "vision_feature_select_strategy", "default")
    # "default" drops the CLS token, "full" keeps it; a tower without CLS would not have it anyway
    return patches + (1 if strategy == "full" else 0)


def _export_one(module: torch.nn.Module, args: tuple, path: Path, role: str, input_names: list[str],
                dynamic_shapes=None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module.eval(), args, dynamo=True, opset_version=OPSET,
                                    custom_translation_table=CUSTOM_TRANSLATIONS,
                                    input_names=input_names, output_names=OUTPUTS[role],
                                    dynamic_shapes=dynamic_shapes,
                                    external_data=False, verbose=False, optimize=OPTIMIZE)
    import onnxscript.optimizer

    onnxscript.optimizer.fold_constants(program.model)
    onnxscript.optimizer.remove_unused_nodes(program.model)
    program.save(str(path))
    replace_castlike(path)


def export_decode_graph(model, path: Path, n_slots: int | None = None) -> None:
    """The decode graph, traced once with a symbolic slot count ``slots`` and then fixed to
    ``n_slots`` (static shapes, as every engine expects). Left symbolic (n_slots None), one trace
    serves every budget: :func:`fix_slots` stamps out the static copies (the benchmarks do)."""
    shape = DecoderShape(model.config.text_config)
    probe = 64                                   # any size: the slot axis is symbolic in the trace
    args = (torch.zeros(1, 1, dtype=torch.int64), torch.tensor([probe]),
            torch.zeros(shape.n_layers, 1, shape.n_kv_heads, probe),
            *[torch.zeros(1, shape.n_kv_heads, probe, shape.head_dim) for _ in range(2 * shape.n_layers)])
    slots = torch.export.Dim("slots", min=2, max=1 << 20)
    dynamic = (None, None, {3: slots}, tuple({2: slots} for _ in range(2 * shape.n_layers)))
    target = path if n_slots is None else path.with_suffix(".dynamic.onnx")
    with torch.no_grad():
        _export_one(DecodeGraph(model), args, target, "decode", decode_input_names(shape.n_layers), dynamic)
    if n_slots is not None:
        fix_slots(target, path, n_slots)
        target.unlink()


def fix_slots(src: Path, dst: Path, n_slots: int) -> None:
    """A static copy of a slot-symbolic decode graph: every ``slots`` dimension set to n_slots."""
    import onnx
    from onnxruntime.tools.onnx_model_utils import make_dim_param_fixed

    model = onnx.load(str(src))
    names = {d.dim_param for vi in model.graph.input for d in vi.type.tensor_type.shape.dim if d.dim_param}
    if names != {"slots"}:
        raise ExportError(f"{src} is not a slot-symbolic decode graph (symbolic dims: {sorted(names)})")
    make_dim_param_fixed(model.graph, "slots", n_slots)
    onnx.save(model, str(dst))


def replace_castlike(path: Path) -> None:
    """CastLike(x, like) -> Cast(x, to=dtype of like): same result, and an op TensorRT imports."""
    import onnx
    from onnx import helper, shape_inference

    model = onnx.load(str(path))
    graph = shape_inference.infer_shapes(model).graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*graph.value_info, *graph.input, *graph.output]}
    types.update({init.name: init.data_type for init in model.graph.initializer})
    for node in model.graph.node:
        if node.op_type == "Constant":
            types[node.output[0]] = node.attribute[0].t.data_type
    changed = False
    for index, node in enumerate(model.graph.node):
        if node.op_type == "CastLike" and types.get(node.input[1]):
            model.graph.node[index].CopyFrom(helper.make_node("Cast", [node.input[0]], list(node.output),
                                                              name=node.name, to=types[node.input[1]]))
            changed = True
    if changed:
        onnx.save(model, str(path))


def save_processor(processor, out: Path) -> dict | None:
    """Keep the tokenizer/processor beside the graphs, so running an export needs no model; returns
    the manifest's ``processor`` entry (for the default model, with its image preprocessing)."""
    if processor is None:
        return None
    if isinstance(processor, DefaultProcessor):
        processor.tokenizer.save_pretrained(out / "processor")
        # what the runtime's processor (cspkv.runtime.processor) needs besides the tokenizer files
        return {"kind": "default", "path": "processor", "image_size": int(processor.image_size),
                "image_mean": [float(v) for v in processor.image_mean],
                "image_std": [float(v) for v in processor.image_std],
                "image_token": processor.image_token, "image_token_id": int(processor.image_token_id),
                "image_tokens": int(processor.num_image_tokens), "resize_filter": RESIZE_FILTER}
    processor.save_pretrained(out / "processor")
    return {"kind": "hf", "path": "processor"}


def load_processor(folder: Path, manifest: dict):
    """The processor saved by ``save_processor`` (None for models without one, e.g. tiny)."""
    spec = manifest.get("processor")
    if not spec:
        return None
    path = Path(folder) / spec["path"]
    if spec["kind"] == "default":
        from transformers import AutoTokenizer

        return DefaultProcessor(AutoTokenizer.from_pretrained(path))
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path, local_files_only=True)


def example_inputs(model, plan: ExportPlan) -> dict[str, tuple]:
    """Tracing inputs of each graph, with the static shapes of the plan."""
    shape = DecoderShape(model.config.text_config)
    hidden = model.config.text_config.hidden_size
    p = plan.max_prompt
    return {
        "vision": (torch.zeros(plan.vision_batch, 3, plan.image_size, plan.image_size),),
        "prefill": (torch.zeros(1, p, dtype=torch.int64), torch.zeros(1, p, hidden),
                    torch.zeros(1, p, dtype=torch.int64), torch.tensor([max(2, p // 2)])),
        "decode": (torch.zeros(1, 1, dtype=torch.int64), torch.tensor([p]),
                   torch.zeros(shape.n_layers, 1, shape.n_kv_heads, plan.n_slots),
                   *[torch.zeros(1, shape.n_kv_heads, plan.n_slots, shape.head_dim)
                     for _ in range(2 * shape.n_layers)]),
    }


def export_model(model, out_dir: str | Path, plan: ExportPlan, model_id: str, force: bool = False,
                 progress: Callable[[str], None] = lambda message: None, processor=None,
                 reuse: dict[str, str | Path] | None = None) -> dict:
    """Write vision.onnx, prefill.onnx, decode.onnx and manifest.json into ``out_dir``.

    ``reuse`` maps a role to an already exported graph of the same model to copy instead of
    tracing it again ("decode_dynamic": a slot-symbolic decode graph, fixed to this plan's slots).
    The caller vouches that they come from this model (the benchmarks build many plans from one).
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} already exists and is not empty: choose another --out or pass --force")
    out.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    modules = {
        "vision": VisionGraph(model),
        "prefill": PrefillGraph(model, get_policy(plan.policy, **plan.policy_params), plan.budget,
                                plan.max_prompt, plan.n_slots),
        "decode": DecodeGraph(model),
    }
    inputs = example_inputs(model, plan)
    names = graph_inputs(DecoderShape(model.config.text_config).n_layers)
    timings = {}
    reuse = reuse or {}
    for role, module in modules.items():
        start = time.perf_counter()
        target = out / f"{role}.onnx"
        if role == "decode" and "decode_dynamic" in reuse:
            progress("fixing the slot count of the decode graph")
            fix_slots(Path(reuse["decode_dynamic"]), target, plan.n_slots)
        elif role in reuse:
            progress(f"reusing {reuse[role]} as the {role} graph")
            shutil.copyfile(reuse[role], target)
        elif role == "decode":
            progress("exporting decode graph")
            export_decode_graph(model, target, plan.n_slots)
        else:
            progress(f"exporting {role} graph")
            with torch.no_grad():
                _export_one(module, inputs[role], target, role, names[role])
        timings[role] = round(time.perf_counter() - start, 2)
    graphs = {r: f"{r}.onnx" for r in modules}
    progress("storing the language model's weights once for prefill and decode")
    weights = share_weights(out, graphs)
    manifest = build_manifest(model, model_id, plan, out, graphs, OPSET, timings, save_processor(processor, out),
                              weights)
    write_manifest(out, manifest)
    return manifest
