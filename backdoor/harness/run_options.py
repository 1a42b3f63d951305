"""The options a grid run takes both as ``backdoor run`` options and as the pytest plugin's options (the CLI
forwards them to pytest as given): written once here, added to either parser by ``add_run_options``."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class RunOption:
    flag: str
    default: object
    help: str
    type: type = str


RUN_OPTIONS = (
    RunOption("--results-dir", os.environ.get("BACKDOOR_RESULTS", "results"),
              "results root; records go to <root>/<matrix name>/; $BACKDOOR_RESULTS sets it (default: %(default)s)"),
    RunOption("--cache-dir", os.environ.get("BACKDOOR_CACHE", ".backdoor-cache"),
              "artifact cache shared by runs and workers; $BACKDOOR_CACHE sets it (default: %(default)s)"),
    RunOption("--device", "auto",
              "torch device, or 'auto': one GPU per xdist worker, else the CPU (default: %(default)s)"),
    RunOption("--threads", 1, "CPU threads per process; 1 gives the same numbers serial and under -n N (default: "
                              "%(default)s)", int),
    RunOption("--seeds", None, "override the matrix's seeds: a count n (seeds 0..n-1) or a list such as 0,1,2"),
)


def add_run_options(add_option: Callable[..., object]) -> None:
    """Add every run option through ``add_option`` (argparse's ``add_argument`` or pytest's ``addoption``)."""
    for option in RUN_OPTIONS:
        add_option(option.flag, default=option.default, type=option.type, help=option.help)
