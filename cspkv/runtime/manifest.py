"""Reading an export folder: manifest.json checked against itself, its files and its graphs.

Everything a runtime relies on is checked before the first inference, and every mismatch is one
line naming the field, both values and what to do:

1. :func:`read_manifest`: the manifest parses, has this cspkv's version, every field the runtime
   reads has the right type and range, the derived sizes agree (``max_keep = ceil(budget *
   max_prompt)``, ``n_slots``, the ``slots`` summary), every file it names lies inside the folder
   and has its recorded size and hash.
2. :func:`check_graphs`, once the graphs are loaded: each graph carries the stamp the exporter
   wrote into its metadata (role, model, plan), which must equal the manifest's; its inputs and
   outputs (names, shapes, dtypes) equal both what the manifest declares and what the plan implies
   (:func:`graph_contract`). A graph of another role, another export or another model is refused.

Imports numpy only: the runtime needs no torch.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np

MANIFEST_VERSION = 5  # 5: the shared weights file (weights); 4: the processor entry records the preprocessing
MANIFEST_NAME = "manifest.json"
STAMP_KEY = "cspkv.graph"       # ONNX metadata_props key of the stamp
ROLES = ("vision", "prefill", "decode")
# precision -> dtype of the K/V tensors (prefill `kv`, decode `past_*` / `new_kv`) and of the runtime's
# C buffer. fp32 graphs come from csp-export; the others are converted from them.
PRECISIONS = {"fp32": "float32", "fp16": "float16", "int8-u8s8": "float32", "int8-s8s8": "float32",
              "int4": "float32"}
# model / plan entries a graph's stamp must agree on (the graph was traced with them)
STAMPED_MODEL = ("fingerprint", "layers", "heads", "kv_heads", "head_dim", "hidden_size", "vocab_size",
                 "image_token_id")
REDO = "re-run csp-export"
# Pillow filters an export may name for bringing image files to plan.image_size (processor.resize_filter)
RESIZE_FILTERS = ("nearest", "bilinear", "bicubic", "lanczos")
# The language model's weights, stored once for prefill and decode (cspkv.export.weights), and their table
WEIGHTS_FILE, TABLE_FILE = "weights.bin", "weights.json"
# dtypes of the tensors in an export's shared weights file
WEIGHT_DTYPES = ("float32", "float16", "int64", "int32", "int8", "uint8", "bool")


class ManifestError(ValueError):
    """A missing, corrupt or mismatched export folder; the message says what to do."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def kv_dtype(manifest: dict) -> np.dtype:
    """numpy dtype of the export's K/V tensors and of the runtime's buffer (float32 when absent)."""
    return np.dtype(manifest.get("kv_dtype", "float32"))


# ---- the manifest on its own --------------------------------------------------------------------

class _Fields:
    """Typed access to manifest fields by dotted name; a bad one raises ManifestError naming it."""

    def __init__(self, manifest: dict, path: Path):
        self.manifest, self.path = manifest, path

    def fail(self, message: str) -> ManifestError:
        return ManifestError(f"{self.path}: {message}: {REDO}")

    def get(self, name: str):
        value = self.manifest
        for part in name.split("."):
            if not isinstance(value, dict) or part not in value:
                raise self.fail(f"{name} is missing")
            value = value[part]
        return value

    def integer(self, name: str, low: int = 1, high: int | None = None) -> int:
        value = self.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise self.fail(f"{name} is {value!r}, expected an integer {bound}")
        return value

    def number(self, name: str, low: float, high: float, low_open: bool = False) -> float:
        value = self.get(name)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
            and (value > low if low_open else value >= low) and value <= high
        if not ok:
            raise self.fail(f"{name} is {value!r}, expected a number in {'(' if low_open else '['}{low}, {high}]")
        return float(value)

    def expect(self, name: str, value, want, why: str = "") -> None:
        if value != want:
            raise self.fail(f"{name} is {value!r}, expected {want!r}{' (' + why + ')' if why else ''}")


