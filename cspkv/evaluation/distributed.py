"""The sweep on a Ray cluster: worker actors evaluate prompts, the driver alone writes the records.

Each worker is a Ray actor that loads the model once, checks that its weights are the driver's
(``model_fingerprint``), and then evaluates the prompts the driver hands it one at a time, returning
each prompt's record. The driver appends every record to ``eval_records.jsonl`` itself
(``append_line``: one whole line per write, synced), so two workers never write to the file and no
prompt is handed to two workers at once: the file never holds a torn or a duplicated line.

A worker that dies mid-prompt (killed, out of memory, its node lost) is replaced, and its prompt goes
back to the front of the queue for the next free worker, up to ``max_retries`` times; a prompt that
still fails is reported in the result's ``failed`` list, never dropped. Records are resumed as in
:func:`cspkv.evaluation.sweep.run_sweep`, so a run stopped by Ctrl-C or a lost driver carries on
from its file.

Ray is imported inside the functions: the base install and ``csp-eval --help`` do not need it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections import Counter, deque
from typing import Callable

from cspkv.durable import append_line
from cspkv.evaluation.sweep import (EvalItem, aggregate, interleave, make_record, policy_specs, reusable_records,
                                    sweep_setting)

MAX_RETRIES = 2


class ClusterError(RuntimeError):
    """The cluster cannot run this sweep; the message is one line saying what is wrong and what to do."""


class _WorkerLost(Exception):
    """A worker died before it was ready (its message says why)."""


def ray_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def check_address(address: str, timeout_s: float = 5.0) -> str:
    """Raise :class:`ClusterError` unless a Ray cluster answers at ``address`` (host:port, ray://host:port
    or auto); returns the host:port probed. ``ray.init`` itself retries an unreachable address for many
    minutes before it gives up, so a plain TCP connection to the cluster's port is tried first."""
    target = address.removeprefix("ray://")
    if target == "auto":
        try:  # resolves RAY_ADDRESS, then the cluster the last `ray start` on this machine joined
            from ray._private.services import canonicalize_bootstrap_address

            target = canonicalize_bootstrap_address("auto")
        except ImportError:
            return address  # a Ray without this helper: ray.init reports it
        except ConnectionError:
            raise ClusterError("--address auto: no Ray cluster was started on this machine; run `ray start --head` "
                               "(or `ray start --address=HEAD:6379` to join one), or pass --address HOST:PORT") from None
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"--address {address}: expected HOST:PORT (the address `ray start --head` prints) or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ClusterError(f"--address {address}: no Ray cluster answers at {host}:{port} ({exc.strerror or exc}); "
                           "start one with `ray start --head`, or leave --address out to run on this machine") from None
    return f"{host}:{port}"


def load_named_model(name: str, rank: int):
    """A worker's loader for a ``--model`` value (``default`` or a checkpoint folder that every node
    has at the same path): ``(model, processor)``."""
    from cspkv.models.registry import load_model

    model, processor, _ = load_model(name)
    return model, processor


class SweepWorker:
    """One worker (a Ray actor): loads the model once, then evaluates prompts by their index in ``items``.

    ``loader(rank)`` returns ``(model, processor)``; ``threads`` caps torch's intra-op threads (the
    actor's OMP/MKL variables are set to the same number by the driver)."""

    def __init__(self, loader: Callable, rank: int, threads: int, items: list[EvalItem], policies: list[str],
                 budgets: list[float], max_new_tokens: int, blank: bool = True):
        import torch

        from cspkv.export.manifest import model_fingerprint
        from cspkv.heap import keep_freed_heap
        from cspkv.models.llava import LlavaReference

        torch.set_num_threads(threads)
        keep_freed_heap()  # as csp-eval's own process: the sweep re-allocates big score buffers every layer
        model, processor = loader(rank)
        self.rank = rank
        self.items = items
        self.budgets = budgets
        self.max_new_tokens = max_new_tokens
        self.blank = blank
        self.reference = LlavaReference(model)
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.pruning, self.decode_n = policy_specs(policies)
        self.setting = sweep_setting(model_fingerprint(model), max_new_tokens)

    def identity(self) -> dict:
        import ray

        return {"fingerprint": self.setting["model"], "node": ray.util.get_node_ip_address(), "pid": os.getpid(),
                "rank": self.rank}

    def evaluate(self, index: int) -> dict:
        return make_record(self.reference, self.tokenizer, self.items[index], self.pruning, self.budgets,
                           self.max_new_tokens, self.setting, self.decode_n, self.blank)


def _reason(exc: BaseException) -> str:
    """One line out of a Ray error (its messages carry whole tracebacks): how a worker process died,
    or the exception that ended it."""
    text = str(exc)
    detail = re.search(r"Worker exit detail: ([^.]*)", text)
    if detail:
        node = re.search(r"\bip: (\S+)", text)
        return f"worker process died{' on ' + node.group(1) if node else ''} ({detail.group(1).strip()})"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    causes = [line for line in lines if not line.startswith(("File ", "^", "~", "Traceback", "The actor"))]
    return (causes or lines or [type(exc).__name__])[-1][:300]


