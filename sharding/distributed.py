"""``alpro shard --distributor ray``: transcoding as tasks on a Ray cluster, writing in this process.

The unit of work is one slice of ``shard_size`` consecutive manifest rows (a shard's worth of rows: a shard's
own slice when nothing in it is rejected). A task reads, hashes, transcodes and validates its rows with the same
function a local worker runs (:func:`alpro.sharding.shard._process`) and returns the results; the driver (the
``alpro shard`` process) takes them back in manifest order and is the one ordered writer, exactly as in a local
build. Deciding shard boundaries, content duplicates and reject ownership needs the rows in order, so keeping
those decisions in one place is what makes the output byte-identical to a local build (same names, same bytes,
same ``index.json.zst``), whatever the cluster size or the order tasks finish in.

Failures: a task whose worker process dies (killed, out of memory, a lost node) is rescheduled by Ray up to
``MAX_RETRIES`` times (``max_retries``: system failures); rows are pure functions of their inputs, so a rerun
slice gives the same bytes. If a slice still fails, the build stops with one line; completed shards (their
``_stats.json`` marker) are kept and a rerun resumes after them, as for a local build.

Memory: the driver reads the manifest in a stream (two passes, :func:`alpro.sharding.shard._plan`) and keeps at
most ``2 x cluster CPUs`` slices in flight; their results wait in Ray's object store, not in the driver.
Throughput: the driver only writes encoded bytes (~0.7 MB per clip) while each task spends CPU seconds per clip,
so one driver keeps hundreds of CPUs busy; beyond that, split the manifest with ``--num-nodes``/``--node-rank``
(one driver per partition) and ``alpro shard --merge-index``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from alpro.errors import AlproError

if TYPE_CHECKING:
    from alpro.sharding.shard import ShardOptions, _Item, _Result

__all__ = ["ray_results", "MAX_RETRIES"]

MAX_RETRIES = 4  # reschedules of a slice whose worker died (Ray's max_retries for system failures)


def _transcode_slice(opts: ShardOptions, items: list[_Item]) -> list[_Result]:
    """A Ray task: the results of one slice of rows, in order (runs in a Ray worker process)."""
    from alpro.sharding.shard import _init_worker, _process

    _init_worker(opts)
    return [_process(item) for item in items]


def _start(address: str | None) -> bool:
    """Join (or start) a Ray session; True if this call started it (and must shut it down)."""
    try:
        import ray
    except ImportError:
        raise AlproError("--distributor ray needs Ray: pip install 'alpro[ray]'") from None
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise AlproError(f"cannot join the Ray cluster {address or '(local)'}: {' '.join(str(e).split())[:300]}") from None
    return True


def ray_results(items: Iterator[_Item], opts: ShardOptions) -> Iterator[_Result]:
    """The results of ``items`` in manifest order, transcoded by Ray tasks of ``opts.shard_size`` rows each."""
    started = _start(opts.ray_address)
    import ray
    from ray.exceptions import RayError

    try:
        task = ray.remote(num_cpus=1, max_retries=MAX_RETRIES, retry_exceptions=False)(_transcode_slice)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        window = max(2, 2 * cpus)
        opts_ref = ray.put(opts)
        pending: deque[tuple[Any, int]] = deque()  # (object ref, first row index of the slice)

        def take() -> list[_Result]:
            ref, first = pending.popleft()
            try:
                return ray.get(ref)
            except RayError as e:
                detail = " ".join(str(e).split())[:300]
                raise AlproError(f"a Ray task failed {MAX_RETRIES + 1} times on the slice from selected row {first} "
                                 f"({type(e).__name__}: {detail}); completed shards are kept, rerun to resume") from None

        chunk: list[_Item] = []
        for item in items:
            chunk.append(item)
            if len(chunk) == opts.shard_size:
                pending.append((task.remote(opts_ref, chunk), chunk[0].index))
                chunk = []
                while len(pending) >= window:
                    yield from take()
        if chunk:
            pending.append((task.remote(opts_ref, chunk), chunk[0].index))
        while pending:
            yield from take()
    finally:
        if started:
            ray.shutdown()
