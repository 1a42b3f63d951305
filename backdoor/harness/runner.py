"""Run one grid case end to end: dataset -> poisoned set -> backdoored model -> defense -> metrics.

Each stage is an artifact in the cache keyed by its full spec, so a rerun, another selection or another
worker loads it instead of training. ``run_case`` returns the record that the harness stores.
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from functools import cached_property

import torch

from backdoor.attacks import Attack, AttackContext, PoisonedSet, create_attack
from backdoor._storage import module_to_tensors, tensors_with_prefix
from backdoor.harness.cache import ArtifactCache
from backdoor.data import Dataset, Split, dataset_from_tensors, dataset_to_tensors, load_dataset
from backdoor.defenses import DefenseInputs, NotApplicable, create_defense
from backdoor.defenses.base import FitOnDevice, ModelRecipe
from backdoor.detectors import create_detector
from backdoor.metrics import (backdoor_metrics, detection_metrics, input_detection_metrics, roc_points,
                              target_class_figures)
from backdoor.models import Classifier
from backdoor.progress import log
from backdoor.targets import Target, attack_labels, target_problem
from backdoor.training import TrainConfig, fit, predict
from backdoor.checkpoints import user_models
from backdoor.harness.case import CLEAN, Case
from backdoor.harness.case_record import (StageLog, benign_figures, case_provenance, case_record, collapsed,
                                          detection_fields, device_label, static_provenance, target_class_poisoning,
                                          thin_inputs, user_model_fields)
from backdoor.harness.specs import (attack_spec, backdoor_spec, code_version, dataset_spec, defense_spec, detector_spec,
                                    model_spec)


def derive_seed(seed: int, stage: str) -> int:
    return int(hashlib.sha256(f"{seed}:{stage}".encode()).hexdigest()[:8], 16)


def backdoor_model_seed(case: Case) -> int:
    """The seed a case's backdoored model trains with (the grid's, and a study's retraining of it)."""
    return derive_seed(case.seed, "backdoor-model")


