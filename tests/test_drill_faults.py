"""A drill of faults (issue 18): signals, unwritable or shared results folders, killed writes, diverging training,
collapsed models, non-finite figures and bad process options; each asserts the clean outcome."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from backdoor.attacks import PoisonedSet
from backdoor.data import Dataset, Split
from backdoor.harness.case import Case
from backdoor.harness.case_record import collapsed, thin_inputs
from backdoor.harness.ray_local import group_members
from backdoor.harness.records import (RECORDS, ResultsFolderError, other_matrix_hashes, prepare_results_folder,
                                      read_records, set_records_aside, upsert_records)
from backdoor.harness.report.leaderboard import render_markdown
from backdoor.training import NonFiniteLossError, TrainConfig, fit
from fixtures import plugin

ROOT = Path(__file__).resolve().parent.parent


def _record(case_id: str, matrix_hash: str = "h1", **fields) -> dict:
    return {"case_id": case_id, "dataset": "digits", "model": "cnn_small", "attack": "badnets", "defense": "none",
            "poison_ratio": 0.1, "seed": 0, "status": "ok", "c_acc": 0.9, "asr": 0.9, "r_acc": 0.1, "target": 0,
            "provenance": {"matrix_hash": matrix_hash}, **fields}


# -- signals -------------------------------------------------------------------------------------------------------
GROUP_SCRIPT = """
import subprocess, sys, time
from pathlib import Path
from backdoor.harness.launch import run_in_own_group
out = Path(sys.argv[1])
child = '''
import os, signal, subprocess, sys, time
from pathlib import Path
out = Path(sys.argv[1])
ready = out / "worker.ready"
worker = subprocess.Popen([sys.executable, "-c", "import signal, sys, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                           "open(sys.argv[1], 'w').close(); time.sleep(120)", str(ready)])
while not ready.exists():
    time.sleep(0.05)
(out / "worker.pid").write_text(str(worker.pid))
(out / "leader.pid").write_text(str(os.getpid()))
time.sleep(120)
'''
code = run_in_own_group([sys.executable, "-c", child, str(out)], lambda name: (out / "stopped").write_text(name))
(out / "rc").write_text(str(code))
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (ended, not yet reaped by its parent) counts as ended
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_wrapper_stops_the_whole_group(tmp_path, signum):
    """`kill <pid>` of `backdoor run` once ended the wrapper only; SIGINT left xdist workers orphaned. Here the
    grandchild ignores SIGINT, as a worker busy in a case may: it ends too, and the stop handler runs once."""
    wrapper = subprocess.Popen([sys.executable, "-c", GROUP_SCRIPT, str(tmp_path)], cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 120
    while not (tmp_path / "worker.pid").exists() and time.time() < deadline:
        time.sleep(0.2)
    worker, leader = int((tmp_path / "worker.pid").read_text()), int((tmp_path / "leader.pid").read_text())
    wrapper.send_signal(signum)
    assert wrapper.wait(timeout=120) == 0
    assert (tmp_path / "rc").read_text() == str(128 + signum)
    assert (tmp_path / "stopped").read_text() == signal.Signals(signum).name
    time.sleep(0.5)
    assert not _alive(leader) and not _alive(worker)


def test_an_unsignalled_run_returns_pytests_status(tmp_path):
    from backdoor.harness.launch import run_in_own_group

    stopped = []
    assert run_in_own_group([sys.executable, "-c", "raise SystemExit(3)"], stopped.append) == 3
    assert stopped == []


# -- results folder --------------------------------------------------------------------------------------------------
def _refused_under(folder: Path, mkdir):
    """``Path.mkdir`` as a read-only ``folder`` answers it: EACCES for anything made inside it."""
    def refused(self, *args, **kwargs):
        if folder in self.parents:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return mkdir(self, *args, **kwargs)
    return refused


def test_read_only_results_folder_is_refused_before_any_case(tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):  # root writes anywhere: the file system's refusal is played instead
            monkeypatch.setattr(Path, "mkdir", _refused_under(folder, Path.mkdir))
        with pytest.raises(ResultsFolderError) as e:
            prepare_results_folder(folder / "m")
    finally:
        folder.chmod(0o700)
    assert "\n" not in str(e.value) and f"results folder {folder / 'm'}: cannot be written" in str(e.value)
    assert "expected a writable folder" in str(e.value)


def test_a_file_as_results_folder_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ResultsFolderError, match="cannot be written .*expected a writable folder"):
        prepare_results_folder(tmp_path / "file" / "m")