def _inside(folder: Path, name, what: str, fields: _Fields) -> Path:
    """``folder / name`` for a relative name that stays inside ``folder``."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts \
            or "\\" in name:
        raise fields.fail(f"{what} names {name!r}, which is not a file name inside the export folder")
    return folder / name


def _check_layer_keep(f, uniform: int, max_prompt: int) -> int:
    """plan.max_keep, checked: ceil(budget * max_prompt) in every layer, or with layer-adaptive
    budgets (policy_params.pyramid > 0) the widest of plan.layer_keep, whose counts add up to no
    more than layers x ceil(budget * max_prompt)."""
    pyramid = f.get("plan.policy_params").get("pyramid", 0.0)
    if not pyramid:
        f.expect("plan.max_keep", f.get("plan.max_keep"), uniform, "ceil(plan.budget * plan.max_prompt)")
        return uniform
    layers, layer_keep = f.get("model.layers"), f.get("plan.layer_keep")
    if (not isinstance(layer_keep, list) or len(layer_keep) != layers
            or not all(isinstance(c, int) and not isinstance(c, bool) and 1 <= c <= max_prompt for c in layer_keep)):
        raise f.fail(f"plan.layer_keep must list {layers} entry counts in [1, {max_prompt}], one per layer")
    if sum(layer_keep) > layers * uniform:
        raise f.fail(f"plan.layer_keep keeps {sum(layer_keep)} entries, more than {layers} layers x "
                     f"ceil(plan.budget * plan.max_prompt) = {layers * uniform}")
    f.expect("plan.max_keep", f.get("plan.max_keep"), max(layer_keep), "max(plan.layer_keep)")
    return max(layer_keep)


def _check_fields(manifest: dict, folder: Path, path: Path) -> None:
    f = _Fields(manifest, path)
    f.integer("model.layers")
    heads, kv_heads = f.integer("model.heads"), f.integer("model.kv_heads")
    if heads % kv_heads:
        raise f.fail(f"model.heads {heads} is not a multiple of model.kv_heads {kv_heads}")
    f.integer("model.head_dim")
    f.integer("model.hidden_size")
    vocab = f.integer("model.vocab_size")
    f.integer("model.image_token_id", 0, vocab - 1)
    if not isinstance(f.get("model.fingerprint"), str):
        raise f.fail("model.fingerprint is not a string")
    if not isinstance(f.get("plan.policy"), str) or not isinstance(f.get("plan.policy_params"), dict):
        raise f.fail("plan.policy must name a pruning policy and plan.policy_params hold its parameters")
    budget = f.number("plan.budget", 0.0, 1.0, low_open=True)
    max_prompt = f.integer("plan.max_prompt", 2)
    decode_slots = f.integer("plan.decode_slots")
    decode_n = f.number("plan.decode_n", 0.0, math.inf)
    uniform = math.ceil(budget * max_prompt)
    max_keep = _check_layer_keep(f, uniform, max_prompt)
    null_slot = decode_n > 0
    f.expect("plan.n_slots", f.get("plan.n_slots"), max_keep + decode_slots + null_slot,
             "plan.max_keep + plan.decode_slots" + (" + 1 null slot" if null_slot else ""))
    for name in ("plan.vision_batch", "plan.image_size", "plan.image_tokens"):
        f.integer(name)
    slots = {"prompt_max": "plan.max_keep", "decode": "plan.decode_slots", "total": "plan.n_slots"}
    for key, source in slots.items():
        f.expect(f"slots.{key}", f.get(f"slots.{key}"), f.get(source), f"= {source}")
    f.expect("slots.null_slot", f.get("slots.null_slot"), null_slot, "plan.decode_n > 0")
    f.integer("runtime_abi", 0)
    graphs, files = f.get("graphs"), f.get("files")
    if not isinstance(graphs, dict) or sorted(graphs) != sorted(ROLES):
        raise f.fail(f"graphs is {graphs!r}, expected one file for each of {', '.join(ROLES)}")
    if not isinstance(files, dict):
        raise f.fail("files is not a table of file names")
    for role, name in graphs.items():
        _inside(folder, name, f"graphs.{role}", f)
        if name not in files:
            raise f.fail(f"graphs.{role} names {name!r}, which files does not list (no hash to check it by)")
    io = f.get("io")
    for role in ROLES:
        for side in ("inputs", "outputs"):
            specs = io.get(role, {}).get(side) if isinstance(io, dict) and isinstance(io.get(role), dict) else None
            if not isinstance(specs, dict) or not specs:
                raise f.fail(f"io.{role}.{side} is missing")
            for name, spec in specs.items():
                if not (isinstance(spec, dict) and isinstance(spec.get("shape"), list)
                        and all(isinstance(d, int) and not isinstance(d, bool) for d in spec["shape"])
                        and isinstance(spec.get("dtype"), str)):
                    raise f.fail(f"io.{role}.{side}.{name} is {spec!r}, expected a shape (integers) and a dtype")
    processor = manifest["processor"]
    if processor is not None:
        if not isinstance(processor, dict) or processor.get("kind") not in ("default", "hf"):
            raise f.fail(f"processor is {processor!r}, expected null or a kind 'default' or 'hf' and a path")
        if not _inside(folder, processor.get("path"), "processor.path", f).is_dir():
            raise f.fail(f"processor.path {processor.get('path')!r} is not a folder of the export")
        if processor["kind"] == "default":
            _check_preprocessing(f)


def _check_preprocessing(f: _Fields) -> None:
    """The preprocessing a ``default`` processor entry records, and its agreement with model and plan."""
    f.expect("processor.image_size", f.integer("processor.image_size"), f.get("plan.image_size"), "= plan.image_size")
    f.expect("processor.image_tokens", f.integer("processor.image_tokens"), f.get("plan.image_tokens"),
             "= plan.image_tokens")
    f.expect("processor.image_token_id", f.integer("processor.image_token_id", 0), f.get("model.image_token_id"),
             "= model.image_token_id")
    token = f.get("processor.image_token")
    if not isinstance(token, str) or not token:
        raise f.fail(f"processor.image_token is {token!r}, expected the image placeholder's text, e.g. '<image>'")
    for name, low in (("processor.image_mean", -math.inf), ("processor.image_std", 0.0)):
        values = f.get(name)
        if not (isinstance(values, list) and len(values) == 3
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > low
                        for v in values)):
            kind = "positive numbers" if low == 0.0 else "finite numbers"
            raise f.fail(f"{name} is {values!r}, expected 3 {kind} (one per RGB channel)")
    if f.get("processor.resize_filter") not in RESIZE_FILTERS:
        raise f.fail(f"processor.resize_filter is {f.get('processor.resize_filter')!r}, expected one of "
                     f"{', '.join(RESIZE_FILTERS)}")


def read_manifest(folder: str | Path, verify_hashes: bool = True) -> dict:
    """Load and check an export folder's manifest: present, parseable, this cspkv's version, every
    field the runtime reads valid and consistent, every file inside the folder with its recorded
    size and (unless ``verify_hashes`` is False) hash."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise ManifestError(f"{folder} is not a folder: pass the --out folder of csp-export")
    if not path.is_file():
        raise ManifestError(f"{path} is missing: this is not a csp-export folder ({REDO})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path} is corrupt ({exc}): {REDO}") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path} is corrupt (not a JSON object): {REDO}")
    if manifest.get("manifest_version") != MANIFEST_VERSION:
        raise ManifestError(f"{path} has manifest version {manifest.get('manifest_version')!r}; this "
                            f"cspkv reads version {MANIFEST_VERSION}: re-export with this cspkv")
    for key in ("precision", "kv_dtype", "processor", "weights"):
        if key not in manifest:
            raise ManifestError(f"{path}: {key} is missing: {REDO}")
    precision = manifest["precision"]
    if precision not in PRECISIONS:
        raise ManifestError(f"{path} has precision {precision!r}; this cspkv runs "
                            f"{', '.join(PRECISIONS)}: convert the fp32 export again with this cspkv "
                            "(csp-export --from FP32_FOLDER --precision ...) or upgrade cspkv")
    if manifest["kv_dtype"] != PRECISIONS[precision]:
        raise ManifestError(f"{path}: kv_dtype is {manifest.get('kv_dtype')!r}, but a {precision} export holds "
                            f"{PRECISIONS[precision]} K/V: {REDO}")
    _check_fields(manifest, folder, path)
    fields = _Fields(manifest, path)
    if precision == "int4":          # the blocks the graphs were quantized in, as csp-export records them
        block = fields.integer("conversion.block_size", 16)
        if block & (block - 1):
            raise fields.fail(f"conversion.block_size is {block}, expected a power of two")
        if not isinstance(fields.get("conversion.symmetric"), bool):
            raise fields.fail("conversion.symmetric is not true or false")
    for name, meta in manifest["files"].items():
        file = _inside(folder, name, "files", fields)
        if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str) or not isinstance(meta.get("bytes"), int):
            raise fields.fail(f"files.{name} is {meta!r}, expected its sha256 and bytes")
        if not file.is_file():
            raise ManifestError(f"{file} is missing: {REDO}")
        if file.stat().st_size != meta["bytes"]:
            raise ManifestError(f"{file} has {file.stat().st_size} bytes, manifest.json says {meta['bytes']} "
                                f"(truncated or replaced): {REDO}")
        if verify_hashes and file_sha256(file) != meta["sha256"]:
            raise ManifestError(f"{file} does not match its manifest hash (corrupt or replaced): {REDO}")
    if manifest.get("weights") is not None:
        _check_weights(fields, folder)
    return manifest


