"""The frequency attacks' shared machinery (backdoor/attacks/_frequency.py), against independent answers: the
block DCT against scipy's orthonormal DCT computed window by window, the colour spaces against their published
formulas (and OpenCV where it is installed), the position mask, the parameter checks."""
import numpy as np
import pytest
import scipy.fft
import torch

from backdoor._checks import ParameterError
from backdoor.attacks._frequency import (YCRCB, YUV, block_dct, block_idct, check_channels, check_positions,
                                         check_window_fits, coefficient_mask, dct_matrix)


def scipy_block_dct(x: np.ndarray, window: int) -> np.ndarray:
    """Window by window with scipy (the reference's loop), on [..., H, W]."""
    out = np.zeros_like(x, dtype=float)
    for a in range(0, x.shape[-2], window):
        for b in range(0, x.shape[-1], window):
            block = x[..., a:a + window, b:b + window]
            out[..., a:a + window, b:b + window] = scipy.fft.dctn(block, axes=(-2, -1), norm="ortho")
    return out


def test_dct_matrix_is_scipys_orthonormal_dct_ii():
    for n in (1, 4, 8, 32):
        c = dct_matrix(n)
        assert torch.allclose(c, torch.from_numpy(scipy.fft.dct(np.eye(n), axis=0, norm="ortho")), atol=1e-12)
        assert torch.allclose(c @ c.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert dct_matrix(2)[0, 0].item() == pytest.approx(2 ** -0.5) and dct_matrix(2)[1, 1].item() == pytest.approx(-0.5 ** 0.5)


@pytest.mark.parametrize("shape, window", [((2, 3, 16, 24), 8), ((1, 2, 32, 32), 32), ((3, 64, 32), 32)])
def test_block_dct_is_the_dct_of_every_window_and_block_idct_inverts_it(shape, window):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 255
    coefficients = block_dct(x, window)
    assert np.allclose(coefficients.numpy(), scipy_block_dct(x.numpy(), window), atol=1e-9)
    assert torch.allclose(block_idct(coefficients, window), x, atol=1e-9)


def test_block_dct_refuses_windows_that_do_not_tile():
    with pytest.raises(ValueError, match="does not tile"):
        block_dct(torch.zeros(1, 28, 28, dtype=torch.float64), 32)


def rgb(*values):
    return torch.tensor(values, dtype=torch.float64).view(1, 3, 1, 1)


def test_ycrcb_is_opencvs_formula():
    # Y = .299 R + .587 G + .114 B, Cr = .713 (R - Y) + 128, Cb = .564 (B - Y) + 128
    for r, g, b in [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0), (10, 200, 77)]:
        y = 0.299 * r + 0.587 * g + 0.114 * b
        expected = [y, 0.713 * (r - y) + 128, 0.564 * (b - y) + 128]
        assert YCRCB.forward(rgb(r, g, b)).flatten().tolist() == pytest.approx(expected, abs=1e-9)
    assert YCRCB.channels == ("Y", "Cr", "Cb")


def test_ycrcb_matches_opencv_to_its_rounding():
    cv2 = pytest.importorskip("cv2")
    image = np.random.RandomState(0).randint(0, 256, (16, 16, 3)).astype(np.uint8)
    ours = YCRCB.forward(torch.from_numpy(image).permute(2, 0, 1)[None].double())[0].permute(1, 2, 0).numpy()
    # OpenCV rounds Y before it forms R - Y and B - Y, then rounds the chroma: within one level of ours
    assert np.abs(np.round(ours) - cv2.cvtColor(image, cv2.COLOR_RGB2YCrCb)).max() <= 1


def test_yuv_is_kornias_formula():
    for r, g, b in [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (10, 200, 77)]:
        expected = [0.299 * r + 0.587 * g + 0.114 * b, -0.147 * r - 0.289 * g + 0.436 * b,
                    0.615 * r - 0.515 * g - 0.100 * b]
        assert YUV.forward(rgb(r, g, b)).flatten().tolist() == pytest.approx(expected, abs=1e-9)
    assert YUV.channels == ("Y", "U", "V")


@pytest.mark.parametrize("space", [YCRCB, YUV], ids=["ycrcb", "yuv"])
def test_colour_round_trip_is_the_identity(space):
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 255
    assert torch.allclose(space.inverse(space.forward(x)), x, atol=1e-9)
    grey = torch.full((1, 3, 2, 2), 90.0, dtype=torch.float64)  # grey has no chroma: U = V = 0, Cr = Cb = 128
    assert torch.allclose(space.forward(grey)[:, 1:], torch.tensor(space.offset[1:]).view(1, 2, 1, 1).double(),
                          atol=1e-9)


def test_coefficient_mask_marks_each_position_in_every_window():
    mask = coefficient_mask(16, 24, 8, ((1, 2), (7, 7)))
    expected = torch.zeros(16, 24, dtype=torch.bool)
    for a in (0, 8):
        for b in (0, 8, 16):
            expected[a + 1, b + 2] = expected[a + 7, b + 7] = True
    assert torch.equal(mask, expected) and int(mask.sum()) == 12


def test_checks():
    assert check_channels("x", [2, 1], YUV) == (2, 1)
    assert check_positions("x", [[0, 1], (3, 3)], 4) == ((0, 1), (3, 3))
    for bad in ([], [3], [1, 1], [-1], [1.0], 1.5, None):
        with pytest.raises(ParameterError, match="channels"):
            check_channels("x", bad, YUV)
    for bad in ([], [[4, 0]], [[0, -1]], [[1, 1], [1, 1]], [[1, 2, 3]], [1, 2], "15,15", [[1.0, 2]]):
        with pytest.raises(ParameterError, match="positions"):
            check_positions("x", bad, 4)
    check_window_fits("x", 32, (3, 64, 32))
    with pytest.raises(ParameterError, match="window_size"):
        check_window_fits("x", 32, (3, 28, 28))
    with pytest.raises(ParameterError, match="RGB"):
        check_window_fits("x", 32, (1, 32, 32))
