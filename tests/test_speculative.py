"""Lossless speculative decoding (sampling/speculative.py): FreeDave gives its greedy target's tokens (semi_ar /
block_nocache with topk_confidence, one token per step, temperature 0) in fewer forwards; DiffuSpec gives the `ar`
sampler's greedy tokens, and at temperature 1 exactly the AR's distribution; known tokens stay; one-line errors."""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm_jax import config as config_lib
from dlm_jax import families, main
from dlm_jax.diffusion.masked import subs_logits
from dlm_jax.errors import UserError
from dlm_jax.experiment import load_sampler_components
from dlm_jax.families.base import Component
from dlm_jax.sampling import speculative
from dlm_jax.sampling.loop import SampleSpec
from dlm_jax.train.loop import train
from tests.helpers import StubTokenizer, tiny_config

VOCAB = 12  # tokens; the masked families add [MASK] = 12
MASK = VOCAB
PROMPT = np.array([3, 1, 4, 1] + [-1] * 12, np.int32)  # one whole block of 4
FREE = np.full((16,), -1, np.int32)


class Tokenizer(StubTokenizer):
    def describe(self) -> dict:
        return {"tokenizer": "stub", "vocab_size": self.vocab_size, "eos_id": self.eos_id}


def _bare(name, **model):
    """A tiny family of `name` (no params)."""
    c = families.base_config()
    c.model.family = name
    c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.mlp_dim = 2, 32, 4, 64
    c.model.update(model)
    c.data.seq_len = 32
    return families.get(name)(c, Tokenizer(VOCAB), {})


def _family(name, seed=0, scale=0.3, **model):
    """A tiny random family; its params are perturbed (by `scale`) so the predictions are sharp, not near-ties."""
    fam = _bare(name, **model)
    params = fam.model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 16), jnp.int32), jnp.ones((1,)))["params"]
    params = jax.tree.map(lambda x: x + scale * jax.random.normal(jax.random.PRNGKey(seed + 1), x.shape), params)
    return fam, params


def _confidence_gap(fam, params, template, block):
    """The smallest gap between the top two confidences of the greedy target's commits after its first forward.
    FreeDave verifies drafts in batches of N k rows, whose float noise (~1e-6 on CPU) may flip a near-tie that
    the target, run on N rows, broke the other way: the token-for-token claim holds for models without them
    (the all-[MASK] first forward has exact ties, broken by index in the same N-row forward on both paths)."""
    forward = jax.jit(fam.bind(fam.frozen).sequence_forward(params, jax.random.PRNGKey(0)))
    z = jnp.asarray(np.where(template < 0, MASK, template)[None], jnp.int32)
    gaps = []
    for i in range(int((template < 0).sum())):
        logits = subs_logits(forward(z, speculative.block_time(z, MASK, block)), MASK)
        todo = (z == MASK) & speculative.current_block(z == MASK, block)
        conf = np.where(todo, np.asarray(jax.nn.softmax(logits, -1).max(-1)), -1.0)[0]
        top = np.sort(conf)[::-1]
        gaps += [top[0] - top[1]] if i and top[1] >= 0 else []
        position, token = speculative.greedy_commit(logits, z, MASK, block)
        z = z.at[0, position[0]].set(token[0])
    return min(gaps, default=1.0)


def _spec(fam, sampler, template, n=3, steps=16, temperature=0.0, **options):
    return SampleSpec(sampler, n, len(template), steps=steps, temperature=temperature,
                      options=fam.sampler(sampler).options(**options))


def _sample(fam, params, sampler, template, seed=0, **kw):
    spec = _spec(fam, sampler, template, **kw)
    fam.check_sample(spec, template)
    tokens, stats = jax.jit(lambda p, f, r: fam.bind(f).sample(p, r, spec, template))(
        params, fam.frozen, jax.random.PRNGKey(seed))
    return np.asarray(tokens), {k: float(v) for k, v in stats.items()}


