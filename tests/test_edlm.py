"""EDLM (families/edlm.py, diffusion/energy.py, sampling/energy.py): the importance sampler against exact targets,
the four reference-code bugs (softmax(+E), probabilities for log-probabilities, candidates of different samples
mixed, a single-sample plug-in for log Z), the Theorem-1 estimate against enumeration, NCE training, the AR-energy
workdir through the CLI. The family contract tests (tests/test_families.py) run the nce energy."""

import dataclasses
import itertools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dlm_jax import main
from dlm_jax.diffusion import energy as energy_lib
from dlm_jax.diffusion.schedules import MaskSchedule
from dlm_jax.errors import UserError
from dlm_jax.experiment import build_experiment, load_workdir_config, restore_for_inference
from dlm_jax.sampling import energy as energy_sampling
from dlm_jax.sampling import masked as masked_sampling
from dlm_jax.sampling.loop import SampleSpec
from dlm_jax.train.loop import train
from dlm_jax.train.metrics import read_metrics
from tests.helpers import tiny_config

MASK = 5  # toy vocabulary: tokens 0..4, [MASK] = 5


def _spec(k, window=1.0, tau=1.0, temperature=1.0, top_p=1.0, num_samples=2, length=4, steps=6):
    return SampleSpec("edlm", num_samples, length, steps=steps, temperature=temperature, top_p=top_p,
                      options=energy_sampling.EDLMOptions(k=k, tau=tau, window=window))


def _random_logits_fn(seed=0, vocab=MASK + 1):
    table = jax.random.normal(jax.random.PRNGKey(seed), (vocab, vocab)) * 2.0

    def logits_fn(tokens, t):
        del t
        return table[tokens] + jnp.roll(table[tokens], 1, axis=1)  # depends on the tokens: changes as they unmask

    return logits_fn


# -- the sampler -------------------------------------------------------------------------------------------


def test_k1_and_a_candidate_0_energy_give_the_plain_mdlm_tokens():
    """k = 1 is the MDLM sampler; and with an energy that always prefers candidate 0 (rows j = 0 of the sample-major
    layout) k = 4 is too, every step in the window: candidate 0 is the plain draw of the same rng."""
    logits_fn, template = _random_logits_fn(), jnp.full((12,), MASK, jnp.int32)
    schedule, rng = MaskSchedule("linear"), jax.random.PRNGKey(3)
    spec = _spec(1, num_samples=3, length=12, steps=8)
    plain_spec = dataclasses.replace(spec, sampler="ancestral", options=masked_sampling.AncestralOptions())
    plain, _ = masked_sampling.sample(logits_fn, rng, template, plain_spec, mask_id=MASK, schedule=schedule)
    prefer_first = lambda x_t, x0, t, lp: jnp.where(jnp.arange(x0.shape[0]) % 4 == 0, 0.0, 1e4)  # noqa: E731
    for k, energy in ((1, lambda x_t, x0, t, lp: jnp.zeros(x0.shape[0])), (4, prefer_first)):
        tokens, stats_ = energy_sampling.sample(logits_fn, energy, rng, template, _spec(k, 1.0, num_samples=3,
                                                                                        length=12, steps=8),
                                                MASK, schedule, 1e-3)
        np.testing.assert_array_equal(tokens, plain)
        assert int(stats_["nfe"]) == 8 and int(stats_["nfe_energy"]) == (7 if k > 1 else 0)


def test_window_counts_energy_passes():
    logits_fn, template = _random_logits_fn(), jnp.full((8,), MASK, jnp.int32)
    zero = lambda x_t, x0, t, lp: jnp.zeros(x0.shape[0])  # noqa: E731
    for window, expected in ((1.0, 9), (0.2, 2), (0.0, 1)):  # 9 reverse steps, t = 1, 0.889, ..., 0.112
        _, s = energy_sampling.sample(logits_fn, zero, jax.random.PRNGKey(0), template,
                                      _spec(2, window, length=8, steps=10), MASK, MaskSchedule("linear"), 1e-3)
        assert int(s["nfe_energy"]) == expected


