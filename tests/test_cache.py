"""The artifact cache: hits, corruption recovery, concurrent builders of one artifact, temp directories left by
killed builds, and the build figures a rerun keeps."""
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from filelock import FileLock

import backdoor.harness.cache
from backdoor.harness.cache import HOST, ArtifactCache
from backdoor.harness.case import Case
from backdoor.harness.runner import Runner
from backdoor.training import TrainConfig


def build_counting(counter: Path, value: float = 1.0, sleep: float = 0.0):
    def build():
        with open(counter, "a") as f:
            f.write("built\n")
        time.sleep(sleep)
        return {"w": torch.full((64, 64), value)}, {"note": "x"}
    return build


def builds(counter: Path) -> int:
    return len(counter.read_text().splitlines()) if counter.exists() else 0


def test_hit_after_build_and_across_instances(tmp_path):
    counter = tmp_path / "count"
    (t, meta), hit = ArtifactCache(tmp_path / "c").get_or_build("k", {"a": 1}, build_counting(counter))
    assert not hit and meta == {"note": "x"}
    (t2, _), hit2 = ArtifactCache(tmp_path / "c").get_or_build("k", {"a": 1}, build_counting(counter))
    assert hit2 and torch.equal(t["w"], t2["w"]) and builds(counter) == 1
    _, hit3 = ArtifactCache(tmp_path / "c").get_or_build("k", {"a": 2}, build_counting(counter))
    assert not hit3 and builds(counter) == 2, "another spec is another artifact"


def corrupt_truncate(entry: Path):
    path = entry / "tensors.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def corrupt_flip_byte(entry: Path):
    path = entry / "tensors.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))


def corrupt_manifest(entry: Path):
    (entry / "manifest.json").write_text("{not json")


def corrupt_missing_meta(entry: Path):
    (entry / "meta.json").unlink()


def edit_manifest(entry: Path, edit) -> None:
    manifest = json.loads((entry / "manifest.json").read_text())
    edit(manifest["files"])
    (entry / "manifest.json").write_text(json.dumps(manifest))


def corrupt_emptied_manifest(entry: Path):
    """A manifest that lists no file vouches for nothing: the flipped tensors must not be loaded."""
    corrupt_flip_byte(entry)
    edit_manifest(entry, dict.clear)


def corrupt_manifest_without_tensors(entry: Path):
    corrupt_flip_byte(entry)
    edit_manifest(entry, lambda files: files.pop("tensors.safetensors"))


def corrupt_unlisted_file(entry: Path):
    (entry / "extra.bin").write_bytes(b"not part of the entry")


CORRUPTIONS = (corrupt_truncate, corrupt_flip_byte, corrupt_manifest, corrupt_missing_meta, corrupt_emptied_manifest,
               corrupt_manifest_without_tensors, corrupt_unlisted_file)


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=[c.__name__ for c in CORRUPTIONS])
def test_corrupt_entries_are_rebuilt_never_loaded_and_named(tmp_path, capsys, corrupt):
    counter = tmp_path / "count"
    cache_dir = tmp_path / "cache"
    ArtifactCache(cache_dir).get_or_build("k", {"a": 1}, build_counting(counter, 2.0))
    entry = ArtifactCache(cache_dir).path("k", {"a": 1})
    corrupt(entry)
    capsys.readouterr()
    (t, _), hit = ArtifactCache(cache_dir).get_or_build("k", {"a": 1}, build_counting(counter, 2.0))
    assert not hit and builds(counter) == 2
    assert torch.equal(t["w"], torch.full((64, 64), 2.0))
    said = capsys.readouterr().err.splitlines()
    assert len(said) == 1 and said[0].startswith(f"backdoor cache: corrupt entry {entry} (") and "rebuilding" in said[0]
    _, hit = ArtifactCache(cache_dir).get_or_build("k", {"a": 1}, build_counting(counter, 2.0))
    assert hit, "the rebuilt entry is valid"
    assert capsys.readouterr().err == "", "a sound entry is loaded silently"


def test_failed_build_leaves_no_entry(tmp_path):
    cache = ArtifactCache(tmp_path / "c")

    def broken():
        raise RuntimeError("boom")

    try:
        cache.get_or_build("k", {"a": 1}, broken)
    except RuntimeError:
        pass
    assert not cache.path("k", {"a": 1}).exists()
    assert not [p for p in (tmp_path / "c" / "k").iterdir() if p.name.startswith(".tmp")]


def _worker(cache_dir, counter, out):
    (t, _), hit = ArtifactCache(cache_dir).get_or_build("k", {"a": 1}, build_counting(Path(counter), 3.0, sleep=1.0))
    Path(out).write_text(f"{hit} {float(t['w'].sum())}")


def test_concurrent_builders_build_once(tmp_path):
    counter = tmp_path / "count"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(str(tmp_path / "c"), str(counter), str(tmp_path / f"out{i}")))
             for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert builds(counter) == 1
    results = [(tmp_path / f"out{i}").read_text().split() for i in range(3)]
    assert sorted(r[0] for r in results) == ["False", "True", "True"]
    assert {r[1] for r in results} == {str(3.0 * 64 * 64)}


# -- temp directories of builds killed mid-write ------------------------------------------------------------------
def _killed_mid_write(cache_dir, spec):
    """Build an artifact and die (SIGKILL) halfway through writing its tensors, as a killed worker does."""
    def half_then_die(tensors, path):
        Path(path).write_bytes(b"\0" * 1000)
        os.kill(os.getpid(), signal.SIGKILL)

    backdoor.harness.cache.save_file = half_then_die
    ArtifactCache(cache_dir).get_or_build("k", spec, lambda: ({"w": torch.ones(4)}, {}))


