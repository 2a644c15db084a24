"""manifest.json: everything a runtime needs to trust an export folder, and to refuse a bad one."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import onnx

MANIFEST_VERSION = 2  # 2: the decode graph takes one K and one V input per layer
MANIFEST_NAME = "manifest.json"
# precision -> dtype of the K/V tensors (prefill `kv`, decode `past_*` / `new_kv`) and of the runtime's
# C buffer. fp32 graphs come from csp-export; the others from cspkv.engines.precision.
PRECISIONS = {"fp32": "float32", "fp16": "float16", "int8-u8s8": "float32", "int8-s8s8": "float32"}


class ManifestError(ValueError):
    """A missing, corrupt or mismatched export folder; the message says what to do."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def _io_specs(path: Path) -> dict:
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


def _runtime_abi() -> int:
    from cspkv.runtime.kv_buffer import ABI_VERSION

    return ABI_VERSION


def build_manifest(model, model_id, plan, out: Path, graphs: dict, inputs: dict, outputs: dict,
                   opset: int, timings: dict) -> dict:
    from cspkv.models.static_llama import DecoderShape

    shape = DecoderShape(model.config.text_config)
    files = {}
    for role, name in graphs.items():
        path = out / name
        files[name] = {"sha256": file_sha256(path), "bytes": path.stat().st_size}
    return {
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
        "io": {role: _io_specs(out / name) for role, name in graphs.items()},
        "runtime_abi": _runtime_abi(),
        "opset": opset,
        "exporter": "torch.onnx dynamo",
        "precision": "fp32",
        "kv_dtype": PRECISIONS["fp32"],
        "export_seconds": timings,
        "versions": package_versions(),
        "files": files,
    }


def write_manifest(out: Path, manifest: dict) -> None:
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def read_manifest(folder: str | Path, verify_hashes: bool = True) -> dict:
    """Load and check an export folder's manifest: present, parseable, same manifest version,
    every graph file present with the recorded hash."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise ManifestError(f"{folder} is not a folder: pass the --out folder of csp-export")
    if not path.is_file():
        raise ManifestError(f"{path} is missing: this is not a csp-export folder (re-run csp-export)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path} is corrupt ({exc}): re-run csp-export") from None
    if manifest.get("manifest_version") != MANIFEST_VERSION:
        raise ManifestError(f"{path} has manifest version {manifest.get('manifest_version')!r}; this "
                            f"cspkv reads version {MANIFEST_VERSION}: re-export with this cspkv")
    precision = manifest.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise ManifestError(f"{path} has precision {precision!r}; this cspkv runs "
                            f"{', '.join(PRECISIONS)}: convert the fp32 export again with this cspkv "
                            "(csp-export --from FP32_FOLDER --precision ...) or upgrade cspkv")
    if manifest.get("kv_dtype", "float32") not in ("float32", "float16"):
        raise ManifestError(f"{path} has kv_dtype {manifest.get('kv_dtype')!r}; the runtime's KV buffer "
                            "holds float32 or float16: re-convert the export with this cspkv")
    for name, meta in manifest.get("files", {}).items():
        file = folder / name
        if not file.is_file():
            raise ManifestError(f"{file} is missing: re-run csp-export")
        if verify_hashes and file_sha256(file) != meta["sha256"]:
            raise ManifestError(f"{file} does not match its manifest hash (corrupt or replaced): "
                                "re-run csp-export")
    return manifest


def kv_dtype(manifest: dict):
    """numpy dtype of the export's K/V tensors and of the runtime's buffer (float32 when absent)."""
    import numpy as np

    return np.dtype(manifest.get("kv_dtype", "float32"))