def _chi_square_p(counts, probs):
    probs = np.asarray(probs, np.float64)
    return stats.chisquare(counts, probs / probs.sum() * counts.sum()).pvalue


def test_resampling_frequencies_match_softmax_of_minus_energy_over_tau():
    """k fixed distinct candidates with energies E: the kept one ~ softmax(-E / tau) (chi-square), and the
    reference's softmax(+E) (bug 1) is rejected by the same test."""
    energy, tau, rows = jnp.array([0.0, 1.0, 2.0, -0.5]), 0.7, 20000
    candidates = jnp.broadcast_to(jnp.arange(4)[None, :, None], (rows, 4, 1))
    log_w = energy_lib.log_importance_weights(jnp.zeros((rows, 4)), jnp.zeros((rows, 4)),
                                              jnp.broadcast_to(energy, (rows, 4)), tau)
    kept = np.asarray(energy_lib.resample(jax.random.PRNGKey(0), candidates, log_w))[:, 0]
    counts = np.bincount(kept, minlength=4)
    right = np.asarray(jax.nn.softmax(-energy / tau))
    assert _chi_square_p(counts, right) > 1e-3
    assert _chi_square_p(counts, np.asarray(jax.nn.softmax(energy / tau))) < 1e-12  # the sign flip fails


def _toy_ar(x0):
    """A joint 'AR' log-likelihood over 2 tokens of {0, 1, 2}: strongly correlated (x1 == x0 likely)."""
    table = jnp.log(jnp.array([[0.30, 0.02, 0.02], [0.02, 0.25, 0.03], [0.01, 0.05, 0.30]]))
    table = table - jax.nn.logsumexp(table)
    return table[x0[:, 0], x0[:, 1]]


def _ar_energy_sampler(token_input):
    """The edlm proposal with the AR energy of `_toy_ar` (all positions masked): SIR towards p_AR.
    token_input maps the log-probabilities the energy receives (identity, or exp: the reference's bug 2)."""
    def energy(x_t, x0, t, token_logp):
        ar = jnp.stack([_toy_ar(x0), jnp.zeros(x0.shape[0])], axis=-1)  # the joint's log-prob on the first position
        return energy_lib.ar_energy(ar, token_input(token_logp), x_t == MASK, carry_over=False)

    return energy


@pytest.mark.parametrize("bug", [False, True])
def test_ar_energy_importance_sampling_reaches_the_ar_joint_and_needs_log_probabilities(bug):
    """From a factorized p_theta, k = 128 candidates with the AR energy give (nearly) the AR joint (total variation
    < 0.04); handing the energy probabilities instead of log-probabilities (bug 2) lands far from it."""
    rows, k = 4000, 128
    logits = jnp.broadcast_to(jnp.log(jnp.array([[0.6, 0.2, 0.2, 1e-9, 1e-9, 0.0], [0.2, 0.2, 0.6, 1e-9, 1e-9, 0.0]])),
                              (rows, 2, MASK + 1)).at[..., MASK].set(-jnp.inf)
    tokens = jnp.full((rows, 2), MASK, jnp.int32)
    propose = energy_sampling.importance_proposal(_ar_energy_sampler(jnp.exp if bug else (lambda x: x)),
                                                  _spec(k, num_samples=rows, length=2), MASK)
    kept = np.asarray(jax.jit(propose)(jax.random.PRNGKey(1), logits, tokens, jnp.float32(1.0)))
    freq = np.bincount(kept[:, 0] * 3 + kept[:, 1], minlength=9) / rows
    target = np.exp(np.asarray([_toy_ar(jnp.array([[a, b]]))[0] for a in range(3) for b in range(3)]))
    tv = 0.5 * np.abs(freq - target).sum()
    assert (tv > 0.12) if bug else (tv < 0.04), tv  # the bug gives ~ p_theta * p_AR: 0.19 away


