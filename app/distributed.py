"""Sweeps on Ray: independent work items mapped over a pool of workers that each load the model once.

An analyzer's or a circuit method's work often splits into independent items: one layer's heads
patched (activation patching, Wang et al. 2022 §3), one batch of needle tests (retrieval heads, Wu et
al. 2024 §2). ``ModelPool`` starts one Ray actor per worker (one per GPU, or per CPU worker), each
holding the model, maps a module-level function ``fn(model, item, shared)`` over the items, shows
progress, retries a failed item and raises ``ItemsFailed`` with every item that still failed (nothing
is silently dropped), and returns the results in item order, so the merge is deterministic.

The per-item functions are the single-process code's own units (``circuits.patching.node_layer``,
``Retrieval.run_batch``), so the merged ``HeadScores`` equal a single process's.

This module lives in ``app/`` because it orchestrates analyzers and circuit methods (it imports
``heads`` and ``circuits``; nothing below ``app/`` may) and keeps Ray out of the library: Ray is the
optional extra ``headscope[distributed]`` and is imported only when a pool starts.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from functools import partial

import torch
from tqdm.auto import tqdm

from .. import load


class ItemsFailed(RuntimeError):
    """Items that still failed after their retries: ``failed`` = [(index, item, error text)]."""

    def __init__(self, failed):
        self.failed = failed
        lines = "\n".join(f"  item {i} ({item!r:.60}): {err.strip().splitlines()[-1] if err.strip() else err}"
                          for i, item, err in failed)
        super().__init__(f"{len(failed)} work item(s) failed after their retries:\n{lines}")


@dataclass
class _Worker:
    """Body of one Ray actor: the model, loaded once, and the shared values of the current sweep."""

    model_spec: object
    load_kwargs: dict

    def __post_init__(self):
        spec = self.model_spec
        self.model = spec() if callable(spec) else load(spec, **self.load_kwargs)
        self.shared = {}

    def ready(self) -> str:
        return f"pid {os.getpid()}"

    def run(self, fn, item, setup=None, key=None):
        """``fn(model, item, shared)``; ``shared`` = ``setup(model)``, computed once per sweep ``key``."""
        if key is not None and key not in self.shared:
            self.shared = {key: setup(self.model)}
        return fn(self.model, item, self.shared.get(key))


def connect(address=None, num_workers: int = 2, runtime_env=None):
    """Start (address None: a local cluster with ``num_workers`` CPUs) or join ("auto", an address) Ray."""
    try:
        import ray
    except ImportError as e:
        raise ImportError("Ray is not installed: `pip install 'headscope[distributed]'` (or `pip install ray`)") from e
    if not ray.is_initialized():
        if address in (None, "local"):
            ray.init(num_cpus=num_workers, include_dashboard=False, log_to_driver=False,
                     runtime_env=runtime_env, logging_level="ERROR")
        else:                                      # "auto" or "ray://host:port" / "host:port"
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=False, logging_level="ERROR")
    return ray


class ModelPool:
    """One Ray actor per worker, each holding ``model`` (a name for ``hs.load``, or a picklable zero-argument
    function returning a ``HookedModel``).

    ``address``: None starts a local Ray cluster with ``num_workers`` CPU workers; "auto" joins the
    running cluster (``ray start --head`` on this host); any other string is a cluster address.
    ``gpus_per_worker``: 1 gives each actor its own GPU (then ``num_workers`` defaults to the cluster's
    GPU count). Workers that cannot be placed within ``start_timeout`` seconds raise. ``retries``: how many times a failed item is run again (on any worker) before it is
    reported. Use as a context manager, or call ``close()``."""

    def __init__(self, model="smollm2", *, address=None, num_workers: int | None = None,
                 gpus_per_worker: float = 0, retries: int = 2, load_kwargs: dict | None = None,
                 runtime_env: dict | None = None, start_timeout: float = 900):
        if retries < 0:
            raise ValueError(f"retries={retries} must be >= 0")
        ray = connect(address, num_workers or 2, runtime_env)
        if num_workers is None:
            res = ray.cluster_resources()
            num_workers = int(res.get("GPU", 0) // gpus_per_worker) if gpus_per_worker else int(res.get("CPU", 1))
        if num_workers < 1:
            raise ValueError("the Ray cluster has no worker to offer (no CPU/GPU resources)")
        self.ray, self.retries = ray, retries
        actor = ray.remote(num_cpus=1, num_gpus=gpus_per_worker, max_restarts=1, max_task_retries=1)(_Worker)
        self.actors = [actor.remote(model, dict(load_kwargs or {})) for _ in range(num_workers)]
        try:                                                       # load errors surface here, once
            ray.get([a.ready.remote() for a in self.actors], timeout=start_timeout)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise RuntimeError(f"{num_workers} workers did not start within {start_timeout:.0f} s: the cluster has "
                               f"{ray.available_resources()} free; each worker takes 1 CPU and {gpus_per_worker} "
                               "GPU (close other pools, or ask for fewer workers)") from None
        self._sweeps = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Kill this pool's worker actors (idempotent). A Ray cluster that ``connect`` started stays up
        for the next pool; ``ray.shutdown()`` ends it."""
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []

    def map(self, fn, items, *, setup=None, progress: bool = True, desc: str = "items") -> list:
        """``[fn(model, item, setup(model)) for item in items]`` over the workers, in item order.

        ``fn`` and ``setup`` must be picklable (module-level functions or ``functools.partial`` of
        them). ``setup`` runs once per worker per call (values every item of the sweep shares). A
        failed item is run again up to ``retries`` times; items that still fail raise ``ItemsFailed``
        after every other item has finished."""
        items = list(items)
        self._sweeps += 1
        key = self._sweeps if setup is not None else None
        results, tries, failed = [None] * len(items), [0] * len(items), []
        todo = list(range(len(items)))
        running = {}                                               # object ref -> (item index, actor)
        idle = list(self.actors)
        bar = tqdm(total=len(items), desc=desc, disable=not progress)
        while todo or running:
            while todo and idle:                                   # one item per idle worker
                i, a = todo.pop(0), idle.pop(0)
                running[a.run.remote(fn, items[i], setup, key)] = (i, a)
            if not running:                                        # every worker died
                failed += [(i, items[i], "no live worker left") for i in todo]
                break
            done, _ = self.ray.wait(list(running), num_returns=1)
            i, a = running.pop(done[0])
            try:
                results[i] = self.ray.get(done[0])
                idle.append(a)
                bar.update(1)
            except Exception as e:                                 # noqa: BLE001 - reported below
                if not isinstance(e, self.ray.exceptions.RayActorError):
                    idle.append(a)                                 # a dead worker (after its restart) gets no more
                tries[i] += 1
                if tries[i] <= self.retries:
                    todo.append(i)
                else:
                    failed.append((i, items[i], str(e)))
                    bar.update(1)
        bar.close()
        if failed:
            raise ItemsFailed(sorted(failed, key=lambda f: f[0]))
        return results


