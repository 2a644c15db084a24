"""Writing manifest.json: what the exporter records about an export folder, and the stamp it puts
into each graph. Reading and checking a folder is :mod:`cspkv.runtime.manifest`."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path

import onnx

from cspkv.durable import write_atomic
from cspkv.models.static_llama import DecoderShape
from cspkv.runtime.kv_buffer import ABI_VERSION
from cspkv.runtime.manifest import (MANIFEST_NAME, MANIFEST_VERSION, PRECISIONS, STAMP_KEY, file_sha256,
                                    graph_stamp)

# Config entries that say where a model was loaded from or how it was saved, not what it computes.
# A model fresh in memory has ``_name_or_path`` '', no ``architectures`` and ``dtype`` None; the same
# weights read back from a folder carry that folder's path, the saved class and "float32". The
# parameters' own dtypes are hashed instead.
_LOAD_ONLY_CONFIG_KEYS = frozenset({"_name_or_path", "architectures", "dtype", "torch_dtype"})


def _without_load_only_keys(config: dict) -> dict:
    return {key: _without_load_only_keys(value) if isinstance(value, dict) else value
            for key, value in config.items() if key not in _LOAD_ONLY_CONFIG_KEYS}


def model_fingerprint(model) -> str:
    """A hash of the config and of every parameter's dtype and bytes: identifies the exact weights,
    wherever they were loaded from."""
    config = _without_load_only_keys(json.loads(model.config.to_json_string(use_diff=False)))
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}".encode())
        digest.update(tensor.detach().contiguous().float().numpy().tobytes())
    return digest.hexdigest()


# The package sources that decide what an exported graph computes (the traced models, the pruning
# policies, the export and the precision conversions).
_GRAPH_SOURCES = ("models", "pruning", "export", "quantize")
# Checks that only read graphs: changing them changes no export.
_CHECK_SOURCES = ("export/readiness.py", "export/polygraphy_io.py")


@functools.lru_cache(maxsize=1)
def graph_code_fingerprint() -> str:
    """A hash of the sources the graphs are built from (read once per process)."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted(p for sub in _GRAPH_SOURCES for p in (root / sub).rglob("*.py")
                       if str(p.relative_to(root)) not in _CHECK_SOURCES):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def traced_by_this_code(manifest: dict) -> bool:
    """Whether an export's graphs come from this code. Caches of export folders (csp-bench, the
    precision table) reuse a folder only then, so an export made by other code is rebuilt rather
    than measured as if it were this one."""
    return manifest.get("graph_code") == graph_code_fingerprint()


def io_specs(path: Path) -> dict:
    graph = onnx.load(str(path), load_external_data=False).graph

    def spec(values):
        return {v.name: {"shape": [d.dim_value for d in v.type.tensor_type.shape.dim],
                         "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name}
                for v in values}

    return {"inputs": spec(graph.input), "outputs": spec(graph.output)}


def package_versions() -> dict:
    import importlib.metadata as metadata

    versions = {}
    for name in ("cspkv", "torch", "transformers", "onnx", "onnxscript", "onnxruntime"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def stamp_graph(path: Path, stamp: dict) -> None:
    """Write ``stamp`` (role, model, plan) into the graph's metadata, where the runtime reads it back
    from the loaded session: a graph then says which export it belongs to, whatever its file name."""
    model = onnx.load(str(path), load_external_data=False)
    text = json.dumps(stamp, sort_keys=True)
    for prop in model.metadata_props:
        if prop.key == STAMP_KEY:
            if prop.value == text:
                return
            prop.value = text
            break
    else:
        model.metadata_props.add(key=STAMP_KEY, value=text)
    onnx.save(model, str(path))


def finish_manifest(out: Path, manifest: dict) -> dict:
    """Stamp every graph, then record each graph's inputs and outputs and every file's size and hash
    (graphs and the processor folder); returns the manifest, not yet written."""
    for role, name in manifest["graphs"].items():
        stamp_graph(out / name, graph_stamp(manifest, role))
    manifest["io"] = {role: io_specs(out / name) for role, name in manifest["graphs"].items()}
    names = list(manifest["graphs"].values())
    if manifest.get("weights"):
        names += [manifest["weights"]["file"], manifest["weights"]["table"]]
    if manifest.get("processor"):
        folder = out / manifest["processor"]["path"]
        names += sorted(str(p.relative_to(out)) for p in folder.rglob("*") if p.is_file())
    manifest["files"] = {name: {"sha256": file_sha256(out / name), "bytes": (out / name).stat().st_size}
                         for name in names}
    return manifest


def build_manifest(model, model_id, plan, out: Path, graphs: dict, opset: int, timings: dict,
                   processor: dict | None, weights: dict | None = None) -> dict:
    shape = DecoderShape(model.config.text_config)
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "model": {"id": model_id, "fingerprint": model_fingerprint(model),
                  "text_model_type": model.config.text_config.model_type,
                  "layers": shape.n_layers, "heads": shape.n_heads, "kv_heads": shape.n_kv_heads,
                  "head_dim": shape.head_dim, "hidden_size": model.config.text_config.hidden_size,
                  "vocab_size": model.config.text_config.vocab_size,
                  "image_token_id": model.config.image_token_id,
                  "eos_token_id": model.config.text_config.eos_token_id},
        "plan": dataclasses.asdict(plan),
        "slots": {"prompt_max": plan.max_keep, "decode": plan.decode_slots, "total": plan.n_slots,
                  "null_slot": plan.n_slots > plan.max_keep + plan.decode_slots,
                  "kept_at_budget": f"ceil({plan.budget} * valid_length)"},
        "graphs": graphs,
        "processor": processor,
        "weights": weights,
        "runtime_abi": ABI_VERSION,
        "opset": opset,
        "exporter": "torch.onnx dynamo",
        "graph_code": graph_code_fingerprint(),
        "precision": "fp32",
        "kv_dtype": PRECISIONS["fp32"],
        "export_seconds": timings,
        "versions": package_versions(),
    }
    return finish_manifest(out, manifest)


def write_manifest(out: Path, manifest: dict) -> None:
    write_atomic(out / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
