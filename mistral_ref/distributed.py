"""Independent pieces of a study (perplexity chunks, compared prompts) run in this process or on a
Ray cluster, results coming back in order.

`ordered_results(worker, init_args, method, calls, ray_address)`: with `ray_address` None, one
`worker(*init_args)` in this process runs `worker.method(*call)` for each call. Otherwise
`ray.init(address=ray_address or None)` (an empty address starts a local Ray; "auto" or
"ray://host:10001" joins a cluster), `n_workers` actors are created, one per worker process,
each loading the model once in its constructor, and the calls are dealt round-robin; results are
yielded in call order as they arrive. The callers add results up in that order, so a Ray run
computes what the local run computes.

Ray is an optional extra (`pip install 'mistral-ref[ray]'`).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from mistral_ref.errors import MistralRefError


def ordered_results(worker: type, init_args: tuple, method: str, calls: Sequence[tuple],
                    ray_address: str | None = None, n_workers: int | None = None,
                    threads_per_worker: int = 1) -> Iterator[Any]:
    """`worker(*init_args).method(*call)` for each call, in order (see the module docstring).
    `worker` takes a keyword argument `threads` (its Numba thread count) on Ray."""
    if ray_address is None:
        instance = worker(*init_args)
        for call in calls:
            yield getattr(instance, method)(*call)
        return
    try:
        import ray
    except ImportError:
        raise MistralRefError("--ray needs Ray: pip install 'mistral-ref[ray]'") from None
    ray.init(address=ray_address or None, ignore_reinit_error=True, log_to_driver=False,
             include_dashboard=False) if not ray.is_initialized() else None
    cpus = int(ray.cluster_resources().get("CPU", 1))
    n = max(1, min(len(calls), n_workers or cpus // threads_per_worker))
    actor = ray.remote(num_cpus=threads_per_worker)(worker)
    actors = [actor.remote(*init_args, threads=threads_per_worker) for _ in range(n)]
    futures = [getattr(actors[i % n], method).remote(*call) for i, call in enumerate(calls)]
    try:
        for future in futures:
            yield ray.get(future)
    finally:
        for a in actors:
            ray.kill(a)
