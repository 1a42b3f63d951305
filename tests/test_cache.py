"""The artifact cache: hits, corruption recovery, and concurrent builders of one artifact."""
import multiprocessing as mp
import time
from pathlib import Path

import torch

from backdoor.cache import ArtifactCache


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


def test_corrupt_entries_are_rebuilt_never_loaded(tmp_path):
    for corrupt in (corrupt_truncate, corrupt_flip_byte, corrupt_manifest, corrupt_missing_meta):
        counter = tmp_path / f"count-{corrupt.__name__}"
        cache_dir = tmp_path / corrupt.__name__
        ArtifactCache(cache_dir).get_or_build("k", {"a": 1}, build_counting(counter, 2.0))
        corrupt(ArtifactCache(cache_dir).path("k", {"a": 1}))
        (t, _), hit = ArtifactCache(cache_dir).get_or_build("k", {"a": 1}, build_counting(counter, 2.0))
        assert not hit and builds(counter) == 2, corrupt.__name__
        assert torch.equal(t["w"], torch.full((64, 64), 2.0))
        _, hit = ArtifactCache(cache_dir).get_or_build("k", {"a": 1}, build_counting(counter, 2.0))
        assert hit, f"{corrupt.__name__}: the rebuilt entry is valid"


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
