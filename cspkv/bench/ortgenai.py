"""onnxruntime-genai as a csp-bench peer: its model folders, built from the same weights cspkv exports.

onnxruntime-genai runs a text-only decoder, so the peer gets the LLaVA model's language model alone
(merged LoRA and all: the weights of the loaded model, not of a checkpoint on disk), saved as a
``LlamaForCausalLM``-style folder with its tokenizer and turned into ONNX by onnxruntime-genai's own
model builder (``python -m onnxruntime_genai.models.builder -e cpu -p fp32|int4``, its defaults
otherwise). Folders are cached under the key of the weights and the onnxruntime-genai version.

The runner itself is :func:`cspkv.bench.runners.run_ortgenai`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

PACKAGE = "onnxruntime-genai"
PRECISIONS = ("fp32", "int4")
# Bytes per weight element as the builder stores them on CPU: fp32, and int4 as 4-bit values with
# one fp32 scale per block of 32 (symmetric, no zero points), embedding/LM head included.
WEIGHT_BYTES = {"fp32": 4.0, "int4": 0.5 + 4 / 32}
INSTALL = f'pip install "{PACKAGE}==0.18.0" (or pip install -e ".[peers]")'


def missing_reason() -> str | None:
    """Why the peer cannot run in this environment, or None when it can."""
    if importlib.util.find_spec("onnxruntime_genai") is None:
        return f"{PACKAGE} is not installed: {INSTALL}"
    try:
        import onnxruntime_genai  # noqa: F401
    except Exception as exc:  # e.g. an onnxruntime too old for it
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        return f"{PACKAGE} does not import ({first}): {INSTALL} beside onnxruntime >= 1.31"
    return None


def language_model(model):
    """The LLaVA model's language model as a stand-alone causal LM (a copy of its current weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    text = model.config.text_config
    lm = AutoModelForCausalLM.from_config(text, dtype=torch.float32)
    lm.model.load_state_dict(model.model.language_model.state_dict(), strict=True)
    lm.lm_head.load_state_dict(model.lm_head.state_dict(), strict=True)
    if getattr(text, "tie_word_embeddings", False):
        lm.tie_weights()
    return lm.eval()


def word_level_tokenizer(vocab_size: int, bos: int | None, eos: int):
    """A tokenizer whose tokens are the ids themselves ('t0', 't1', ...), for models that have none
    (the tiny test model): the builder needs one, and the peer is fed ids, never text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="t0", pad_token="t0", eos_token=f"t{eos}",
                                   bos_token=None if bos is None else f"t{bos}")


def save_language_model(model, tokenizer, folder: Path) -> Path:
    """Write the language model and a tokenizer as a Hugging Face folder the builder reads."""
    lm = language_model(model)
    config = lm.config
    if config.eos_token_id is None:              # the builder needs one; min_length keeps it from stopping us
        config.eos_token_id = config.pad_token_id if config.pad_token_id is not None else 0
        lm.generation_config.eos_token_id = config.eos_token_id
    if tokenizer is None:
        tokenizer = word_level_tokenizer(config.vocab_size, config.bos_token_id, int(config.eos_token_id))
    folder.mkdir(parents=True, exist_ok=True)
    lm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def weights_key(model) -> str:
    """A short hash of the language model's weights and the onnxruntime-genai version: new weights
    (a retrained LoRA, say) or another builder give a new folder."""
    digest = hashlib.sha256(importlib.metadata.version(PACKAGE).encode())
    for name, tensor in sorted(language_model_state(model).items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy())
    return digest.hexdigest()[:16]


def language_model_state(model) -> dict:
    state = {f"model.{k}": v for k, v in model.model.language_model.state_dict().items()}
    state["lm_head.weight"] = model.lm_head.weight
    return state


def build(hf_folder: Path, target: Path, precision: str, progress: Callable[[str], None] = print) -> Path:
    """Run onnxruntime-genai's model builder (CPU) on ``hf_folder`` into ``target`` (atomically)."""
    if precision not in PRECISIONS:
        raise ValueError(f"onnxruntime-genai precision {precision!r}: choose from {', '.join(PRECISIONS)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_folder), "-o",
                   str(tmp / "model"), "-p", precision, "-e", "cpu", "-c", str(tmp / "cache")]
        progress(f"building the onnxruntime-genai {precision} model ({target.name})")
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if done.returncode != 0 or not (tmp / "model" / "genai_config.json").is_file():
            tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-4:])
            raise RuntimeError(f"onnxruntime-genai's model builder failed on {hf_folder}: {tail}")
        os.replace(tmp / "model", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


class OrtGenaiModels:
    """The peer's model folders for one model, one per precision, built once and cached."""

    def __init__(self, model, tokenizer, model_id: str, root: Path, progress: Callable[[str], None] = print):
        self.model, self.tokenizer, self.progress = model, tokenizer, progress
        safe_id = "".join(c if c.isalnum() or c in "-_" else "_" for c in model_id)[-40:]
        self.base = Path(root) / f"ortgenai-{safe_id}-{weights_key(model)}"

    def folder(self, precision: str) -> Path:
        target = Path(f"{self.base}-{precision}")
        if (target / "genai_config.json").is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="cspkv-ortgenai-hf-", dir=target.parent) as hf:
            self.progress(f"saving the language model for onnxruntime-genai ({target.name})")
            save_language_model(self.model, self.tokenizer, Path(hf))
            return build(Path(hf), target, precision, self.progress)
