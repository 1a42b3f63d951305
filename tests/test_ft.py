"""FT: fine-tuning repairs, in place, a model that gets the defender's clean subset wrong; its epochs and lr
override the defense budget and nothing else."""
import pytest
import torch
from torch import nn

from backdoor.data import Split
from backdoor.defenses import DefenseInputs, create_defense
from backdoor.models import Classifier, LayerRoles
from backdoor.training import TrainConfig, fit, predict

CPU = torch.device("cpu")


def colour_split(n: int = 64) -> Split:
    """Class 0: red images, class 1: green ones (4x4, with noise)."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 2
    x = torch.randint(0, 60, (n, 3, 4, 4), generator=g)
    x[y == 0, 0] += 180
    x[y == 1, 1] += 180
    return Split(x.to(torch.uint8), y)


def always_class_0() -> Classifier:
    """A linear classifier whose bias sends every image to class 0: half the clean subset is wrong."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    with torch.no_grad():
        net[1].weight.zero_()
        net[1].bias.copy_(torch.tensor([3.0, -3.0]))
    return Classifier(net, (0.0,) * 3, (1.0,) * 3, LayerRoles(("0", "0", "0"), "0", "1"), arch="linear")


def ft_inputs(model, clean, calls=None):
    def recording_fit(m, split, config, **kw):
        if calls is not None:
            calls.append({"model": m, "split": split, "config": config, **kw})
        return fit(m, split, config, device=CPU, **kw)

    budget = TrainConfig(epochs=20, batch_size=64, lr=0.5, crop_padding=0, hflip=False)
    return DefenseInputs(model=model, clean=clean, num_classes=2, device=CPU, seed=3, training=budget,
                         retraining=budget.with_(lr=0.01), new_model=always_class_0, fit=recording_fit)


def test_fine_tuning_repairs_the_model_in_place():
    clean, model = colour_split(), always_class_0()
    assert float((predict(model, clean.x, device=CPU) == clean.y).float().mean()) == 0.5
    outcome = create_defense("ft").run(ft_inputs(model, clean))
    assert outcome.model is model
    assert torch.equal(predict(outcome.model, clean.x, device=CPU), clean.y)
    assert outcome.info == {"epochs": 20}


def test_epochs_and_lr_override_the_defense_budget_and_nothing_else():
    clean = colour_split()
    calls = []
    inputs = ft_inputs(always_class_0(), clean, calls)
    create_defense("ft", epochs=2, lr=0.05).run(inputs)
    create_defense("ft").run(ft_inputs(always_class_0(), clean, calls))
    (first, second) = calls
    assert first["config"] == inputs.training.with_(epochs=2, lr=0.05)
    assert second["config"] == inputs.training
    assert first["model"] is inputs.model and first["split"] is clean and first["seed"] == 3


@pytest.mark.parametrize("params", [{"epochs": 0}, {"lr": 0}, {"lr": -0.1}])
def test_bad_parameters_are_refused(params):
    with pytest.raises(ValueError, match="ft"):
        create_defense("ft", **params)
