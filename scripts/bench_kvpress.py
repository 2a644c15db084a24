#!/usr/bin/env python
"""kvpress peer for csp-bench, run in kvpress's own environment (kvpress needs transformers < 5.3;
cspkv uses 5.24), so this file imports neither cspkv nor anything beyond torch/transformers/kvpress.

    python scripts/bench_kvpress.py SPEC.json RESULT.json

SPEC: {"model_dir": the cached default LLaVA folder, "embeds": an .npz whose "embeds" [L, hidden]
are the prompt's input embeddings with the image features already placed (made by csp-bench, so
both environments decode the very same prompt), "press": "snapkv" | "streaming_llm", "budget":
fraction kept, "new_tokens": N}. Prefill runs under the press (kvpress compresses after prefill),
then greedy decoding token by token with explicit positions, as kvpress's own pipeline does.

Setup of that environment (what csp-bench's --kvpress-python points at):
    python3 -m venv /work/kvpress-venv
    /work/kvpress-venv/bin/pip install torch==2.13.0 && /work/kvpress-venv/bin/pip install "transformers<5.3" kvpress gguf accelerate
"""

import json
import resource
import sys
import time

import numpy as np
import torch


def load_language_model(model_dir: str):
    """The LLaVA checkpoint's language model as a LlamaForCausalLM: its vision tower is a cspkv
    model type this environment's transformers does not know, and decoding needs only the LM."""
    from pathlib import Path

    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(model_dir)
    text = json.loads((folder / "config.json").read_text())["text_config"]
    config = AutoConfig.for_model(**text)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    weights = {}
    for file in sorted(folder.glob("*.safetensors")):
        for name, tensor in load_file(str(file)).items():
            for prefix, into in (("model.language_model.", "model."), ("language_model.model.", "model."),
                                 ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head.")):
                if name.startswith(prefix):       # the key layouts of transformers 4.x and 5.x
                    weights[into + name[len(prefix):]] = tensor
                    break
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise RuntimeError(f"{folder}: weights do not match the language model (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    if "lm_head.weight" in missing:
        model.tie_weights()
    return model.eval()


def _peak_rss() -> int:
    """VmHWM (ru_maxrss would include the parent's peak: it survives fork and exec)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(spec_path: str, out_path: str) -> int:
    import kvpress
    import transformers
    from transformers import DynamicCache

    with open(spec_path) as f:
        spec = json.load(f)
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    presses = {"snapkv": kvpress.SnapKVPress, "streaming_llm": kvpress.StreamingLLMPress}
    press = presses[spec["press"]](compression_ratio=1.0 - float(spec["budget"]))
    model = load_language_model(spec["model_dir"])
    embeds = torch.from_numpy(np.load(spec["embeds"])["embeds"]).float()[None]
    length, new_tokens = embeds.shape[1], int(spec["new_tokens"])
    steps = []
    with torch.no_grad():
        start = time.perf_counter()
        cache = DynamicCache()
        with press(model):
            out = model(inputs_embeds=embeds, past_key_values=cache, use_cache=True,
                        position_ids=torch.arange(length)[None], logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        ttft = time.perf_counter() - start
        for i in range(new_tokens - 1):
            t0 = time.perf_counter()
            out = model(input_ids=token, past_key_values=cache, use_cache=True,
                        position_ids=torch.tensor([[length + i]]))
            token = out.logits[:, -1:].argmax(-1)
            steps.append(time.perf_counter() - t0)
    kv_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    result = {"ttft_ms": 1e3 * ttft, "step_ms": [1e3 * s for s in steps], "kv_bytes": int(kv_bytes),
              "tokens": new_tokens, "kept_per_layer": int(cache.layers[0].keys.shape[2]),
              "peak_rss_bytes": _peak_rss(),
              "versions": {"kvpress": getattr(kvpress, "__version__", "?"),
                           "transformers": transformers.__version__, "torch": torch.__version__}}
    with open(out_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2]))