def _keeps_template(tokens, template):
    known = template >= 0
    np.testing.assert_array_equal(tokens[:, known], np.broadcast_to(template[known], (len(tokens), known.sum())))
    assert tokens.min() >= 0 and tokens.max() < VOCAB  # no [MASK] left


@pytest.fixture(scope="module")
def mdlm():
    return _family("mdlm", seed=7)  # seed: its greedy texts are not one repeated token


@pytest.fixture(scope="module")
def ar():
    fam, params = _family("ar", seed=5)
    return Component("verifier", "/verifier", fam, params, fam.config)


# ---------------------------------------------------------------------------------------------- FreeDave


@pytest.mark.parametrize("template", [FREE, PROMPT], ids=["free", "prompt"])
def test_freedave_is_the_greedy_semi_ar_decoder_token_for_token(mdlm, template):
    fam, params = mdlm
    assert _confidence_gap(fam, params, template, 4) > 1e-4
    target, stats = _sample(fam, params, "semi_ar", template, block_length=4, inner="topk_confidence")
    assert stats["nfe"] == 16  # one token per forward (a known block: 4 forwards that commit nothing)
    tokens, fast = _sample(fam, params, "freedave", template, block_length=4, draft_size=4)
    np.testing.assert_array_equal(tokens, target)
    _keeps_template(tokens, template)
    generated = (template < 0).sum()
    assert fast["nfe"] < generated and fast["mean_accepted"] > 1.5  # real multi-token steps ...
    assert fast["forward_rows"] == 3 + 3 * 4 * (fast["nfe"] - 1)  # ... each verification forwards N * k rows
    # committing the k most confident tokens of one forward without the verification is not the target
    unverified, _ = _sample(fam, params, "semi_ar", template, steps=4, block_length=4, inner="topk_confidence")
    assert (unverified != target).any()


def test_freedave_with_one_draft_is_the_target_and_time_conditioning_matches():
    # t = the masked fraction of the block; seed and scale: no near-tie on the target's path (gap 1.4e-3)
    fam, params = _family("mdlm", seed=4, scale=0.15, time_conditioning=True)
    assert _confidence_gap(fam, params, FREE, 8) > 1e-4
    target, _ = _sample(fam, params, "semi_ar", FREE, n=2, block_length=8, inner="topk_confidence")
    for k in (1, 3):
        tokens, stats = _sample(fam, params, "freedave", FREE, n=2, block_length=8, draft_size=k)
        np.testing.assert_array_equal(tokens, target)
    assert stats["nfe"] < 16


def test_freedave_on_block_diffusion_is_block_nocache_greedy_with_and_without_the_kv_cache():
    # a prompt block first: from no context at all the tiny block model's first commit is a near-tie that the
    # cached and uncached forwards' float noise breaks either way (the `block` sampler's too)
    template = PROMPT
    fam, params = _family("block", seed=3)  # block_size 4
    assert _confidence_gap(fam, params, template, 4) > 1e-4
    target, _ = _sample(fam, params, "block_nocache", template, inner="topk_confidence")
    cached_target, _ = _sample(fam, params, "block", template, inner="topk_confidence")
    np.testing.assert_array_equal(cached_target, target)
    tokens, cached = _sample(fam, params, "freedave", template, draft_size=4)
    uncached_tokens, uncached = _sample(fam, params, "freedave_nocache", template, draft_size=4)
    np.testing.assert_array_equal(tokens, target)
    np.testing.assert_array_equal(uncached_tokens, target)
    _keeps_template(tokens, template)
    generated, blocks = int((template < 0).sum()), len(template) // 4
    # cached: a forward per masked block (its first prediction), the verifications, a K/V write per finished
    # block but the last; each verification runs N k rows of one block, the others N rows
    verifications = cached["nfe"] - generated // 4 - (blocks - 1)
    assert 1 <= verifications < generated and cached["mean_accepted"] > 1.5
    assert cached["forward_rows"] == 3 * (cached["nfe"] - verifications) + 3 * 4 * verifications
    assert uncached["nfe"] < generated and uncached["forward_rows"] == 3 + 3 * 4 * (uncached["nfe"] - 1)
    unverified, _ = _sample(fam, params, "block_nocache", template, steps=4, inner="topk_confidence")
    assert (unverified != target).any()


