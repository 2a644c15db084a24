"""The prefill graph variant whose CSP ("distinct") top-k selection is one ``cspkv::ModalityTopK`` node,
the TensorRT plugin of cspkv/engines/plugin (ModalityTopKPlugin.h), with the layers as its batch,
instead of the standard ops (threshold search, masks, a scatter) that the policy's kept_indices
traces into.

    export_modality_topk_prefill(model, plan, "exports/fp32/prefill_modality_topk.onnx")

How: the prefill module is traced with a policy whose ``kept_indices`` calls the torch custom op
``cspkv::modality_topk`` (its CPU kernel is the plugin's C reference, so eager runs and the traced
graph agree with the plugin), and the dynamo exporter translates that op to

    ModalityTopK(self_scores f32 [B,H,L], cross_scores f32 [B,H,L], key_modality i32 [B,L],
                 n_keep i32 [B], n_recent i32 [B]) -> indices i64 [B,H,c_max]
    domain "cspkv", attributes cross_ratio (float), c_max (int), plugin_namespace = "cspkv"

exactly the plugin's inputs, attributes and output (the indices already are "kept ascending, then the
others", as the standard-op selection gives them). The rest of the graph (scores, gathers, slot
outputs) is PrefillGraph's own code.
ONNX Runtime cannot run the node (no kernel for domain cspkv): the graph is for TensorRT with the plugin
library loaded (``build_engines(..., plugins=[libcspkv_modality_topk_plugin.so])``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnxscript.optimizer
import torch

from cspkv.engines.modality_topk import modality_topk_ref
from cspkv.export.exporter import OPSET, OUTPUTS, example_inputs, graph_inputs, replace_castlike
from cspkv.export.graphs import PrefillGraph
from cspkv.export.onnx_ops import CUSTOM_TRANSLATIONS
from cspkv.models.static_llama import DecoderShape
from cspkv.pruning import get_policy
from cspkv.pruning.csp import CrossSelfPruning

DOMAIN = "cspkv"
OP_TYPE = "ModalityTopK"
INPUTS = ("self_scores", "cross_scores", "key_modality", "n_keep", "n_recent")


@torch.library.custom_op("cspkv::modality_topk", mutates_args=())
def modality_topk_op(self_scores: torch.Tensor, cross_scores: torch.Tensor, key_modality: torch.Tensor,
                     n_keep: torch.Tensor, n_recent: torch.Tensor, cross_ratio: float, c_max: int) -> torch.Tensor:
    """The plugin's semantics on CPU (its C reference): int64 [B, H, c_max]."""
    out = modality_topk_ref(self_scores.float(), cross_scores.float(), key_modality.to(torch.int32),
                            n_keep.to(torch.int32), n_recent.to(torch.int32), cross_ratio=cross_ratio, c_max=c_max)
    return torch.from_numpy(out)


@modality_topk_op.register_fake
def _(self_scores, cross_scores, key_modality, n_keep, n_recent, cross_ratio, c_max):
    return self_scores.new_empty((self_scores.shape[0], self_scores.shape[1], c_max), dtype=torch.int64)


def register_onnx_schema() -> None:
    """Declare cspkv::ModalityTopK (version 1) to onnx, so onnxscript can emit it and onnx.checker
    validates its inputs, output and attributes against the plugin's interface."""
    from onnx import defs

    if defs.has(OP_TYPE, DOMAIN):
        return
    param, attribute = defs.OpSchema.FormalParameter, defs.OpSchema.Attribute
    schema = defs.OpSchema(
        OP_TYPE, DOMAIN, 1,
        doc="CSP distinct modality-aware top-k (TensorRT plugin cspkv::ModalityTopK, cspkv/engines/plugin).",
        inputs=[param("self_scores", "F"), param("cross_scores", "F"), param("key_modality", "I"),
                param("n_keep", "I"), param("n_recent", "I")],
        outputs=[param("indices", "L")],
        type_constraints=[("F", ["tensor(float)"], "scores"), ("I", ["tensor(int32)"], "ids and budgets"),
                          ("L", ["tensor(int64)"], "kept positions")],
        attributes=[attribute("cross_ratio", defs.OpSchema.AttrType.FLOAT, "rho in [0, 1]"),
                    attribute("c_max", defs.OpSchema.AttrType.INT, "static output width"),
                    attribute("plugin_namespace", defs.OpSchema.AttrType.STRING, "cspkv")],
    )
    defs.register_schema(schema)


