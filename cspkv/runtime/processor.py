"""An export's preprocessing without torch or transformers: question and images in, token ids and
pixel values out.

The export folder's ``processor/`` holds the tokenizer (``tokenizer.json``, ``tokenizer_config.json``,
``chat_template.jinja``); manifest.json's ``processor`` entry records the image preprocessing (size,
mean, std, the image token and how many tokens each image takes, the resize filter for image files).
:class:`Processor` computes from them the same token ids and the same float32 pixel values as the
exporter's processor does through transformers and torch (tests/test_runtime_processor.py compares
them): the chat template is rendered by jinja2 the way transformers renders it, the text is encoded by
the ``tokenizers`` library without special tokens, and images are normalised in float32 with numpy.

Imports numpy, Pillow, tokenizers and jinja2: what an edge install of the runtime carries.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np

from cspkv.runtime.manifest import REDO, RESIZE_FILTERS, ManifestError

PROCESSOR_KIND = "default"   # the kind this module runs; "hf" processors run through transformers
# tokenizer_config.json entries a chat template can read by name (transformers' special_tokens_map)
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def load_images(paths, size: int, resize_filter: str = "bilinear") -> list[np.ndarray]:
    """Read image files as size x size RGB uint8 arrays (Pillow), resized with ``resize_filter``."""
    from PIL import Image, UnidentifiedImageError

    if resize_filter not in RESIZE_FILTERS:
        raise ValueError(f"resize filter {resize_filter!r} is not one of {', '.join(RESIZE_FILTERS)}")
    resample = getattr(Image.Resampling, resize_filter.upper())
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(np.asarray(image.convert("RGB").resize((size, size), resample)))
        except FileNotFoundError:
            raise ValueError(f"image {path} does not exist") from None
        except UnidentifiedImageError:
            raise ValueError(f"{path} is not an image Pillow can read (PNG, JPEG, ...)") from None
        except IsADirectoryError:
            raise ValueError(f"{path} is a folder, not an image file") from None
        except (OSError, Image.DecompressionBombError) as exc:  # truncated or corrupt image data
            raise ValueError(f"{path} cannot be decoded as an image ({exc}): pass an intact PNG or JPEG") from None
    return images


def _chat_environment():
    """jinja2 set up as transformers sets it up for chat templates (sandboxed, trim_blocks,
    lstrip_blocks, loop controls, ``raise_exception``, ``strftime_now``, a ``tojson`` that does not
    escape HTML, and ``{% generation %}`` blocks rendered as their body)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        # transformers uses the tag to find the assistant's tokens; the rendered text is the body's
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    return env


class ChatTokenizer:
    """``tokenizer.json`` and the chat template of a processor folder, with the calls the prompt
    builders make on a transformers tokenizer (``chat_template``, ``apply_chat_template``,
    ``eos_token_id``, ``decode``)."""

    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer

        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ManifestError(f"{path} is missing: the export's processor has no tokenizer ({REDO})")
        self.backend = Tokenizer.from_file(str(path))
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        self.special_tokens = {}
        for name in SPECIAL_TOKENS:
            token = config.get(name)
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str):
                self.special_tokens[name] = token
        template = folder / "chat_template.jinja"
        self.chat_template = template.read_text(encoding="utf-8") if template.is_file() else config.get("chat_template")
        self._compiled = None
        eos = self.special_tokens.get("eos_token")
        self.eos_token_id = self.backend.token_to_id(eos) if eos is not None else None

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False,
                            add_generation_prompt: bool = False) -> str:
        """The conversation as text, rendered by the folder's chat template."""
        if tokenize:
            raise ValueError("apply_chat_template renders text only: pass tokenize=False and encode the text")
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        if self._compiled is None:
            self._compiled = _chat_environment().from_string(self.chat_template)
        return self._compiled.render(messages=messages, tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt, **self.special_tokens)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without the special tokens a post-processor would add."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


class Processor:
    """The preprocessing of an export whose manifest's ``processor`` entry has kind ``default``.

    ``processor(text, images)`` expands every image token of ``text`` into ``image_tokens`` copies
    and returns ``input_ids`` (int64, [1, L]) and ``pixel_values`` (float32, [N, 3, S, S]: RGB uint8
    scaled to [0, 1], minus ``image_mean``, divided by ``image_std``)."""

    def __init__(self, folder: str | Path, spec: dict):
        if spec.get("kind") != PROCESSOR_KIND:
            raise ValueError(f"processor kind {spec.get('kind')!r} runs through transformers, not this runtime "
                             "processor: install the full cspkv (pip install 'cspkv[full]')")
        self.tokenizer = ChatTokenizer(Path(folder) / spec["path"])
        self.image_token, self.image_token_id = spec["image_token"], spec["image_token_id"]
        self.image_size, self.num_image_tokens = spec["image_size"], spec["image_tokens"]
        self.image_mean = np.asarray(spec["image_mean"], np.float32)
        self.image_std = np.asarray(spec["image_std"], np.float32)
        self.resize_filter = spec["resize_filter"]
        found = self.tokenizer.token_to_id(self.image_token)
        if found != self.image_token_id:
            raise ManifestError(f"{Path(folder) / spec['path']}: the tokenizer gives {self.image_token!r} the id "
                                f"{found}, but manifest.json's processor.image_token_id is {self.image_token_id}: "
                                f"{REDO}")

    def load_images(self, paths) -> list[np.ndarray]:
        """Image files at this export's image size, resized with its filter."""
        return load_images(paths, self.image_size, self.resize_filter)

    def preprocess_images(self, images) -> np.ndarray:
        arrays = [np.asarray(image) for image in images]
        want = (self.image_size, self.image_size, 3)
        for array in arrays:
            if array.shape != want or array.dtype != np.uint8:
                raise ValueError(f"expected {want[0]}x{want[1]}x3 uint8 RGB images, got {array.shape} {array.dtype}: "
                                 "load image files with Processor.load_images")
        # float32 throughout, in the order the export-side (torch) processor computes it
        pixels = np.stack(arrays).astype(np.float32) / np.float32(255.0)
        pixels = (pixels - self.image_mean) / self.image_std
        return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))

    def __call__(self, text: str, images=(), return_tensors: str = "np") -> dict[str, np.ndarray]:
        if return_tensors != "np":
            raise ValueError(f"return_tensors={return_tensors!r}: this processor returns numpy arrays ('np')")
        images = list(images)
        placeholders = text.count(self.image_token)
        if placeholders != len(images):
            raise ValueError(f"text has {placeholders} {self.image_token} placeholders but {len(images)} images "
                             "were given: write one placeholder per image")
        ids = self.tokenizer.encode(text.replace(self.image_token, self.image_token * self.num_image_tokens))
        size = self.image_size
        pixels = self.preprocess_images(images) if images else np.zeros((0, 3, size, size), np.float32)
        return {"input_ids": np.asarray([ids], np.int64), "pixel_values": pixels}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
