"""backdoor-bench: a benchmark harness for backdoor learning on image classifiers."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("backdoor-bench")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"
