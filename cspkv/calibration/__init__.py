"""INT8 calibration data built from the benchmark's training split, and calibrators (issue: engines).

    from cspkv.calibration import build_calibration_set
    calib = build_calibration_set("exports/fp32")          # cached under ~/.cache/cspkv/calibration
    reader = calib.reader("prefill", manifest)              # an onnxruntime CalibrationDataReader

Prompts come from the easy-VQA TRAIN split for the default model (:func:`train_prompts` refuses any
other split) and from synthetic prompts for the tiny test model.
"""

from cspkv.calibration.data import (  # noqa: F401
    HOW_TO,
    CalibrationSet,
    CalibrationSettings,
    FeedReader,
    build_calibration_set,
    cache_key,
    cache_root,
    record_calibration_set,
)
from cspkv.calibration.prompts import (  # noqa: F401
    CALIBRATION_SEED,
    CalibrationError,
    CalibrationPrompt,
    tiny_prompts,
    train_prompts,
)
