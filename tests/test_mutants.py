"""Mutants: every attack, defense and detector declares its own, they apply to its file and compile; the mutation runner
(``backdoor mutate``) tells caught, survived and broken mutants apart on a throwaway repository; and the
do-nothing mutant of every method is caught by its tests (the CI mutation run)."""
import json
import subprocess

import pytest

from backdoor.harness import cli
from backdoor.attacks import ATTACKS
from backdoor.defenses import DEFENSES
from backdoor.detectors import DETECTORS
from backdoor.mutants import DO_NOTHING, Mutant, do_nothing, family, mutants_of, source_file
from backdoor.mutants import tests_of as declared_tests  # not collected as a test
from backdoor.harness.mutate import (CAUGHT, DETECTOR_PREFIX, ERROR, SURVIVED, Job, MutationResult, Target,
                                     checkout_files, exit_status, registered_methods, repo_root, run_job, run_jobs, select_jobs, target_of)

ROOT = repo_root()
METHODS = {(f"{DETECTOR_PREFIX}{m.name}" if family(m) == "detector" else m.name): m for m in registered_methods()}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_method_declares_mutants_that_apply_to_its_file_and_compile(name):
    method = METHODS[name]
    own = getattr(method, "mutants", ())
    assert len(own) >= 2, f"{name} declares {len(own)} mutant(s) of its own; at least two"
    names = [m.name for m in mutants_of(method)]
    assert len(set(names)) == len(names), f"{name}: mutant names repeat: {names}"
    source = source_file(method).read_text()
    for mutant in mutants_of(method):
        assert mutant.breaks.strip(), f"{name}/{mutant.name} does not say what it breaks"
        assert mutant.find == "" or source.count(mutant.find) == 1, f"{name}/{mutant.name}: find is not once"
        compile(mutant.apply(source, str(source_file(method))), str(source_file(method)), "exec")
    for entry in declared_tests(method):
        assert (ROOT / entry.split("::")[0]).is_file(), f"{name}: mutation test {entry} does not exist"


def test_the_default_selection_is_every_attack_defense_and_detector_but_none():
    assert "none" not in METHODS
    assert set(METHODS) == ((set(ATTACKS.names()) | set(DEFENSES.names())) - {"none"}
                            | {f"{DETECTOR_PREFIX}{n}" for n in DETECTORS.names()})
    assert registered_methods(["detector:nc"]) == [DETECTORS.get("nc")]
    assert registered_methods(["nc"]) == [DEFENSES.get("nc")]  # a shared name is the defense's
    jobs = select_jobs([METHODS["ft"], METHODS["fp"]], ROOT, do_nothing_only=True)
    assert [(j.target.method, j.mutant.name) for j in jobs] == [("ft", DO_NOTHING), ("fp", DO_NOTHING)]
    assert jobs[0].target == Target("ft", "defense", "backdoor/defenses/ft.py", "backdoor.defenses.ft",
                                    ("tests/test_ft.py",))
    with pytest.raises(ValueError, match="no-such-mutant"):
        select_jobs([METHODS["ft"]], ROOT, ["no-such-mutant"])


# -- the runner on a throwaway repository -----------------------------------------------------------------
TOY = '''
def double(x):
    return 2 * x
'''
TOY_TESTS = '''
from toy import double


def test_zero():
    assert double(0) == 0


def test_three():
    assert double(3) == 6
'''


@pytest.fixture(scope="module")
def toy_repo(tmp_path_factory):
    """A git repository with a module ``toy`` and its tests; pytest's plugins are not autoloaded in the children
    (the installed grid plugin is irrelevant here and slow to import)."""
    root = tmp_path_factory.mktemp("toy-repo")
    (root / "toy.py").write_text(TOY)
    (root / "test_toy.py").write_text(TOY_TESTS)
    (root / "test_empty.py").write_text("X = 1\n")
    (root / ".gitignore").write_text("ignored.txt\n")
    (root / "ignored.txt").write_text("not copied\n")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "add", "toy.py", ".gitignore"], cwd=root, check=True)  # tests untracked: copied too
    return root


@pytest.fixture
def no_autoload(monkeypatch):
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")


def toy_job(find, replace, tests=("test_toy.py",), name="m"):
    return Job(Target("toy", "attack", "toy.py", "toy", tests), Mutant(name, "breaks the toy", find, replace))


def test_checkout_files_are_tracked_and_untracked_but_not_ignored(toy_repo):
    assert checkout_files(toy_repo) == [".gitignore", "test_empty.py", "test_toy.py", "toy.py"]


def test_a_folder_outside_git_is_refused(tmp_path):
    with pytest.raises(RuntimeError, match="git checkout"):
        checkout_files(tmp_path)


def test_a_mutant_a_test_fails_on_is_caught_by_that_test(toy_repo, no_autoload):
    result = run_job(toy_job("\n    return 2 * x", "\n    return 3 * x"), toy_repo, timeout=120)
    assert (result.status, result.detail) == (CAUGHT, "test_toy.py::test_three")
    assert result.caught_by == "test_toy.py::test_three" and result.seconds > 0
    assert (toy_repo / "toy.py").read_text() == TOY  # only the copy was mutated


