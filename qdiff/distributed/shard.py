"""Deterministic sharding of work items across ranks, and gathering results back in item order.

Every rank computes the same assignment from the same inputs (no communication), so a shard is a pure function
of ``(items, costs, world_size)``. Prompt shards are whole batches: a pipeline call then sees the same batch on any
rank, and the seeded sampler (``qdiff.sampling.draw``, prompt ``j`` drawn with ``seed + j``) gives the same images
or activations whatever the number of ranks.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from qdiff.distributed.env import Group


def batch_shard(count: int, batch_size: int, rank: int, world_size: int) -> range:
    """The contiguous item range of ``rank``: whole batches of ``batch_size``, batches split as evenly as possible.

    Ranks take batches in rank order (rank 0 the first ones), so concatenating the shards in rank order is the
    original order. A rank may get an empty range when there are fewer batches than ranks.
    """
    if batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"bad shard request: batch_size={batch_size}, rank={rank}, world_size={world_size}")
    batches = -(-count // batch_size)
    base, extra = divmod(batches, world_size)
    first = rank * base + min(rank, extra)
    last = first + base + (1 if rank < extra else 0)
    return range(min(count, first * batch_size), min(count, last * batch_size))


def assign(costs: Sequence[float], world_size: int) -> list[list[int]]:
    """Item indices per rank, balancing the summed ``costs`` (longest-processing-time-first greedy).

    Items are taken from the most to the least costly (ties: lower index first) and each goes to the rank with the
    least total so far (ties: lower rank). Every rank's list is in increasing index order. Deterministic.
    """
    if world_size <= 0:
        raise ValueError(f"world_size must be > 0, got {world_size}")
    loads = [0.0] * world_size
    out: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(costs)), key=lambda i: (-float(costs[i]), i)):
        r = min(range(world_size), key=lambda r: (loads[r], r))
        loads[r] += max(0.0, float(costs[i]))
        out[r].append(i)
    return [sorted(ix) for ix in out]


def gather_in_order(group: Group, mine: Mapping[Hashable, Any], order: Sequence[Hashable]) -> list[Any] | None:
    """Results keyed by item from every rank, on rank 0 as a list in ``order`` (``None`` on the other ranks).

    A key missing from every rank is an error (an item nobody computed).
    """
    parts = group.gather(dict(mine))
    if parts is None:
        return None
    merged: dict[Hashable, Any] = {}
    for part in parts:
        merged.update(part)
    missing = [k for k in order if k not in merged]
    if missing:
        raise RuntimeError(f"{len(missing)} work item(s) were computed by no rank, e.g. {missing[0]!r}")
    return [merged[k] for k in order]


def all_gather_in_order(group: Group, mine: Mapping[Hashable, Any], order: Sequence[Hashable]) -> list[Any]:
    """Like :func:`gather_in_order`, on every rank."""
    merged: dict[Hashable, Any] = {}
    for part in group.all_gather(dict(mine)):
        merged.update(part)
    missing = [k for k in order if k not in merged]
    if missing:
        raise RuntimeError(f"{len(missing)} work item(s) were computed by no rank, e.g. {missing[0]!r}")
    return [merged[k] for k in order]