def _check_weights(f: _Fields, folder: Path) -> None:
    """The shared weights file and its table (``weights.file``, ``weights.table``) lie in the folder
    and are hashed (so the table is checked against the graphs' export, not just against itself)."""
    if not isinstance(f.get("weights"), dict):
        raise f.fail(f"weights is {f.get('weights')!r}, expected null or the shared weights file and its table")
    for key in ("file", "table"):
        name = f.get(f"weights.{key}")
        _inside(folder, name, f"weights.{key}", f)
        if name not in f.get("files"):
            raise f.fail(f"weights.{key} names {name!r}, which files does not list (no hash to check it by)")


def weights_table(folder: str | Path, manifest: dict) -> dict[str, tuple[int, int, str, list[int]]]:
    """The shared weights of a checked export (:func:`read_manifest`): ``{name: (offset, nbytes, dtype,
    shape)}``, each entry fitting the weights file; {} for an export without one."""
    spec = manifest.get("weights")
    if not spec:
        return {}
    folder = Path(folder)
    path, size = folder / spec["table"], manifest["files"][spec["file"]]["bytes"]
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path} is corrupt ({exc}): {REDO}") from None
    if not isinstance(table, dict) or not table:
        raise ManifestError(f"{path} is not a table of tensors: {REDO}")
    for name, entry in table.items():
        if not (isinstance(entry, list) and len(entry) == 4 and entry[2] in WEIGHT_DTYPES
                and isinstance(entry[3], list)
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (*entry[:2], *entry[3]))):
            raise ManifestError(f"{path}: {name} is {entry!r}, expected [offset, bytes, dtype, shape]: {REDO}")
        offset, nbytes, dtype, shape = entry
        if math.prod(shape) * np.dtype(dtype).itemsize != nbytes or offset + nbytes > size:
            raise ManifestError(f"{path}: {name} ({dtype} {shape} at bytes {offset}..{offset + nbytes}) does not fit "
                                f"{spec['file']} ({size} bytes): {REDO}")
    return {name: tuple(entry) for name, entry in table.items()}


