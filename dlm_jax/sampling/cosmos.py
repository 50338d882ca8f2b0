"""The Cosmos sampler: Gaussian latent diffusion over the N latent slots, then the autoencoder's decoder; one
`lax.scan` on the `sample_latent` skeleton (sampling/loop.py).

Prior z ~ N(0, I) [num_samples, N, C]; T steps on the uniform grid t_0 = 1 > ... > t_{T-1} = t_min: at t_i the
denoiser predicts x0_hat (reading the previous x0_hat when self-conditioning), then DDIM (or the exact posterior,
`ddpm`) moves z to t_{i+1}; the last x0_hat is de-normalised and decoded (argmax, or a draw at --temperature).
NFE: T denoiser forwards + 1 decoder pass (+ T decoder passes with prompt guidance).

Prompts (a template with known tokens) are approximate: each x0_hat takes one step of size `prompt_guidance` down
the gradient of the decoder's cross-entropy on the known tokens (reconstruction guidance on x0, Chung et al. 2023
style), and the known tokens are then pinned in the output. `prompt_match` reports how many of them the decoder
produced before pinning: the honest measure of how well the latent honours the prompt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dlm_jax.diffusion import gaussian
from dlm_jax.diffusion.common import token_nll
from dlm_jax.sampling.loop import SampleSpec, argmax_last, option, sample_categorical, sample_latent

Array = jax.Array
STEPS = ("ddim", "ddpm")
DECODES = ("argmax", "sample")


@dataclasses.dataclass(frozen=True)
class CosmosOptions:
    step: str = option("ddim", "the reverse step: deterministic DDIM or the exact Gaussian posterior (DDPM)", STEPS)
    t_min: float = option(0.05, "the last time of the uniform grid 1 -> t_min (x0_hat there is decoded)")
    self_condition: bool = option(True, "feed each step's x0_hat back (models trained with self-conditioning)")
    decode: str = option("argmax", "tokens from the decoder's logits: argmax, or a draw at --temperature", DECODES)
    prompt_guidance: float = option(10.0, "prompts: size of each x0 guidance step on the known tokens' CE (0: none)")


def time_grid(steps: int, t_min: float) -> Array:
    """[steps] times from 1 down to t_min, uniform (one step: t_min)."""
    return jnp.linspace(1.0, t_min, steps) if steps > 1 else jnp.full((1,), t_min)


def sample(denoiser: Callable[[Array, Array, Array | None], Array], decode_logits: Callable[[Array], Array],
           rng: Array, template: np.ndarray, spec: SampleSpec, schedule: gaussian.LatentSchedule,
           latent_shape: tuple[int, int], self_conditioned: bool) -> tuple[Array, dict[str, Array]]:
    """(tokens [num_samples, len(template)], {"nfe", "prompt_match"}).

    denoiser(z [N, S, C], t [N], x0_sc | None) -> x0_hat (normalised latents); decode_logits(x0_hat) -> logits
    [N, L, V] over the model's L >= len(template) positions (de-normalising inside)."""
    opts = spec.options
    n, length = spec.num_samples, len(template)
    grid = time_grid(spec.steps, opts.t_min)
    feed_back = self_conditioned and opts.self_condition
    known = np.asarray(template) >= 0
    guided = bool(known.any()) and opts.prompt_guidance > 0
    targets = jnp.asarray(np.where(known, template, 0), jnp.int32)

    def prompt_loss(x0_hat: Array) -> Array:
        nll = token_nll(decode_logits(x0_hat)[:, :length], jnp.broadcast_to(targets, (n, length)))
        return (nll * jnp.asarray(known, jnp.float32)).sum()

    def step(carry: tuple[Array, Array], i: Array, rng_step: Array) -> tuple[Array, Array]:
        z, previous = carry
        t, s = grid[i], grid[jnp.minimum(i + 1, spec.steps - 1)]  # the last step stays at t_min
        t_row = jnp.full((n,), t)
        x0_hat = denoiser(z, t_row, previous if feed_back else None)
        if guided:
            x0_hat = x0_hat - opts.prompt_guidance * jax.grad(prompt_loss)(x0_hat)
        if opts.step == "ddim":
            z = gaussian.ddim_step(z, x0_hat, t_row, jnp.full((n,), s), schedule)
        else:
            z = gaussian.ddpm_step(rng_step, z, x0_hat, t_row, jnp.full((n,), s), schedule)
        return z, x0_hat

    def prior(rng_prior: Array) -> tuple[Array, Array]:
        z = jax.random.normal(rng_prior, (n, *latent_shape), jnp.float32)
        return z, jnp.zeros_like(z)

    rng, rng_decode = jax.random.split(rng)

    def decode(carry: tuple[Array, Array]) -> Array:
        logits = decode_logits(carry[1])[:, :length]
        if opts.decode == "argmax":
            return argmax_last(logits)
        return sample_categorical(rng_decode, logits, spec.temperature, spec.top_p)

    tokens, stats = sample_latent(prior, step, decode, rng, template, n, spec.steps)
    if guided:
        stats["nfe"] = stats["nfe"] + spec.steps
    return tokens, stats
