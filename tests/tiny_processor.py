"""A processor for the tiny test models (vocabulary of 100, image token 99, 16 tokens per 28 px image):
a word-level tokenizer with a ChatML template, wrapped as the exporter's DefaultProcessor, so that a
tiny export can carry a processor folder like the default model's."""

from tokenizers import AddedToken, Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from cspkv.models.tiny import IMAGE_SIZE, IMAGE_TOKEN, VOCAB

SPECIAL = ["[UNK]", "<|im_start|>", "<|im_end|>"]
WORDS = ["system", "user", "assistant", "You", "answer", "questions", "about", "images", ".", "Image", ":", "(",
         "end", "of", "image", ")", "Question", "Which", "shows", "the", "blue", "circle", "?", "Options", "A", "B",
         "C", "D", "Answer", "with", "option", "'", "s", "letter", "1", "2", "3", "4", "a", "red", "square"]
# Whitespace control ({%- -%}, indented tags), raise_exception and a special-token variable: the parts of
# a template where renderers can differ.
CHAT_TEMPLATE = """{% if messages[0]['role'] != 'system' %}
    {{ raise_exception('the first message must be the system message') }}
{% endif %}
{% for message in messages %}
    {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + eos_token + '\n' -}}
{% endfor %}
{% if add_generation_prompt %}
    {{ '<|im_start|>assistant\n' }}
{% endif %}"""


def tiny_tokenizer():
    """A transformers tokenizer over the word list, ``<image>`` at id ``IMAGE_TOKEN``."""
    from transformers import PreTrainedTokenizerFast

    words = SPECIAL + WORDS
    words += [f"w{i}" for i in range(IMAGE_TOKEN - len(words))] + ["<image>"]
    assert len(words) == VOCAB
    backend = Tokenizer(WordLevel({word: i for i, word in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    backend.add_special_tokens([AddedToken(token, special=True) for token in SPECIAL[1:] + ["<image>"]])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", pad_token="<|im_end|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_processor():
    """The DefaultProcessor of the tiny models: their image size and tokens per image."""
    from cspkv.models.default_model import DefaultProcessor

    processor = DefaultProcessor(tiny_tokenizer())
    processor.image_size, processor.num_image_tokens = IMAGE_SIZE, 16
    assert processor.image_token_id == IMAGE_TOKEN
    return processor
