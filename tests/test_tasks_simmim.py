"""The SimMIM task's reconstruction display (the task itself trains in tests/test_pretrain.py)."""
import torch

from models.simmim import normalize_targets
from scale.tasks.simmim import denormalize_prediction, reconstruction_grid


def test_reconstruction_grid_layout():
    b, h = 2, 32
    images = torch.zeros(b, 3, h, h)
    recon = torch.ones(b, 3, h, h) * 5  # far out of range: clamped
    mask = torch.zeros(b, h // 4, h // 4)
    mask[:, :4] = 1  # top half masked
    grid = reconstruction_grid(images, mask, recon, [0.5] * 3, [0.25] * 3)
    assert grid.shape == (3, b * h, 3 * h)
    assert 0 <= grid.min() and grid.max() <= 1
    # masked input is grey on the masked half; reconstruction shows the prediction only there
    assert torch.allclose(grid[:, :16, h:2 * h], torch.full((3, 16, h), 0.5))
    assert torch.allclose(grid[:, :16, 2 * h:], torch.ones(3, 16, h))
    assert torch.allclose(grid[:, 16:h, 2 * h:], torch.full((3, 16, h), 0.5))


def test_denormalize_inverts_target_normalisation():
    images = torch.randn(2, 3, 32, 32)
    targets = normalize_targets(images, 15)
    torch.testing.assert_close(denormalize_prediction(targets, images, 15), images, rtol=1e-4, atol=1e-4)
    assert denormalize_prediction(targets, images, None) is targets
