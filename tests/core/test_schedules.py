"""Schedules: bit-exact parity with the seed's make_beta_schedule, and NoiseSchedule's derived terms
checked against formulas written independently here (Ho et al. 2020, eqs. 4, 6, 7)."""

import math

import numpy as np
import pytest
import torch

from ddpm.core.schedules import SCHEDULES, NoiseSchedule, make_beta_schedule, rescale_zero_terminal_snr

# The seed's np.clip on a torch tensor goes through torch's __array_wrap__, which numpy 2 flags as
# deprecated; the warning comes from the verbatim seed copy below, not from the library.
pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning")


# --- Verbatim copy of the seed's function (seeds/000_e6fd2cdf48f0943f.txt), torch + numpy as written there,
# --- including np.clip applied to a torch tensor. Only the name is changed. Do not "fix" it.
def seed_make_beta_schedule(
    schedule, n_timestep, linear_start=1e-4, linear_end=2e-2, cosine_s=8e-3
):
    if schedule == "linear":
        betas = (
            torch.linspace(
                linear_start ** 0.5, linear_end ** 0.5, n_timestep, dtype=torch.float64
            )
            ** 2
        )

    elif schedule == "cosine":
        timesteps = (
            torch.arange(n_timestep + 1, dtype=torch.float64) / n_timestep + cosine_s
        )
        alphas = timesteps / (1 + cosine_s) * np.pi / 2
        alphas = torch.cos(alphas).pow(2)
        alphas = alphas / alphas[0]
        betas = 1 - alphas[1:] / alphas[:-1]
        betas = np.clip(betas, a_min=0, a_max=0.999)

    elif schedule == "sqrt_linear":
        betas = torch.linspace(
            linear_start, linear_end, n_timestep, dtype=torch.float64
        )
    elif schedule == "sqrt":
        betas = (
            torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64)
            ** 0.5
        )
    else:
        raise ValueError(f"schedule '{schedule}' unknown.")
    return betas.numpy()
# --- end of the seed's code


def test_seed_golden_alphas_linear_T10():
    # The seed's comment: alphas of its "linear" schedule for T=10, to 4 places.
    golden = [0.9999, 0.9994, 0.9985, 0.9971, 0.9953, 0.9931, 0.9905, 0.9874, 0.9839, 0.9800]
    alphas = 1.0 - make_beta_schedule("linear", 10)
    assert np.round(alphas, 4).tolist() == golden
    # NoiseSchedule.alphas is the same numbers.
    assert np.round(NoiseSchedule.from_name("linear", 10).alphas.numpy(), 4).tolist() == golden


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("T", [2, 10, 1000, 4000])
def test_bitwise_equal_to_seed(name, T):
    ours = make_beta_schedule(name, T)
    ref = seed_make_beta_schedule(name, T)
    assert isinstance(ours, np.ndarray) and ours.dtype == np.float64 and ours.shape == (T,)
    assert np.array_equal(ours, ref)


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(linear_start=1e-5, linear_end=0.05, cosine_s=0.0),
        dict(linear_start=0.00085, linear_end=0.012, cosine_s=0.02),
        dict(linear_start=0.02, linear_end=1e-4, cosine_s=1e-3),  # decreasing is the seed's business too
    ],
)
@pytest.mark.parametrize("T", [3, 250, 1001])
def test_bitwise_equal_to_seed_nondefault(name, kwargs, T):
    assert np.array_equal(make_beta_schedule(name, T, **kwargs), seed_make_beta_schedule(name, T, **kwargs))


def test_name_collision_documented_values():
    # The seed's "linear" is linear in sqrt(beta) (diffusers' "scaled_linear"); the paper's linear
    # schedule (beta_1 = 1e-4 ... beta_T = 0.02, evenly spaced) is the seed's "sqrt_linear".
    T = 1000
    np.testing.assert_allclose(make_beta_schedule("sqrt_linear", T), np.linspace(1e-4, 0.02, T), rtol=1e-12)
    np.testing.assert_allclose(
        make_beta_schedule("linear", T), np.linspace(1e-4**0.5, 0.02**0.5, T) ** 2, rtol=1e-12
    )
    np.testing.assert_allclose(make_beta_schedule("sqrt", T), np.linspace(1e-4, 0.02, T) ** 0.5, rtol=1e-12)
    # Cosine (Nichol & Dhariwal eq. 17): abar_t = f(t)/f(0), betas clipped at 0.999.
    s = 8e-3
    f = np.cos((np.arange(T + 1) / T + s) / (1 + s) * np.pi / 2) ** 2
    np.testing.assert_allclose(make_beta_schedule("cosine", T), np.clip(1 - f[1:] / f[:-1], 0, 0.999), rtol=1e-10)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as e:
        make_beta_schedule("scaled_linear", 10)
    for name in SCHEDULES:
        assert name in str(e.value)
    assert "scaled_linear" in str(e.value)
    with pytest.raises(ValueError):
        NoiseSchedule.from_name("quadratic", 10)