def test_tempered_proposal_is_corrected_to_the_same_target():
    """Candidates from a tempered proposal q (temperature 2) are reweighted by p_theta / q: the kept tokens still
    follow p_theta exp(-E / tau) (one masked position, E known)."""
    rows, k, tau = 4000, 64, 0.5
    probs = jnp.array([0.6, 0.25, 0.1, 0.05, 1e-9])
    energy_table = jnp.array([0.5, 0.0, -0.5, -1.0, 0.0])
    logits = jnp.broadcast_to(jnp.append(jnp.log(probs), -jnp.inf), (rows, 1, MASK + 1))
    energy = lambda x_t, x0, t, lp: energy_table[x0[:, 0]]  # noqa: E731
    propose = energy_sampling.importance_proposal(energy, _spec(k, tau=tau, temperature=2.0, num_samples=rows,
                                                                length=1), MASK)
    kept = np.asarray(propose(jax.random.PRNGKey(2), logits, jnp.full((rows, 1), MASK, jnp.int32), jnp.float32(1)))
    target = np.asarray(jax.nn.softmax(jnp.log(probs) - energy_table / tau))
    assert 0.5 * np.abs(np.bincount(kept[:, 0], minlength=5) / rows - target).sum() < 0.04


def test_each_samples_candidates_stay_its_own(monkeypatch):
    """Batch > 1 with distinct x_t: the energy prefers x0[1] == x_t[0] + 1, so sample b must end with its own
    x_t[0] + 1. The reference's layout (k-major rows regrouped as [B, k], bug 3) pairs candidates with the other
    sample's x_t and fails the same check."""
    k, n = 16, 4
    tokens = jnp.array([[0, MASK], [1, MASK], [2, MASK], [3, MASK]], jnp.int32)
    logits = jnp.zeros((n, 2, MASK + 1)).at[..., MASK].set(-jnp.inf)  # uniform over 0..4

    def energy(x_t, x0, t, lp):
        return jnp.where(x0[:, 1] == x_t[:, 0] + 1, -50.0, 0.0)

    def run():
        propose = energy_sampling.importance_proposal(energy, _spec(k, num_samples=n, length=2), MASK)
        out = [np.asarray(propose(jax.random.PRNGKey(s), logits, tokens, jnp.float32(1)))[:, 1] for s in range(8)]
        return np.stack(out)

    expected = np.arange(n) + 1
    hits = run() == expected
    assert hits.mean() > 0.9  # a miss: none of the 16 candidates drew the preferred token (prob (4/5)^16 ~ 0.03)
    monkeypatch.setattr(energy_lib, "expand_candidates", lambda x, k: jnp.tile(x, (k,) + (1,) * (x.ndim - 1)))
    assert (run() == expected).mean() < 0.6  # the reference's k-major pairing: ~1/4 right by chance


# -- Theorem 1 against enumeration -------------------------------------------------------------------------


def test_theorem1_log_z_converges_to_the_exact_log_likelihood():
    """Vocab 3, length 3, all masked: p_theta factorized, E an arbitrary table over the 27 sequences.
    -log p_phi(x_0 | x_t) = -log p_theta(x_0) + E(x_0) + log Z; log Z from n proposals: the lower estimate stays
    below the exact value, the leave-one-out upper estimate above it (n >= 8), and both converge as n grows. A
    single-sample plug-in (bug 4) is far off."""
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]])
    table = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (3, 3, 3))) * 1.5
    seqs = np.array(list(itertools.product(range(3), repeat=3)))
    log_p = np.log(probs[np.arange(3), seqs]).sum(-1)  # [27]
    log_z = float(np.log(np.sum(np.exp(log_p - table[tuple(seqs.T)]))))
    x0 = seqs[5]
    exact_nll = -log_p[5] + table[tuple(x0)] + log_z

    def estimate(n, reps=4000, seed=0):
        draws = jax.random.categorical(jax.random.PRNGKey(seed), jnp.log(probs), shape=(reps, n, 3))
        neg_e = -jnp.asarray(table)[draws[..., 0], draws[..., 1], draws[..., 2]]
        lower, upper = energy_lib.log_partition_estimates(neg_e)
        return float(lower.mean()), float(upper.mean())

    errors = []
    for n in (2, 8, 64, 512):
        lower, upper = estimate(n)
        if n >= 8:
            assert lower < log_z < upper, (n, lower, log_z, upper)
        errors.append(abs(-log_p[5] + table[tuple(x0)] + upper - exact_nll))
    assert errors[-1] < 0.01 and errors[-1] < errors[1] < errors[0]
    single = float((-jnp.asarray(table)[tuple(jax.random.categorical(jax.random.PRNGKey(1), jnp.log(probs),
                                                                       shape=(4000, 3)).T)]).mean())
    assert abs(single - log_z) > 0.3  # E[-E(x)] of one proposal is not log Z
    with pytest.raises(ValueError, match="n >= 2"):
        energy_lib.log_partition_estimates(jnp.zeros((3, 1)))


