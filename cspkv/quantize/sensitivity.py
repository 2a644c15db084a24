"""Which module group's INT8 error changes the default model's answers (ONNX Runtime, CPU).

    python scripts/int8_sensitivity.py --fp32 ~/.cache/cspkv/precision-table/default/budget-1.0-fp32

For each group (none, the vision graph, each projection type of the decoder: q/k/v/o/gate/up/down_proj,
the decode graph, "layers:A-B": those decoder layers), quantize the fp32 export to INT8 with that group
kept fp32 (everything else as convert_export does it, except that every projection type and graph
starts int8; the cached calibration set and ranges are reused), then
greedy-decode held-out TRAIN prompts (a calibration seed of their own; never the test split, so the
choice cannot be tuned on the scored prompts) and compare with fp32: the share of prompts whose
generated tokens are all identical, and the mean number of leading tokens that agree. Then, teacher-forced
on fp32's answer (each step fed fp32's token, so a late flip is seen even after an early one): the
share of answer positions whose argmax differs from fp32's token, and the mean KL(fp32 || int8) over
them. Those two see every answer word, where greedy equality stops at the first flip. Prints a table
and writes JSON after each group.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cspkv.durable import write_atomic
from cspkv.engines.onnx_runtime import OnnxPipeline, OrtEngine
from cspkv.export.exporter import load_processor
from cspkv.quantize.calibration_prompts import CALIBRATION_SEED, train_prompts
from cspkv.quantize.convert import convert_int8, resolve_calibration
from cspkv.quantize.int8 import INT8_EXCLUDE_MODULES
from cspkv.runtime.manifest import read_manifest

GROUPS = ("none", "vision", "decode", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
          "layers:A-B")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _is_layer_range(part: str) -> bool:
    try:
        layer_range(part)
        return True
    except ValueError:
        return False


def layer_range(part: str) -> tuple[int, int]:
    """"layers:0-1" -> (0, 1); "layers:29" -> (29, 29): those decoder layers' MatMuls stay fp32."""
    if not part.startswith("layers:"):
        raise ValueError(part)
    first, _, last = part[len("layers:"):].partition("-")
    first, last = int(first), int(last or first)
    if first < 0 or last < first:
        raise ValueError(part)
    return first, last


def generate(folder: Path, prompts, max_new_tokens: int, eos) -> tuple[list[list[int]], list[np.ndarray]]:
    """(generated tokens, first-token logits) of each prompt."""
    pipeline = OnnxPipeline(OrtEngine(folder))
    tokens, first = [], []
    for p in prompts:
        result = pipeline.generate(p.input_ids, p.pixel_values, max_new_tokens=max_new_tokens, eos_token_id=eos)
        tokens.append(result.tokens)
        first.append(np.asarray(result.logits[0], dtype=np.float64).ravel())
    return tokens, first


def forced(folder: Path, prompts, reference_tokens) -> list[list[np.ndarray]]:
    """Each prompt's logits at every position of the fp32 answer, fed that answer (teacher forcing)."""
    pipeline = OnnxPipeline(OrtEngine(folder))
    return [[np.asarray(x, dtype=np.float64).ravel() for x in
             pipeline.generate(p.input_ids, p.pixel_values, max_new_tokens=len(want), forced_tokens=want).logits]
            for p, want in zip(prompts, reference_tokens)]


def kl(want: np.ndarray, got: np.ndarray) -> float:
    log_p = want - want.max() - np.log(np.exp(want - want.max()).sum())
    log_q = got - got.max() - np.log(np.exp(got - got.max()).sum())
    return float(np.sum(np.exp(log_p) * (log_p - log_q)))


def forced_agreement(logits, reference_logits, reference_tokens) -> dict:
    """Teacher-forced: share of answer positions whose argmax is not fp32's token; mean KL over them."""
    flips, kls = [], []
    for got, want, tokens in zip(logits, reference_logits, reference_tokens):
        for position, (g, w) in enumerate(zip(got, want)):
            flips.append(int(g.argmax()) != tokens[position])
            kls.append(kl(w, g))
    return {"forced_flip_rate": float(np.mean(flips)), "forced_answer_kl": float(np.mean(kls)),
            "forced_positions": len(flips)}


def first_token_kl(logits, reference) -> float:
    """Mean KL(fp32 || int8) of the first generated token's distribution: finer than token equality."""
    values = []
    for got, want in zip(logits, reference):
        log_p = want - want.max() - np.log(np.exp(want - want.max()).sum())
        log_q = got - got.max() - np.log(np.exp(got - got.max()).sum())
        values.append(float(np.sum(np.exp(log_p) * (log_p - log_q))))
    return float(np.mean(values))


