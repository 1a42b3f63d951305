"""NC as a model-level detector: the model whose class 0 needs no trigger is flagged, class 0 suspected, and its
score is the anomaly index of class 0's mask norm computed by hand from the reported norms."""
import statistics

import pytest
import torch

from backdoor._checks import ParameterError
from backdoor.data import Split
from backdoor.detectors import create_detector
from test_nc import always_class_0, recording_inputs


def test_the_class_that_needs_no_trigger_flags_the_model():
    g = torch.Generator().manual_seed(0)
    clean = Split(torch.randint(0, 256, (20, 3, 8, 8), generator=g, dtype=torch.uint8), torch.arange(20) % 4)
    verdict = create_detector("nc", epochs=30, batch_size=20, early_stop=False).inspect(
        recording_inputs(always_class_0(), clean, []))
    l1 = verdict.info["mask_l1"]
    median = statistics.median(l1)
    mad = statistics.median(abs(v - median) for v in l1)
    assert verdict.flagged is True and verdict.info["suspected_class"] == 0 and verdict.info["flagged_classes"] == [0]
    assert l1[0] < median
    assert verdict.score == pytest.approx(abs(l1[0] - median) / (1.4826 * mad), rel=1e-3) and verdict.score > 2


def test_a_score_below_the_threshold_does_not_flag():
    g = torch.Generator().manual_seed(0)
    clean = Split(torch.randint(0, 256, (20, 3, 8, 8), generator=g, dtype=torch.uint8), torch.arange(20) % 4)
    detector = create_detector("nc", epochs=30, batch_size=20, early_stop=False, anomaly_threshold=1e6)
    verdict = detector.inspect(recording_inputs(always_class_0(), clean, []))
    assert verdict.flagged is False and verdict.score > 2  # the same index, under a threshold it does not pass


@pytest.mark.parametrize("params", [{"epochs": 0}, {"anomaly_threshold": 0}, {"lr": -1}])
def test_bad_parameters_are_refused(params):
    with pytest.raises(ParameterError):
        create_detector("nc", **params)
