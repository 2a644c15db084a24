"""csp-eval's sweep: one prefill per prompt, every policy and budget, baselines, MileBench items, errors."""

import dataclasses
from pathlib import Path
import math

import pytest
import torch
from click.testing import CliRunner

from cspkv.cli.eval import main
from cspkv.evaluation import sweep
from cspkv.models.llava import LlavaReference
from cspkv.models.tiny import multi_image_prompt, tiny_llava
from test_milebench import _write_task


class DigitTokenizer:
    """Decodes token ids as space-separated numbers; no EOS, so decoding runs to max_new_tokens."""

    eos_token_id = None

    def decode(self, tokens, skip_special_tokens=True):
        return " ".join(map(str, tokens))


def _prompt_item(task, seed, n_images, score, answer):
    """A multiple-choice EvalItem over a tiny multi-image prompt; blanking zeroes its pixels."""
    ids, pixels = multi_image_prompt(n_images, seed=seed)
    return sweep.EvalItem(task, str(seed), lambda blank: {"input_ids": ids, "pixel_values": pixels * 0 if blank else pixels},
                          score, answer, "multi-choice")


@pytest.fixture
def prefill_calls(monkeypatch):
    """A list that grows by one on every LlavaReference.prefill (the real one still runs)."""
    calls = []
    original = LlavaReference.prefill
    monkeypatch.setattr(LlavaReference, "prefill", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    return calls


def test_sweep_prefills_once_per_prompt_and_fills_every_cell(prefill_calls):
    model = tiny_llava(seed=2)
    calls = prefill_calls

    def item(task, seed):
        return _prompt_item(task, seed, 3, lambda reply: float(len(reply) > 0), "A")

    items = [item("t1", 1), item("t1", 2), item("t2", 3)]
    policies, budgets = ["full", "snapkv", "csp"], [1.0, 0.5, 0.2]
    result = sweep.run_sweep(model, DigitTokenizer(), items, policies, budgets, max_new_tokens=3)
    assert len(calls) == 2 * len(items)                      # one prefill + one blanked prefill each
    assert set(result["scores"]) == {"t1", "t2"}
    length = items[0].build_inputs(False)["input_ids"].shape[1]
    for task, by_policy in result["scores"].items():
        assert set(by_policy["full"]) == {"1.0"}
        for name in ("snapkv", "csp"):
            for budget in budgets:
                cell = by_policy[name][str(budget)]
                assert cell["score"] == 1.0
                assert cell["kept_fraction"] == pytest.approx(math.ceil(budget * length) / length)
    assert result["prompts_per_task"] == {"t1": 2, "t2": 1}
    assert result["baselines"]["t1"]["majority"] == 1.0
    table = sweep.markdown_table(result, budgets, policies)
    assert "### t1" in table and "| csp | 1.000 | 1.000 | 1.000 |" in table
    blank = result["baselines"]["t1"]["blank_images"]
    ci = result["baselines"]["t1"]["full_minus_blank_ci95"]
    assert f"| t1 | multi-choice | 2 | 1.000 | {blank:.3f} | 1.000 | {1 - blank:+.3f} ± {ci:.3f} |" in table
    assert result["baselines"]["t2"]["full_minus_blank_ci95"] is None          # one prompt: no interval
    t2_row = next(row for row in table.splitlines() if row.startswith("| t2 |"))
    assert "±" not in t2_row
    assert f"| csp | 1.000 (1.00) | 1.000 ({math.ceil(0.5 * length) / length:.2f}) |" in table


def test_timing_note_gives_the_records_compute_time_beside_this_runs_wall_time():
    """A run that only rewrites the tables from records takes ~0 s; the note still says what they cost."""
    result = {"wall_seconds": 0.4, "sweep_seconds": 300.0, "prompts_per_task": {"t1": 8, "t2": 4}}
    assert sweep.timing_note(result) == ("this run 0.4 s; its 12 prompts took 300 s in all (25.0 s a prompt), "
                                         "summed over the records")
    assert "0 prompts took 0 s in all (0.0 s a prompt)" in sweep.timing_note(
        {"wall_seconds": 0.0, "sweep_seconds": 0.0, "prompts_per_task": {}})


def test_paired_interval_of_full_minus_blanked():
    """1.96 standard errors of the mean per-prompt difference; none from a single prompt."""
    assert sweep.paired_ci95([1.0, 0.0, 1.0, 0.0]) == pytest.approx(1.96 * (1 / 3) ** 0.5 / 2)
    assert sweep.paired_ci95([0.5, 0.5, 0.5]) == 0.0
    assert sweep.paired_ci95([1.0]) is None


def test_sweep_resumes_from_its_records_and_redoes_a_torn_line(prefill_calls, tmp_path):
    model = tiny_llava(seed=2)
    calls = prefill_calls

    def item(task, seed):
        return _prompt_item(task, seed, 2, lambda reply: float(reply.startswith("1")), "1")

    items = [item("t1", 1), item("t1", 2), item("t2", 3)]
    policies, budgets = ["full", "csp"], [1.0, 0.5]
    records = tmp_path / "records.jsonl"
    first = sweep.run_sweep(model, DigitTokenizer(), items[:2], policies, budgets, max_new_tokens=2, records_path=records)
    assert len(calls) == 4 and len(records.read_text().splitlines()) == 2
    calls.clear()
    # The third item is new; the two recorded ones are not prefilled again.
    resumed = sweep.run_sweep(model, DigitTokenizer(), items, policies, budgets, max_new_tokens=2, records_path=records)
    assert len(calls) == 2
    fresh = sweep.run_sweep(model, DigitTokenizer(), items, policies, budgets, max_new_tokens=2)
    assert resumed["scores"] == fresh["scores"] and resumed["baselines"] == fresh["baselines"]
    assert resumed["scores"]["t1"] == first["scores"]["t1"]
    # Compute time adds up over resumed runs: every record's own seconds, not just this run's.
    recorded = sweep.read_records(records)
    assert all(r["seconds"] > 0 for r in recorded)
    assert resumed["sweep_seconds"] == pytest.approx(sum(r["seconds"] for r in recorded), abs=1e-3)
    # A line cut short by a killed run is redone, not trusted; other budgets are not reused either.
    lines = records.read_text().splitlines()
    records.write_text("\n".join(lines[:-1] + [lines[-1][: len(lines[-1]) // 2]]) + "\n")
    calls.clear()
    sweep.run_sweep(model, DigitTokenizer(), items, policies, budgets, max_new_tokens=2, records_path=records)
    assert len(calls) == 2
    calls.clear()
    sweep.run_sweep(model, DigitTokenizer(), items, policies, [0.2], max_new_tokens=2, records_path=records)
    assert len(calls) == 2 * len(items)
    # Records of other weights are never mixed in.
    calls.clear()
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1.0
    sweep.run_sweep(model, DigitTokenizer(), items, policies, budgets, max_new_tokens=2, records_path=records)
    assert len(calls) == 2 * len(items)
    # Nor records of the same sample id written for another prompt (a changed prompt format).
    calls.clear()
    sweep.run_sweep(model, DigitTokenizer(), items, policies, budgets, max_new_tokens=2, records_path=records)
    assert len(calls) == 0
    reworded = [dataclasses.replace(i, prompt_key=sweep.prompt_digest("reworded", i.sample_id)) for i in items]
    sweep.run_sweep(model, DigitTokenizer(), reworded, policies, budgets, max_new_tokens=2, records_path=records)
    assert len(calls) == 2 * len(items)


def test_sweep_reuses_records_of_the_same_weights_loaded_from_elsewhere(prefill_calls, tmp_path):
    """Records made by a model fresh in memory are reused by the same weights read back from a
    saved copy (another path, a config that now names it and its dtype); weights one ULP apart
    are another model and every prompt is redone."""
    from transformers import LlavaForConditionalGeneration

    model = tiny_llava(seed=2)
    calls = prefill_calls
    items = [_prompt_item("t1", seed, 2, lambda reply: 1.0, "1") for seed in (1, 2)]
    policies, budgets = ["full", "csp"], [1.0, 0.5]
    records = tmp_path / "records.jsonl"
    sweep.run_sweep(model, DigitTokenizer(), items, policies, budgets, max_new_tokens=2, records_path=records)
    model.save_pretrained(tmp_path / "saved")
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "saved", dtype=torch.float32).eval()
    assert reloaded.config._name_or_path == str(tmp_path / "saved")
    calls.clear()
    result = sweep.run_sweep(reloaded, DigitTokenizer(), items, policies, budgets, max_new_tokens=2,
                             records_path=records)
    assert len(calls) == 0 and result["prompts_per_task"] == {"t1": 2}
    with torch.no_grad():
        reloaded.lm_head.weight.copy_(torch.nextafter(reloaded.lm_head.weight, torch.tensor(1.0)))
    sweep.run_sweep(reloaded, DigitTokenizer(), items, policies, budgets, max_new_tokens=2, records_path=records)
    assert len(calls) == 2 * len(items)


def test_easyvqa_items_key_their_records_by_prompt_text_and_images():
    from cspkv.evaluation import easyvqa_tasks as ev

    items = sweep.easyvqa_items(["attribute", "describe"], processor=None, limit=3)
    keys = [i.prompt_key for i in items]
    assert len(set(keys)) == len(keys) and all(len(k) == 16 for k in keys)
    sample = ev.test_samples("attribute", 1)[0]
    assert keys[0] == sweep.prompt_digest(ev.prompt_text(sample), sample.image_ids)
    assert "(end of image 1)" in ev.prompt_text(sample)


def test_interleave_takes_tasks_round_robin_and_a_spent_time_budget_starts_nothing():
    def item(task, i):
        return sweep.EvalItem(task, str(i), lambda blank: {}, lambda reply: 0.0, "A", "multi-choice")

    items = [item("a", 0), item("a", 1), item("a", 2), item("b", 0), item("c", 0), item("c", 1)]
    order = [(i.task, i.sample_id) for i in sweep.interleave(items)]
    assert order == [("a", "0"), ("b", "0"), ("c", "0"), ("a", "1"), ("c", "1"), ("a", "2")]
    # build_inputs returns nothing a model could run: the budget must stop before the first prompt.
    result = sweep.run_sweep(tiny_llava(seed=2), DigitTokenizer(), items, ["full"], [1.0], minutes=0.0)
    assert result["prompts_per_task"] == {} and result["scores"] == {}


def test_milebench_items_skip_bad_samples_and_score_with_milebench_rules(tmp_path):
    root = tmp_path / "MileBench"
    _write_task(root, missing_image=True)

    class Processor:
        image_token = "<image>"
        image_size = 8

        def __call__(self, text, images, return_tensors="pt"):
            return {"input_ids": torch.zeros(1, 1), "text": text, "n_images": len(images)}

    errors = []
    items = sweep.milebench_items(root, ["ToyVQA"], Processor(), limit=10, errors=errors)
    assert len(items) == 1 and len(errors) == 1 and "3.png" in errors[0]
    built = items[0].build_inputs(False)
    assert built["n_images"] == 2 and built["text"].count("<image>") == 2
    assert items[0].score("A") == 1.0 and items[0].score("Apple") == 1.0 and items[0].score("B") == 0.0


@pytest.mark.parametrize("args,message", [
    (["--tasks", "juggling"], "juggling"),
    (["--policies", "csp,magic"], "unknown policy 'magic'"),
    (["--policies", "csp(cross_ratio=2)"], "cross_ratio (rho) must be in [0, 1]"),
    (["--split", "val"], "'val' is not one of 'test', 'dev'"),
    (["--split", "dev", "--milebench", "/tmp"], "MileBench folders have no development split"),
    (["--budgets", "0.5,1.5"], "budget must be a number in (0, 1]"),
    (["--milebench", "/nonexistent/milebench"], "does not exist"),
])
def test_cli_rejects_bad_requests_before_loading_a_model(args, message):
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and message in result.output, result.output


def test_identical_pruned_caches_reuse_one_decode(monkeypatch):
    """Every policy at budget 1.0 keeps the whole cache: one decode serves them all, and the
    record equals the one that decodes every cell."""
    model = tiny_llava(seed=4)
    reference = LlavaReference(model)
    item = _prompt_item("t", 5, 3, lambda reply: float(reply.startswith("1")), "A")
    policies = ["full", "random", "h2o", "csp"]
    pruning = {name: sweep.get_policy(name) for name in policies}
    decodes = []
    original = LlavaReference.decode
    monkeypatch.setattr(LlavaReference, "decode", lambda self, *a, **k: decodes.append(1) or original(self, *a, **k))
    fresh = sweep.evaluate_item(reference, DigitTokenizer(), item, pruning, [1.0, 0.5], 4, reuse_identical=False,
                                batched=False)
    n_fresh = len(decodes)
    reused = sweep.evaluate_item(reference, DigitTokenizer(), item, pruning, [1.0, 0.5], 4, batched=False)
    assert n_fresh == 1 + 3 * 2 + 1                            # full, 3 policies x 2 budgets, blanked
    assert len(decodes) - n_fresh == 1 + 3 + 1                 # the 1.0 cells of random/h2o/csp reuse full's
    batched = sweep.evaluate_item(reference, DigitTokenizer(), item, pruning, [1.0, 0.5], 4)
    assert len(decodes) - n_fresh == 1 + 3 + 1                 # the batched path never calls the one-cache decoder
    for record in (fresh, reused, batched):
        record.pop("seconds")
    assert fresh == reused == batched
    prefill = reference.prefill(item.build_inputs(False)["input_ids"], item.build_inputs(False)["pixel_values"], pruning)
    whole, half = reference.prune(prefill, "csp", 1.0), reference.prune(prefill, "csp", 0.5)
    assert sweep.same_cache(whole, reference.prune(prefill, "full", 1.0)) and not sweep.same_cache(whole, half)


def test_policy_specs_share_one_prefill_skip_the_blanked_prompt_and_decode_the_null_slot(prefill_calls):
    """Settings of one policy are cells of one sweep; ``decode_n`` cells decode with the n-softmax
    null slot, exactly as the reference decoder does; ``blank=False`` runs no blanked prompt."""
    model = tiny_llava(seed=2)
    item = _prompt_item("t1", 1, 3, lambda reply: 1.0, "A")
    policies = ["csp", "csp(recent_cap=0.25)", "csp(decode_n=1)"]
    result = sweep.run_sweep(model, DigitTokenizer(), [item], policies, [0.2], max_new_tokens=6, blank=False)
    assert len(prefill_calls) == 1
    assert set(result["scores"]["t1"]) == {"csp", "csp(recent_cap=0.25)", "csp(decode_n=1.0)"}
    assert result["baselines"]["t1"]["blank_images"] is None
    assert "images blanked –" in sweep.markdown_table(result, [0.2], list(result["scores"]["t1"]))
    reference = LlavaReference(model)
    pruning, decode_n = sweep.policy_specs(policies)
    record = sweep.evaluate_item(reference, DigitTokenizer(), item, pruning, [0.2], 6, decode_n=decode_n, blank=False)
    assert record["blank_reply"] is None and record["blank_score"] is None
    inputs = item.build_inputs(False)
    prefill = reference.prefill(inputs["input_ids"], inputs["pixel_values"], pruning)
    first = int(prefill.logits[0].argmax())
    for key, null in (("csp", 0.0), ("csp(decode_n=1.0)", 1.0), ("csp(recent_cap=0.25)", 0.0)):
        tokens = reference.decode(reference.prune(prefill, key, 0.2), first, 6, decode_n=null).tokens
        assert record["cells"][key]["0.2"]["reply"] == " ".join(map(str, tokens)), key
    capped, plain = reference.prune(prefill, "csp(recent_cap=0.25)", 0.2), reference.prune(prefill, "csp", 0.2)
    assert not sweep.same_cache(capped, plain)


def test_tables_and_plots_hold_the_full_cache_when_the_other_budgets_leave_out_1_0(tmp_path):
    model = tiny_llava(seed=2)
    item = _prompt_item("t1", 1, 3, lambda reply: 1.0, "A")
    result = sweep.run_sweep(model, DigitTokenizer(), [item], ["full", "csp"], [0.2], max_new_tokens=3, blank=False)
    assert set(result["scores"]["t1"]["full"]) == {"1.0"}
    assert "| t1 | multi-choice | 1 | 1.000 | – | 1.000 | – |" in sweep.markdown_table(result, [0.2], ["full", "csp"])
    assert [Path(p).name for p in sweep.plot(result, [0.2], tmp_path)] == ["t1.png"]