# ---------------------------------------------------------------------------------------------- DiffuSpec


def test_diffuspec_greedy_is_the_ar_greedy_decoder(mdlm, ar):
    fam, params = mdlm
    fam.add_component(ar, "--sampler.verifier")
    for template in (PROMPT, FREE):
        target, ar_stats = _sample(ar.family, ar.params, "ar", template)
        tokens, stats = _sample(fam, params, "diffuspec", template, verifier="/verifier", draft_size=4)
        np.testing.assert_array_equal(tokens, target)
        _keeps_template(tokens, template)
        assert stats["nfe"] == stats["nfe_drafter"] + stats["nfe_verifier"]
        assert stats["nfe_verifier"] <= ar_stats["nfe"] + 1  # worst case (no draft kept): + the prompt's prefill


# (adaptive, steps, drafts kept per row and step): rows without / with a wrong draft at 9 / at 5, 6 and 12 take
# 3 / 4 / 5 steps keeping 9 / 8 / 7 drafts at k = 4; adaptive k (4 -> a + 1, doubled after a full accept) keeps
# fewer: 3 / 5 / 7 steps keeping 9 / 7 / 5 (all 4 slots are forwarded anyway: why it is off by default)
@pytest.mark.parametrize("adaptive,steps,mean_accepted", [(False, 5, 24 / 12), (True, 7, 21 / 15)])
def test_diffuspec_keeps_good_drafts_and_fixes_bad_ones(ar, adaptive, steps, mean_accepted):
    """A drafter that knows the AR's greedy text except at a few positions: the drafts are kept up to each wrong
    one, the AR's token replaces it, and the output is still the AR's (the pure sampler on a real AR)."""
    target, _ = _sample(ar.family, ar.params, "ar", PROMPT)
    guess = target.copy()
    guess[0, 9] = (guess[0, 9] + 1) % VOCAB
    guess[1, [5, 6, 12]] = (guess[1, [5, 6, 12]] + 1) % VOCAB
    drafter = lambda z, t: 30.0 * jax.nn.one_hot(jnp.asarray(guess), VOCAB + 1)  # noqa: E731
    decode = ar.family.decode_fn(ar.params)
    spec = SampleSpec("diffuspec", 3, 16, temperature=0.0,
                      options=speculative.DiffuSpecOptions(verifier="/verifier", draft_size=4, adaptive=adaptive))
    tokens, stats = jax.jit(lambda rng: speculative.diffuspec(
        drafter, lambda x, cache, i: decode(x, None, cache, i), ar.family.empty_cache, rng, PROMPT, spec, MASK,
        ar.family.bos_id))(jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(tokens), target)
    assert int(stats["nfe_drafter"]) == steps and float(stats["mean_accepted"]) == pytest.approx(mean_accepted)
    assert int(stats["nfe_verifier"]) == steps + 1  # + the prompt's prefill


def _toy_tables():
    """A bigram AR p(x_l | x_{l-1}) on 3 tokens (row 3: after BOS) and a drafter q_l per position, far from p."""
    p = jnp.array([[0.6, 0.3, 0.1], [0.1, 0.2, 0.7], [0.3, 0.4, 0.3], [0.2, 0.5, 0.3]])
    q = jnp.array([[0.1, 0.1, 0.8], [0.5, 0.4, 0.1], [0.2, 0.2, 0.6]])
    return p, q


