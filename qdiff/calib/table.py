"""The sensitivity table (one row per layer) and its append-only, resumable JSONL journal.

A row holds, for one layer, the score of every candidate bit-width, weights (``w``) and activations
(``a``) measured separately, plus the sizes the allocator weights them by::

    {"name": "down_blocks.0.attentions.0.proj_in", "group": "quality", "kind": "conv2d",
     "params": 1024, "act_numel": 32768, "metric": "sqnr", "w": {"4": 31.2, "8": 55.0}, "a": {"4": 20.1, "8": 44.7}}

Higher is better for both metrics (SSIM in [-1, 1]; SQNR in dB, capped at ``SQNR_CAP``).

The journal is ``header line + one line per finished layer``; every line is flushed and fsynced, so a
run killed at any point (``kill -9``) loses at most the layer in progress. A torn last line is dropped
on resume; a header that does not match the current run is an error (the journal belongs to another run).
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qdiff.calib.stats import write_text_atomic
from qdiff.errors import QdiffError

SQNR_CAP = 300.0  # dB; an exact match (infinite SQNR) is stored as the cap so the JSON stays standard
TABLE_VERSION = 1


@dataclass
class SensitivityTable:
    """Rows in layer order plus run metadata (mode, metrics, prompts, wall time)."""

    rows: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)

    def row(self, name: str) -> dict[str, Any]:
        for r in self.rows:
            if r["name"] == name:
                return r
        raise KeyError(name)

    def columns(self) -> list[str]:
        """Candidate columns present in the table, e.g. ``["w2", "w4", "w8", "a4", "a8"]``."""
        cols = set()
        for r in self.rows:
            cols |= {f"w{b}" for b in r["w"]} | {f"a{b}" for b in r["a"]}
        return sorted(cols, key=lambda c: (c[0] != "w", int(c[1:])))

    def to_dict(self) -> dict[str, Any]:
        return {"format": "qdiff-sensitivity", "version": TABLE_VERSION, "meta": self.meta, "rows": self.rows}

    @classmethod
    def from_dict(cls, data: Any, source: str = "sensitivity table") -> SensitivityTable:
        if not isinstance(data, dict) or data.get("format") != "qdiff-sensitivity":
            raise QdiffError(f'{source}: not a qdiff sensitivity table (missing "format": "qdiff-sensitivity")')
        if data.get("version") != TABLE_VERSION:
            raise QdiffError(f"{source}: unsupported table version {data.get('version')!r}")
        return cls(list(data["rows"]), dict(data.get("meta") or {}))

    def save_json(self, path: str | Path) -> None:
        write_text_atomic(Path(path), json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load_json(cls, path: str | Path) -> SensitivityTable:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise QdiffError(f"{path}: cannot read sensitivity table ({exc})") from None
        return cls.from_dict(data, str(path))

    def to_csv(self) -> str:
        cols = self.columns()
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["name", "group", "kind", "params", "act_numel", "metric", *cols])
        for r in self.rows:
            scores = [r[c[0]].get(c[1:], "") for c in cols]
            writer.writerow([r["name"], r["group"], r["kind"], r["params"], r["act_numel"], r["metric"], *scores])
        return buf.getvalue()

    def save_csv(self, path: str | Path) -> None:
        write_text_atomic(Path(path), self.to_csv())


class Journal:
    """Append-only JSONL: a header (the run's fingerprint) and one row per finished layer."""

    def __init__(self, path: str | Path, header: dict[str, Any]) -> None:
        self.path = Path(path)
        self.header = json.loads(json.dumps(header))  # normalised like a round trip through the file
        self.done: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            self._resume()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._append({"header": self.header})

    def _resume(self) -> None:
        raw = self.path.read_bytes()
        complete, _, tail = raw.rpartition(b"\n")  # ``tail``: a write torn by a kill (no newline yet)
        records = []
        for i, line in enumerate(complete.split(b"\n") if complete else []):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise QdiffError(f"{self.path}: line {i + 1} is corrupt; delete the journal to start over") from None
        if tail:
            with open(self.path, "r+b") as f:  # drop the torn tail so appends start on a clean line
                f.truncate(len(raw) - len(tail))
                f.flush()
                os.fsync(f.fileno())
        if not records:  # killed while writing the header: start over
            self._append({"header": self.header})
            return
        if records[0].get("header") != self.header:
            raise QdiffError(
                f"{self.path}: journal was written by a different run (model, recipe or prompts changed); "
                "delete it to start over"
            )
        for rec in records[1:]:
            self.done[rec["name"]] = rec

    def _append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def add(self, row: dict[str, Any]) -> None:
        self._append(row)
        self.done[row["name"]] = json.loads(json.dumps(row))