# ------------------------------------------------------------------------- node patching
def _patch_setup(task, how, positions, batch_size, model):
    from ..circuits.patching import node_setup
    return node_setup(model, task, "z", how, positions, batch_size)


def _patch_layer(task, batch_size, model, layer, setup):
    from ..circuits.patching import node_layer
    return node_layer(model, task, "z", layer, list(range(model.cfg.n_heads)), setup, batch_size), setup["m_clean"]


def patch_heads(pool: ModelPool, model, task, how: str = "mean", positions=None, batch_size: int = 64,
                check: bool = True, progress: bool = True):
    """``circuits.patch_heads`` with one item per layer (that layer's heads, batched as in a single
    process) on the pool's workers; ``model`` (the same model, in this process) gives the task check
    and the metadata. Returns the same HeadScores (Wang et al. 2022, §3)."""
    from ..circuits.patching import HOWS, head_scores
    t0 = time.time()
    if how not in HOWS:
        raise ValueError(f"how={how!r}: use one of {HOWS}")
    if check:
        task.check(model)
    rows = pool.map(partial(_patch_layer, task, batch_size), range(model.cfg.n_layers),
                    setup=partial(_patch_setup, task, how, positions, batch_size), progress=progress,
                    desc=f"patch heads ({how}) on Ray")
    out = torch.stack([r for r, _ in rows])                                   # [L, H]
    return head_scores(model, task, out, rows[0][1], how, positions, t0)


# ------------------------------------------------------------------------- retrieval heads
def _needle_batch(analyzer, model, tests, shared):
    return analyzer.run_batch(model, tests)


def retrieval(pool: ModelPool, model, analyzer=None, data=None, progress: bool = True):
    """The retrieval-head analyzer (Wu et al. 2024, §2 eq. 1) with one item per batch of needle tests
    (the batches ``Retrieval.score`` decodes together) on the pool's workers; the tests are built here
    with ``model``'s tokenizer. Returns the same HeadScores as ``analyzer.score(model, data)``."""
    from ..heads.retrieval import Retrieval
    t0 = time.time()
    analyzer = analyzer or Retrieval()
    tests = analyzer.tests(model, data)
    analyzer.check_tests(model, tests)
    groups = analyzer.test_batches(tests)
    got = pool.map(partial(_needle_batch, analyzer), [[tests[i] for i in g] for g in groups], progress=progress,
                   desc="retrieval NIAH on Ray")
    results = [None] * len(tests)
    for g, rs in zip(groups, got):
        for i, r in zip(g, rs):
            results[i] = r
    return analyzer.merge(model, data, tests, results, t0)


# ------------------------------------------------------------------------- analyzers
RAY_ANALYZERS = ("retrieval",)


def score(pool: ModelPool | None, model, analyzer, data=None, progress: bool = True):
    """``analyzer.score(model, data)``, on the pool's workers when its work splits into items (the
    analyzers in ``RAY_ANALYZERS``) and in this process otherwise (or when ``pool`` is None)."""
    if pool is not None and analyzer.name == "retrieval":
        return retrieval(pool, model, analyzer, data, progress=progress)
    return analyzer.score(model, data, progress=progress)