def _onnx_translation(self_scores, cross_scores, key_modality, n_keep, n_recent, cross_ratio: float, c_max: int):
    from onnxscript import values

    register_onnx_schema()
    opset = values.Opset(DOMAIN, 1)
    return opset.ModalityTopK(self_scores, cross_scores, key_modality, n_keep, n_recent,
                              cross_ratio=float(cross_ratio), c_max=int(c_max), plugin_namespace=DOMAIN)


class PluginTopKPolicy(CrossSelfPruning):
    """CSP "distinct" whose selection is the plugin op, which returns the kept indices [B, H, c_max]
    (int64) directly."""

    def __init__(self, policy: CrossSelfPruning, c_max: int):
        if getattr(policy, "variant", None) != "distinct":
            raise ValueError("the ModalityTopK plugin implements CSP's 'distinct' variant only")
        super().__init__(**policy.params())     # every setting, the layer budgets included
        self.c_max = int(c_max)

    def kept_indices(self, scores, key_modality, n_keep, c_max: int, n_kv_heads: int):
        if c_max != self.c_max:
            raise ValueError(f"the plugin was built for c_max {self.c_max}, the graph asks for {c_max}")
        n_valid = (key_modality >= 0).sum(-1)
        n_keep = torch.as_tensor(n_keep).reshape(-1).expand(key_modality.shape[0])
        n_recent = torch.as_tensor(self.recent_window(n_valid, n_keep)).reshape(-1).expand(key_modality.shape[0])
        return torch.ops.cspkv.modality_topk(scores[:, :, 0].float(), scores[:, :, 1].float(),
                                             key_modality.to(torch.int32), n_keep.to(torch.int32),
                                             n_recent.to(torch.int32), self.cross_ratio, self.c_max)


def modality_topk_prefill_module(model, plan):
    """PrefillGraph over the plugin policy (eager-runnable: the op's CPU kernel is the C reference)."""
    policy = get_policy(plan.policy, **plan.policy_params)
    if not isinstance(policy, CrossSelfPruning):
        raise ValueError(f"the ModalityTopK plugin implements CSP, not {plan.policy!r}")
    return PrefillGraph(model, PluginTopKPolicy(policy, plan.max_keep), plan.budget, plan.max_prompt, plan.n_slots)


def export_modality_topk_prefill(model, plan, path: str | Path) -> Path:
    """Write the prefill graph variant with one ModalityTopK node (the layers as its batch) to ``path``."""
    register_onnx_schema()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    module = modality_topk_prefill_module(model, plan)
    inputs = example_inputs(model, plan)["prefill"]
    names = graph_inputs(DecoderShape(model.config.text_config).n_layers)["prefill"]
    table = {**CUSTOM_TRANSLATIONS, torch.ops.cspkv.modality_topk.default: _onnx_translation}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module.eval(), inputs, dynamo=True, opset_version=OPSET,
                                    custom_translation_table=table, input_names=names,
                                    output_names=OUTPUTS["prefill"], external_data=False, verbose=False,
                                    optimize=False)
    onnxscript.optimizer.fold_constants(program.model)
    onnxscript.optimizer.remove_unused_nodes(program.model)
    program.save(str(path))
    replace_castlike(path)
    return path


def modality_topk_nodes(model) -> list:
    """The ModalityTopK nodes of an onnx.ModelProto."""
    return [node for node in model.graph.node if node.domain == DOMAIN and node.op_type == OP_TYPE]
