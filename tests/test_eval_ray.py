"""csp-eval on Ray: two nodes simulated on this machine give the single-process records, a worker
killed mid-prompt loses nothing and duplicates nothing, other weights are refused, and bad
--workers/--address requests stop with a one-line error."""

import json
import os
import socket
import sys
from functools import partial
from pathlib import Path

import pytest
from click.testing import CliRunner

from cspkv.cli.eval import main
from cspkv.evaluation import distributed, sweep
from cspkv.export.manifest import model_fingerprint
from cspkv.models.tiny import tiny_llava
from test_sweep import DigitTokenizer, _prompt_item

needs_ray = pytest.mark.skipif(not distributed.ray_installed(),
                               reason="Ray is not installed (pip install 'cspkv[ray]'): no cluster to run on")
POLICIES, BUDGETS, NEW_TOKENS = ["full", "snapkv", "csp"], [1.0, 0.5], 3
SEED = 2


def tiny_loader(rank):
    """Every worker builds the same tiny model the driver built (fixed seed)."""
    return tiny_llava(seed=SEED), DigitTokenizer()


def mixed_loader(rank):
    """Worker 1 holds other weights (another seed): a node with another model installed."""
    return tiny_llava(seed=SEED if rank == 0 else SEED + 1), DigitTokenizer()


def _score(reply):
    return float(reply.startswith("1"))


