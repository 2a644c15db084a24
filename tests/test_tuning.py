"""Policy specs, the development split and the choice of settings on it."""

import pytest

from cspkv.evaluation import easyvqa_tasks, tuning
from cspkv.pruning import get_policy
from cspkv.pruning.spec import parse_policy, split_specs


def test_specs_name_settings_in_one_canonical_key():
    assert parse_policy("csp").key == "csp"
    assert parse_policy("csp(n=1, cross_ratio=0.5)").key == "csp"            # the defaults: the bare name
    spec = parse_policy("csp( recent_cap=0.5, cross_ratio=0.25 )")
    assert spec.key == "csp(cross_ratio=0.25,recent_cap=0.5)" and spec.name == "csp"
    assert spec.policy.params() == get_policy("csp", cross_ratio=0.25, recent_cap=0.5).params()
    assert parse_policy(spec.key).key == spec.key                             # a key parses to itself
    assert parse_policy("lookm(merge=True)").policy.merge is True
    assert parse_policy("snapkv(kernel_size=9)").policy.kernel_size == 9
    nulled = parse_policy("csp(decode_n=1)")
    assert nulled.key == "csp(decode_n=1.0)" and nulled.decode_n == 1.0 and nulled.policy.params() == get_policy("csp").params()


def test_specs_split_on_commas_outside_brackets():
    assert split_specs("full,csp(cross_ratio=0.25,recent_cap=0.5), snapkv") == [
        "full", "csp(cross_ratio=0.25,recent_cap=0.5)", "snapkv"]
    with pytest.raises(ValueError, match="unbalanced"):
        split_specs("csp(n=1")


@pytest.mark.parametrize("spec,message", [
    ("magic", "unknown policy 'magic'"),
    ("csp(rho=0.3)", "bad parameter for policy 'csp'"),
    ("csp(cross_ratio=2)", "cross_ratio (rho) must be in [0, 1]"),
    ("csp(recent_cap=0.5", "settings go in brackets"),
    ("csp(n)", "must be key=value"),
    ("csp(decode_n=-1)", "decode_n must be a number >= 0"),
])
def test_bad_specs_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError) as error:
        parse_policy(spec)
    assert message in str(error.value)


def test_the_development_split_uses_train_images_and_never_a_test_prompt():
    for task in ("image_needle", "counting", "comparison"):
        dev = easyvqa_tasks.dev_samples(task, 30)
        test = easyvqa_tasks.test_samples(task, 200)
        assert {s.split for s in dev} == {"train"} and {s.split for s in test} == {"test"}
        assert not {s.sample_id for s in dev} & {s.sample_id for s in test}
        assert [s.sample_id for s in easyvqa_tasks.dev_samples(task, 5)] == [s.sample_id for s in dev[:5]]
        assert {s.question_type for s in dev} == {s.question_type for s in test}      # the same format
        assert min(s.n_images for s in dev) >= easyvqa_tasks.MIN_IMAGES
    with pytest.raises(ValueError, match="unknown evaluation split 'val'"):
        easyvqa_tasks.eval_samples("counting", 3, "val")


def _records(scores: dict) -> list[dict]:
    """Records from {task: {key: [score per prompt at 0.2, ...]}}, the 0.1 cell scoring 0."""
    records = []
    for task, by_key in scores.items():
        n = len(next(iter(by_key.values())))
        for i in range(n):
            records.append({"task": task, "sample_id": f"{task}-{i}",
                            "cells": {key: {"0.2": {"score": v[i]}, "0.1": {"score": 0.0}} for key, v in by_key.items()}})
    return records


def test_choose_takes_the_best_mean_over_equally_weighted_tasks_and_prefers_the_default_on_ties():
    grid = {"csp": ["csp", "csp(cross_ratio=0.25)"], "snapkv": ["snapkv", "snapkv(kernel_size=9)"]}
    records = _records({
        # 3 prompts of one task and 1 of the other: per-task means are weighted equally
        "a": {"csp": [1, 1, 1], "csp(cross_ratio=0.25)": [0, 0, 0], "snapkv": [1, 0, 0], "snapkv(kernel_size=9)": [1, 0, 0]},
        "b": {"csp": [0], "csp(cross_ratio=0.25)": [1], "snapkv": [1], "snapkv(kernel_size=9)": [1]},
    })
    choice = tuning.choose(records, ["0.2", "0.1"], grid)
    csp = choice["families"]["csp"]["settings"]
    assert csp["csp"]["by_budget"]["0.2"] == pytest.approx(0.5) and csp["csp"]["mean"] == pytest.approx(0.25)
    assert csp["csp(cross_ratio=0.25)"]["by_budget"]["0.2"] == pytest.approx(0.5)
    assert choice["families"]["csp"]["chosen"] == "csp"                      # a tie: the default
    assert choice["families"]["snapkv"]["chosen"] == "snapkv"
    assert choice["csp_per_task"] == {"a": "csp", "b": "csp(cross_ratio=0.25)"}
    assert choice["prompts_per_task"] == {"a": 3, "b": 1}
    table = tuning.choice_table(choice)
    assert "| csp | **csp** | 0.500 | 0.000 | **0.250** |" in table