def test_a_full_disk_is_found_before_any_case(tmp_path, monkeypatch):
    """The probe write fails as a full disk's first record write would (ENOSPC)."""
    def full(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(ResultsFolderError, match="No space left on device"):
        prepare_results_folder(tmp_path / "m")


def test_temp_files_of_killed_record_writes_are_swept(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    for i in range(12):
        (folder / f".{RECORDS}.{i:08x}.tmp").write_text("half a rec")
    (folder / "keep.txt").write_text("x")
    assert prepare_results_folder(folder) == 12
    assert sorted(p.name for p in folder.iterdir()) == ["keep.txt", f"{RECORDS}.lock"]


def _config(tmp_path: Path, policy: str):
    return SimpleNamespace(path=tmp_path / "m.yaml", name="m", digest="h2"), policy


@pytest.mark.parametrize("policy", ["refuse", "replace", "add"])
def test_records_of_another_matrix_under_one_name(tmp_path, policy, capsys):
    folder = tmp_path / "m"
    upsert_records(folder, [_record("a", "h1")])
    matrix, _ = _config(tmp_path, policy)
    if policy == "refuse":
        with pytest.raises(pytest.UsageError) as e:
            plugin._prepare_results(folder, matrix, policy)
        assert "\n" not in str(e.value)
        assert f"{matrix.path}: name: 'm' already holds records of another matrix" in str(e.value)
        assert "matrix hash h1, this file's is h2" in str(e.value) and "--other-records replace" in str(e.value)
        return
    plugin._prepare_results(folder, matrix, policy)
    if policy == "replace":
        assert not (folder / RECORDS).exists() and len(list(folder.glob("records.replaced-*.jsonl"))) == 1
    else:
        assert other_matrix_hashes(folder, "h2") == {"h1"}


def test_the_same_matrix_reruns_into_its_folder(tmp_path):
    folder = tmp_path / "m"
    upsert_records(folder, [_record("a", "h2")])
    plugin._prepare_results(folder, _config(tmp_path, "refuse")[0], "refuse")
    assert set_records_aside(folder).name.startswith("records.replaced-")


def test_a_record_write_that_fails_mid_run_stops_the_session_in_one_line(tmp_path, capsys, monkeypatch):
    """A disk that fills during the run: the write's temp file is removed, the session stops, no INTERNALERROR."""
    folder = tmp_path / "m"
    upsert_records(folder, [_record("a")])

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    collector = plugin.ResultsCollector(folder, SimpleNamespace())
    collector.session = SimpleNamespace(shouldstop=False)
    collector._store([_record("b")])
    monkeypatch.undo()
    assert "cannot write" in collector.session.shouldstop and "No space left on device" in collector.session.shouldstop
    assert capsys.readouterr().err.count("\n") == 1
    assert [r["case_id"] for r in read_records(folder)] == ["a"]
    assert not list(folder.glob(".records.jsonl.*.tmp"))


# -- numbers that must not be scored ----------------------------------------------------------------------------------
def test_non_finite_figures_are_written_as_strict_json(tmp_path):
    upsert_records(tmp_path, [_record("a", c_acc=float("nan"), asr=float("inf"),
                                      defense_info={"x": [float("-inf"), 1.0]})])
    text = (tmp_path / RECORDS).read_text()

    def refuse(constant):
        raise ValueError(constant)

    record = json.loads(text, parse_constant=refuse)
    assert (record["c_acc"], record["asr"], record["defense_info"]["x"]) == (None, None, [None, 1.0])


def test_diverging_training_stops_the_case_with_one_clear_error():
    torch.manual_seed(0)
    data = Split(torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8), torch.arange(32) % 4)
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 4))
    with pytest.raises(NonFiniteLossError) as e:
        fit(model, data, TrainConfig(epochs=3, batch_size=8, lr=1e30, crop_padding=0), device=torch.device("cpu"),
            seed=0, desc="badnets train")
    assert "\n" not in str(e.value)
    assert str(e.value).startswith("badnets train: the training loss is") and "Lower the learning rate" in str(e.value)


def test_a_model_predicting_one_class_is_marked_never_scored_as_a_backdoor():
    assert collapsed(torch.full((10,), 3), torch.arange(10)) == {"collapsed_to": 3}
    assert collapsed(torch.arange(10) % 2, torch.arange(10)) == {}
    assert collapsed(torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long)) == {}  # one-class test set
    figures = dict(c_acc=0.1, asr=1.0, r_acc=0.0, collapsed_to=0, target_acc=1.0, target_base_rate=1.0)
    records = [_record("n", **figures), _record("f", defense="ft", **figures)]
    board = render_markdown(records, "drill")
    assert "100.00 †" in board and "the model predicts one class for every input (class 0)" in board


def test_inputs_that_run_but_mean_little_are_warned_in_the_record():
    """Ratio 1e-9 poisoned nothing and clean_fraction 1e-9 fine-tuned on one image, both `ok` without a word; a
    target class absent from the test split gave target_acc null silently."""
    split = Split(torch.zeros(100, 3, 8, 8, dtype=torch.uint8), torch.arange(100) % 4)
    test = Split(torch.zeros(8, 3, 8, 8, dtype=torch.uint8), torch.tensor([1, 2, 3, 1, 2, 3, 1, 2]))
    data = Dataset("d", split, test, 4, (0.5,) * 3, (0.5,) * 3, False)
    case = Case(matrix="m", dataset="d", model="cnn_small", attack="badnets", defense="ft", ratio=1e-9, seed=0,
                clean_fraction=1e-9)
    nothing = PoisonedSet(split.x, split.y, torch.zeros(100, dtype=torch.bool), 0.0)
    assert thin_inputs(case, data, nothing) == [
        "the poison ratio 1e-09 poisons no training sample",
        "clean_fraction 1e-09 gives the defender 1 clean image(s), fewer than the 4 classes",
        "the target class 0 has no test image: target_acc is null"]
    fine = Case(matrix="m", dataset="d", model="cnn_small", attack="badnets", defense="ft", ratio=0.1, seed=0,
                target=1, clean_fraction=0.5)
    some = PoisonedSet(split.x, split.y, torch.arange(100) < 10, 0.1)
    assert thin_inputs(fine, data, some) == []


