"""The 2-D denoiser: shapes, errors, time conditioning, and that it can fit a target."""

import pytest
import torch

from ddpm.nets.mlp import MLPConfig, MLPDenoiser


def test_shapes_and_t_forms():
    model = MLPDenoiser(MLPConfig(dim=3, hidden=32, depth=2, time_embed_dim=16)).eval()
    x = torch.randn(5, 3)
    out = model(x, torch.arange(5))
    assert out.shape == (5, 3) and out.dtype == torch.float32
    assert torch.equal(model(x, torch.full((5,), 7)), model(x, 7))
    assert torch.equal(model(x, torch.full((5,), 7)), model(x, torch.full((5,), 7.0)))
    assert MLPDenoiser().config == MLPConfig()


def test_bad_inputs():
    model = MLPDenoiser()
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        model(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="t of shape"):
        model(torch.randn(4, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="hidden"):
        MLPConfig(hidden=0)
    with pytest.raises(ValueError, match="time_embed_dim"):
        MLPConfig(time_embed_dim=7)
    from ddpm.errors import UserError
    from ddpm.config import TrainConfig

    with pytest.raises(UserError, match="unknown config key 'model.width'"):
        TrainConfig.from_dict({"model": {"type": "mlp", "dim": 2, "width": 3}})


def test_fits_a_time_dependent_target():
    # The target depends on both x and t, so the time embedding must carry information.
    torch.manual_seed(0)
    model = MLPDenoiser(MLPConfig(hidden=64, depth=2, time_embed_dim=32))
    x = torch.randn(256, 2)
    t = torch.randint(0, 1000, (256,))
    target = torch.stack([x[:, 1], torch.cos(t / 150.0)], dim=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    with torch.no_grad():
        first = (model(x, t) - target).pow(2).mean()
    for _ in range(60):
        loss = (model(x, t) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first.item() / 10