def test_the_grid_gives_every_tuned_policy_the_same_number_of_trials_and_parses():
    keys = tuning.grid_keys()
    assert set(keys) == {"csp", "snapkv", "lookm", "h2o"}
    assert len({len(v) for v in keys.values()}) == 1
    for family, specs in keys.items():
        assert specs[0] == family                                             # defaults first
        assert len(set(specs)) == len(specs)
    assert split_specs(tuning.grid_policies())[0] == "full"


def _family(chosen: str, mean: float) -> dict:
    return {"chosen": chosen, "settings": {chosen: {"mean": mean}}}


def test_the_test_run_takes_csp_and_the_best_baseline_and_csp_with_the_null_slot():
    choice = {"families": {"csp": _family("csp(cross_ratio=0.25,recent_cap=0.5)", 0.5),
                           "snapkv": _family("snapkv(kernel_size=9)", 0.3), "lookm": _family("lookm(recent_cap=0.5)", 0.4)}}
    assert tuning.best_baseline(choice) == "lookm"
    assert tuning.policies_for_test_run(choice) == ("csp(cross_ratio=0.25,recent_cap=0.5),lookm(recent_cap=0.5),"
                                                    "csp(cross_ratio=0.25,decode_n=1.0,recent_cap=0.5)")
    choice["families"]["csp"] = _family("csp", 0.5)                       # a default: the sweep has its cells
    assert tuning.policies_for_test_run(choice) == "lookm(recent_cap=0.5),csp(decode_n=1.0)"
    assert tuning.layer_grid(choice) == {
        "csp": ["csp", "csp(pyramid=0.3)", "csp(pyramid=0.6)"],
        "lookm": ["lookm(recent_cap=0.5)", "lookm(pyramid=0.3,recent_cap=0.5)", "lookm(pyramid=0.6,recent_cap=0.5)"]}


def _write(path, records):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_records_of_one_prompt_from_two_runs_merge_and_pair(tmp_path):
    from cspkv.evaluation.paired import merge_records, paired

    base = {"model": "w", "max_new_tokens": 8, "prompt_key": "k"}
    first = [{**base, "task": "t", "sample_id": str(i), "cells": {"csp": {"0.2": {"score": float(i % 2)}}}}
             for i in range(4)]
    second = [{**base, "task": "t", "sample_id": str(i), "cells": {"csp(recent_cap=0.5)": {"0.2": {"score": 1.0}}}}
              for i in range(3)]
    records = merge_records([_write(tmp_path / "a.jsonl", first), _write(tmp_path / "b.jsonl", second)])
    assert len(records) == 4 and set(records[0]["cells"]) == {"csp", "csp(recent_cap=0.5)"}
    result = paired(records, "csp(recent_cap=0.5)", "csp", "0.2")
    assert result["prompts"] == 3 and result["won"] == 2 and result["tied"] == 1 and result["mean"] == pytest.approx(2 / 3)
    assert paired(records, "csp", "csp(recent_cap=0.5)", "0.1") is None
    other = [{**second[0], "prompt_key": "changed"}]
    with pytest.raises(ValueError, match="recorded with different prompt_key"):
        merge_records([tmp_path / "a.jsonl", _write(tmp_path / "c.jsonl", other)])


def test_with_settings_adds_or_replaces_a_setting_and_keeps_the_key_canonical():
    from cspkv.pruning.spec import with_settings

    assert with_settings("csp", decode_n=1) == "csp(decode_n=1.0)"
    assert with_settings("csp(n=0)", pyramid=0.3) == "csp(n=0.0,pyramid=0.3)"
    assert with_settings("csp(cross_ratio=0.75,recent_cap=0.5)", cross_ratio=0.5) == "csp(recent_cap=0.5)"
    assert with_settings("csp(decode_n=1)", pyramid=0.6) == "csp(decode_n=1.0,pyramid=0.6)"
