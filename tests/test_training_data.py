"""The default model's training inputs and LoRA: conversations that agree with the labels and the
benchmark's prompt format, train-split images only, and a LoRA merge equal to the trained adapters."""

import pytest
import torch
from torch import nn

from cspkv.models import lora
from cspkv.training import conversations as td

easy_vqa = pytest.importorskip("easy_vqa")
from cspkv.evaluation import easyvqa_tasks as ev  # noqa: E402
from cspkv.evaluation import answers  # noqa: E402
from cspkv.data import easyvqa  # noqa: E402
from cspkv.models import prompting  # noqa: E402


class CharTokenizer:
    """One token per character; enough to check which tokens are supervised."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def _expected_answer(q: td.Question, labels, code_word):
    """The answer recomputed from the labels alone (independently of the conversation builder's code)."""
    import re

    numbers = [int(x) for x in re.findall(r"\d+", q.question)]
    if q.kind == "attribute":
        k = numbers[0] - 1
        return labels[k][0] if "colour" in q.question else labels[k][1]
    if q.kind == "image_needle":
        color, shape = re.match(r"Which image shows the (\w+) (\w+)\?", q.question).groups()
        matches = [k + 1 for k, label in enumerate(labels) if label == (color, shape)]
        assert len(matches) == 1, "an image-needle question must have exactly one matching image"
        return str(matches[0])
    if q.kind == "counting":
        thing = re.match(r"How many images show (?:an?) (\w+)", q.question).group(1)
        if thing in easyvqa.COLORS:
            return str(sum(label[0] == thing for label in labels))
        return str(sum(label[1] == thing for label in labels))
    if q.kind == "comparison":
        a, b = numbers[0] - 1, numbers[1] - 1
        index = 0 if q.question.endswith("colour?") else 1
        return "yes" if labels[a][index] == labels[b][index] else "no"
    if q.kind == "text_needle":
        return code_word
    if q.kind == "describe":
        k = numbers[0] - 1
        return f"a {labels[k][0]} {labels[k][1]}"
    raise AssertionError(q.kind)


def _train_conversations(n: int, **kwargs):
    """(conversation, its images' labels) for seeds 0..n-1 over the train split."""
    labels = easyvqa.load_labels("train")
    pool = sorted(labels)
    for seed in range(n):
        conv = td.make_conversation(seed, pool, labels, **kwargs)
        yield conv, [labels[i] for i in conv.image_ids]


def test_conversations_answer_correctly_from_train_images_only():
    pool = sorted(easyvqa.load_labels("train"))
    kinds = set()
    for conv, image_labels in _train_conversations(300):
        assert 3 <= len(conv.image_ids) <= 10 and set(conv.image_ids) <= set(pool)
        assert conv.context.count(prompting.IMAGE_TOKEN) == len(conv.image_ids)
        assert len({q.question for q in conv.questions}) == len(conv.questions)  # no repeated question
        if conv.code_word is not None:
            assert f"The code word is {conv.code_word}." in conv.context
        for q in conv.questions:
            kinds.add(q.kind)
            expected = _expected_answer(q, image_labels, conv.code_word)
            if q.choices is None:
                assert q.answer == expected
            else:
                assert q.choices[ord(q.answer) - 65] == expected
                assert len(set(q.choices)) == len(q.choices)
    assert kinds == {k for k, _ in td.QUESTION_MIX}


def test_first_turn_is_the_benchmarks_prompt_and_only_answers_are_supervised():
    labels = easyvqa.load_labels("train")
    conv = td.make_conversation(7, sorted(labels), labels)
    tokenizer = CharTokenizer()
    ids, supervised = td.conversation_tokens(conv, tokenizer, image_tokens=1)
    text = "".join(map(chr, ids))
    first = conv.questions[0]
    sample_like = ev.TaskSample(task=first.kind, split="train", sample_id="x", image_ids=conv.image_ids,
                                labels=tuple(labels[i] for i in conv.image_ids), context=conv.context,
                                question=first.question, choices=first.choices, answer=first.answer,
                                answer_text=first.answer)
    assert text.startswith(f"<|im_start|>system\n{prompting.SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
                           f"{ev.prompt_text(sample_like)}<|im_end|>\n<|im_start|>assistant\n")
    supervised_text = "".join(chr(t) for t, s in zip(ids, supervised) if s)
    assert supervised_text == "".join(q.target + "<|im_end|>" for q in conv.questions)
    for q in conv.questions:  # the option's text scores as the right letter
        assert answers.score(sample_like.__class__(**{**sample_like.__dict__, "choices": q.choices, "answer": q.answer,
                                                 "question": q.question}), q.target) == pytest.approx(1.0)


def test_conversations_are_seeded():
    labels = easyvqa.load_labels("train")
    pool = sorted(labels)
    assert td.make_conversation("0:5", pool, labels) == td.make_conversation("0:5", pool, labels)
    assert td.make_conversation("0:5", pool, labels) != td.make_conversation("0:6", pool, labels)


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleDict({"q_proj": nn.Linear(6, 4), "down_proj": nn.Linear(4, 6),
                                                    "other": nn.Linear(6, 6)}) for _ in range(2)])

    def forward(self, x):
        for layer in self.layers:
            x = layer["down_proj"](torch.relu(layer["q_proj"](x))) + layer["other"](x)
        return x