def test_speculative_sampling_keeps_the_ar_distribution_on_a_toy_vocabulary():
    """Chi-square of 40,000 three-token sequences of the whole sampler (drafts, acceptance, residual and bonus
    draws, several steps) against the exact AR joint, with hand-made p and q tables."""
    p, q = _toy_tables()
    bos, mask = 3, 3  # the toy AR's BOS row; the drafter's [MASK] column
    drafter = lambda z, t: jnp.broadcast_to(jnp.log(jnp.pad(q, ((0, 0), (0, 1)))), (*z.shape, 4))  # noqa: E731

    def verifier(x, cache, index):  # the bigram's logits from the input token only; the cache is not needed
        return jnp.log(p)[x], cache

    n = 40_000
    exact = np.array([p[bos, a] * p[a, b] * p[b, c] for a in range(3) for b in range(3) for c in range(3)])
    for k, adaptive in ((2, False), (1, True), (3, True)):
        spec = SampleSpec("diffuspec", n, 3, temperature=1.0,
                          options=speculative.DiffuSpecOptions(verifier="toy", draft_size=k, adaptive=adaptive))
        tokens, stats = jax.jit(lambda rng, spec=spec: speculative.diffuspec(
            drafter, verifier, lambda b, length: jnp.zeros((1, b)), rng, np.full((3,), -1, np.int32), spec, mask,
            bos))(jax.random.PRNGKey(k))
        tokens = np.asarray(tokens)
        counts = np.bincount(tokens[:, 0] * 9 + tokens[:, 1] * 3 + tokens[:, 2], minlength=27)
        chi2 = float((((counts - n * exact) ** 2) / (n * exact)).sum())
        assert chi2 < 54.1, (k, chi2)  # the 0.999 quantile of chi-square with 26 degrees of freedom
        assert 0 < float(stats["mean_accepted"]) < k  # drafts kept, and some rejected
    drafts_only = np.array([q[0, a] * q[1, b] * q[2, c] for a in range(3) for b in range(3) for c in range(3)])
    assert float((((n * drafts_only - n * exact) ** 2) / (n * exact)).sum()) > 1000  # the test can tell them apart


def test_speculative_accept_by_hand():
    """One position, two tokens: accept prob min(1, p/q), residual norm(max(p - q, 0)), bonus from p."""
    p = jnp.array([[[0.25, 0.75], [0.9, 0.1]]])  # p_1, and the bonus p_2
    q = jnp.array([[[0.5, 0.5]]])
    n = 2000
    accepted, tokens = map(np.asarray, speculative.speculative_accept(
        jax.random.PRNGKey(0), jnp.zeros((n, 1), jnp.int32), jnp.broadcast_to(q, (n, 1, 2)),
        jnp.broadcast_to(p, (n, 2, 2)), jnp.ones((n,), jnp.int32)))
    assert 0.45 < accepted.mean() < 0.55  # min(1, 0.25 / 0.5)
    assert (tokens[accepted == 0] == 1).all()  # residual (0, 0.25): always token 1
    assert 0.87 < (tokens[accepted == 1] == 0).mean() < 0.93  # bonus ~ p_2 = (0.9, 0.1)
    none, token = speculative.speculative_accept(jax.random.PRNGKey(0), jnp.array([[0]]), q, p, jnp.array([0]))
    assert int(none[0]) == 0  # no usable draft: the token comes from p_1


# ---------------------------------------------------------------------------------------------- errors


def _one_line_error(match, fn, *args):
    with pytest.raises(UserError, match=match) as info:
        fn(*args)
    assert "\n" not in str(info.value)


