"""Run qdiff's stages on torch.distributed ranks launched by ``torchrun`` (issue 12).

* :mod:`qdiff.distributed.env` — the torchrun environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), process-group
  init and teardown (gloo on CPU, nccl on CUDA), the :class:`~qdiff.distributed.env.Group` collectives every stage
  uses, rank-tagged logging and the failure agreement (one rank fails -> every rank stops with one error line).
* :mod:`qdiff.distributed.shard` — deterministic sharding of work items (batch-aligned prompt ranges, cost-balanced
  items).
* :mod:`qdiff.distributed.worklog` — the resumable per-rank work log, merged on a rerun with any world size.

Nothing here imports calibration, scheduling or evaluation code: those stages import this package. With
``WORLD_SIZE`` unset or 1 :func:`qdiff.distributed.env.current` is the one-process group and every collective is a
no-op.
"""