def test_lora_merge_equals_the_trained_adapters():
    torch.manual_seed(0)
    trained, plain = TwoLayers(), TwoLayers()
    plain.load_state_dict(trained.state_dict())
    params = lora.attach(trained, rank=2, alpha=4.0, targets=("q_proj", "down_proj"))
    assert len(params) == 2 * 2 * 2  # A and B for two Linears in two layers
    x = torch.randn(3, 6)
    torch.testing.assert_close(trained(x), plain(x))  # B = 0: no change before training
    with torch.no_grad():
        for p in params:
            p.normal_()
    state = lora.adapter_state(trained)
    assert set(state) == {f"layers.{i}.{n}.lora_{ab}" for i in range(2) for n in ("q_proj", "down_proj") for ab in "AB"}
    assert lora.merge(plain, state) == 4
    torch.testing.assert_close(plain(x), trained(x), atol=1e-5, rtol=1e-5)
    lora.detach_adapters(trained)
    assert not any(isinstance(m, lora.LoRALinear) for m in trained.modules())
    torch.testing.assert_close(trained(x), plain(x), atol=1e-5, rtol=1e-5)


def test_lora_state_loads_back_into_fresh_adapters():
    torch.manual_seed(0)
    trained, resumed = TwoLayers(), TwoLayers()
    resumed.load_state_dict(trained.state_dict())
    params = lora.attach(trained, rank=2, alpha=4.0, targets=("q_proj", "down_proj"))
    with torch.no_grad():
        for p in params:
            p.normal_()
    lora.attach(resumed, rank=2, alpha=4.0, targets=("q_proj", "down_proj"), seed=1)
    lora.load_adapter_state(resumed, lora.adapter_state(trained))
    x = torch.randn(3, 6)
    torch.testing.assert_close(resumed(x), trained(x))
    narrower = TwoLayers()
    lora.attach(narrower, rank=2, alpha=4.0, targets=("q_proj",))
    with pytest.raises(ValueError, match="adapts 4 Linears, the attached adapters 2"):
        lora.load_adapter_state(narrower, lora.adapter_state(trained))


def test_lora_file_for_another_model_is_refused_whole():
    model = TwoLayers()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = {"layers.0.q_proj.lora_A": torch.ones(2, 6), "layers.0.q_proj.lora_B": torch.ones(4, 2)}
    with pytest.raises(ValueError, match="layers.1.q_proj.*does not fit"):
        lora.merge(model, {**good, "layers.1.q_proj.lora_A": torch.ones(2, 5), "layers.1.q_proj.lora_B": torch.ones(4, 2)})
    with pytest.raises(ValueError, match="'layers.0.nothing'"):
        lora.merge(model, {**good, "layers.0.nothing.lora_A": torch.ones(2, 6), "layers.0.nothing.lora_B": torch.ones(4, 2)})
    with pytest.raises(ValueError, match="lacks lora_A or lora_B"):
        lora.merge(model, {"layers.0.q_proj.lora_A": torch.ones(2, 6)})
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing merged partly