def test_speculative_checks_are_one_line(tmp_path, ar):
    fam = _bare("mdlm")
    check = fam.check_sample
    _one_line_error("draft_size must be >= 1", check, _spec(fam, "freedave", FREE, draft_size=0), FREE)
    _one_line_error("not divisible by the block length 5", check, _spec(fam, "freedave", FREE, block_length=5), FREE)
    _one_line_error("needs --sampler.verifier=WORKDIR", check, _spec(fam, "diffuspec", PROMPT), PROMPT)
    _one_line_error("is not loaded", check, _spec(fam, "diffuspec", PROMPT, verifier="/elsewhere"), PROMPT)
    fam.add_component(ar, "--sampler.verifier")
    spec = _spec(fam, "diffuspec", PROMPT, verifier="/verifier")
    _one_line_error("only continue a prompt", check, spec, np.array([-1, 2] + [-1] * 14, np.int32))
    _one_line_error("draft_size must be >= 1", check, _spec(fam, "diffuspec", PROMPT, verifier="/verifier",
                                                           draft_size=0), PROMPT)
    short = Component("verifier", "/short", ar.family, ar.params, ar.config.copy_and_resolve_references())
    short.config.data.seq_len = 8
    fam.add_component(short, "--sampler.verifier")
    _one_line_error(r"verifier='/short' was trained on data.seq_len=8", check,
                    _spec(fam, "diffuspec", PROMPT, verifier="/short"), PROMPT)
    other = types.SimpleNamespace(tokenizer=Tokenizer(VOCAB + 1))  # all a tokenizer check reads of a family
    _one_line_error("--sampler.verifier='/other' uses another tokenizer", fam.add_component,
                    Component("verifier", "/other", other, ar.params, ar.config), "--sampler.verifier")
    block = _bare("block")
    _one_line_error("length 18 is not divisible by the block length 4", block.check_sample,
                    _spec(block, "freedave", np.full((18,), -1, np.int32)), np.full((18,), -1, np.int32))
    # a verifier workdir of another family: load_component's one line, naming the option
    (tmp_path / "config.json").write_text(config_lib.to_json(fam.config))
    exp = types.SimpleNamespace(family=fam, config=fam.config,
                                mesh=jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",)))
    _one_line_error(r"--sampler.verifier='.*': it holds a 'mdlm' model, this slot takes ar", load_sampler_components,
                    exp, _spec(fam, "diffuspec", PROMPT, verifier=str(tmp_path)))


# ---------------------------------------------------------------------------------------------- CLI


def _cli(capsys, *argv):
    main.main(list(argv))
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _tokens(path):
    return [json.loads(line)["tokens"] for line in open(path, encoding="utf-8")]


@pytest.mark.slow
def test_diffuspec_through_the_cli(tmp_path, capsys, train_corpus):
    """`sample --sampler=diffuspec --sampler.verifier=AR_WORKDIR` loads the AR once and gives its greedy text; `eval
    --gen` sweeps it; the verifier may not judge the samples it chose."""
    workdirs = {f: str(tmp_path / f) for f in ("mdlm", "ar")}
    for family, workdir in workdirs.items():
        train(tiny_config(train_corpus, family, ["--config.train.num_steps=2"]), workdir)
    common = ["--num_samples=2", "--length=16", "--prompt=To", "--temperature=0"]
    _cli(capsys, "sample", f"--workdir={workdirs['ar']}", "--sampler=ar", f"--output={tmp_path / 'ar.jsonl'}", *common)
    verifier = f"--sampler.verifier={workdirs['ar']}"
    row = _cli(capsys, "sample", f"--workdir={workdirs['mdlm']}", "--sampler=diffuspec", verifier,
               f"--output={tmp_path / 'spec.jsonl'}", *common)
    assert _tokens(tmp_path / "spec.jsonl") == _tokens(tmp_path / "ar.jsonl")
    assert row["nfe"] == row["nfe_drafter"] + row["nfe_verifier"] and "mean_accepted" in row
    sweep = _cli(capsys, "eval", f"--workdir={workdirs['mdlm']}", "--gen", "--samplers=diffuspec", "--steps_list=4",
                 verifier, f"--output_dir={tmp_path}", *common)
    assert [r["sampler"] for r in sweep["rows"]] == ["diffuspec"]
    with pytest.raises(SystemExit):
        main.main(["sample", f"--workdir={workdirs['mdlm']}", "--sampler=diffuspec", verifier,
                   f"--judge_workdir={workdirs['ar']}", *common])
    assert "is --sampler.verifier of this model, which its sampler runs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main.main(["sample", f"--workdir={workdirs['mdlm']}", "--sampler=diffuspec",
                   f"--sampler.verifier={workdirs['mdlm']}", *common])
    err = capsys.readouterr().err
    assert "--sampler.verifier=" in err and "this slot takes ar" in err and err.count("\n") == 1
