"""A case's record and its provenance: the fields the runner fills in before evaluation, the figures and
warnings it adds (clean-label target share, thin inputs, benign condition, a collapsed model), and where and
with what the case ran (package, git commit, torch, CPU kernels, device, time)."""
from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import time
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch

import backdoor
from backdoor.attacks import Attack, PoisonedSet
from backdoor.data import Dataset
from backdoor.harness.case import Case

NUMERICS_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")


def numerics_env() -> dict[str, str]:
    """The environment variables that select PyTorch's, oneDNN's and MKL's CPU kernels (and so the last bits)."""
    return {name: os.environ[name] for name in NUMERICS_VARIABLES if name in os.environ}


def target_class_poisoning(poisoned: PoisonedSet, data: Dataset, target: int) -> dict:
    """A clean-label attack poisons only target-class images: the share of that class it poisoned, and a warning
    past one half (at ratio 0.1 on 10 balanced classes it is nearly all of it: the model then barely sees a clean
    target image, and ``cap_ratio`` may have poisoned a smaller class entirely)."""
    own = int((data.train.y == target).sum())
    share = float(poisoned.mask.sum()) / own if own else None
    out = {"target_poisoned_share": share}
    if share is not None and share > 0.5:
        out["warnings"] = [f"the clean-label attack poisoned {100 * share:.0f}% of the target class's training images"]
    return out


def thin_inputs(case: Case, data: Dataset, poisoned: PoisonedSet | None) -> list[str]:
    """Warnings for inputs that run but can hardly mean anything: a ratio that poisons no training sample, a
    defender's clean subset smaller than the class count, a target class absent from the test split."""
    out = []
    if poisoned is not None and poisoned.mask is not None and not bool(poisoned.mask.any()):
        out.append(f"the poison ratio {case.ratio:g} poisons no training sample")
    if case.defense != "none":
        n = max(1, int(round(case.clean_fraction * len(data.train))))
        if n < data.num_classes:
            out.append(f"clean_fraction {case.clean_fraction:g} gives the defender {n} clean image(s), fewer than "
                       f"the {data.num_classes} classes")
    if isinstance(case.target, int) and not bool((data.test.y == case.target).any()):
        out.append(f"the target class {case.target} has no test image: target_acc is null")
    return out


def benign_figures(record: dict) -> dict:
    """A defense on the clean reference model (the benign condition): ``c_acc_cost``, the clean accuracy it
    loses; ``flagged`` and ``fpr``, the training samples a data-side defense flags when none is poisoned (all of
    them false positives); ``flagged_classes``, the classes a detector (NC) flags as backdoored."""
    detection = record.get("detection") or {}
    info = record.get("defense_info") or {}
    return {"c_acc_cost": record["undefended"]["c_acc"] - record["c_acc"],
            "flagged": detection.get("flagged"), "fpr": detection.get("fpr"),
            "flagged_classes": info.get("flagged_classes") if "detected" in info else None}


def collapsed(clean_pred: torch.Tensor, labels: torch.Tensor) -> dict:
    """``{"collapsed_to": k}`` when a model predicts one class k for every clean test image of a test set holding
    several classes (a broken model: its ASR is 1 for k's trigger and means nothing; the leaderboard marks it),
    else nothing (records of working models are unchanged)."""
    if len(clean_pred) and len(labels.unique()) > 1 and len(clean_pred.unique()) == 1:
        return {"collapsed_to": int(clean_pred[0])}
    return {}


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


class StageLog:
    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.hits: dict[str, bool] = {}
        self.builds: dict[str, dict] = {}  # per cached stage: how its artifact was built (cache's build_info)
        self.notes: dict = {}  # figures a stage adds to the record

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)


def case_record(case: Case, attack: Attack | None, poisoned: PoisonedSet | None, result: dict, log_: StageLog,
                provenance: dict) -> dict:
    """A case's record before evaluation (its metrics are null until measured): what ran, with which parameters,
    what the defense said, what the cache served and built, and the provenance."""
    return {
        "case_id": case.case_id,
        "matrix": case.matrix,
        "dataset": case.dataset, "dataset_params": case.dataset_params,
        "model": case.model, "model_params": case.model_params,
        "attack": case.attack, "attack_kind": attack.kind if attack else None,
        "attack_params": attack.params() if attack else {},
        "defense": case.defense, "defense_kind": result["defense_kind"],
        "defense_params": result["defense_params"],
        "poison_ratio": case.ratio if attack else 0.0,
        "effective_ratio": poisoned.effective_ratio if poisoned is not None else (0.0 if not attack else None),
        "seed": case.seed, "target": case.target,
        "training": case.training.to_dict(), "defense_training": case.defense_training.to_dict(),
        "clean_fraction": case.clean_fraction,
        "status": "not_applicable" if "not_applicable" in result else "ok",
        "reason": result.get("not_applicable"),
        "c_acc": None, "asr": None, "r_acc": None,
        "detection": result.get("detection"),
        "defense_info": result.get("info", {}),
        "cache_hits": log_.hits,
        "build_seconds": {stage: build["seconds"] for stage, build in log_.builds.items()},
        "build_provenance": {stage: {**build["provenance"], "utc_time": build["utc_time"], "host": build["host"]}
                             for stage, build in log_.builds.items()},
        "provenance": provenance,
    }


def detection_fields(case: Case, result: dict, log_: StageLog) -> dict:
    """A detection case's own fields: the detector, its task and parameters, what it said (``detection``, scored
    against the truth), its runtime (``detection_seconds``: the build time kept with the cached detection, so a
    rerun that loads it still knows), and the figures the regression bands check (``det_auroc``, ``det_tpr``,
    ``det_fpr``, ``det_score``)."""
    detection = result.get("detection") or {}
    build = log_.builds.get("detection")
    return {"detector": case.detector, "task": result["task"], "detector_params": result["detector_params"],
            "defense_params": {}, "detection": detection or None, "detector_info": result.get("info", {}),
            "detection_seconds": build["seconds"] if build else log_.seconds.get("detection"),
            "det_auroc": detection.get("auroc"), "det_tpr": detection.get("tpr"), "det_fpr": detection.get("fpr"),
            "det_score": detection.get("score"),
            "c_acc": detection.get("c_acc_kept"), "asr": detection.get("residual_asr"),
            "r_acc": detection.get("r_acc_kept")}


def user_model_fields(case: Case, poisoned: PoisonedSet | None, log_: StageLog) -> dict:
    """A user-model case's own fields: ``model`` is the user's label (``arch`` its architecture), ``source``
    is ``user``, ``user_model`` says what was read (checkpoint, digest, trigger, training set)."""
    um = case.user_model
    return {"model": um.label, "arch": case.model, "source": "user", "user_model": um.describe(),
            "poison_ratio": 0.0,
            "effective_ratio": poisoned.effective_ratio if poisoned is not None else None, **log_.notes}


@lru_cache(maxsize=None)
def static_provenance() -> dict:
    """What stays the same for every case of this process: versions, git commit, CPU kernels."""
    return {"package_version": backdoor.__version__, "git_commit": git_commit(),
            "torch_version": str(torch.__version__), "python": platform.python_version(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "numerics_env": numerics_env()}


def device_label(device: torch.device) -> str:
    """The device, with the GPU's name on CUDA."""
    label = str(device)
    if device.type == "cuda":
        label += f" ({torch.cuda.get_device_name(device)})"
    return label


def case_provenance(case: Case, device: str) -> dict:
    """Where, when and with what ``case`` ran on ``device`` (its label)."""
    return {**static_provenance(), "matrix_hash": case.matrix_hash, "device": device,
            "seed": case.seed, "utc_time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