def leftovers(cache_dir: Path) -> list[Path]:
    return sorted((cache_dir / "k").glob(".tmp-*"))


def kill_a_build(cache_dir: Path, spec: dict) -> Path:
    proc = mp.get_context("spawn").Process(target=_killed_mid_write, args=(str(cache_dir), spec))
    proc.start()
    proc.join(60)
    assert proc.exitcode == -signal.SIGKILL
    (tmp,) = leftovers(cache_dir)
    assert tmp.name.startswith(f".tmp-{ArtifactCache(cache_dir).path('k', spec).name}-{HOST}-{proc.pid}-")
    return tmp


@pytest.mark.parametrize("next_spec", [{"a": 1}, {"a": 2}], ids=["same-artifact", "another-artifact"])
def test_temp_directory_of_a_killed_build_is_removed_by_the_next_run(tmp_path, capsys, next_spec):
    tmp = kill_a_build(tmp_path / "c", {"a": 1})
    (t, _), hit = ArtifactCache(tmp_path / "c").get_or_build("k", next_spec, lambda: ({"w": torch.ones(4)}, {}))
    assert not hit and torch.equal(t["w"], torch.ones(4)) and leftovers(tmp_path / "c") == []
    assert f"backdoor cache: removed {tmp}, left by a build that was killed mid-write" in capsys.readouterr().err


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _hold_lock(lock: str, ready: str, release: str):
    with FileLock(lock):
        Path(ready).touch()
        while not Path(release).exists():
            time.sleep(0.05)


def fake_tmp(cache: ArtifactCache, spec: dict, builder: str, age: float = 0.0) -> Path:
    tmp = cache.path("k", spec).parent / f".tmp-{cache.path('k', spec).name}-{builder}abcdef12"
    tmp.mkdir(parents=True)
    (tmp / "tensors.safetensors").write_bytes(b"partial")
    os.utime(tmp, (time.time() - age, time.time() - age))
    return tmp


def test_sweep_never_touches_a_build_in_progress_or_a_live_builder(tmp_path):
    cache = ArtifactCache(tmp_path / "c")
    live = fake_tmp(cache, {"a": 1}, f"{HOST}-{os.getpid()}-")  # this very process: alive
    locked = fake_tmp(cache, {"a": 2}, f"{HOST}-{dead_pid()}-")  # builder gone, but its key's lock is held
    young_unknown = fake_tmp(cache, {"a": 3}, "")  # the old name (no builder), written a minute ago
    old_unknown = fake_tmp(cache, {"a": 4}, "", age=2 * backdoor.harness.cache.STALE_SECONDS)
    other_host = fake_tmp(cache, {"a": 5}, f"elsewhere-{dead_pid()}-")
    ready, release = tmp_path / "ready", tmp_path / "release"
    holder = mp.get_context("spawn").Process(target=_hold_lock, args=(
        str(cache.path("k", {"a": 2})) + ".lock", str(ready), str(release)))
    holder.start()
    try:
        while not ready.exists():
            assert holder.is_alive()
            time.sleep(0.05)
        cache.sweep_stale()
        assert leftovers(tmp_path / "c") == sorted([live, locked, young_unknown, other_host])
        assert not old_unknown.exists()
    finally:
        release.touch()
        holder.join(60)
    ArtifactCache(tmp_path / "c").sweep_stale()  # a later run: the lock is free now
    assert leftovers(tmp_path / "c") == sorted([live, young_unknown, other_host])


# -- build figures ------------------------------------------------------------------------------------------------
def test_build_figures_are_kept_with_the_entry(tmp_path):
    cache = ArtifactCache(tmp_path / "c")
    cache.provenance = {"git_commit": "abc", "device": "cpu"}
    cache.get_or_build("k", {"a": 1}, build_counting(tmp_path / "count", sleep=0.2))
    built = cache.build_info("k", {"a": 1})
    assert built["seconds"] >= 0.2 and built["provenance"] == {"git_commit": "abc", "device": "cpu"}
    assert built["host"] == HOST and built["pid"] == os.getpid() and built["utc_time"]
    later = ArtifactCache(tmp_path / "c")
    later.provenance = {"git_commit": "def", "device": "cuda:0"}
    _, hit = later.get_or_build("k", {"a": 1}, build_counting(tmp_path / "count"))
    assert hit and later.build_info("k", {"a": 1}) == built, "a load reports the original build"


def test_a_rerun_from_the_cache_keeps_the_original_build_figures(tmp_path):
    case = Case(matrix="t", dataset="synthetic", model="cnn_small", attack="badnets", defense="ft", ratio=0.1, seed=0,
                dataset_params={"num_classes": 4, "train_size": 64, "test_size": 32, "image_size": 16},
                training=TrainConfig(epochs=1, batch_size=32), defense_training=TrainConfig(epochs=1, batch_size=32),
                clean_fraction=0.25)
    first = Runner(ArtifactCache(tmp_path / "c")).run(case)
    again = Runner(ArtifactCache(tmp_path / "c")).run(case)
    stages = {"dataset", "poison", "backdoor_model", "defense"}
    assert set(first["build_seconds"]) == stages and not any(first["cache_hits"].values())
    assert all(again["cache_hits"].values())
    assert again["build_seconds"] == first["build_seconds"] and again["build_provenance"] == first["build_provenance"]
    assert again["build_seconds"]["backdoor_model"] > again["stage_seconds"]["backdoor_model"], \
        "the rerun's own timings are kept alongside"
    assert again["build_provenance"]["backdoor_model"]["git_commit"] == first["provenance"]["git_commit"]
    assert again["build_provenance"]["defense"]["utc_time"] <= first["provenance"]["utc_time"]
    assert (again["c_acc"], again["asr"], again["r_acc"]) == (first["c_acc"], first["asr"], first["r_acc"])