def _score_or_die(marker, reply):
    """Scores like _score, except that the first worker to get here (it creates ``marker``) dies on the spot:
    mid-prompt, after its prefill and decode."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return _score(reply)
    os._exit(1)


def _always_die(reply):
    os._exit(1)


def _items(n=6, scores=None):
    """n tiny two-image prompts over two tasks; ``scores`` overrides the scorer of some positions."""
    scores = scores or {}
    items = []
    for seed in range(1, n + 1):
        item = _prompt_item(f"t{seed % 2}", seed, 2, scores.get(seed - 1, _score), "1")
        item.prompt_key = sweep.prompt_digest("tiny", seed)
        items.append(item)
    return items


def _by_key(path):
    """Records by (task, sample_id), timing dropped; fails on a duplicated or torn line."""
    records = {}
    for line in Path(path).read_text().splitlines():
        record = json.loads(line)
        key = (record["task"], record["sample_id"])
        assert key not in records, f"{key} recorded twice"
        record.pop("seconds")
        records[key] = record
    return records


@pytest.fixture(scope="module")
def cluster():
    """A Ray cluster of two nodes with one CPU each, on this machine, shared by the module's tests.
    A one-CPU worker fits one to a node, so two workers run on two nodes."""
    if not distributed.ray_installed():
        pytest.skip("Ray is not installed (pip install 'cspkv[ray]')")
    from ray.cluster_utils import Cluster

    # The workers unpickle this module's loaders and scorers by name: let them import from tests/.
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), saved]))
    try:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster
        cluster.shutdown()
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


@pytest.fixture(scope="module")
def fingerprint():
    return model_fingerprint(tiny_llava(seed=SEED))


def _run(cluster, fingerprint, items, records, loader=tiny_loader, **kw):
    return distributed.run_sweep_distributed(loader, fingerprint, items, POLICIES, BUDGETS, NEW_TOKENS, workers=2,
                                             address=cluster.address, records_path=records, **kw)


@needs_ray
def test_two_workers_on_two_nodes_record_what_one_process_records_and_resume(cluster, fingerprint, tmp_path):
    items = _items()
    single = tmp_path / "single.jsonl"
    expected = sweep.run_sweep(tiny_llava(seed=SEED), DigitTokenizer(), items, POLICIES, BUDGETS, NEW_TOKENS,
                               records_path=single)
    records = tmp_path / "ray.jsonl"
    result = _run(cluster, fingerprint, items, records)
    assert result["failed"] == [] and result["workers"] == 2
    assert _by_key(records) == _by_key(single)
    assert result["scores"] == expected["scores"] and result["baselines"] == expected["baselines"]
    assert result["prompts_per_task"] == expected["prompts_per_task"] == {"t1": 3, "t0": 3}

    # A run stopped mid-write (Ctrl-C, a lost driver) leaves whole lines and at most a torn last one:
    # the next run keeps the whole ones and redoes only the rest.
    lines = records.read_text().splitlines()
    records.write_text("\n".join(lines[:2]) + "\n" + lines[2][:40])
    kept = [json.loads(line) for line in lines[:2]]
    resumed = _run(cluster, fingerprint, items, records)
    assert resumed["failed"] == [] and _by_key(records) == _by_key(single)
    after = [json.loads(line) for line in records.read_text().splitlines()]
    assert after[:2] == kept and len(after) == len(items)      # earlier lines untouched, seconds included


@needs_ray
def test_a_worker_killed_mid_prompt_loses_nothing_and_a_prompt_that_always_kills_is_reported(
        cluster, fingerprint, tmp_path):
    marker = tmp_path / "killed-once"
    items = _items(6, scores={1: partial(_score_or_die, str(marker)), 4: _always_die})
    records = tmp_path / "ray.jsonl"
    lost = []
    result = _run(cluster, fingerprint, items, records, notice=lost.append, max_retries=1)
    assert marker.exists()                                     # a worker did die mid-prompt
    poison = items[4]
    assert result["failed"] == [{"task": poison.task, "sample_id": poison.sample_id, "attempts": 2,
                                 "error": result["failed"][0]["error"]}]
    assert len(lost) == 3 and "retrying it on another worker" in lost[0] and "giving up" in " ".join(lost)
    assert all("worker process died on " in message for message in lost), lost
    # Every other prompt is recorded exactly once (_by_key fails on a repeat), with the records one process makes.
    single = tmp_path / "single.jsonl"
    survivors = [item for index, item in enumerate(_items(6)) if index != 4]
    sweep.run_sweep(tiny_llava(seed=SEED), DigitTokenizer(), survivors, POLICIES, BUDGETS, NEW_TOKENS,
                    records_path=single)
    assert _by_key(records) == _by_key(single)
    assert sum(result["prompts_per_task"].values()) == len(survivors)


@needs_ray
def test_a_worker_with_other_weights_is_refused_before_any_prompt(cluster, fingerprint, tmp_path):
    records = tmp_path / "ray.jsonl"
    with pytest.raises(distributed.ClusterError, match=r"worker 1 on .* loaded other weights .*the driver's "
                                                       + fingerprint[:12]) as refused:
        _run(cluster, fingerprint, _items(2), records, loader=mixed_loader)
    assert "\n" not in str(refused.value)
    assert not records.exists()


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("args,message", [
    (["--workers", "0"], "--workers 0: give at least 1"),
    (["--workers", "2", "--threads-per-worker", "0"], "--threads-per-worker 0: give at least 1"),
    (["--address", "127.0.0.1:6379"], "--address needs --workers N"),
    (["--threads-per-worker", "2"], "--threads-per-worker sets the threads of Ray workers"),
])
def test_cli_rejects_bad_distribution_requests_in_one_line(args, message):
    result = CliRunner().invoke(main, ["--tasks", "counting", *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output


@needs_ray
@pytest.mark.parametrize("address,message", [
    ("127.0.0.1:{port}", "no Ray cluster answers at 127.0.0.1:{port}"),
    ("nonsense", "--address nonsense: expected HOST:PORT"),
])
def test_cli_refuses_an_unreachable_or_malformed_address_at_once(address, message):
    port = _closed_port()            # nothing listens there: refused at once, not after ray.init's retries
    result = CliRunner().invoke(main, ["--tasks", "counting", "--workers", "2", "--address", address.format(port=port)])
    assert result.exit_code == 1 and message.format(port=port) in result.output, result.output
    assert "ray start --head" in result.output or "HOST:PORT" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_cli_without_ray_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)             # import ray fails, as in the base install
    result = CliRunner().invoke(main, ["--tasks", "counting", "--workers", "2"])
    assert result.exit_code == 1 and "pip install 'cspkv[ray]'" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
