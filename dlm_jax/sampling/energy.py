"""EDLM's sampler: parallel importance sampling as the x_0 proposal of MDLM's reverse step (Xu et al. 2025, Alg. 2).

At a step t -> s with t in the window [1 - w, 1]: k candidates x_0 ~ p_theta(. | x_t) per sample, drawn from the one
denoiser forward of the step (the k candidates of a sample share x_t, hence its logits); all N * k candidates scored
in one energy pass (sample-major rows, `diffusion/energy.py:expand_candidates`); one kept per sample with weights
softmax(-E / tau) (for a tempered / nucleus proposal q: p_theta exp(-E / tau) / q); it is then the proposal of the
masked step's commit rule (ancestral: each [MASK] unmasks w.p. (alpha_s - alpha_t) / (1 - alpha_t)). Outside the
window the plain draw. Candidate 0 is the plain draw itself, so k = 1 is exactly the MDLM sampler (same rng).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from dlm_jax.diffusion import energy as energy_lib
from dlm_jax.diffusion.masked import masked_token_nll
from dlm_jax.diffusion.schedules import MaskSchedule
from dlm_jax.errors import UserError
from dlm_jax.sampling import masked as masked_sampling
from dlm_jax.sampling.loop import SampleSpec, nucleus_logits, option, sample_categorical

Array = jax.Array
# (x_t [M, L], x_0 [M, L], t [M], log p_theta(x_0^l | x_t) [M, L]) -> E [M]
EnergyFn = Callable[[Array, Array, Array, Array], Array]
INNER = ("ancestral", "cached")


@dataclasses.dataclass(frozen=True)
class EDLMOptions:
    k: int = option(4, "candidates per sample at each step in the window (1: the plain MDLM step)")
    tau: float = option(1.0, "energy temperature: candidates weighted by softmax(-E / tau)")
    window: float = option(0.2, "importance sampling at steps with t >= 1 - window (1: every step)")
    inner: str = option("ancestral", "the masked rule around the proposal (cached: t-agnostic MDLMs)", INNER)
    time_grid: str = masked_sampling.time_grid_option()


def check(spec: SampleSpec, time_conditioned: bool, seq_len: int) -> None:
    """One-line errors for options the edlm sampler cannot run with."""
    o = spec.options
    masked_sampling.check_runner(spec, time_conditioned)
    if o.k < 1 or o.tau <= 0 or not 0.0 <= o.window <= 1.0:
        raise UserError(f"edlm needs --sampler.k >= 1, --sampler.tau > 0 and --sampler.window in [0, 1]; got k={o.k}, "
                        f"tau={o.tau}, window={o.window}")
    if spec.temperature == 0 and o.k > 1:
        raise UserError("edlm weighs k random candidates: --temperature=0 makes them all the argmax; use "
                        "--temperature > 0 or --sampler.k=1")
    if spec.length > seq_len:
        raise UserError(f"the model was trained on data.seq_len={seq_len} tokens; cannot sample {spec.length} "
                        "(lower --length)")


def in_window(t: Array, window: float) -> Array:
    return t >= 1.0 - window - 1e-6


def draw_candidates(keys: Array, logits: Array, tokens: Array, mask_id: int, temperature: float = 1.0,
                    top_p: float = 1.0) -> Array:
    """One draw x_0 ~ softmax(logits [N, L, V]) per key of keys [k, ...], visible tokens of x_t [N, L] carried over:
    candidates [N, k, L] (candidate j of sample b at [b, j]: the sample-major layout)."""
    draws = jax.lax.map(lambda key: sample_categorical(key, logits, temperature, top_p), keys)  # [k, N, L]
    return jnp.where((tokens == mask_id)[:, None], jnp.swapaxes(draws, 0, 1), tokens[:, None])


def importance_proposal(energy_fn: EnergyFn, spec: SampleSpec, mask_id: int) -> masked_sampling.ProposalFn:
    """The ProposalFn (rng, SUBS logits [N, L, V], x_t [N, L], t) -> x_0 [N, L] of EDLM's importance sampling."""
    k, tau, window = spec.options.k, spec.options.tau, spec.options.window

    def draw(key: Array, logits: Array) -> Array:
        return sample_categorical(key, logits, spec.temperature, spec.top_p)

    def weighted(rng: Array, logits: Array, tokens: Array, t: Array) -> Array:
        n, length = tokens.shape
        keys = jnp.stack([rng] + [jax.random.fold_in(rng, j) for j in range(1, k)])  # candidate 0: the plain draw
        candidates = draw_candidates(keys, logits, tokens, mask_id, spec.temperature, spec.top_p)  # [N, k, L]
        masked = tokens == mask_id
        # log p_theta(x_0^l | x_t) of each candidate's masked tokens [N, k, L] (carried-over tokens: 0)
        token_logp = -masked_token_nll(logits[:, None], candidates, masked[:, None], mask_id)
        proposal_logp = token_logp
        if spec.temperature != 1.0 or spec.top_p < 1.0:  # candidates came from the tempered / nucleus q
            q_logits = nucleus_logits(logits.astype(jnp.float32) / spec.temperature, spec.top_p)
            proposal_logp = -masked_token_nll(q_logits[:, None], candidates, masked[:, None], mask_id)
        energy = energy_lib.group_candidates(energy_fn(
            energy_lib.expand_candidates(tokens, k), candidates.reshape(n * k, length),
            jnp.broadcast_to(t, (n * k,)), token_logp.reshape(n * k, length)), k)  # [N, k]
        log_w = energy_lib.log_importance_weights(token_logp.sum(-1), proposal_logp.sum(-1), energy, tau)
        return energy_lib.resample(jax.random.fold_in(rng, k), candidates, log_w)

    def propose(rng: Array, logits: Array, tokens: Array, t: Array) -> Array:
        if k == 1:
            return draw(rng, logits)
        return jax.lax.cond(in_window(jnp.asarray(t), window), lambda: weighted(rng, logits, tokens, t),
                            lambda: draw(rng, logits))

    return propose


def sample(logits_fn: masked_sampling.LogitsFn, energy_fn: EnergyFn, rng: Array, template: Array, spec: SampleSpec,
           mask_id: int, schedule: MaskSchedule, t_eps: float) -> tuple[Array, dict[str, Array]]:
    """(tokens [N, L], {"nfe": denoiser forwards, "nfe_energy": energy passes, each over N * k rows})."""
    tokens, stats = masked_sampling.sample(logits_fn, rng, template, spec, mask_id=mask_id, schedule=schedule,
                                           t_eps=t_eps, proposal=importance_proposal(energy_fn, spec, mask_id))
    ms = masked_sampling.MaskedSampling(spec, mask_id, schedule, t_eps)
    steps = masked_sampling.reverse_steps(spec.options.inner, spec.steps)
    t, _ = ms.grid(jnp.arange(steps), steps)
    passes = jnp.sum(in_window(t, spec.options.window)) if spec.options.k > 1 else jnp.zeros((), jnp.int32)
    return tokens, {**stats, "nfe_energy": passes.astype(jnp.int32)}