def _connect(ray, address: str | None, cpus: int) -> bool:
    """Join the cluster at ``address``, or start a local Ray runtime in this process with ``cpus``
    logical CPUs; True where this call connected (and so disconnects at the end)."""
    import logging

    if ray.is_initialized():
        return False
    if address is None:
        ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)
    else:
        check_address(address)
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except Exception as exc:  # a version mismatch, a refused token, a cluster gone since the probe
            raise ClusterError(f"--address {address}: could not join the Ray cluster ({_reason(exc)}); check that "
                               "every node runs this Ray version and the cluster is up (`ray status`)") from None
    return True


def run_sweep_distributed(loader: Callable, fingerprint: str, items: list[EvalItem], policies: list[str],
                          budgets: list[float], max_new_tokens: int = 8, *, workers: int, address: str | None = None,
                          threads_per_worker: int = 1, progress: Callable[[str], None] = lambda message: None,
                          notice: Callable[[str], None] = lambda message: None, records_path=None,
                          minutes: float | None = None, max_retries: int = MAX_RETRIES,
                          start_timeout_s: float = 900.0, blank: bool = True) -> dict:
    """:func:`cspkv.evaluation.sweep.run_sweep` over ``workers`` Ray actors, each loading
    ``loader(rank)`` and holding weights whose ``model_fingerprint`` is ``fingerprint`` (the driver's).

    ``address`` None starts a local Ray runtime in this process; otherwise the driver joins that
    cluster (``auto``: the one ``ray start`` set up here). The records, their reuse and ``minutes``
    work as in ``run_sweep``; ``progress`` is called once per prompt (done, recorded earlier or failed),
    ``notice`` for each worker lost. The result is ``run_sweep``'s plus ``workers``, ``startup_seconds``
    (of ``wall_seconds``, until the first workers were ready) and ``failed``: the prompts that lost a
    worker ``max_retries + 1`` times, or were left when no worker could start.
    Raises :class:`ClusterError` when the cluster cannot run the sweep, before any prompt is handed out
    when a first worker holds other weights or cannot load the model.
    """
    if workers < 1 or threads_per_worker < 1:
        raise ValueError("workers and threads_per_worker must be at least 1")
    setting = sweep_setting(fingerprint, max_new_tokens)
    policies = list(policy_specs(policies)[0])  # keys, as the records name them
    done = reusable_records(records_path, items, policies, budgets, setting, blank)
    order = interleave(items)
    started = time.perf_counter()
    pending: deque[int] = deque()
    for position, item in enumerate(order):
        if (item.task, item.sample_id) in done:
            progress(f"[{position + 1}/{len(items)}] {item.task} {item.sample_id} (recorded earlier)")
        else:
            pending.append(position)
    failed: list[dict] = []
    timing: dict = {}
    if pending and (minutes is None or minutes > 0):
        failed = _drive(loader, fingerprint, order, policies, budgets, max_new_tokens, pending, done, workers, address,
                        threads_per_worker, progress, notice, records_path, started, minutes, max_retries,
                        start_timeout_s, timing, blank)
    elif pending:
        progress(f"[{pending[0] + 1}/{len(items)}] time budget of {minutes} min spent: stopping")
    keys = [(item.task, item.sample_id) for item in order]
    result = aggregate([done[key] for key in keys if key in done], items, policies, budgets)
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    result["workers"] = workers
    result["startup_seconds"] = timing.get("startup_seconds", 0.0)   # joining or starting Ray, loading the workers
    result["failed"] = failed
    return result


