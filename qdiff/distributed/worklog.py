"""A resumable work log: finished items of one stage, one JSON-lines file per rank, merged on open.

``FOLDER/STAGE.rank{R}.jsonl`` starts with a header line (a fingerprint of what the results depend on: model,
recipe, prompts) followed by one ``{"key": ..., "value": ...}`` line per finished item, appended with one write and
fsynced, so a killed rank loses at most the item in progress. Opening reads *every* rank's file of the stage (any
earlier world size), drops a torn last line, and refuses a file whose header differs (it belongs to another run).
Only rank 0 reads; it hands the finished items to the others (:func:`open_shared`), so every rank sees the same set
even on nodes without a shared filesystem (there, items finished by other nodes are simply redone).

Collectives and failures: a phase (:meth:`~qdiff.distributed.env.Group.phase`) holds local work only; collectives run
between phases, so a rank that fails still takes part in every collective and no rank waits forever.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from qdiff.distributed.env import Group
from qdiff.errors import QdiffError

# tests: "RANK:K:exit" makes rank RANK die (os._exit(17)) after logging K items; "RANK:K:raise" makes it raise
TEST_HOOK_ENV = "QDIFF_DIST_TEST_HOOK"


def _normal(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def read_stage(folder: Path, stage: str, header: dict[str, Any]) -> dict[str, Any]:
    """Finished ``{key: value}`` of ``stage`` from every rank's file in ``folder`` (first record of a key wins)."""
    header = _normal(header)
    done: dict[str, Any] = {}
    for path in sorted(folder.glob(f"{stage}.rank*.jsonl")):
        complete = path.read_bytes().rpartition(b"\n")[0]  # a torn last line (no newline yet) is dropped
        lines = complete.split(b"\n") if complete else []
        if not lines:
            continue
        try:
            records = [json.loads(line) for line in lines]
        except json.JSONDecodeError:
            raise QdiffError(f"{path}: corrupt work log line; delete it to redo its items") from None
        if records[0].get("header") != header:
            raise QdiffError(f"{path}: work log of a different run (model, recipe or prompts changed); delete "
                             f"{folder} to start over")  # fmt: skip
        for rec in records[1:]:
            done.setdefault(rec["key"], rec["value"])
    return done


class WorkLog:
    """The appending side: this rank's file of one stage (created with its header on first use)."""

    def __init__(self, folder: str | Path, stage: str, header: dict[str, Any], rank: int) -> None:
        self.path = Path(folder) / f"{stage}.rank{rank}.jsonl"
        self.header, self.rank, self.added = _normal(header), rank, 0
        hook = os.environ.get(TEST_HOOK_ENV, "").split(":")
        self._hook = (int(hook[1]), hook[2]) if len(hook) == 3 and hook[0] == str(rank) else None

    def _write(self, record: dict[str, Any]) -> None:
        with open(self.path, "ab") as f:
            f.write((json.dumps(record) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())

    def add(self, key: str, value: Any) -> None:
        """Record one finished item (one append + fsync)."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._write({"header": self.header})
        else:
            self._drop_torn_tail()
        self._write({"key": key, "value": value})
        self.added += 1
        if self._hook is not None and self.added >= self._hook[0]:  # test hook: a rank dying or failing mid-run
            if self._hook[1] == "exit":
                os._exit(17)
            raise RuntimeError(f"{TEST_HOOK_ENV}: injected failure after {self.added} items")

    def _drop_torn_tail(self) -> None:
        raw = self.path.read_bytes()
        if raw and not raw.endswith(b"\n"):
            with open(self.path, "r+b") as f:
                f.truncate(raw.rfind(b"\n") + 1)


def open_shared(group: Group, folder: str | Path, stage: str, header: dict[str, Any]) -> tuple[WorkLog, dict]:
    """``(this rank's log, finished items)``: rank 0 reads every rank's file and broadcasts what is done.

    Call it on every rank, outside a :meth:`~qdiff.distributed.env.Group.phase` (it is a collective); a foreign or
    corrupt log raises :class:`~qdiff.distributed.env.RankFailed` on every rank, printed by rank 0.
    """
    folder = Path(folder)
    done: dict[str, Any] = {}
    with group.phase(f"{stage} work log"):
        if group.is_main and folder.is_dir():
            done = read_stage(folder, stage, header)
    return WorkLog(folder, stage, header, group.rank), group.broadcast(done)
