"""Checkerboard (the example attack of tests/test_new_method.py): the board in the corner, nothing else touched."""
import torch

from backdoor.attacks import create_attack


def test_the_board_overwrites_the_bottom_right_corner_only():
    x = torch.full((2, 3, 8, 8), 100, dtype=torch.uint8)
    out = create_attack("checkerboard").apply_trigger(x)
    corner = torch.tensor([[255, 0, 255, 0], [0, 255, 0, 255], [255, 0, 255, 0], [0, 255, 0, 255]], dtype=torch.uint8)
    assert torch.equal(out[..., 4:, 4:], corner.expand(2, 3, 4, 4))
    out[..., 4:, 4:] = 100
    assert torch.equal(out, x)