@pytest.mark.parametrize("n", [1, 0, -5, 2.5, True, None])
def test_n_timestep_below_two_refused(n):
    with pytest.raises(ValueError, match="n_timestep"):
        make_beta_schedule("linear", n)


def _independent_terms(betas):
    """Eqs. 4, 6, 7 computed term by term with explicit products (no shared code with the library)."""
    T = len(betas)
    out = {k: np.empty(T) for k in ("ab", "ab_prev", "post_var", "coef1", "coef2")}
    for t in range(T):
        ab = math.prod(1.0 - b for b in betas[: t + 1])
        ab_prev = math.prod(1.0 - b for b in betas[:t])  # empty product = 1 at t=0
        out["ab"][t] = ab
        out["ab_prev"][t] = ab_prev
        out["post_var"][t] = (1 - ab_prev) / (1 - ab) * betas[t]
        out["coef1"][t] = math.sqrt(ab_prev) * betas[t] / (1 - ab)
        out["coef2"][t] = math.sqrt(1 - betas[t]) * (1 - ab_prev) / (1 - ab)
    return out


@pytest.mark.parametrize("name", SCHEDULES)
def test_derived_terms_match_independent_formulas(name):
    T = 50
    betas = make_beta_schedule(name, T)
    s = NoiseSchedule(betas, name=name)
    ref = _independent_terms(betas.tolist())
    ab = ref["ab"]
    checks = {
        "betas": betas,
        "alphas": 1 - betas,
        "alphas_cumprod": ab,
        "alphas_cumprod_prev": ref["ab_prev"],
        "alphas_cumprod_next": np.append(ab[1:], 0.0),
        "sqrt_alphas_cumprod": np.sqrt(ab),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - ab),
        "log_one_minus_alphas_cumprod": np.log(1 - ab),
        "sqrt_recip_alphas_cumprod": 1 / np.sqrt(ab),
        "sqrt_recipm1_alphas_cumprod": np.sqrt((1 - ab) / ab),
        "posterior_variance": ref["post_var"],
        "posterior_mean_coef1": ref["coef1"],
        "posterior_mean_coef2": ref["coef2"],
        "log_snr": np.log(ab / (1 - ab)),
    }
    for key, want in checks.items():
        got = getattr(s, key)
        assert got.dtype == torch.float64 and got.shape == (T,), key
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-11, atol=1e-300, err_msg=key)
    # Eq. 7 at t=0 (paper's t=1): q(x_0 | x_1, x0) is a point mass at x0, so its log is clipped to the next value.
    assert s.posterior_variance[0] == 0.0
    np.testing.assert_allclose(
        s.posterior_log_variance_clipped.numpy(), np.log(np.append(ref["post_var"][1], ref["post_var"][1:])), rtol=1e-12
    )
    assert torch.isfinite(s.posterior_log_variance_clipped).all()
    np.testing.assert_allclose(s.snr().numpy(), ab / (1 - ab), rtol=1e-11)
    assert s.num_timesteps == T == len(s)
    # The posterior variance lies between 0 and beta_t, and abar decreases strictly.
    assert (s.posterior_variance <= s.betas).all() and (s.alphas_cumprod.diff() < 0).all()


def test_from_name_and_explicit_betas_agree():
    a = NoiseSchedule.from_name("cosine", 100, cosine_s=0.01)
    b = NoiseSchedule(make_beta_schedule("cosine", 100, cosine_s=0.01), num_timesteps=100)
    c = NoiseSchedule(torch.from_numpy(make_beta_schedule("cosine", 100, cosine_s=0.01)))
    for key in NoiseSchedule._TERMS:
        assert torch.equal(getattr(a, key), getattr(b, key)) and torch.equal(getattr(a, key), getattr(c, key))
    assert "cosine" in repr(a) and "T=100" in repr(a)


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("T", [10, 1000])
def test_rescale_to_zero_terminal_snr(name, T):
    base = NoiseSchedule.from_name(name, T)
    s = NoiseSchedule.from_name(name, T, rescale_to_zero_terminal_snr=True)
    ab = s.alphas_cumprod.numpy()
    assert ab[-1] == 0.0 and s.betas[-1] == 1.0
    assert ab[0] == base.alphas_cumprod[0]  # abar_0 unchanged, bit for bit
    assert np.all(np.diff(ab) < 0)  # still strictly decreasing
    assert np.all((s.betas.numpy() > 0) & (s.betas.numpy() <= 1))
    assert s.log_snr[-1] == -math.inf and torch.isfinite(s.log_snr[:-1]).all()
    # Lin et al. 2023, Algorithm 1: sqrt(abar) is an affine map of the original sqrt(abar).
    q = np.sqrt(base.alphas_cumprod.numpy())
    want = (q - q[-1]) * q[0] / (q[0] - q[-1])
    np.testing.assert_allclose(np.sqrt(ab), want, rtol=1e-10, atol=1e-15)
    # The posterior terms stay finite at the last step (x_T carries no signal).
    for key in ("posterior_variance", "posterior_mean_coef1", "posterior_mean_coef2", "sqrt_alphas_cumprod"):
        assert torch.isfinite(getattr(s, key)).all(), key


