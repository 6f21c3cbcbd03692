"""The torchrun environment, the process group and the few collectives qdiff's stages need.

``torchrun --nproc-per-node N --no-python qdiff ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and
``MASTER_ADDR``/``MASTER_PORT`` for every worker. :func:`session` initialises the process group once (gloo on CPU,
nccl on CUDA with ``LOCAL_RANK`` choosing the GPU) and tears it down on exit; :func:`current` is the
:class:`Group` of this process (the one-process group when ``WORLD_SIZE`` is unset or 1, or no group is initialised).

Failures: each stage runs its work inside :meth:`Group.phase`; at the end of a phase every rank shares whether it
failed, and if one did, every rank raises :class:`RankFailed` naming the first failing rank and its message. Only
that rank's error is printed (the others' carry ``quiet=True``), so a run stops with one error line.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from qdiff.errors import QdiffError

TIMEOUT_ENV = "QDIFF_DIST_TIMEOUT"  # seconds a collective may wait for a peer (default 1800)
DEFAULT_TIMEOUT_S = 1800


@dataclass(frozen=True)
class DistEnv:
    """What torchrun told this process; ``world_size == 1`` when not launched by torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int(environ: Mapping[str, str], key: str, default: int) -> int:
    raw = environ.get(key)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise QdiffError(f"environment: {key}={raw!r} is not an integer (set by torchrun)") from None


def detect(environ: Mapping[str, str] | None = None) -> DistEnv:
    """The torchrun environment of this process (``os.environ`` by default), validated."""
    environ = os.environ if environ is None else environ
    world = _int(environ, "WORLD_SIZE", 1)
    rank, local = _int(environ, "RANK", 0), _int(environ, "LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise QdiffError(f"environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local} are inconsistent")
    return DistEnv(rank, world, local, environ.get("MASTER_ADDR"))


class RankFailed(QdiffError):
    """A phase failed on some rank; raised on every rank. ``quiet``: another rank prints the error line."""

    def __init__(self, message: str, quiet: bool) -> None:
        super().__init__(message)
        self.quiet = quiet


@dataclass(frozen=True)
class Group:
    """This process's place among the ranks, with the collectives qdiff uses (no-ops for one process)."""

    rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        import torch.distributed as td

        out: list[Any] = [None] * self.world_size
        td.all_gather_object(out, obj)
        return out

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` in rank order on rank 0; ``None`` elsewhere."""
        if not self.distributed:
            return [obj]
        import torch.distributed as td

        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        td.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` on every rank (the others pass anything)."""
        if not self.distributed:
            return obj
        import torch.distributed as td

        box = [obj if self.is_main else None]
        td.broadcast_object_list(box, src=0)
        return box[0]

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Run a phase; afterwards every rank learns whether any rank failed and, if so, all raise together.

        The block must hold local work only (no collective): a rank that raises skips the rest of the block, so a
        collective inside it would be left waiting for that rank.
        """
        if not self.distributed:
            yield
            return
        error: str | None = None
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - reported to every rank below, then re-raised as RankFailed
            error = str(exc) if isinstance(exc, QdiffError) else f"{type(exc).__name__}: {exc}"
            error = (error.strip().splitlines() or [type(exc).__name__])[0]
        self.agree(name, error)

    def agree(self, name: str, error: str | None = None) -> None:
        """Share ``error`` (None = ok) with every rank; raise :class:`RankFailed` on all if any rank failed."""
        if not self.distributed:
            if error is not None:
                raise QdiffError(error)
            return
        errors = self.all_gather(error)
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if failed:
            first, msg = failed[0]
            raise RankFailed(f"rank {first}/{self.world_size} failed in {name}: {msg}", quiet=self.rank != first)


SINGLE = Group()


def current() -> Group:
    """The group of this process: the initialised torch.distributed group, else the one-process group."""
    if detect().world_size == 1:
        return SINGLE  # no torch.distributed on the one-process path
    import torch.distributed as td

    if not (td.is_available() and td.is_initialized()):
        return SINGLE
    return Group(td.get_rank(), td.get_world_size())


def rank_device(device: str, env: DistEnv) -> str:
    """The device of this rank: a bare ``cuda`` becomes ``cuda:LOCAL_RANK``; anything else is kept."""
    return f"cuda:{env.local_rank}" if env.distributed and device == "cuda" else device


def _timeout() -> timedelta:
    raw = os.environ.get(TIMEOUT_ENV)
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise QdiffError(f"environment: {TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    return timedelta(seconds=seconds)


@contextmanager
def session(device: str = "cpu") -> Iterator[tuple[Group, str]]:
    """Initialise the process group when launched by torchrun with ``WORLD_SIZE > 1``; destroy it on exit.

    Yields ``(group, device)`` with the device this rank runs on. On CPU each rank uses one thread unless
    ``OMP_NUM_THREADS`` says otherwise. With one process nothing is initialised and ``(SINGLE, device)`` is yielded.
    """
    env = detect()
    if not env.distributed:
        yield SINGLE, device
        return
    import torch
    import torch.distributed as td

    device = rank_device(device, env)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(torch.device(device))
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    owner = not td.is_initialized()
    if owner:
        td.init_process_group("nccl" if cuda else "gloo", timeout=_timeout())
    try:
        yield Group(td.get_rank(), td.get_world_size()), device
    finally:
        if owner and td.is_initialized():
            td.destroy_process_group()


def tag(group: Group) -> str:
    """``"[rank r/N] "`` for a distributed run, else ``""``: the prefix of every log line a rank prints."""
    return f"[rank {group.rank}/{group.world_size}] " if group.distributed else ""


def echo(group: Group, line: str, *, all_ranks: bool = False) -> None:
    """Print a log line: rank 0's on stdout; with ``all_ranks`` the others' on stderr, each tagged by rank."""
    if group.is_main:
        print(f"{tag(group)}{line}", flush=True)
    elif all_ranks:
        print(f"{tag(group)}{line}", file=sys.stderr, flush=True)
