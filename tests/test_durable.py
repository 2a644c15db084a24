"""Files a kill leaves readable: JSON-lines records and whole-file results, killed mid-write for real."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from cspkv.durable import append_line, cut_torn_tail, write_atomic
from cspkv.evaluation import sweep


def _spawn(code: str, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_when(proc: subprocess.Popen, ready, delay: float) -> None:
    deadline = time.monotonic() + 120
    while not ready():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the child never got going"
        time.sleep(0.005)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


APPENDER = """
    import json, sys
    from cspkv.durable import append_line
    path, start = sys.argv[1], int(sys.argv[2])
    for i in range(start, start + 10_000):   # 1 MB lines: a kill often lands inside a write
        append_line(path, json.dumps({"i": i, "pad": "x" * 1_000_000}))
"""


def test_records_killed_mid_write_resume_with_every_record_once(tmp_path):
    path = tmp_path / "records.jsonl"
    next_index = 0
    for round_ in range(6):
        proc = _spawn(APPENDER, path, next_index)
        # even rounds kill as soon as bytes arrive (often inside the first write); odd rounds once a new
        # record is whole, so the resumed file grows however slowly this machine writes
        done = next_index

        def written(done=done, odd=round_ % 2):
            return path.exists() and (path.read_bytes().count(b"\n") > done if odd else path.stat().st_size > 0)

        _kill_when(proc, written, 0.02 * round_)
        text = path.read_bytes()
        lines = text.split(b"\n")
        # every line but a torn last one is a whole record
        whole = [json.loads(line)["i"] for line in lines[:-1]]
        assert whole == list(range(len(whole)))
        next_index = len(whole)
    assert next_index > 0
    # the next append cuts a torn tail first: the file reads back whole, each record once, in order
    append_line(path, json.dumps({"i": next_index, "pad": ""}))
    indices = [json.loads(line)["i"] for line in path.read_text().splitlines()]
    assert indices == list(range(next_index + 1))


def test_a_torn_tail_is_cut_before_the_next_record():
    """What a kill inside a write leaves (half a line, no newline) never merges with the next line."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.jsonl"
        path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3, "b"')
        assert sweep.read_records(path) == [{"a": 1}, {"a": 2}]
        append_line(path, json.dumps({"a": 4}))
        assert path.read_text() == '{"a": 1}\n{"a": 2}\n{"a": 4}\n'
        path.write_text('{"torn, no newline at all')
        assert cut_torn_tail(path) == len('{"torn, no newline at all')
        assert path.read_text() == ""
        with pytest.raises(ValueError, match="must not contain a newline"):
            append_line(path, "a\nb")


REWRITER = """
    import sys
    from cspkv.durable import write_atomic
    path = sys.argv[1]
    for i in range(10_000):
        write_atomic(path, str(i) * 1_000_000)
"""


def test_whole_files_are_old_or_new_after_a_kill(tmp_path):
    path = tmp_path / "bench.json"
    write_atomic(path, "start")
    for round_ in range(4):
        proc = _spawn(REWRITER, path)
        _kill_when(proc, lambda: path.read_text()[:1].isdigit(), 0.03 * round_)
        text = path.read_text()
        assert len(set(text)) == 1 and len(text) % 1_000_000 == 0        # one version, whole


SWEEP = """
    import sys
    sys.path.insert(0, sys.argv[2])
    from test_durable import sweep_setup
    from cspkv.evaluation import sweep
    model, tokenizer, items, policies, budgets = sweep_setup()
    sweep.run_sweep(model, tokenizer, items, policies, budgets, max_new_tokens=3, records_path=sys.argv[1])
"""


def sweep_setup():
    from cspkv.models.tiny import tiny_llava
    from test_sweep import DigitTokenizer, _prompt_item

    items = [_prompt_item(f"t{seed % 2}", seed, 2, lambda reply: float(reply.startswith("1")), "1")
             for seed in range(1, 7)]
    return tiny_llava(seed=2), DigitTokenizer(), items, ["full", "csp"], [1.0, 0.5]


def test_a_killed_sweep_resumes_to_the_records_of_an_uninterrupted_one(tmp_path):
    records = tmp_path / "eval_records.jsonl"
    proc = _spawn(SWEEP, records, os.path.dirname(__file__))
    _kill_when(proc, lambda: records.exists() and records.read_text().count("\n") >= 2, 0.0)
    killed_at = len(sweep.read_records(records))
    assert 2 <= killed_at < 6
    model, tokenizer, items, policies, budgets = sweep_setup()
    sweep.run_sweep(model, tokenizer, items, policies, budgets, max_new_tokens=3, records_path=records)
    fresh = tmp_path / "fresh.jsonl"
    sweep.run_sweep(model, tokenizer, items, policies, budgets, max_new_tokens=3, records_path=fresh)

    def by_prompt(path):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        keys = [(r["task"], r["sample_id"]) for r in rows]
        assert len(keys) == len(set(keys)) == len(items)               # each prompt exactly once
        return {key: {k: v for k, v in r.items() if k != "seconds"} for key, r in zip(keys, rows)}

    assert by_prompt(records) == by_prompt(fresh)


def test_an_atomic_write_has_the_permissions_of_a_plain_new_file(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("x")
    write_atomic(tmp_path / "atomic", "x")
    assert os.stat(tmp_path / "atomic").st_mode == os.stat(plain).st_mode