# ---- the manifest against the graphs ------------------------------------------------------------

def graph_stamp(manifest: dict, role: str) -> dict:
    """What the exporter writes into each graph's metadata: its role and the model and plan it was
    traced with."""
    return {"role": role, "model": {key: manifest["model"][key] for key in STAMPED_MODEL},
            "plan": manifest["plan"]}


def graph_contract(manifest: dict) -> dict:
    """{role: {"inputs"|"outputs": {name: (shape, dtype)}}} that the plan implies; each dimension is
    (size, the manifest field it comes from, or None for a fixed size)."""
    m, p = manifest["model"], manifest["plan"]
    kv = str(kv_dtype(manifest))
    one = (1, None)
    layers, kv_heads, head_dim = (m["layers"], "model.layers"), (m["kv_heads"], "model.kv_heads"), \
        (m["head_dim"], "model.head_dim")
    hidden, vocab = (m["hidden_size"], "model.hidden_size"), (m["vocab_size"], "model.vocab_size")
    slots, prompt = (p["n_slots"], "plan.n_slots"), (p["max_prompt"], "plan.max_prompt")
    batch, size = (p["vision_batch"], "plan.vision_batch"), (p["image_size"], "plan.image_size")
    table = [layers, kv_heads, slots]
    past = {f"{part}_{i}": ([one, kv_heads, slots, head_dim], kv)
            for i in range(m["layers"]) for part in ("past_key", "past_value")}
    return {
        "vision": {"inputs": {"pixel_values": ([batch, (3, None), size, size], "float32")},
                   "outputs": {"image_features": ([batch, (p["image_tokens"], "plan.image_tokens"), hidden],
                                                  "float32")}},
        "prefill": {"inputs": {"input_ids": ([one, prompt], "int64"), "image_embeds": ([one, prompt, hidden], "float32"),
                               "modality": ([one, prompt], "int64"), "valid_length": ([one], "int64")},
                    "outputs": {"logits": ([one, vocab], "float32"),
                                "kv": ([layers, (2, None), one, kv_heads, slots, head_dim], kv),
                                "slot_position": (table, "int64"), "slot_modality": (table, "int64"),
                                "slot_valid": (table, "int64"), "slot_mass": (table, "float32")}},
        "decode": {"inputs": {"token": ([one, one], "int64"), "position": ([one], "int64"),
                              "bias": ([layers, one, kv_heads, slots], "float32"), **past},
                   "outputs": {"logits": ([one, vocab], "float32"),
                               "new_kv": ([layers, (2, None), one, kv_heads, one, head_dim], kv),
                               "mass": ([layers, one, kv_heads, slots], "float32")}},
    }


