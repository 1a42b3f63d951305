"""Shrink (the example defense of tests/test_new_method.py): every weight scaled by the factor, biases kept."""
import torch
from torch import nn

from backdoor.defenses import create_defense


class Inputs:
    def __init__(self, model):
        self.model = model


def test_every_weight_is_scaled_and_no_bias():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    outcome = create_defense("shrink", factor=0.25).run(Inputs(model))
    for name, parameter in outcome.model.named_parameters():
        expected = before[name] * 0.25 if name.endswith("weight") else before[name]
        assert torch.equal(parameter, expected), name
