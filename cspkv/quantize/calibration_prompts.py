"""Calibration prompts: the benchmark's TRAINING split only (default model), or synthetic prompts
(tiny model). The test split is what accuracy is measured on; calibrating on it would leak it, so
nothing here can reach it: :func:`train_prompts` refuses any other split and checks every sample it
got back."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cspkv.evaluation import easyvqa_tasks as tasks_module
from cspkv.models.tiny import multi_image_prompt

# Not the benchmark's TEST_SEED: a seed of its own, so calibration prompts are a fixed, separate
# draw (from the train split's images, which never appear in the test split).
CALIBRATION_SEED = 7_000_001
TRAIN_SPLIT = "train"
# Few images per prompt, so prompts fit exports with a small --max-prompt (256 tokens per image).
MIN_IMAGES, MAX_IMAGES = 2, 5


class CalibrationError(ValueError):
    """Calibration data cannot be built or read; the message says how to provide it."""


@dataclass(frozen=True)
class CalibrationPrompt:
    """One prompt as the pipeline takes it: token ids [L] and pixel values [N, 3, H, W] (or None)."""

    input_ids: np.ndarray
    pixel_values: np.ndarray | None
    source: str               # "easyvqa-train:<sample_id>" or "tiny-synthetic:<seed>"


def train_prompts(processor, n_prompts: int, max_prompt: int, split: str = TRAIN_SPLIT,
                  seed: int = CALIBRATION_SEED, tasks=None) -> list[CalibrationPrompt]:
    """``n_prompts`` easy-VQA prompts of the TRAIN split (tasks in turn), tokenised with the default
    model's ``processor``; prompts longer than ``max_prompt`` tokens are skipped."""
    if split != TRAIN_SPLIT:
        raise CalibrationError(f"calibration prompts come from the training split only, got split={split!r}: "
                               "the test split is what accuracy is measured on")
    tasks = tuple(tasks or tasks_module.TASKS)
    prompts: list[CalibrationPrompt] = []
    per_task = {task: 0 for task in tasks}
    attempts = 0
    while len(prompts) < n_prompts:
        task = tasks[attempts % len(tasks)]
        index = per_task[task]
        per_task[task] += 1
        attempts += 1
        if attempts > 20 * max(n_prompts, 1) + 20:
            raise CalibrationError(f"could not find {n_prompts} training prompts of at most {max_prompt} "
                                   f"tokens (found {len(prompts)}): export with a larger --max-prompt")
        # generate_samples(i) does not depend on n, so asking for index + 1 and taking the last is
        # the i-th training prompt of the task
        sample = tasks_module.generate_samples(task, index + 1, split=TRAIN_SPLIT, seed=seed,
                                               min_images=MIN_IMAGES, max_images=MAX_IMAGES)[-1]
        if sample.split != TRAIN_SPLIT:  # belt and braces: never a test-split sample
            raise CalibrationError(f"sample {sample.sample_id} is not from the training split")
        inputs = tasks_module.build_prompt(sample, processor)
        ids = np.asarray(inputs["input_ids"])[0].astype(np.int64)
        if len(ids) > max_prompt:
            continue
        pixels = inputs.get("pixel_values")
        pixels = None if pixels is None else np.asarray(pixels, dtype=np.float32)
        prompts.append(CalibrationPrompt(ids, pixels, f"easyvqa-{TRAIN_SPLIT}:{sample.sample_id}"))
    return prompts


def tiny_prompts(n_prompts: int, max_prompt: int, seed: int = CALIBRATION_SEED) -> list[CalibrationPrompt]:
    """Synthetic multi-image prompts for the tiny test model (random tokens and pixels)."""
    prompts = []
    for i in range(n_prompts):
        # 22 tokens per image (6 text + 16 image) plus 7: as many images as fit, at least one
        n_images = max(1, min(1 + i % 4, (max_prompt - 7) // 22))
        ids, pixels = multi_image_prompt(n_images, seed=seed + i)
        ids = ids[0].numpy()
        if len(ids) > max_prompt:
            raise CalibrationError(f"a tiny calibration prompt has {len(ids)} tokens, the export takes "
                                   f"{max_prompt}: export with --max-prompt >= {len(ids)}")
        prompts.append(CalibrationPrompt(ids, pixels.numpy(), f"tiny-synthetic:{seed + i}"))
    return prompts
