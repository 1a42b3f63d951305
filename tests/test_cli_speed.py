"""``backdoor --help`` and ``backdoor list`` answer at once: they import no torch, and ``list`` (read from the
method files' source) says what the imported registries say, each description whole."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backdoor.harness.catalog import catalog, first_paragraph
from backdoor.attacks import ATTACKS
from backdoor.data import DATASETS
from backdoor.defenses import DEFENSES
from backdoor.detectors import DETECTORS
from backdoor.models import MODELS

ROOT = Path(__file__).resolve().parent.parent
PROBE = """
import sys
from backdoor.harness.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("TORCH-IMPORTED" if "torch" in sys.modules else "NO-TORCH", file=sys.stderr)
"""


def run_cli(*argv: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=120)
    return done, time.perf_counter() - started


@pytest.mark.parametrize("argv", [["--help"], ["list"], ["run", "--help"], ["analyze", "--help"]])
def test_help_and_list_import_no_torch(argv):
    done, seconds = run_cli(*argv)
    assert done.stdout.strip(), done.stderr
    assert "NO-TORCH" in done.stderr, f"backdoor {' '.join(argv)} imported torch"
    assert seconds < 10  # under 1 s unloaded; the bound only catches a torch import on a busy machine


def test_a_tools_own_options_are_still_offered():
    done, _ = run_cli("analyze", "tsne", "--help")
    assert "--perplexity" in done.stdout


@pytest.mark.parametrize("family, registry", [("data", DATASETS), ("models", MODELS), ("attacks", ATTACKS),
                                              ("defenses", DEFENSES), ("detectors", DETECTORS)])
def test_the_catalog_is_the_registry(family, registry):
    entries = catalog(family)
    assert [e.name for e in entries] == registry.names()
    for entry in entries:
        factory = registry.get(entry.name)
        assert entry.kind == getattr(factory, "kind", getattr(factory, "task", None))
        assert entry.title == getattr(factory, "title", None)
        doc = factory.__doc__ or sys.modules[factory.__module__].__doc__
        assert entry.summary == first_paragraph(doc)


def test_list_shows_whole_descriptions():
    done, _ = run_cli("list")
    ac = next(line for line in done.stdout.splitlines() if line.strip().startswith("ac "))
    assert ac.rstrip().endswith("retrained from scratch.")
    lc = next(line for line in done.stdout.splitlines() if line.strip().startswith("lc "))
    assert "(LC) [clean label]" in lc  # the title tables use, where the description does not begin with it
    for entry in catalog("attacks") + catalog("defenses"):
        assert entry.summary.endswith("."), entry