def _flat(tree: dict, prefix: str = "") -> dict:
    """{"plan.policy_params.n": 1.0, ...}: nested fields by dotted name."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _closest_role(names: set[str], contract: dict) -> str | None:
    for role, sides in contract.items():
        if names == set(sides["inputs"]):
            return role
    return None


def check_graphs(folder: str | Path, manifest: dict, graph_io: dict, stamps: dict) -> None:
    """Refuse graphs that are not the ones the manifest describes.

    ``graph_io``: {role: {"inputs"|"outputs": {name: (shape, dtype)}}} as the loaded graph reports
    it; ``stamps``: {role: the graph's ``cspkv.graph`` metadata string, or None}."""
    folder = Path(folder)
    contract = graph_contract(manifest)
    for role in ROLES:
        file = folder / manifest["graphs"][role]
        stamp_text = stamps.get(role)
        try:
            stamp = json.loads(stamp_text) if stamp_text else None
        except json.JSONDecodeError:
            stamp = None
        if not isinstance(stamp, dict):
            raise ManifestError(f"{file} carries no cspkv stamp: it was not written by this cspkv's csp-export "
                                f"({REDO})")
        if stamp.get("role") != role:
            raise ManifestError(f"{file} is the {stamp.get('role')} graph, but manifest.json uses it as the "
                                f"{role} graph: {REDO}")
        want = _flat(graph_stamp(manifest, role))
        got_fields = _flat(stamp)
        for key in sorted(set(want) | set(got_fields)):
            if got_fields.get(key, "missing") != want.get(key, "missing"):
                raise ManifestError(
                    f"manifest.json says {key} = {want.get(key, 'missing')!r}, but {file.name} was exported with "
                    f"{got_fields.get(key, 'missing')!r}: the manifest and the graphs do not belong together ({REDO})")
        got, declared = graph_io[role], manifest["io"][role]
        for side in ("inputs", "outputs"):
            names, want_names = set(got[side]), set(declared[side])
            if names != want_names:
                guess = _closest_role(set(got["inputs"]), contract)
                hint = f" (it looks like the {guess} graph)" if guess and guess != role else ""
                raise ManifestError(f"{file} has {side} {', '.join(sorted(names))}, but manifest.json's {role} graph "
                                    f"has {', '.join(sorted(want_names))}{hint}: {REDO}")
            for name in sorted(names):
                shape, dtype = got[side][name]
                spec = declared[side][name]
                if list(shape) != spec["shape"] or dtype != spec["dtype"]:
                    raise ManifestError(f"{file}: {side[:-1]} {name} is {dtype} {list(shape)}, but manifest.json "
                                        f"says {spec['dtype']} {spec['shape']}: {REDO}")
        for side in ("inputs", "outputs"):
            for name, (dims, dtype) in contract[role][side].items():
                if name not in got[side]:
                    raise ManifestError(f"{file} has no {side[:-1]} {name}, which the {role} graph needs: {REDO}")
                shape, got_dtype = got[side][name]
                if got_dtype != dtype:
                    raise ManifestError(f"{file}: {side[:-1]} {name} is {got_dtype}, but kv_dtype / the runtime "
                                        f"needs {dtype}: {REDO}")
                if len(shape) != len(dims):
                    raise ManifestError(f"{file}: {side[:-1]} {name} has shape {list(shape)}, expected "
                                        f"{[d for d, _ in dims]}: {REDO}")
                for axis, (size, field) in enumerate(dims):
                    if shape[axis] != size:
                        source = f"manifest.json's {field} is {size}" if field else f"it must be {size}"
                        raise ManifestError(f"{file}: {side[:-1]} {name} has size {shape[axis]} on axis {axis}, "
                                            f"but {source}: {REDO}")