def test_effective_sample_size():
    ess = energy_lib.effective_sample_size(jnp.array([[0.0, 0.0, 0.0, 0.0], [0.0, -1e4, -1e4, -1e4],
                                                      [0.0, 0.0, -1e4, -1e4]]))
    np.testing.assert_allclose(ess, [4.0, 1.0, 2.0], rtol=1e-6)


def test_nce_terms_by_hand():
    terms = energy_lib.nce_terms(jnp.array([-2.0, 1.0]), jnp.array([[3.0], [-1.0]]))
    expected = 0.5 * (math.log1p(math.exp(-2)) + math.log1p(math.exp(1))) \
        + 0.5 * (math.log1p(math.exp(-3)) + math.log1p(math.exp(1)))
    np.testing.assert_allclose(float(terms["loss"]), expected, rtol=1e-6)
    assert float(terms["accuracy"]) == 0.5 and float(terms["ranking_accuracy"]) == 0.5


# -- the family --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def components(tmp_path_factory, train_corpus):
    root = tmp_path_factory.mktemp("edlm_components")
    out = {}
    for name, family, seed in (("mdlm", "mdlm", 0), ("ar", "ar", 0), ("judge", "ar", 1)):
        out[name] = str(root / name)
        train(tiny_config(train_corpus, family, ["--config.train.num_steps=30", "--config.train.log_every=10",
                                                 f"--config.seed={seed}"]), out[name])
    return out


def _comp(components, names=("mdlm", "ar")):
    return [f"--config.components.{n}.workdir={components[n]}" for n in names]


def test_config_errors(train_corpus, components):
    with pytest.raises(UserError, match=r"needs --config.components.ar.workdir"):
        tiny_config(train_corpus, "edlm", ["--config.edlm.energy=ar", *_comp(components, ("mdlm",))])
    tiny_config(train_corpus, "edlm", _comp(components, ("mdlm",)))  # nce needs no AR
    with pytest.raises(UserError, match="num_proposals"):
        tiny_config(train_corpus, "edlm", ["--config.edlm.num_proposals=1", *_comp(components)])
    with pytest.raises(UserError, match=r"model.d_model=64 here, 32 in components.mdlm.workdir"):
        build_experiment(tiny_config(train_corpus, "edlm", ["--config.model.d_model=64", *_comp(components)]))


def test_nce_init_copies_the_mdlm_and_training_separates(tmp_path, train_corpus, components):
    workdir = str(tmp_path / "nce")
    config = tiny_config(train_corpus, "edlm", ["--config.train.num_steps=40", "--config.train.log_every=10",
                                                "--config.train.learning_rate=3e-3", *_comp(components, ("mdlm",))])
    exp = build_experiment(config)
    params = exp.family.init_params(jax.random.PRNGKey(0))
    mdlm = exp.frozen["mdlm"]
    for key in ("embed", "layers" if "layers" in mdlm else "layer_0", "final_norm"):
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a.unbox() if hasattr(a, "unbox") else a),
                                                                np.asarray(b)),
                     params[key], mdlm[key], is_leaf=lambda x: hasattr(x, "unbox"))
    assert "head" not in params and "pair_in" in params
    train(config, workdir)
    logged = [m for m in read_metrics(workdir) if "loss" in m]
    assert logged[-1]["loss"] < logged[0]["loss"]
    assert logged[-1]["ranking_accuracy"] > 0.8 and logged[-1]["accuracy"] > 0.6, logged[-1]


