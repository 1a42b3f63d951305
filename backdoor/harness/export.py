"""The paper's pure-attack mode: export what an attack made, in open formats (``backdoor export``).

``export_case(results_dir, case_id, out_dir)`` rebuilds the case from its record (``case_from_record``: the
record holds every resolved parameter and budget, so no matrix file is needed), loads its artifacts through the
``Runner`` from the cache (an artifact that is not cached, e.g. after a cache was cleared or the code changed,
is rebuilt and cached, and the export says which), and writes to ``out_dir``:

- ``model.safetensors``: the backdoored model's state dict (a ``Classifier``: ``net.*`` plus the ``mean`` and
  ``std`` buffers of the normalisation it applies inside), and ``model.json``: architecture and its parameters,
  class count, dataset and its parameters, normalisation, attack and its parameters, target, poison ratio,
  effective ratio, seed, training budget, metrics (measured on the exported model, beside the record's),
  code version and provenance, and each file's SHA-256;
- ``poisoned_train.safetensors``: ``x`` uint8 [N, C, H, W], ``y`` int64 [N] (the labels trained on), ``mask``
  bool [N] (True: poisoned);
- ``poisoned_test.safetensors``: ``x``, ``y`` (true labels) and ``index`` (positions in the clean test set) of
  the poisoned test set ASR and R-Acc are measured on;
- ``trigger.safetensors`` (when the attack has trigger material): every artifact the attack's ``prepare``
  fetched from the cache (``<kind>.<name>``: LF's ``lf_perturbation.delta``, SSBA's ``ssba_encoder.encoder.*``
  and ``.decoder.*``, LC's ``lc_perturbed.images`` and ``.index``, ...) and its learned state
  (``state.<name>``: WaNet's ``state.field``, Input-aware's ``state.G.*`` and ``state.M.*``). BadNets, Blended
  and SIG have none: their trigger is a function of the parameters in ``model.json``.

A clean reference case exports its model only. ``load_model(out_dir)`` returns the model ready to use: a
``Classifier`` in eval mode that takes float RGB images in [0, 1], ``[N, C, H, W]``, and normalises inside.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

import backdoor
from backdoor.harness.cached_case import CaseNotFoundError, case_from_record, find_record
from backdoor._storage import file_sha256
from backdoor.harness.cache import ArtifactCache
from backdoor.data import DATASETS
from backdoor.checkpoints.export import FORMAT, FORMAT_VERSION, ExportError
from backdoor.models import MODELS
from backdoor.harness.case import CLEAN
from backdoor.harness.case_record import StageLog
from backdoor.harness.runner import Runner
from backdoor.harness.specs import code_version
from backdoor.harness.records import RECORDS
from backdoor.targets import triggered_test_keep

FILES = ("model.safetensors", "model.json", "poisoned_train.safetensors", "poisoned_test.safetensors",
         "trigger.safetensors")
HARNESS_KINDS = {"dataset", "clean_model", "poisoned", "backdoor_model", "defended_model"}  # not trigger material


class RecordingCache(ArtifactCache):
    """An ``ArtifactCache`` that remembers every artifact it served (kind, tensors, hit) in order."""

    def __init__(self, root, **kwargs):
        super().__init__(root, **kwargs)
        self.served: list[tuple[str, dict, bool]] = []

    def get_or_build(self, kind, spec, build):
        (tensors, meta), hit = super().get_or_build(kind, spec, build)
        self.served.append((kind, tensors, hit))
        return (tensors, meta), hit


@dataclass
class ExportReport:
    out_dir: Path
    case_id: str
    files: list[str]
    rebuilt: list[str] = field(default_factory=list)  # artifact kinds that were not cached and were rebuilt
    metrics: dict = field(default_factory=dict)
    record_metrics: dict = field(default_factory=dict)

    @property
    def metrics_match(self) -> bool:
        return all(self.metrics.get(k) == self.record_metrics.get(k) for k in ("c_acc", "asr", "r_acc"))


def locate_record(results_dir: str | Path, case_id: str) -> tuple[dict, Path]:
    """The record of ``case_id``: in ``results_dir/records.jsonl`` (a matrix's folder), else in exactly one
    ``results_dir/<matrix>/records.jsonl`` (the results root)."""
    results_dir = Path(results_dir)
    if (results_dir / RECORDS).is_file():
        return find_record(results_dir, case_id), results_dir
    folders = sorted(p.parent for p in results_dir.glob(f"*/{RECORDS}"))
    if not folders:
        raise CaseNotFoundError(f"no {RECORDS} in {results_dir} or its sub-folders: run a matrix first")
    found = []
    for folder in folders:
        try:
            found.append((find_record(folder, case_id), folder))
        except CaseNotFoundError:
            continue
    if not found:
        raise CaseNotFoundError(f"no case {case_id!r} in any {RECORDS} under {results_dir} "
                                f"({', '.join(f.name for f in folders)})")
    if len(found) > 1:
        raise CaseNotFoundError(f"case {case_id!r} is in several matrices under {results_dir} "
                                f"({', '.join(str(f) for _, f in found)}): name the matrix's folder")
    return found[0]


def _prepare_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir():
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in FILES)
        if foreign:
            raise ExportError(f"{out_dir} holds files that are not an export's ({', '.join(foreign[:5])}): "
                              "export into a new or empty folder")
        for name in FILES:  # a previous export is replaced whole, never mixed with this one
            (out_dir / name).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)


def export_case(results_dir: str | Path, case_id: str, out_dir: str | Path, cache_dir: str | Path | None = None,
                device: str = "cpu") -> ExportReport:
    """Write the case's backdoored model, poisoned sets and trigger material to ``out_dir`` (see the module)."""
    record, folder = locate_record(results_dir, case_id)
    if record.get("source") == "user":
        raise ExportError(f"{case_id} is a user-model case: its model is the checkpoint you gave "
                          f"({(record.get('user_model') or {}).get('checkpoint')}), nothing to export")
    case = case_from_record(record)
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir)
    cache = RecordingCache(cache_dir or os.environ.get("BACKDOOR_CACHE", ".backdoor-cache"))
    runner = Runner(cache, device)
    log_ = StageLog()
    data = runner.dataset(case, log_)
    attack, poisoned = None, None
    if case.attack == CLEAN:
        model = runner.clean_model(case, data, log_)
    else:
        attack = runner.attack(case, data, log_)
        model, poisoned = runner.backdoored_model(case, attack, data, log_)
    metrics = runner.evaluate(model, data, attack, case.target)
    source = record if case.defense == "none" else (record.get("undefended") or {})
    record_metrics = {k: source.get(k) for k in metrics}

    files = ["model.safetensors"]
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(out_dir / "model.safetensors"), metadata={"format": FORMAT, "case_id": case.case_id})
    material_info = {}
    if poisoned is not None:
        save_file({"x": poisoned.x.contiguous(), "y": poisoned.y.contiguous(), "mask": poisoned.mask.bool().contiguous()},
                  str(out_dir / "poisoned_train.safetensors"), metadata={"format": FORMAT})
        keep = torch.nonzero(triggered_test_keep(case.target, data.test.y)).flatten()
        triggered = attack.poison_test(data.test)
        save_file({"x": triggered.x.contiguous(), "y": triggered.y.contiguous(), "index": keep.contiguous()},
                  str(out_dir / "poisoned_test.safetensors"), metadata={"format": FORMAT})
        files += ["poisoned_train.safetensors", "poisoned_test.safetensors"]
        material = {}
        for kind, tensors, _ in cache.served:
            if kind not in HARNESS_KINDS:
                material.update({f"{kind}.{k}": v for k, v in tensors.items()})
        material.update({f"state.{k}": v for k, v in attack.state_tensors().items()})
        material_info = {"kinds": sorted({k.split(".", 1)[0] for k in material}), "tensors": len(material)}
        if material:
            save_file({k: v.detach().cpu().contiguous() for k, v in material.items()}, str(out_dir / "trigger.safetensors"),
                      metadata={"format": FORMAT})
            files.append("trigger.safetensors")
    rebuilt = sorted({kind for kind, _, hit in cache.served if not hit})

    codes = {"model_code": code_version(MODELS.get(case.model).__module__),
             "dataset_code": code_version(DATASETS.get(case.dataset).__module__)}
    if attack is not None:
        codes["attack_code"] = code_version(type(attack).__module__)
    provenance = record.get("provenance") or {}
    description = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "case_id": case.case_id, "matrix": case.matrix,
        "results": str(folder.resolve()),
        "architecture": {"name": case.model, "params": case.model_params, "num_classes": data.num_classes},
        "input": "float RGB images in [0, 1], [N, C, H, W]; the model normalises inside",
        "dataset": {"name": case.dataset, "params": case.dataset_params, "image_shape": list(data.image_shape),
                    "num_classes": data.num_classes, "train_size": len(data.train), "test_size": len(data.test)},
        "normalization": {"mean": list(data.mean), "std": list(data.std)},
        "attack": None if attack is None else {"name": case.attack, "kind": attack.kind, "params": attack.params()},
        "target": case.target, "poison_ratio": record.get("poison_ratio"),
        "effective_ratio": poisoned.effective_ratio if poisoned is not None else 0.0,
        "seed": case.seed, "training": case.training.to_dict(),
        "metrics": metrics, "record_metrics": record_metrics,
        "trigger_material": material_info or None,
        "rebuilt": rebuilt,
        "code_version": {"package_version": backdoor.__version__, "git_commit": provenance.get("git_commit"),
                         "torch_version": str(torch.__version__), **codes},
        "provenance": provenance,
        "files": {name: file_sha256(out_dir / name) for name in files},
    }
    (out_dir / "model.json").write_text(json.dumps(description, indent=2, sort_keys=True) + "\n")
    return ExportReport(out_dir, case.case_id, [*files, "model.json"], rebuilt, metrics, record_metrics)
