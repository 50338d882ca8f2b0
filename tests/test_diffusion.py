"""Hand-checkable math of the MDLM and AR families: schedules, weights, antithetic t, SUBS, perfect predictors."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dlm_jax.diffusion import autoregressive, masked
from dlm_jax.diffusion.schedules import MaskSchedule, sample_times
from dlm_jax.families import base_config

V, MASK = 5, 5  # 5 real tokens, [MASK] = id 5


@pytest.mark.parametrize(
    "kind,t,alpha",
    [("linear", 0.25, 0.75), ("cosine", 0.5, 1 - math.cos(math.pi / 4)), ("cosine", 1.0, 0.0), ("poly", 0.5, 0.75)],
)
def test_schedule_values(kind, t, alpha):
    s = MaskSchedule(kind, power=2.0)
    assert float(s.alpha(jnp.float32(t))) == pytest.approx(alpha, abs=1e-6)
    assert float(s.alpha(jnp.float32(0.0))) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("kind", ["linear", "cosine", "poly"])
def test_alpha_derivative_matches_finite_difference(kind):
    s = MaskSchedule(kind, power=3.0)
    t = jnp.linspace(0.1, 0.9, 9, dtype=jnp.float64) if jax.config.x64_enabled else jnp.linspace(0.1, 0.9, 9)
    h = 1e-3
    fd = (s.alpha(t + h) - s.alpha(t - h)) / (2 * h)
    np.testing.assert_allclose(s.alpha_derivative(t), fd, rtol=2e-3, atol=1e-4)


def test_linear_weight_is_one_over_t_in_continuous_and_discrete_time():
    s = MaskSchedule("linear")
    t = jnp.array([0.1, 0.25, 0.5, 1.0])
    np.testing.assert_allclose(s.continuous_weight(t), 1 / t, rtol=1e-6)
    t_grid = jnp.array([1, 2, 5, 10]) / 10.0
    np.testing.assert_allclose(s.discrete_weight(t_grid, 10), 1 / t_grid, rtol=1e-5)


def test_discrete_weight_tends_to_continuous_weight():
    s = MaskSchedule("cosine")
    t = jnp.array([0.3, 0.6, 0.9])
    np.testing.assert_allclose(s.discrete_weight(t, 1000), s.continuous_weight(t), rtol=5e-3)


def test_antithetic_times_cover_the_interval_evenly():
    eps = 1e-3
    t = np.sort(np.asarray(sample_times(jax.random.PRNGKey(3), 8, eps)))
    assert t.min() >= eps and t.max() <= 1.0
    np.testing.assert_allclose(np.diff(t), (1 - eps) / 8, rtol=1e-4)  # one point per 1/8 stratum


def test_discrete_times_lie_on_the_grid():
    t = np.asarray(sample_times(jax.random.PRNGKey(0), 16, 1e-3, num_timesteps=4))
    assert set(np.round(t * 4).astype(int)) <= {1, 2, 3, 4} and np.allclose(t * 4, np.round(t * 4))


def test_subs_forbids_mask():
    logits = jnp.zeros((2, 3, V + 1))
    probs = jax.nn.softmax(masked.subs_logits(logits, MASK), axis=-1)
    np.testing.assert_allclose(probs[..., MASK], 0.0)
    np.testing.assert_allclose(probs[..., :V].sum(-1), 1.0, rtol=1e-6)


def _oracle(x0, confident_everywhere=True):
    """logits putting all mass on the true token (on masked positions only, if not confident_everywhere)."""

    def logits_fn(z_t, t):
        good = 100.0 * jax.nn.one_hot(x0, V + 1)
        if confident_everywhere:
            return good
        bad = 100.0 * jax.nn.one_hot((x0 + 1) % V, V + 1)  # wrong on clean positions: carry-over ignores them
        return jnp.where((z_t == MASK)[..., None], good, bad)

    return logits_fn


def test_perfect_predictor_has_zero_nelbo_and_carry_over_ignores_clean_positions():
    x0 = jax.random.randint(jax.random.PRNGKey(0), (4, 16), 0, V)
    mask = jnp.ones_like(x0, jnp.float32)
    section = base_config().mdlm
    for everywhere in (True, False):
        terms = masked.nelbo_terms(_oracle(x0, everywhere), x0, mask, jax.random.PRNGKey(1), section, MASK)
        assert float(terms["nll_sum"]) == pytest.approx(0.0, abs=1e-6)
        assert float(terms["num_tokens"]) == 64


def test_uniform_predictor_nelbo_is_weighted_masked_count_times_log_v():
    x0 = jax.random.randint(jax.random.PRNGKey(0), (2, 32), 0, V)
    t = jnp.array([0.5, 0.25])
    rng = jax.random.PRNGKey(7)
    terms = masked.nelbo_terms_at(
        lambda z, t: jnp.zeros(z.shape + (V + 1,)), x0, jnp.ones_like(x0, jnp.float32), t, rng,
        MaskSchedule("linear"), 0, MASK,
    )
    _, is_masked = masked.forward_mask(rng, x0, 1 - t, MASK)
    expected = float(np.sum(np.asarray(is_masked).sum(1) / np.asarray(t)) * math.log(V))
    assert float(terms["nll_sum"]) == pytest.approx(expected, rel=1e-5)


def test_forward_mask_rate_matches_one_minus_alpha():
    x0 = jnp.zeros((4, 4096), jnp.int32)
    alpha = jnp.array([0.0, 0.25, 0.5, 1.0])
    z, is_masked = masked.forward_mask(jax.random.PRNGKey(0), x0, alpha, MASK)
    np.testing.assert_allclose(is_masked.mean(1), 1 - alpha, atol=0.03)
    assert bool(jnp.all(jnp.where(is_masked, z == MASK, z == x0)))


def test_loss_mask_excludes_padding():
    x0 = jax.random.randint(jax.random.PRNGKey(0), (2, 8), 0, V)
    t = jnp.array([1.0, 1.0])  # everything masked
    loss_mask = jnp.array([[1.0] * 8, [1.0] * 4 + [0.0] * 4])
    terms = masked.nelbo_terms_at(
        lambda z, t: jnp.zeros(z.shape + (V + 1,)), x0, loss_mask, t, jax.random.PRNGKey(0), MaskSchedule(), 0, MASK
    )
    assert float(terms["nll_sum"]) == pytest.approx(12 * math.log(V), rel=1e-5)
    assert float(terms["num_tokens"]) == 12


def test_ar_shift_and_perfect_predictor():
    x = jnp.array([[3, 1, 4, 1]])
    np.testing.assert_array_equal(autoregressive.shift_right(x, bos_id=9), [[9, 3, 1, 4]])
    terms = autoregressive.nll_terms(lambda inp: 100.0 * jax.nn.one_hot(x, 10), x, jnp.ones((1, 4)), bos_id=9)
    assert float(terms["nll_sum"]) == pytest.approx(0.0, abs=1e-6)
    uniform = autoregressive.nll_terms(lambda inp: jnp.zeros((1, 4, 10)), x, jnp.ones((1, 4)), bos_id=9)
    assert float(uniform["nll_sum"]) == pytest.approx(4 * math.log(10), rel=1e-6)


@pytest.mark.parametrize("kind", ["linear", "cosine", "poly"])
def test_md4_shifted_schedule(kind):
    """alpha = (1 - 2 eps) alpha + eps: from 1 - eps to eps, derivative scaled, time_at_mask_rate its inverse."""
    eps = 0.05
    plain, shifted = MaskSchedule(kind), MaskSchedule(kind, shift=eps)
    t = jnp.linspace(0.0, 1.0, 11)
    np.testing.assert_allclose(shifted.alpha(t), (1 - 2 * eps) * plain.alpha(t) + eps, atol=1e-6)
    np.testing.assert_allclose(shifted.alpha(jnp.array([0.0, 1.0])), [1 - eps, eps], atol=1e-6)
    np.testing.assert_allclose(shifted.alpha_derivative(t), (1 - 2 * eps) * plain.alpha_derivative(t), atol=1e-6)
    inner = t[1:-1]
    np.testing.assert_allclose(shifted.time_at_mask_rate(1.0 - shifted.alpha(inner)), inner, atol=1e-4)
    assert np.isfinite(np.asarray(shifted.continuous_weight(jnp.zeros(1)))).all()  # finite at t = 0


@pytest.mark.parametrize("shift", [0.0, 0.1])
def test_md4_shifted_nelbo_of_a_uniform_model_is_closed_form(shift):
    """A model with uniform logits over the V real tokens: every masked token costs log V, so the continuous NELBO
    per token is E_t[-alpha'_t] log V = (alpha_tmin - alpha_1) log V, plus the reconstruction term
    (1 - alpha_0) log V with the shift: (1 - t_eps) log V unshifted, (1 - 2 eps + eps) log V = (1 - eps) log V
    shifted (a missing reconstruction term would give (1 - 2 eps) log V)."""
    vocab = 7  # real tokens; [MASK] = 7
    section = ml_collections.ConfigDict({"schedule": "linear", "schedule_power": 2.0, "t_eps": 1e-3,
                                         "antithetic": True, "num_timesteps": 0, "schedule_shift": shift})
    x0 = jax.random.randint(jax.random.PRNGKey(0), (256, 64), 0, vocab)
    uniform = lambda z, t: jnp.zeros(z.shape + (vocab + 1,))  # noqa: E731
    totals = [masked.nelbo_terms(uniform, x0, jnp.ones(x0.shape), jax.random.PRNGKey(s), section, vocab)
              for s in range(4)]
    per_token = sum(float(t["nll_sum"]) for t in totals) / sum(float(t["num_tokens"]) for t in totals)
    want = (1 - shift) * np.log(vocab) if shift else (1 - 1e-3) * np.log(vocab)
    assert per_token == pytest.approx(want, rel=1e-2)


def test_schedule_shift_is_validated():
    from dlm_jax import config as config_lib
    from dlm_jax import families
    from dlm_jax.errors import UserError

    c = config_lib.apply_overrides(base_config(), ["--config.model.family=mdlm", "--config.mdlm.schedule_shift=0.5"])
    with pytest.raises(UserError, match=r"mdlm.schedule_shift must be in \[0, 0.5\)"):
        families.validate(c)
    families.validate(config_lib.apply_overrides(c, ["--config.mdlm.schedule_shift=1e-4"]))
