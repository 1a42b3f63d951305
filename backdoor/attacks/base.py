"""What every attack is: poisoned-index selection + an image transform + a label transform (after ffcv).

An attack produces (1) the poisoned training set with its poison mask, (2) the test-time trigger, applied to
raw uint8 images, vectorised over the whole tensor. Training-controllable attacks also return ``TrainHooks``
that the one trainer calls on every batch, and keep what they learn (generator, warp field) in
``state_tensors`` so it is cached with the backdoored model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch

from backdoor._checks import ParameterError
from backdoor._registry import Method
from backdoor.data import Dataset, Split
from backdoor.targets import ALL_TO_ALL, ALLOWED, attack_labels, is_all_to_all, target_problem, triggered_test_keep
from backdoor.training import TrainConfig, TrainHooks

KINDS = ("dirty_label", "clean_label", "training_controllable")


class InfeasibleRatioError(ValueError):
    """A clean-label ratio needs more target-class samples than the training set has."""


@dataclass(frozen=True)
class PoisonedSet:
    """A poisoned training set: images, (possibly relabelled) labels, and the mask of poisoned samples."""

    x: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor  # bool [N]: True where the sample carries the trigger and the attack's label
    effective_ratio: float

    @property
    def split(self) -> Split:
        return Split(self.x, self.y)


@dataclass
class AttackContext:
    """What ``Attack.prepare`` may use to build expensive trigger material (cached by spec).

    ``cached(kind, spec, build)`` returns ``(tensors, meta)`` from the artifact cache, building on a miss;
    ``clean_model()`` returns a clean model of the case's architecture trained the case's way (cached,
    the same model as the clean reference row); ``new_model()`` a fresh, untrained one (seeded).
    """

    dataset: Dataset
    device: torch.device
    seed: int
    training: TrainConfig
    model_name: str
    cached: Callable[[str, dict, Callable[[], tuple[dict, dict]]], tuple[dict, dict]]
    clean_model: Callable[[], torch.nn.Module]
    spec: dict = field(default_factory=dict)  # the dataset/model/training spec, for material cache keys
    new_model: Callable[[], torch.nn.Module] | None = None


def apply_to_float(x: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Run a float [0, 1] transform on uint8 images and round back to uint8."""
    return transform(x.float().div(255)).mul(255).round().clamp(0, 255).to(torch.uint8)


class Attack(Method):
    """Base class. Subclasses set ``name``, ``kind``, define ``__init__`` keyword parameters with paper
    defaults, and implement ``apply_trigger`` (and ``prepare`` / ``train_hooks`` where needed)."""

    name: ClassVar[str]
    kind: ClassVar[str]

    def __init__(self, target: int | str = 0, cap_ratio: bool = False):
        problem = target_problem(target)
        if problem is not None:
            raise ParameterError(self.name, "target", target, ALLOWED)
        if is_all_to_all(target) and self.kind == "clean_label":
            raise ParameterError(self.name, "target", target, "a class index: a clean-label attack keeps every "
                                 f"sample's own label, so it cannot relabel y to (y + 1) mod K ({ALL_TO_ALL})")
        self.target = target if is_all_to_all(target) else int(target)
        self.cap_ratio = bool(cap_ratio)
        self.num_classes: int | None = None  # the dataset's class count, set by the runner (all-to-all needs it)

    @property
    def all_to_all(self) -> bool:
        return is_all_to_all(self.target)

    def relabel(self, y: torch.Tensor) -> torch.Tensor:
        """The attack's label for samples whose true labels are ``y``: the target, or (y + 1) mod K."""
        return attack_labels(self.target, y, self.num_classes)

    def check_image_shape(self, shape: tuple[int, int, int]) -> None:
        """Raise ``ParameterError`` when a parameter does not fit images of ``shape`` (C, H, W); called by the
        matrix loader once the dataset is known. Default: every parameter fits."""

    # -- material -----------------------------------------------------------------------------------------
    def prepare(self, ctx: AttackContext) -> None:
        """Build or load expensive material (reference models, perturbations, encoders). Default: none."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors learned during training (training-controllable attacks), cached with the model."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            raise ValueError(f"{self.name} has no learned state, got {sorted(tensors)}")

    # -- poisoning ----------------------------------------------------------------------------------------
    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        """The test-time trigger on uint8 images [N, C, H, W]; returns uint8 of the same shape."""
        raise NotImplementedError

    def poison_images(self, x: torch.Tensor, train_index: torch.Tensor) -> torch.Tensor:
        """The training-time transform of the selected images; ``train_index`` are their indices in the
        training set (for per-sample material such as LC's perturbations). Default: the test trigger."""
        return self.apply_trigger(x)

    def candidate_pool(self, train: Split) -> torch.Tensor:
        """Indices the poisoned samples are drawn from: all samples (dirty label) or the target class."""
        if self.kind == "clean_label":
            return torch.nonzero(train.y == self.target).flatten()
        return torch.arange(len(train))

    def poison_count(self, train: Split, ratio: float) -> int:
        pool = self.candidate_pool(train)
        wanted = int(round(ratio * len(train)))
        if wanted > len(pool):
            largest = len(pool) / len(train)
            if not self.cap_ratio:
                raise InfeasibleRatioError(
                    f"{self.name}: poison ratio {ratio} needs {wanted} target-class (class {self.target}) "
                    f"samples but the training set has {len(pool)}; the largest feasible ratio is "
                    f"{largest:.4f} (set `cap_ratio: true` in the matrix to cap it)")
            wanted = len(pool)
        return wanted

    def select_poison_indices(self, train: Split, ratio: float, seed: int) -> torch.Tensor:
        """Seeded uniform draw of ``ratio * N`` indices from the candidate pool (sorted)."""
        pool = self.candidate_pool(train)
        count = self.poison_count(train, ratio)
        g = torch.Generator().manual_seed(seed)
        return pool[torch.randperm(len(pool), generator=g)[:count]].sort().values

    def poison_train(self, train: Split, ratio: float, seed: int) -> PoisonedSet:
        """Poison ``ratio`` of the training set: selected images get the trigger, dirty-label attacks also
        relabel them (to the target, or each to its next class for all-to-all)."""
        index = self.select_poison_indices(train, ratio, seed)
        x, y = train.x.clone(), train.y.clone()
        if len(index):
            x[index] = self.poison_images(train.x[index], index)
            if self.kind != "clean_label":
                y[index] = self.relabel(y[index])
        mask = torch.zeros(len(train), dtype=torch.bool)
        mask[index] = True
        return PoisonedSet(x, y, mask, effective_ratio=len(index) / len(train))

    def poison_test(self, test: Split) -> Split:
        """The poisoned test set with the trigger, keeping true labels: every non-target test sample (all-to-one),
        or the whole test set (all-to-all)."""
        keep = triggered_test_keep(self.target, test.y)
        return Split(self.apply_trigger(test.x[keep]), test.y[keep])

    def train_hooks(self, dataset: Dataset, ratio: float, seed: int) -> TrainHooks | None:
        """Per-batch poisoning for training-controllable attacks; None for data poisoning."""
        return None
