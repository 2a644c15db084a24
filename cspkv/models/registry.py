"""What `--model` names: default | tiny | llava | PATH."""

from __future__ import annotations

import os
from pathlib import Path

from cspkv.models.default_model import load_default_model
from cspkv.models.tiny import tiny_llava

LLAVA_ENV = "CSPKV_LLAVA_PATH"


class ModelNotFound(ValueError):
    """A --model that cannot be loaded; the message says what to do."""


def load_model(name: str):
    """Return (model, processor or None, model id) for a --model value."""
    if name == "default":
        model, processor = load_default_model()
        return model, processor, "default"
    if name == "tiny":
        return tiny_llava(), None, "tiny"
    if name == "llava":
        path = os.environ.get(LLAVA_ENV)
        if not path:
            raise ModelNotFound(f"--model llava needs a local LLaVA checkpoint: set {LLAVA_ENV}=/path/to/"
                                "llava-1.5-7b-hf or pass --model /path/to/checkpoint (no model hub is used)")
        name = path
    return _load_local(Path(name))


def _load_local(path: Path):
    if not path.exists():
        raise ModelNotFound(f"unknown model {str(path)!r}: use default, tiny, llava, or the path of a "
                            "local HF LLaVA checkpoint folder")
    if not (path / "config.json").is_file():
        raise ModelNotFound(f"{path} has no config.json: point --model at a HF LLaVA checkpoint folder")
    import json

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type != "llava":
        raise ModelNotFound(f"{path} holds a {model_type!r} model, not LLaVA (model_type 'llava'): "
                            "cspkv exports LlavaForConditionalGeneration checkpoints")
    model = LlavaForConditionalGeneration.from_pretrained(path, local_files_only=True).eval()
    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    except Exception:  # a checkpoint without processor files still exports
        processor = None
    return model, processor, str(path.resolve())