def test_a_record_with_nan_metrics_reads_back(tmp_path):
    upsert_records(tmp_path, [_record("a", c_acc=float("nan"))])
    assert read_records(tmp_path)[0]["c_acc"] is None


# -- process options ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("threads,device,message", [
    (0, "auto", "--threads: 0 is not allowed; expected a thread count >= 1"),
    (-2, "auto", "--threads: -2 is not allowed"),
    (1, "bogus", "--device: 'bogus' is not allowed; expected auto, cpu, cuda or cuda:<index>"),
    (1, "cuda:99", "--device: 'cuda:99' is not allowed; this machine has"),
    (1, "meta", "--device: 'meta' is not allowed"),
])
def test_bad_process_options_are_one_usage_line(threads, device, message):
    config = SimpleNamespace(getoption=lambda name: {"--threads": threads, "--device": device}[name])
    with pytest.raises(pytest.UsageError) as e:
        plugin._check_process_options(config)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_a_bad_matrix_given_to_backdoor_run_is_one_line_before_anything_trains(tmp_path):
    """End to end through the command (one subprocess): a NaN learning rate stops the run at load, exit 4."""
    matrix = tmp_path / "m.yaml"
    matrix.write_text(textwrap.dedent("""\
        datasets: [digits]
        models: [cnn_small]
        attacks: {badnets: {}}
        defenses: [none]
        poison_ratios: [0.1]
        training: {epochs: 1, lr: .nan}
        """))
    done = subprocess.run([sys.executable, "-m", "backdoor.harness.cli", "run", str(matrix), "--cache-dir",
                           str(tmp_path / "c"), "--results-dir", str(tmp_path / "r"), "-q"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 4, done.stdout + done.stderr
    assert f"{matrix}: training.lr: nan is not allowed; expected a finite number > 0" in done.stdout + done.stderr
    assert not (tmp_path / "c").exists() and not (tmp_path / "r" / "m" / RECORDS).exists()


def _pytest_leader(wrapper_pid: int) -> int | None:
    """The pid of the wrapper's child (pytest, the leader of its own process group)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == wrapper_pid:
            return int(stat.parent.name)
    return None


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_backdoor_run_mid_grid_keeps_finished_records_and_ends_every_worker(tmp_path, signum):
    """End to end: `backdoor run -n 2` on a grid of twelve cases, SIGTERM (``kill``) or SIGINT (Ctrl-C) to the
    command once a record is written: it exits 128 + the signal with one line saying where the records are
    and that the leaderboard was re-rendered (no traceback, no teardown warning of xdist), the finished
    records stay and the leaderboard is rendered from them, the unfinished cases have none, and no process of
    pytest's group (controller, xdist workers) runs on."""
    matrix = tmp_path / "sig.yaml"
    matrix.write_text(textwrap.dedent("""\
        name: sig
        datasets: [digits]
        models: [cnn_small]
        attacks: {badnets: {}}
        defenses: [none]
        poison_ratios: [0.1]
        seeds: 12
        target: 0
        reference: false
        training: {epochs: 3, batch_size: 128, lr: 0.05}
        """))
    records = tmp_path / "r" / "sig" / RECORDS
    wrapper = subprocess.Popen([sys.executable, "-m", "backdoor.harness.cli", "run", str(matrix), "-n", "2", "--cache-dir",
                                str(tmp_path / "c"), "--results-dir", str(tmp_path / "r"), "-q"], cwd=tmp_path,
                               env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 600
        while not (records.exists() and records.read_text().strip()) and time.time() < deadline:
            assert wrapper.poll() is None, "the run ended before any record was written"
            time.sleep(0.2)
        leader = _pytest_leader(wrapper.pid)
        assert leader is not None and len(group_members(leader)) >= 3, "pytest and two workers run"
        wrapper.send_signal(signum)
        out, err = wrapper.communicate(timeout=120)
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
    assert wrapper.returncode == 128 + signum, out + err
    name = signal.Signals(signum).name
    stop = [line for line in err.splitlines() if line.startswith("backdoor run: stopped")]
    assert stop == [f"backdoor run: stopped by {name}; every process of the run ended; finished records kept in "
                    f"{records}; leaderboard re-rendered: {records.parent / 'leaderboard.md'}"], err
    for noise in ("Traceback", "KeyboardInterrupt", "PluggyTeardownRaisedWarning", "OSError", "Error"):
        assert noise not in out + err, out + err
    time.sleep(0.5)
    assert group_members(leader) == []
    kept = read_records(records.parent)
    assert 1 <= len(kept) < 12 and all(r["status"] == "ok" for r in kept)
    assert (records.parent / "leaderboard.md").exists()