class Runner:
    """Builds (or loads) each artifact of a case through the cache, on one device."""

    def __init__(self, cache: ArtifactCache, device: torch.device | str = "cpu"):
        self.cache = cache
        self.device = torch.device(device)
        self.cache.provenance = {**static_provenance(), "device": self._device_label}  # kept with each build

    # -- stages -------------------------------------------------------------------------------------------
    def _cached(self, log_: StageLog, stage: str, kind: str, spec: dict, build):
        with log_.stage(stage):
            artifact, hit = self.cache.get_or_build(kind, spec, build)
        log_.hits[stage] = hit
        if self.cache.build_info(kind, spec):
            log_.builds[stage] = self.cache.build_info(kind, spec)
        return artifact

    def dataset(self, case: Case, log_: StageLog) -> Dataset:
        build = lambda: dataset_to_tensors(load_dataset(case.dataset, **case.dataset_params))  # noqa: E731
        tensors, meta = self._cached(log_, "dataset", "dataset", dataset_spec(case), build)
        return dataset_from_tensors(tensors, meta)

    @staticmethod
    def model_recipe(case: Case, data: Dataset) -> ModelRecipe:
        """The case's architecture as plain values: its model and parameters, the dataset's class count, the
        normalisation (the dataset's, or a user model's own) and the init seed."""
        mean, std = (data.mean, data.std) if case.user_model is None else user_models.normalization(case.user_model, data)
        return ModelRecipe(case.model, data.num_classes, mean, std, derive_seed(case.seed, "init"), case.model_params)

    def new_model(self, case: Case, data: Dataset) -> Classifier:
        return self.model_recipe(case, data)()

    def train_config(self, case: Case, data: Dataset) -> TrainConfig:
        return case.training.with_(hflip=case.training.hflip and data.hflip)

    def _load_model(self, case: Case, data: Dataset, tensors: dict) -> Classifier:
        model = self.new_model(case, data)
        model.load_state_dict(tensors_with_prefix(tensors, "model."))
        return model.to(self.device).eval()

    def clean_model(self, case: Case, data: Dataset, log_: StageLog) -> Classifier:
        def build():
            model = self.new_model(case, data)
            history = fit(model, data.train, self.train_config(case, data), device=self.device,
                          seed=derive_seed(case.seed, "clean-model"), desc=f"{case.model} clean")
            return module_to_tensors(model), {"history": history}

        tensors, _ = self._cached(log_, "clean_model", "clean_model", {**model_spec(case), "seed": case.seed},
                                  build)
        return self._load_model(case, data, tensors)

    def attack(self, case: Case, data: Dataset, log_: StageLog) -> Attack:
        problem = target_problem(case.target, data.num_classes, case.dataset)
        if problem is not None:
            raise ValueError(f"target: {problem}")
        attack = create_attack(case.attack, target=case.target, **case.attack_params)
        attack.num_classes = data.num_classes
        ctx = AttackContext(
            dataset=data, device=self.device, seed=derive_seed(case.seed, "attack-material"),
            training=self.train_config(case, data), model_name=case.model,
            cached=lambda kind, spec, build: self.cache.get_or_build(kind, spec, build)[0],
            clean_model=lambda: self.clean_model(case, data, StageLog()),
            new_model=lambda: self.new_model(case, data),
            spec={**model_spec(case), "attack_code": code_version(type(attack).__module__)},
        )
        with log_.stage("attack_material"):
            attack.prepare(ctx)
        return attack

    def poisoned(self, case: Case, attack: Attack, data: Dataset, log_: StageLog, spec: dict) -> PoisonedSet:
        def build():
            p = attack.poison_train(data.train, case.ratio, derive_seed(case.seed, "poison"))
            return {"x": p.x, "y": p.y, "mask": p.mask}, {"effective_ratio": p.effective_ratio}

        tensors, meta = self._cached(log_, "poison", "poisoned", spec, build)
        return PoisonedSet(tensors["x"], tensors["y"], tensors["mask"].bool(), meta["effective_ratio"])

    def backdoored_model(self, case: Case, attack: Attack, data: Dataset, log_: StageLog) -> tuple[Classifier, PoisonedSet]:
        spec = backdoor_spec(case, attack)
        config = self.train_config(case, data)
        seed = backdoor_model_seed(case)
        if attack.kind == "training_controllable":
            def build():
                model = self.new_model(case, data)
                hooks = attack.train_hooks(data, case.ratio, derive_seed(case.seed, "poison"))
                history = fit(model, data.train, config, device=self.device, seed=seed, hooks=hooks,
                              desc=f"{case.attack} train")
                state = {f"attack.{k}": v for k, v in attack.state_tensors().items()}
                return {**module_to_tensors(model), **state}, {"history": history}

            tensors, _ = self._cached(log_, "backdoor_model", "backdoor_model", spec, build)
            attack.load_state_tensors(tensors_with_prefix(tensors, "attack."))
            # The fixed poisoned set (for data-side defenses) needs the trained trigger: keyed by the model.
            poisoned = self.poisoned(case, attack, data, log_, {"backdoor_model": spec})
            return self._load_model(case, data, tensors), poisoned

        poisoned = self.poisoned(case, attack, data, log_, attack_spec(case, attack))

        def build():
            model = self.new_model(case, data)
            history = fit(model, poisoned.split, config, device=self.device, seed=seed, desc=f"{case.attack} train")
            return module_to_tensors(model), {"history": history}

        tensors, _ = self._cached(log_, "backdoor_model", "backdoor_model", spec, build)
        return self._load_model(case, data, tensors), poisoned

    def user_inputs(self, case: Case, data: Dataset, log_: StageLog) -> tuple[Classifier, PoisonedSet | None,
                                                                           Split | None, dict]:
        """Pure defense: the user's model (weights from the checkpoint, nothing run from it), poisoned training set
        (mask None when not given), triggered test images (when the trigger is images) and the defenses' upstream
        spec."""
        um = case.user_model
        with log_.stage("user_model"):
            model = self.new_model(case, data)
            user_models.load_weights(um, model)
            model = model.to(self.device).eval()
            poisoned = None if um.poisoned_train is None else user_models.poisoned_train(um, data)
            triggered = None
            if um.trigger is not None and um.trigger[0] != "attack":
                triggered, dropped = user_models.triggered_test(um, data)
                log_.notes["trigger_target_images_dropped"] = dropped
        return model, poisoned, triggered, user_models.upstream_spec(um, dataset_spec(case), case.model_params)

    def defender_clean_subset(self, case: Case, data: Dataset) -> Split:
        g = torch.Generator().manual_seed(derive_seed(case.seed, "defender-clean"))
        n = max(1, int(round(case.clean_fraction * len(data.train))))
        return data.train.subset(torch.randperm(len(data.train), generator=g)[:n].sort().values)

    def defense_inputs(self, case: Case, data: Dataset, model: Classifier,
                       poisoned_train: Split | None) -> DefenseInputs:
        """What a defense of ``case`` is given: a private copy of ``model``, the defender's clean subset, the
        budgets, ``new_model`` and ``fit`` as plain-value objects (``ModelRecipe``, ``FitOnDevice``) and, for a
        data-side defense, ``poisoned_train``. Nothing in it refers to the case, its test sets, the poison mask
        or this runner (tests/test_threat_model.py walks it)."""
        private = self.new_model(case, data).to(self.device).eval()
        private.load_state_dict(model.state_dict())
        return DefenseInputs(
            model=private, clean=self.defender_clean_subset(case, data), num_classes=data.num_classes,
            device=self.device, seed=derive_seed(case.seed, "defense"),
            training=case.defense_training.with_(hflip=case.defense_training.hflip and data.hflip),
            retraining=self.train_config(case, data), new_model=self.model_recipe(case, data),
            fit=FitOnDevice(self.device), poisoned_train=poisoned_train,
        )

    def defend(self, case: Case, model: Classifier, data: Dataset, poisoned: PoisonedSet | None, upstream: dict,
               log_: StageLog) -> tuple[Classifier, dict]:
        defense = create_defense(case.defense, **case.defense_params)
        if defense.kind == "none":
            return model, {"defense_params": defense.params(), "defense_kind": "none", "info": {}}
        if defense.kind == "data_side" and poisoned is None:  # a user model given without its training set
            return None, {"defense_params": defense.params(), "defense_kind": defense.kind, "info": {},
                          "not_applicable": "a data-side defense needs the poisoned training set: give the user "
                                            "model's poisoned_train"}
        poisoned_train = poisoned.split if defense.kind == "data_side" and poisoned is not None else None

        def build():
            inputs = self.defense_inputs(case, data, model, poisoned_train)
            try:
                outcome = defense.run(inputs)
            except NotApplicable as reason:
                return {}, {"not_applicable": str(reason)}
            tensors = module_to_tensors(outcome.model)
            if outcome.flagged is not None:
                tensors["flagged"] = outcome.flagged.bool().cpu()
            if outcome.scores is not None:
                tensors["scores"] = outcome.scores.float().cpu()
            return tensors, {"info": outcome.info}

        spec = defense_spec(case, upstream, defense)
        tensors, meta = self._cached(log_, "defense", "defended_model", spec, build)
        result = {"defense_params": defense.params(), "defense_kind": defense.kind, "info": meta.get("info", {})}
        if "not_applicable" in meta:
            return None, {**result, "not_applicable": meta["not_applicable"]}
        if "flagged" in tensors and poisoned is not None and poisoned.mask is not None:
            result["detection"] = detection_metrics(tensors["flagged"], poisoned.mask, tensors.get("scores"))
        return self._load_model(case, data, tensors), result

    # -- detection -----------------------------------------------------------------------------------------
    def detector_inputs(self, case: Case, data: Dataset, model: Classifier, poisoned_train: Split | None,
                        data_free: bool) -> DefenseInputs:
        """What a detector is given: a defense's inputs (``defense_inputs``: no test set, no mask, no target); a
        data-free detector gets an empty clean set (which keeps the image shape)."""
        inputs = self.defense_inputs(case, data, model, poisoned_train)
        if data_free:
            inputs = dataclasses.replace(inputs, clean=inputs.clean.subset(torch.zeros(0, dtype=torch.long)))
        return inputs

    def detect(self, case: Case, model: Classifier, data: Dataset, attack: Attack | None,
               poisoned: PoisonedSet | None, upstream: dict, log_: StageLog) -> dict:
        """Run the case's detector on ``model`` (through the cache) and score what it said against the truth: the
        triggered test set (input-level), the poison mask (data-side), whether the model is backdoored
        (model-level). Returns the record's detection fields."""
        detector = create_detector(case.detector, **case.detector_params)
        triggered = attack.poison_test(data.test) if detector.task == "input" and attack is not None else None
        if detector.task == "input" and triggered is None:
            return {"detector_params": detector.params(), "task": detector.task,
                    "not_applicable": "an input-level detector needs triggered inputs: the clean model has none"}
        poisoned_train = poisoned.split if detector.task == "data" else None

        def build():
            inputs = self.detector_inputs(case, data, model, poisoned_train, detector.data_free)
            try:
                if detector.task == "input":
                    screen = detector.calibrate(inputs)
                    tensors = {"clean_scores": screen.scores(data.test.x), "triggered_scores": screen.scores(triggered.x)}
                    return ({k: v.float().cpu() for k, v in tensors.items()},
                            {"threshold": float(screen.threshold), "info": getattr(screen, "info", {})})
                if detector.task == "data":
                    found = detector.detect(inputs)
                    return {"flagged": found.flagged.bool().cpu(), "scores": found.scores.float().cpu()}, {"info": found.info}
                verdict = detector.inspect(inputs)
                return {}, {"score": float(verdict.score), "flagged": bool(verdict.flagged), "info": verdict.info}
            except NotApplicable as reason:
                return {}, {"not_applicable": str(reason)}

        spec = detector_spec(case, upstream, detector)
        tensors, meta = self._cached(log_, "detection", "detection", spec, build)
        result = {"detector_params": detector.params(), "task": detector.task, "info": meta.get("info", {})}
        if "not_applicable" in meta:
            return {**result, "not_applicable": meta["not_applicable"]}
        if detector.task == "input":
            result["detection"] = self._score_screen(model, data, attack, case.target, triggered, tensors, meta)
        elif detector.task == "data":
            mask = poisoned.mask
            result["detection"] = {**detection_metrics(tensors["flagged"], mask, tensors["scores"]),
                                   "roc": roc_points(tensors["scores"][mask], tensors["scores"][~mask])}
        else:
            result["detection"] = {"score": meta["score"], "flagged": meta["flagged"], "backdoored": attack is not None}
        return result

    def _score_screen(self, model: Classifier, data: Dataset, attack: Attack, target: Target, triggered: Split,
                      tensors: dict, meta: dict) -> dict:
        clean, trig = tensors["clean_scores"], tensors["triggered_scores"]
        figures = input_detection_metrics(
            clean, trig, meta["threshold"], clean_pred=predict(model, data.test.x, device=self.device),
            clean_y=data.test.y, triggered_pred=predict(model, triggered.x, device=self.device), triggered_y=triggered.y,
            attack_label=attack_labels(target, triggered.y, data.num_classes))
        return {**figures, "roc": roc_points(trig, clean)}

    def run_detection(self, case: Case) -> dict:
        """A detection case: the case's model (the clean reference or the attack's backdoored model, both cached
        with the grid's other cases) inspected by its detector."""
        log_ = StageLog()
        started = time.perf_counter()
        log(f"[{case.case_id}] start")
        data = self.dataset(case, log_)
        attack, poisoned = None, None
        if case.attack == CLEAN:
            model = self.clean_model(case, data, log_)
            upstream = {"clean_model": {**model_spec(case), "seed": case.seed}}
            poisoned = PoisonedSet(data.train.x, data.train.y, torch.zeros(len(data.train), dtype=torch.bool), 0.0)
        else:
            attack = self.attack(case, data, log_)
            model, poisoned = self.backdoored_model(case, attack, data, log_)
            upstream = backdoor_spec(case, attack)
        result = self.detect(case, model, data, attack, poisoned, upstream, log_)
        record = {**case_record(case, attack, poisoned if attack is not None else None,
                                {"defense_kind": "detector", "defense_params": {}, **result}, log_,
                                self.provenance(case)),
                  **detection_fields(case, result, log_)}
        with log_.stage("evaluate"):
            record["inspected"] = self.evaluate(model, data, attack, case.target)
        if record["task"] == "input":  # the screened model's C-Acc / ASR / R-Acc beside the model's own
            record["undefended"] = {m: record["inspected"].get(m) for m in ("c_acc", "asr", "r_acc")}
        record["stage_seconds"] = dict(log_.seconds)
        record["total_seconds"] = round(time.perf_counter() - started, 3)
        log(f"[{case.case_id}] {record['task']}-level detection: "
            + ", ".join(f"{k} {record['detection'].get(k)}" for k in ("auroc", "tpr", "fpr", "score", "flagged")
                        if k in (record.get("detection") or {})))
        return record

    # -- the whole case ------------------------------------------------------------------------------------
    def run(self, case: Case) -> dict:
        if case.detector:
            return self.run_detection(case)
        log_ = StageLog()
        started = time.perf_counter()
        log(f"[{case.case_id}] start")
        data = self.dataset(case, log_)
        attack, poisoned, triggered = None, None, None
        if case.user_model is not None:
            model, poisoned, triggered, upstream = self.user_inputs(case, data, log_)
            if case.user_model.trigger is not None and case.user_model.trigger[0] == "attack":
                attack = self.attack(case, data, log_)
        elif case.attack == CLEAN:
            model = self.clean_model(case, data, log_)
            upstream = {"clean_model": {**model_spec(case), "seed": case.seed}}
            if case.defense != "none":  # the benign condition: the clean training set, nothing poisoned
                poisoned = PoisonedSet(data.train.x, data.train.y, torch.zeros(len(data.train), dtype=torch.bool), 0.0)
        else:
            attack = self.attack(case, data, log_)
            model, poisoned = self.backdoored_model(case, attack, data, log_)
            upstream = backdoor_spec(case, attack)
        defended, result = self.defend(case, model, data, poisoned, upstream, log_)
        record = case_record(case, attack, poisoned, result, log_, self.provenance(case))
        if case.user_model is not None:
            record.update(user_model_fields(case, poisoned, log_))
        elif attack is not None and attack.kind == "clean_label" and poisoned is not None:
            record.update(target_class_poisoning(poisoned, data, case.target))
        budget_warnings = thin_inputs(case, data, poisoned if attack is not None else None)
        if budget_warnings:
            record["warnings"] = record.get("warnings", []) + budget_warnings
        for warning in record.get("warnings", []):
            log(f"[{case.case_id}] warning: {warning}")
        if defended is not None:
            with log_.stage("evaluate"):
                record.update(self.evaluate(defended, data, attack, case.target, triggered))
                if defended is not model:  # the same metrics before the defense: what the defense changed
                    record["undefended"] = self.evaluate(model, data, attack, case.target, triggered)
        if case.attack == CLEAN and case.defense != "none" and "undefended" in record:
            record["benign"] = benign_figures(record)
        record["stage_seconds"] = dict(log_.seconds)
        record["total_seconds"] = round(time.perf_counter() - started, 3)
        log(f"[{case.case_id}] c_acc={record['c_acc']} asr={record['asr']} r_acc={record['r_acc']}")
        return record

    def evaluate(self, model: Classifier, data: Dataset, attack: Attack | None, target: Target,
                 poisoned_test: Split | None = None) -> dict:
        """C-Acc on the clean test set; with a trigger (``attack``, or a given ``poisoned_test`` of triggered
        images with their true labels: the non-target ones, or all for all-to-all) ASR, R-Acc and the
        target-class figures."""
        clean_pred = predict(model, data.test.x, device=self.device)
        mark = collapsed(clean_pred, data.test.y)
        if attack is None and poisoned_test is None:
            return {"c_acc": float((clean_pred == data.test.y).float().mean()), "asr": None, "r_acc": None, **mark}
        if poisoned_test is None:
            poisoned_test = attack.poison_test(data.test)
        m = backdoor_metrics(clean_pred, data.test.y, predict(model, poisoned_test.x, device=self.device),
                             poisoned_test.y, attack_labels(target, poisoned_test.y, data.num_classes))
        return {**m.to_dict(), **target_class_figures(clean_pred, data.test.y, target, data.num_classes), **mark}

    @cached_property
    def _device_label(self) -> str:
        return device_label(self.device)

    def provenance(self, case: Case) -> dict:
        return case_provenance(case, self._device_label)