def _drive(loader, fingerprint, order, policies, budgets, max_new_tokens, pending, done, workers, address, threads,
           progress, notice, records_path, started, minutes, max_retries, start_timeout_s, timing,
           blank=True) -> list[dict]:
    """The driver loop: start the workers, hand out prompts, append records, retry lost prompts."""
    try:
        import ray
        from ray.exceptions import OutOfMemoryError, RayActorError, RayTaskError, WorkerCrashedError
    except ImportError:
        raise ClusterError("--workers needs Ray: pip install 'cspkv[ray]'") from None
    lost_errors = (RayActorError, OutOfMemoryError, WorkerCrashedError)
    connected = _connect(ray, address, workers * threads)
    actors: list = []
    try:
        cpus = ray.cluster_resources().get("CPU", 0)
        if cpus < workers * threads:
            raise ClusterError(f"--workers {workers} with {threads} thread(s) each needs {workers * threads} CPUs; "
                               f"the cluster has {cpus:g}: lower --workers or add nodes")
        # The prompts go to the object store once; each worker reads them once and then gets indices.
        items_ref = ray.put(order)
        worker_class = ray.remote(SweepWorker)
        # Retries are the driver's (another worker, counted), so Ray restarts and re-runs nothing itself.
        options = dict(num_cpus=threads, max_restarts=0, max_task_retries=0,
                       runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}})
        starting: dict = {}     # identity() call -> (actor, rank)
        running: dict = {}      # evaluate() call -> (actor, position)
        idle: list = []
        ranks = iter(range(1 << 30))

        def start():
            rank = next(ranks)
            actor = worker_class.options(**options).remote(loader, rank, threads, items_ref, policies, budgets,
                                                           max_new_tokens, blank)
            actors.append(actor)
            starting[actor.identity.remote()] = (actor, rank)

        def admit(ref):
            actor, rank = starting.pop(ref)
            try:
                identity = ray.get(ref)
            except (*lost_errors, RayTaskError) as exc:
                raise _WorkerLost(f"worker {rank} could not load the model: {_reason(exc)}") from None
            if identity["fingerprint"] != fingerprint:
                raise ClusterError(f"worker {rank} on {identity['node']} loaded other weights (fingerprint "
                                   f"{identity['fingerprint'][:12]}, the driver's {fingerprint[:12]}): install "
                                   "the same model and cspkv on every node")
            return actor

        for _ in range(workers):
            start()
        # Every first worker must be up with the driver's weights before a prompt is handed out.
        ready, waiting = ray.wait(list(starting), num_returns=len(starting), timeout=start_timeout_s)
        if waiting:
            raise ClusterError(f"{len(waiting)} of {workers} workers did not start within {start_timeout_s:.0f} s; "
                               "check the cluster's free CPUs and memory (`ray status`)")
        for ref in ready:
            try:
                idle.append(admit(ref))
            except _WorkerLost as exc:
                raise ClusterError(f"{exc}; check that every node has the model and cspkv installed") from None
        timing["startup_seconds"] = round(time.perf_counter() - started, 1)

        attempts: Counter = Counter()
        failed: list[dict] = []
        deadline = None if minutes is None else started + minutes * 60
        total = len(order)
        while True:
            if deadline is not None and pending and time.perf_counter() > deadline:
                progress(f"[{pending[0] + 1}/{total}] time budget of {minutes} min spent: stopping")
                pending.clear()  # prompts in flight still finish and are recorded
            while idle and pending:
                actor, position = idle.pop(), pending.popleft()
                running[actor.evaluate.remote(position)] = (actor, position)
            if not running and not starting:
                break
            # With no prompt in flight, a replacement that cannot be placed (its node gone) must not hang the run.
            ready = ray.wait(list(running) + list(starting), num_returns=1,
                             timeout=None if running else start_timeout_s)[0]
            if not ready:
                for actor, rank in starting.values():
                    ray.kill(actor)
                    notice(f"worker {rank} did not start within {start_timeout_s:.0f} s")
                starting.clear()
                continue
            ref = ready[0]
            if ref in starting:
                try:
                    idle.append(admit(ref))
                except _WorkerLost as exc:  # a replacement that cannot start is not replaced again
                    notice(str(exc))
                continue
            actor, position = running.pop(ref)
            item = order[position]
            try:
                record = ray.get(ref)
            except lost_errors as exc:
                ray.kill(actor)  # dead already, or unreachable: either way it gets no more prompts
                attempts[position] += 1
                retry = attempts[position] <= max_retries
                notice(f"lost a worker on {item.task} {item.sample_id} (attempt {attempts[position]}): {_reason(exc)}"
                       + ("; retrying it on another worker" if retry else "; giving up on this prompt"))
                if retry:
                    pending.appendleft(position)
                else:
                    failed.append({"task": item.task, "sample_id": item.sample_id, "attempts": attempts[position],
                                   "error": _reason(exc)})
                    progress(f"[{position + 1}/{total}] {item.task} {item.sample_id} failed")
                if pending:
                    start()
                continue
            except RayTaskError as exc:  # the evaluation itself raised: as in run_sweep, the sweep stops
                raise exc.as_instanceof_cause() from None
            idle.append(actor)
            key = (item.task, item.sample_id)
            if key in done:  # cannot happen (one worker per prompt at a time); never write a record twice
                continue
            done[key] = record
            if records_path is not None:
                append_line(records_path, json.dumps(record))
            progress(f"[{position + 1}/{total}] {item.task} {item.sample_id} ({record['length']} tokens, "
                     f"{time.perf_counter() - started:.0f}s)")
        # No worker left while prompts wait: each is reported, none dropped.
        for position in pending:
            item = order[position]
            failed.append({"task": item.task, "sample_id": item.sample_id, "attempts": attempts[position],
                           "error": "no worker left to run it"})
            progress(f"[{position + 1}/{total}] {item.task} {item.sample_id} failed")
        return failed
    finally:
        for actor in actors:
            ray.kill(actor)
        if connected:
            ray.shutdown()