def test_rescale_matches_diffusers_peer():
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as peer

    betas = make_beta_schedule("linear", 1000, linear_start=0.00085, linear_end=0.012)
    theirs = peer(torch.from_numpy(betas)).numpy()
    np.testing.assert_allclose(rescale_zero_terminal_snr(betas), theirs, rtol=1e-9, atol=1e-15)


def test_rescale_refused_without_snr_range():
    with pytest.raises(ValueError, match="zero terminal SNR"):
        NoiseSchedule([0.1], rescale_to_zero_terminal_snr=True)
    with pytest.raises(ValueError, match="zero terminal SNR"):
        NoiseSchedule([1.0, 0.5, 0.5], rescale_to_zero_terminal_snr=True)


@pytest.mark.parametrize(
    "betas, where",
    [
        ([0.1, 0.0, 0.2], "betas[1] = 0.0"),
        ([0.1, 0.2, -0.3], "betas[2] = -0.3"),
        ([1.5, 0.2], "betas[0] = 1.5"),
        ([0.1, float("nan")], "betas[1] = nan"),
        ([0.1, 0.2, float("inf")], "betas[2] = inf"),
        ([0.1, 1e-20], "betas[1] = 1e-20"),  # 1 - beta == 1 in float64: abar would not move
    ],
)
def test_invalid_betas_refused_naming_index_and_value(betas, where):
    with pytest.raises(ValueError) as e:
        NoiseSchedule(betas)
    assert where in str(e.value)


def test_invalid_betas_shape_and_length_refused():
    with pytest.raises(ValueError, match="1-D"):
        NoiseSchedule(np.full((2, 5), 0.01))
    with pytest.raises(ValueError, match="1-D"):
        NoiseSchedule([])
    with pytest.raises(ValueError, match="num_timesteps=10"):
        NoiseSchedule(np.full(9, 0.01), num_timesteps=10)
    # A beta of exactly 1 is allowed (that is what zero terminal SNR produces).
    assert NoiseSchedule([0.1, 0.2, 1.0]).alphas_cumprod[-1] == 0.0


def test_to_keeps_float64_and_moves_every_term():
    s = NoiseSchedule.from_name("linear", 20)
    assert s.to("cpu") is s
    m = s.to("meta")  # a device without a GPU: every term must be moved, dtype kept
    assert m.device == torch.device("meta") and m.num_timesteps == 20
    for key in NoiseSchedule._TERMS:
        assert getattr(m, key).device.type == "meta" and getattr(m, key).dtype == torch.float64, key
        assert getattr(s, key).device.type == "cpu", key  # the original is untouched
    if torch.cuda.is_available():
        g = s.to("cuda")
        assert g.alphas_cumprod.dtype == torch.float64 and torch.equal(g.alphas_cumprod.cpu(), s.alphas_cumprod)


def test_math_doc_references_resolve():
    # docs/math.md puts each formula beside `module:function`; keep those names and the cited tests real.
    import importlib
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    text = (root / "docs" / "math.md").read_text(encoding="utf-8")
    refs = set(re.findall(r"`([a-z_.]+):([A-Za-z_][A-Za-z0-9_]*)", text)) - {("module", "function")}
    assert len(refs) > 20
    for module, name in sorted(refs):
        assert hasattr(importlib.import_module(f"ddpm.{module}"), name), f"ddpm.{module}.{name}"
    tests = "".join(path.read_text(encoding="utf-8") for path in sorted((root / "tests").rglob("test_*.py")))
    defined = set(re.findall(r"^def (test_\w+)", tests, re.M))
    for cited in set(re.findall(r"`(test_\w+\*?)`", text)):
        assert any(d.startswith(cited.rstrip("*")) if cited.endswith("*") else d == cited for d in defined), cited
    for attr in re.findall(r"`NoiseSchedule\.(\w+)", text):
        assert hasattr(NoiseSchedule.from_name("linear", 10), attr), attr
