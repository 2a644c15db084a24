"""Image loading and prompt building for csp-run."""

import numpy as np
import pytest

from cspkv.models.prompting import chat_prompt, demo_images, load_images


def test_load_images_resizes_and_rejects_what_is_not_an_image(tmp_path):
    from PIL import Image

    path = tmp_path / "small.png"
    Image.fromarray(np.full((10, 20, 3), 200, np.uint8)).save(path)
    (image,) = load_images([path], 224)
    assert image.shape == (224, 224, 3) and image.dtype == np.uint8 and (image == 200).all()
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    with pytest.raises(ValueError, match="notes.png is not an image Pillow can read"):
        load_images([text], 224)
    with pytest.raises(ValueError, match="missing.png does not exist"):
        load_images([tmp_path / "missing.png"], 224)


def test_demo_images_are_easyvqa_test_images_with_their_labels():
    from cspkv.data.easyvqa import load_image, load_labels
    from cspkv.models.prompting import DEMO_LABELS

    images = demo_images(64)
    assert len(images) == 4 and all(im.shape == (64, 64, 3) for im in images)
    labels = load_labels("test")
    for image, wanted in zip(images, DEMO_LABELS):
        matches = [i for i, label in labels.items() if label == wanted]
        assert np.array_equal(image, load_image("test", min(matches), 64))
    assert DEMO_LABELS[1] == ("blue", "circle")                 # csp-run's demo question: answer B, image 2


def test_prompt_placeholders():

    class NoTemplate:
        chat_template = None
        image_token = "<image>"

    prompt = chat_prompt(NoTemplate(), "Which one?", 3)
    # without a chat template: plain text that ends where the answer goes, as the benchmark's prompts
    assert prompt.count("<image>") == 3 and prompt.endswith("Which one?\nAnswer:")
    assert prompt.startswith("Image 1: <image> (end of image 1)\nImage 2: <image> (end of image 2)\n")


def test_chat_prompt_carries_the_benchmarks_system_message():
    """csp-run's prompts open as the training conversations and benchmark prompts do."""
    from cspkv.models.prompting import SYSTEM_PROMPT

    class Template:
        chat_template = "chatml"
        image_token = "<image>"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            self.messages = messages
            return "rendered"

    tokenizer = Template()
    assert chat_prompt(tokenizer, "Which one?", 2) == "rendered"
    assert tokenizer.messages[0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert tokenizer.messages[1]["content"].endswith("Image 2: <image> (end of image 2)\nWhich one?")