def _cli(capsys, *argv):
    main.main(list(argv))
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_ar_energy_workdir_through_the_cli(tmp_path, capsys, components, train_corpus):
    """train (nothing to train: the workdir records the components) -> sample --sampler=edlm -> eval (the residual
    estimate next to MDLM's NELBO and coAR's ELBO) -> eval --gen, whose judge may not be the energy's AR."""
    recipe = tmp_path / "recipe.py"
    recipe.write_text("from dlm_jax.families import base_config\n\n\ndef get_config():\n    c = base_config()\n"
                      "    c.model.family = 'edlm'\n    c.edlm.energy = 'ar'\n    return c\n")
    workdir = str(tmp_path / "edlm_ar")
    tiny = ["--config.data.source=text_files", f"--config.data.path={train_corpus}", "--config.data.seq_len=32",
            "--config.eval.batch_size=8", "--config.eval.num_batches=2", *_comp(components)]
    result = _cli(capsys, "train", f"--config={recipe}", f"--workdir={workdir}", *tiny)
    assert result["nothing_to_train"] and not (tmp_path / "edlm_ar" / "checkpoints").exists()
    stats_ = _cli(capsys, "sample", f"--workdir={workdir}", "--sampler=edlm", "--sampler.k=3", "--sampler.window=1",
                  "--num_samples=2", "--length=16", "--steps=4", "--prompt=To")
    assert stats_["family"] == "edlm" and stats_["nfe"] <= 4 and stats_["nfe_energy"] == 3
    assert all(json.loads(line)["text"].startswith("To") for line in open(stats_["output"]))
    result = _cli(capsys, "eval", f"--workdir={workdir}")
    for key in ("nelbo", "nelbo_mdlm", "nelbo_coar", "nelbo_residual_lower", "log_z_mean", "log_z_ess_mean"):
        assert np.isfinite(result[key]), key
    assert result["nelbo_residual_lower"] <= result["nelbo"] and 1.0 <= result["log_z_ess_mean"] <= 8.0
    with pytest.raises(SystemExit):
        main.main(["eval", f"--workdir={workdir}", "--gen", f"--judge_workdir={components['ar']}"])
    assert "is components.ar of this model, which its sampler runs" in capsys.readouterr().err
    sweep = _cli(capsys, "eval", f"--workdir={workdir}", "--gen", f"--judge_workdir={components['judge']}",
                 "--samplers=ancestral,edlm", "--steps_list=4,8", "--num_samples=2", "--length=16",
                 f"--output_dir={tmp_path}")
    rows = {(r["sampler"], r["steps"]): r for r in sweep["rows"]}
    assert set(rows) == {("ancestral", 4), ("ancestral", 8), ("edlm", 4), ("edlm", 8)}
    assert all(np.isfinite(r["gen_ppl"]) for r in rows.values()) and rows[("edlm", 8)]["nfe_energy"] == 2
    assert "nfe_energy" in (tmp_path / "gen_sweep.csv").read_text().splitlines()[0]


def test_coar_is_self_normalised_and_exact(tmp_path, train_corpus, components):
    """coar: the residual NELBO is coAR's ELBO (log Z = 0, no estimate); with ar energy the upper log Z estimate is
    the one eval reports as nelbo."""
    workdir = str(tmp_path / "coar")
    train(tiny_config(train_corpus, "edlm", ["--config.edlm.energy=coar", *_comp(components)]), workdir)
    exp, params, step = restore_for_inference(workdir, load_workdir_config(workdir))
    batch = {"tokens": np.tile(np.arange(32, dtype=np.int32) + 65, (4, 1)), "loss_mask": np.ones((4, 32), np.float32)}
    terms = jax.jit(lambda p, f: exp.family.bind(f).eval_terms(p, batch, jax.random.PRNGKey(0)))(params, exp.frozen)
    np.testing.assert_array_equal(terms["residual"], terms["coar"])
    assert step == 0 and params == {}