def agreement(tokens, reference) -> dict:
    prefixes = []
    for got, want in zip(tokens, reference):
        n = 0
        while n < min(len(got), len(want)) and got[n] == want[n]:
            n += 1
        prefixes.append(n)
    return {"all_tokens_equal": float(np.mean([a == b for a, b in zip(tokens, reference)])),
            "mean_agreeing_prefix": float(np.mean(prefixes))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fp32", type=Path, required=True, help="an fp32 export folder of the default model")
    parser.add_argument("--flavour", default="u8s8", choices=["u8s8", "s8s8"])
    parser.add_argument("--groups", nargs="+", default=list(GROUPS),
                        help=f"groups, or several joined by '+' (e.g. down_proj+vision): {', '.join(GROUPS)}")
    parser.add_argument("--n-prompts", type=int, default=16)
    parser.add_argument("--tasks", nargs="+", default=["text_needle", "describe"])
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("results/int8_sensitivity.json"))
    args = parser.parse_args(argv)
    for group in args.groups:
        unknown = [part for part in group.split("+") if part not in GROUPS and not _is_layer_range(part)]
        if unknown:
            parser.error(f"unknown group {', '.join(unknown)}: choose from {', '.join(GROUPS)}")

    manifest = read_manifest(args.fp32, verify_hashes=False)
    processor = load_processor(args.fp32, manifest)
    prompts = train_prompts(processor, args.n_prompts, manifest["plan"]["max_prompt"], seed=CALIBRATION_SEED + 1,
                            tasks=args.tasks)
    eos = getattr(getattr(processor, "tokenizer", processor), "eos_token_id", None)
    calibration = resolve_calibration(args.fp32, "auto", log)
    start = time.perf_counter()
    reference, reference_logits = generate(args.fp32, prompts, args.max_new_tokens, eos)
    reference_forced = forced(args.fp32, prompts, reference)
    log(f"fp32: {len(prompts)} held-out train prompts in {time.perf_counter() - start:.0f} s")
    result = {"command": " ".join(["python", "scripts/int8_sensitivity.py", *(argv or sys.argv[1:])]),
              "fp32": str(args.fp32), "flavour": args.flavour, "prompts": [p.source for p in prompts],
              "machine": "see README (2-core CPU, ONNX Runtime CPU)", "reference_tokens": reference, "rows": []}
    for group in args.groups:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="cspkv-sensitivity-") as tmp:
            folder = Path(tmp) / group
            types, graphs, modules = (), (), INT8_EXCLUDE_MODULES
            for part in group.split("+"):
                if part in ("vision", "decode"):
                    graphs += (part,)
                elif part.startswith("layers:"):
                    first, last = layer_range(part)
                    modules += tuple(f"text.layers.{i}" for i in range(first, last + 1))
                elif part != "none":
                    types += (part,)
            convert_int8(args.fp32, folder, args.flavour, calibration, types, graphs, modules)
            tokens, logits = generate(folder, prompts, args.max_new_tokens, eos)
            teacher = forced_agreement(forced(folder, prompts, reference), reference_forced, reference)
        row = {"fp32_group": group, **agreement(tokens, reference),
               "first_token_kl": first_token_kl(logits, reference_logits), **teacher, "tokens": tokens,
               "seconds": round(time.perf_counter() - start, 1)}
        result["rows"].append(row)
        log(f"{group}: all tokens = fp32 {row['all_tokens_equal']:.2f}, agreeing prefix "
            f"{row['mean_agreeing_prefix']:.2f}, first-token KL {row['first_token_kl']:.4f}, teacher-forced flips "
            f"{row['forced_flip_rate']:.3f} KL {row['forced_answer_kl']:.4f} ({row['seconds']} s)")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.out, json.dumps(result, indent=1))
    print("| kept fp32 | all tokens = fp32 | mean agreeing prefix (of %d) | first-token KL | teacher-forced flips "
          "| teacher-forced KL |" % args.max_new_tokens)
    print("|---|---|---|---|---|---|")
    for row in result["rows"]:
        print(f"| {row['fp32_group']} | {row['all_tokens_equal']:.2f} | {row['mean_agreeing_prefix']:.2f} "
              f"| {row['first_token_kl']:.4f} | {row['forced_flip_rate']:.3f} | {row['forced_answer_kl']:.4f} |")
    print(f"{len(prompts)} held-out train prompts ({', '.join(args.tasks)}); JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
