"""A grid case: one cell of a matrix (dataset, model, attack, ratio, seed, defense and their parameters), its id
and its group (the cases sharing one backdoored model). Everything that names a case imports this, not the
runner that runs it."""
from __future__ import annotations

from dataclasses import dataclass, field

from backdoor.checkpoints.user_models import UserModel
from backdoor.targets import Target
from backdoor.training import TrainConfig

CLEAN = "clean"  # the attack name of reference rows: a clean model trained the same way
DETECT = "det_"  # a detection case's defense label: det_<detector> (a detector may share a defense's name)


@dataclass(frozen=True)
class Case:
    """One cell of the grid. ``attack == "clean"`` is the clean reference row."""

    matrix: str
    dataset: str
    model: str
    attack: str
    defense: str
    ratio: float
    seed: int
    target: Target = 0  # a class index, or "all-to-all"
    dataset_params: dict = field(default_factory=dict)
    model_params: dict = field(default_factory=dict)
    attack_params: dict = field(default_factory=dict)
    defense_params: dict = field(default_factory=dict)
    training: TrainConfig = TrainConfig()
    defense_training: TrainConfig = TrainConfig(batch_size=256)
    clean_fraction: float = 0.05
    matrix_hash: str = ""
    user_model: UserModel | None = None  # pure defense: a model the user brings (``model`` is its architecture)
    detector: str = ""  # a detection case: the detector run on the case's model (``defense`` is det_<detector>)
    detector_params: dict = field(default_factory=dict)

    @property
    def case_id(self) -> str:
        if self.user_model is not None:  # <dataset>-<label>-<trigger: attack, images or notrigger>-s<seed>-<defense>
            return f"{self.dataset}-{self.user_model.label}-{self.attack}-s{self.seed}-{self.defense}"
        if self.attack == CLEAN:
            return f"{self.dataset}-{self.model}-{CLEAN}-s{self.seed}-{self.defense}"
        return f"{self.dataset}-{self.model}-{self.attack}-p{self.ratio:g}-s{self.seed}-{self.defense}"

    @property
    def group(self) -> str:
        """Cases sharing one backdoored model (all its defenses): one xdist group."""
        return case_group(self.case_id)


def case_group(case_id: str) -> str:
    """A case's group: its id without the defense, i.e. its backdoored model (``<dataset>-<model>-<attack>-p<ratio>
    -s<seed>``); a defense's case and the no-defense case of the same model share it."""
    return case_id.rsplit("-", 1)[0]


def detection_label(detector: str) -> str:
    """The ``defense`` field (and last case-id part) of a detection case."""
    return DETECT + detector


def case_defense(case_id: str) -> str:
    """A case's defense: the last part of its id."""
    return case_id.rsplit("-", 1)[-1]