def test_a_mutant_that_changes_nothing_meaningful_survives(toy_repo, no_autoload):
    result = run_job(toy_job("\n    return 2 * x", "\n    return x * 2"), toy_repo, timeout=120)
    assert (result.status, result.caught_by) == (SURVIVED, SURVIVED)
    assert exit_status([result]) == 1


@pytest.mark.parametrize("find, replace, reason", [
    ("\n    return 4 * x", "\n    return 5 * x", "does not apply: mutant 'm': its find text occurs 0 times"),
    ("\n    return 2 * x", "\n    return 2 *", "does not compile"),
    ("", "import no_such_module_anywhere", "MUTANT-IMPORT-FAILED toy: ModuleNotFoundError"),
    ("", "raise RuntimeError('at import')", "MUTANT-IMPORT-FAILED toy: RuntimeError: at import"),
])
def test_a_mutant_that_does_not_apply_compile_or_import_is_an_error_not_caught(toy_repo, no_autoload, find, replace,
                                                                                reason):
    result = run_job(toy_job(find, replace), toy_repo, timeout=120)
    assert result.status == ERROR and reason in result.detail, result
    assert result.caught_by.startswith("ERROR: ")


def test_no_tests_missing_tests_and_timeouts_are_errors(toy_repo, no_autoload):
    harmless = ("\n    return 2 * x", "\n    return x + x")
    empty = run_job(toy_job(*harmless, tests=("test_empty.py",)), toy_repo, timeout=120)
    assert empty.status == ERROR and "pytest exit 5, no tests collected" in empty.detail
    missing = run_job(toy_job(*harmless, tests=("test_missing.py",)), toy_repo, timeout=120)
    assert missing.status == ERROR and "pytest exit 4" in missing.detail
    slow = run_job(toy_job("\n    return 2 * x", "\n    __import__('time').sleep(60)\n    return 2 * x"), toy_repo,
                   timeout=5)
    assert (slow.status, slow.detail) == (ERROR, "timed out after 5 s")
    assert slow.seconds < 30


def test_test_entries_run_in_the_declared_order_and_stop_at_the_first_failure(toy_repo, no_autoload):
    tests = ("test_toy.py::test_zero", "test_toy.py")
    zero = run_job(toy_job("\n    return 2 * x", "\n    return 2 * x + 1", tests), toy_repo, timeout=120)
    assert zero.detail == "test_toy.py::test_zero"
    later = run_job(toy_job("\n    return 2 * x", "\n    return 3 * x", tests), toy_repo, timeout=120)
    assert later.detail == "test_toy.py::test_three"


def test_jobs_run_concurrently_and_report_in_order(toy_repo, no_autoload):
    jobs = [toy_job("\n    return 2 * x", f"\n    return {k} * x", name=f"times-{k}") for k in (3, 2, 4)]
    seen = []
    results = run_jobs(jobs, toy_repo, workers=2, timeout=120, on_result=seen.append)
    assert [r.mutant for r in results] == ["times-3", "times-2", "times-4"]
    assert [r.status for r in results] == [CAUGHT, SURVIVED, CAUGHT]
    assert sorted(r.mutant for r in seen) == ["times-2", "times-3", "times-4"]


def test_cli_prints_the_table_writes_json_and_exits_1_unless_all_caught(monkeypatch, tmp_path, capsys):
    rows = [MutationResult("ft", "defense", DO_NOTHING, "does nothing", CAUGHT, "tests/test_ft.py::test_a", 1.0),
            MutationResult("ft", "defense", "zero-lr", "lr 0", SURVIVED, "", 2.0)]
    asked = {}

    def fake_run_jobs(jobs, root, *, workers, timeout, on_result):
        asked.update(jobs=[(j.target.method, j.mutant.name) for j in jobs], workers=workers, timeout=timeout)
        return rows

    monkeypatch.setattr("backdoor.harness.mutate.run_jobs", fake_run_jobs)
    out = tmp_path / "table.json"
    assert cli.main(["mutate", "ft", "--mutant", "zero-lr", "-n", "2", "--timeout", "60", "--out", str(out)]) == 1
    assert asked == {"jobs": [("ft", "zero-lr")], "workers": 2, "timeout": 60.0}
    table = capsys.readouterr().out
    assert "| ft | defense | zero-lr | lr 0 | SURVIVED | 2.0 |" in table
    assert "| tests/test_ft.py::test_a |" in table
    assert [r["caught_by"] for r in json.loads(out.read_text())] == ["tests/test_ft.py::test_a", SURVIVED]
    monkeypatch.setattr("backdoor.harness.mutate.run_jobs", lambda *a, **k: rows[:1])
    assert cli.main(["mutate", "ft", "--do-nothing-only"]) == 0
    assert cli.main(["mutate", "no-such-method"]) == 4
    assert cli.main(["mutate", "ft", "--mutant", "no-such-mutant"]) == 4


# -- the CI mutation run: every method's do-nothing mutant is caught by its tests ----------------------------
@pytest.mark.parametrize("name", sorted(METHODS))
def test_do_nothing_mutant_is_caught(name):
    method = METHODS[name]
    result = run_job(Job(target_of(method, ROOT), do_nothing(method)), ROOT, timeout=1800)
    assert result.status == CAUGHT, f"{name}'s do-nothing mutant: {result.caught_by}"
