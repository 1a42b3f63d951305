"""The Ray path for real: a two-node local cluster (`ray start --head` and a second `ray start --address`, one CPU
each, everything on a loopback address) runs a tiny grid; the metrics equal a serial local run's bit for bit;
killing the second node's processes mid-run loses no finished record and the run completes; a rerun through
the cluster loads every artifact and loses no record.

Needs the extra (`pip install -c constraints.txt -e .[ray]`): skipped without it, except where
``BACKDOOR_RAY_TEST=required`` (``.ci/run``), where a missing Ray fails. Every wait is bounded in time.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

if os.environ.get("BACKDOOR_RAY_TEST") != "required":
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install -c constraints.txt -e .[ray])")

from backdoor.harness.ray_local import LOOPBACK, LocalCluster, command_line  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MATRIX = ROOT / "matrices" / "cluster_drill.yaml"  # the tiny grid (name: tiny)
CASES = 10  # 2 seeds x (clean reference + 2 attacks x 2 defenses): 6 groups, so 6 Ray tasks
METRICS = ("c_acc", "asr", "r_acc", "detection", "undefended", "target_base_rate", "target_acc", "defense_info",
           "effective_ratio")
ENV = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}  # a nested run is not a worker
RUN_SECONDS = 420  # bound of one grid run


def grid_command(tmp: Path, cache: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pytest", str(ROOT / "benchmarks"), "--matrix", str(tmp / "tiny.yaml"),
            "--cache-dir", str(tmp / cache), "--results-dir", str(tmp / "results" / cache), "-q", *extra]


def ray_options(cluster: LocalCluster, tmp: Path, mode: str) -> list[str]:
    return [f"--ray={cluster.address}", f"--ray-node-ip={LOOPBACK}", "--ray-cache", mode,
            "--ray-node-cache", str(tmp / "node-caches"), "--ray-retries", "3"]


def read_records(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return {r["case_id"]: r for r in map(json.loads, lines)}


def kill_when_a_record_is_in(process, cluster: LocalCluster, records: Path) -> tuple[dict, list[str]]:
    """Once at least one record is written and node 1 runs a group's task, SIGKILL node 1's processes. Returns
    the records at that moment and the killed processes' command lines; fails if the run ends first."""
    deadline = time.monotonic() + RUN_SECONDS
    while time.monotonic() < deadline and process.poll() is None:
        done = read_records(records)
        pids = cluster.node_processes(1)
        running = [pid for pid in pids if command_line(pid).startswith("ray::backdoor-group")]
        if done and running and len(done) < CASES:
            lines = [command_line(pid) for pid in pids]
            cluster.kill_node(1)
            return done, lines
        time.sleep(0.2)
    pytest.fail("the run ended (or timed out) before node 1 could be killed mid-task")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    tmp = tmp_path_factory.mktemp("ray")
    (tmp / "tiny.yaml").write_text(MATRIX.read_text())
    serial = subprocess.run(grid_command(tmp, "serial"), capture_output=True, text=True, cwd=ROOT, timeout=RUN_SECONDS,
                            env=ENV)
    assert serial.returncode == 0, serial.stdout + serial.stderr
    out = {"tmp": tmp, "serial": read_records(tmp / "results" / "serial" / "tiny" / "records.jsonl")}
    records = tmp / "results" / "cluster" / "tiny" / "records.jsonl"
    with LocalCluster(tmp / "cluster-nodes") as cluster:
        cluster.add_node(cpus=1)
        with open(tmp / "drill.log", "w") as log:
            drill = subprocess.Popen(grid_command(tmp, "cluster", *ray_options(cluster, tmp, "object-store")),
                                     stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=ENV)
            try:
                out["at_kill"], out["killed"] = kill_when_a_record_is_in(drill, cluster, records)
                out["drill_code"] = drill.wait(timeout=RUN_SECONDS)
            finally:
                if drill.poll() is None:
                    drill.kill()
        out["drill_log"] = (tmp / "drill.log").read_text()
        out["after_drill"] = read_records(records)
        (tmp / "drill.json").write_text(json.dumps({  # what the drill did, for a reader of the tmp folder
            "records_at_kill": sorted(out["at_kill"]), "killed": out["killed"],
            "nodes": {c: r["provenance"]["ray_node"]["node_id"][:8] for c, r in out["after_drill"].items()}}, indent=1))
        out["node1_left"] = cluster.node_processes(1)
        rerun = subprocess.run(grid_command(tmp, "cluster", *ray_options(cluster, tmp, "shared")), capture_output=True,
                               text=True, cwd=ROOT, timeout=RUN_SECONDS, env=ENV)
        out["rerun"] = rerun
        out["after_rerun"] = read_records(records)
    return out


def test_every_case_ran_on_the_cluster(runs):
    assert runs["drill_code"] == 0, runs["drill_log"]
    assert "on 2 node(s), cache object-store" in runs["drill_log"], runs["drill_log"]
    assert sorted(runs["after_drill"]) == sorted(runs["serial"]) and len(runs["serial"]) == CASES
    for case_id, record in runs["after_drill"].items():
        node = record["provenance"].get("ray_node")
        assert node and len(node["node_id"]) == 56 and node["host"], case_id
        assert "ray_node" not in runs["serial"][case_id]["provenance"]


def test_metrics_equal_a_serial_local_run_bit_for_bit(runs):
    for results in ("after_drill", "after_rerun"):
        for case_id, serial in runs["serial"].items():
            record = runs[results][case_id]
            assert {m: record.get(m) for m in METRICS} == {m: serial.get(m) for m in METRICS}, (results, case_id)
            assert set(record) == set(serial), case_id  # the same fields as a local run's


def test_killing_a_node_loses_no_finished_record(runs):
    assert any("/raylet/raylet " in line for line in runs["killed"]), runs["killed"]  # the node itself
    assert any(line.startswith("ray::backdoor-group") for line in runs["killed"])  # it died mid-task
    assert runs["node1_left"] == [], "node 1 is gone"
    assert 1 <= len(runs["at_kill"]) < CASES
    for case_id, record in runs["at_kill"].items():
        kept = runs["after_drill"][case_id]
        assert kept["provenance"]["utc_time"] == record["provenance"]["utc_time"], case_id  # not rewritten
        assert {m: kept.get(m) for m in METRICS} == {m: record.get(m) for m in METRICS}


def test_a_rerun_loads_every_artifact_the_cluster_built(runs):
    rerun = runs["rerun"]
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "on 1 node(s), cache shared" in rerun.stdout, rerun.stdout
    assert sorted(runs["after_rerun"]) == sorted(runs["serial"]), "a rerun replaces records, loses none"
    for case_id, record in runs["after_rerun"].items():
        assert all(record["cache_hits"].values()), (case_id, record["cache_hits"])


def test_ray_options_are_checked():
    from backdoor.harness.distributed import RayGrid

    with pytest.raises(ValueError, match=r"--ray-cpus: 0 is not allowed; expected a number of CPUs per task > 0"):
        RayGrid("cache", cpus=0)
    with pytest.raises(ValueError, match=r"--ray-cache: 'nfs' is not allowed; expected one of shared, object-store"):
        RayGrid("cache", cache_mode="nfs")