def test_training_contexts_use_the_benchmarks_image_lines_and_the_earlier_format_on_request():
    labels = easyvqa.load_labels("train")
    pool = sorted(labels)
    for seed in range(40):
        conv = td.make_conversation(seed, pool, labels)
        lines = [line for line in conv.context.split("\n") if prompting.IMAGE_TOKEN in line]
        assert lines == [prompting.image_line(k) for k in range(1, len(conv.image_ids) + 1)]
        assert lines[-1].endswith(f"{prompting.IMAGE_TOKEN} (end of image {len(lines)})")
        old = td.make_conversation(seed, pool, labels, context_format="prefix")
        # The same draw (images, needle, questions); only the image lines differ.
        assert old.image_ids == conv.image_ids and old.questions == conv.questions
        assert [line for line in old.context.split("\n") if prompting.IMAGE_TOKEN in line] == [
            f"Image {k}: {prompting.IMAGE_TOKEN}" for k in range(1, len(conv.image_ids) + 1)]
    with pytest.raises(ValueError, match="unknown context format 'suffix'"):
        prompting.image_line(1, "suffix")


def test_benchmark_answer_mix_matches_the_benchmarks_answer_distribution():
    """Training answers drawn like the benchmark's: comparison "yes" about half the time (random
    pairs give ~25%), counts spread over 0..6 instead of mostly 0 or 1; "natural" keeps the old draw."""
    labels = easyvqa.load_labels("train")
    pool = sorted(labels)

    def answers(mix):
        comparison, counts = [], []
        for seed in range(300):
            for q in td.make_conversation(seed, pool, labels, answers=mix, replies="direct").questions:
                if q.kind == "comparison":
                    comparison.append(q.target == "yes")
                elif q.kind == "counting":
                    counts.append(int(q.target))
        return sum(comparison) / len(comparison), counts

    yes, counts = answers("benchmark")
    assert 0.4 < yes < 0.6
    assert set(counts) == set(range(7)) and sum(c <= 1 for c in counts) / len(counts) < 0.45
    natural_yes, natural_counts = answers("natural")
    assert natural_yes < 0.35 and sum(c <= 1 for c in natural_counts) / len(natural_counts) > 0.5
    with pytest.raises(ValueError, match="answers must be one of"):
        td.make_conversation(0, pool, labels, answers="uniform")


def test_worked_replies_one_per_conversation_asked_last():
    """A worked question comes last and alone, so no earlier reply can hand it image readings;
    its target is the benchmark's worked reply; "direct" trains the bare options."""
    labels = easyvqa.load_labels("train")
    pool = sorted(labels)
    kinds = set()
    for seed, (conv, image_labels) in enumerate(_train_conversations(200)):
        worked = [q for q in conv.questions if q.steps is not None]
        assert len(worked) <= 1
        if not worked:
            continue
        q = conv.questions[-1]
        assert q is worked[0] and q.kind in answers.WORKED_TASKS
        kinds.add(q.kind)
        expected = _expected_answer(q, image_labels, conv.code_word)
        assert answers.final_answer(q.target) == expected and q.target.startswith("image ")
        assert all(", so " not in other.target for other in conv.questions[:-1])
        direct = td.make_conversation(seed, pool, labels, replies="direct")
        assert all(d.steps is None and ", so " not in d.target for d in direct.questions)
    assert kinds == set(answers.WORKED_TASKS)
    with pytest.raises(ValueError, match="replies must be one of"):
        td.make_conversation(0, pool, labels, replies="verbose")
