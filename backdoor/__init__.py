"""backdoor-bench: a benchmark harness for backdoor learning on image classifiers."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("backdoor-bench")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"


def __getattr__(name: str):
    """``backdoor.load_model(folder)``: an exported model (``backdoor export``), imported on first use so that
    ``import backdoor`` stays light."""
    if name == "load_model":
        from backdoor.checkpoints.export import load_model

        return load_model
    raise AttributeError(f"module 'backdoor' has no attribute {name!r}")
