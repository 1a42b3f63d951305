"""pytest wiring of a checkout: the grid's plugin (``fixtures/plugin.py``, also installed as a pytest11 entry
point, so loading it here is a no-op once the package is installed)."""
pytest_plugins = ["fixtures.plugin"]
