"""What an analysis tool works on: a finished case's cached artifacts (dataset, trigger, backdoored and defended
model, poisoned training set). The harness loads them from the cache (``backdoor.harness.cached_case``); the
tools only read them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from backdoor.attacks import Attack
from backdoor.data import Dataset, Split
from backdoor.models import Classifier
from backdoor.targets import Target


class CaseName(Protocol):
    """What the tools read of a case: its id (for titles and file names) and its target."""

    case_id: str
    target: Target


@dataclass
class CaseArtifacts:
    """A case's cached artifacts: data, attack (trigger), backdoored model, defended model (None when the
    defense is ``none``: it is the backdoored model), and the poisoned training set with its mask."""

    case: CaseName
    data: Dataset
    attack: Attack | None
    backdoored: Classifier
    defended: Classifier | None
    poisoned_x: torch.Tensor | None
    poison_mask: torch.Tensor | None

    def triggered_test(self) -> Split:
        """The poisoned test set as the harness evaluates ASR and R-Acc: every non-target test image with the
        trigger, labelled with its true class."""
        if self.attack is None:
            raise ValueError(f"{self.case.case_id} is a clean reference case: it has no trigger")
        return self.attack.poison_test(self.data.test)

    def untriggered_test(self) -> Split:
        """The same non-target test images without the trigger (in the same order)."""
        keep = self.data.test.y != self.case.target
        return self.data.test.subset(keep)

    def models(self) -> dict[str, Classifier]:
        """``{"before": backdoored}`` plus ``"after": defended`` when the case has a real defense."""
        out = {"before": self.backdoored}
        if self.defended is not None:
            out["after"] = self.defended
        return out
