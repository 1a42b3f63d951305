"""The attack x defense grid of a checkout: the packaged grid test (``fixtures/grid.py``), collected here so that
``pytest`` in the checkout runs it with the unit tests (``--matrix``, default matrices/smoke.yaml)."""
from fixtures.grid import test_case  # noqa: F401
