"""qdiff.distributed without processes: torchrun environment parsing, sharding, per-rank work logs, 1-rank groups."""

from __future__ import annotations

import json

import pytest

from qdiff.distributed.env import SINGLE, DistEnv, Group, detect, rank_device
from qdiff.distributed.shard import all_gather_in_order, assign, batch_shard, gather_in_order
from qdiff.distributed.worklog import TEST_HOOK_ENV, WorkLog, read_stage
from qdiff.errors import QdiffError


def test_detect_reads_torchrun_variables_and_refuses_nonsense():
    assert detect({}) == DistEnv(0, 1, 0, None) and not detect({}).distributed
    env = detect({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node7"})
    assert env == DistEnv(3, 4, 1, "node7") and env.distributed
    assert rank_device("cuda", env) == "cuda:1" and rank_device("cuda:0", env) == "cuda:0"
    assert rank_device("cpu", env) == "cpu" and rank_device("cuda", detect({})) == "cuda"
    with pytest.raises(QdiffError, match="WORLD_SIZE='two'"):
        detect({"WORLD_SIZE": "two"})
    with pytest.raises(QdiffError, match="inconsistent"):
        detect({"RANK": "2", "WORLD_SIZE": "2"})


def test_one_rank_group_collectives_are_identities():
    assert SINGLE.all_gather({"a": 1}) == [{"a": 1}] and SINGLE.gather(5) == [5] and SINGLE.broadcast(7) == 7
    with SINGLE.phase("x"):
        pass
    with pytest.raises(ValueError):  # one process: the original exception, untouched
        with SINGLE.phase("x"):
            raise ValueError("boom")
    assert gather_in_order(SINGLE, {"b": 2, "a": 1}, ["a", "b"]) == [1, 2]
    with pytest.raises(RuntimeError, match="computed by no rank"):
        all_gather_in_order(SINGLE, {"a": 1}, ["a", "z"])
    assert Group(1, 2).distributed and not Group(1, 2).is_main


@pytest.mark.parametrize("count,bs,world", [(0, 2, 2), (7, 2, 2), (8, 4, 3), (5, 1, 5), (3, 4, 4), (16, 4, 2)])
def test_batch_shards_are_whole_batches_covering_all_items_in_order(count, bs, world):
    shards = [batch_shard(count, bs, r, world) for r in range(world)]
    assert [i for s in shards for i in s] == list(range(count))  # concatenation in rank order = original order
    assert all(s.start % bs == 0 for s in shards if len(s))  # every shard starts on a batch boundary
    sizes = [-(-len(s) // bs) for s in shards]  # batches per rank differ by at most one
    assert max(sizes) - min(sizes) <= 1


def test_assign_balances_costs_deterministically():
    costs = [5.0, 1.0, 1.0, 1.0, 1.0, 1.0, 3.0, 2.0]
    parts = assign(costs, 2)
    assert sorted(i for p in parts for i in p) == list(range(len(costs)))
    assert all(p == sorted(p) for p in parts)
    loads = [sum(costs[i] for i in p) for p in parts]
    assert abs(loads[0] - loads[1]) <= 1.0 and parts == assign(costs, 2)
    assert assign([], 3) == [[], [], []] and assign([1.0], 3) == [[0], [], []]


def test_worklog_merges_every_rank_file_drops_torn_lines_and_refuses_other_runs(tmp_path, monkeypatch):
    monkeypatch.delenv(TEST_HOOK_ENV, raising=False)
    header = {"model": "abc", "items": ("w", 4)}
    WorkLog(tmp_path, "sens", header, 0).add("l1|w4", 1.5)
    log1 = WorkLog(tmp_path, "sens", header, 1)
    log1.add("l2|w4", {"w": {"4": 2.0}})
    log1.add("l1|w4", 9.9)  # a duplicate from a rerun: the first record wins
    with open(log1.path, "ab") as f:
        f.write(b'{"key": "l3|w4", "val')  # torn by a kill
    assert read_stage(tmp_path, "sens", header) == {"l1|w4": 1.5, "l2|w4": {"w": {"4": 2.0}}}
    log1.add("l3|w4", 3.0)  # appending again first drops the torn tail
    assert json.loads(log1.path.read_text().splitlines()[-1]) == {"key": "l3|w4", "value": 3.0}
    assert read_stage(tmp_path, "sens", header)["l3|w4"] == 3.0
    assert read_stage(tmp_path, "other", header) == {}
    with pytest.raises(QdiffError, match="different run"):
        read_stage(tmp_path, "sens", {"model": "xyz"})


def test_worklog_test_hook_raises_after_k_items(tmp_path, monkeypatch):
    monkeypatch.setenv(TEST_HOOK_ENV, "0:2:raise")
    log = WorkLog(tmp_path, "s", {}, 0)
    log.add("a", 1)
    with pytest.raises(RuntimeError, match="injected failure after 2 items"):
        log.add("b", 2)
    assert read_stage(tmp_path, "s", {}) == {"a": 1, "b": 2}  # the item was logged before the hook fired
    WorkLog(tmp_path, "s", {}, 1).add("c", 3)  # another rank: no hook
