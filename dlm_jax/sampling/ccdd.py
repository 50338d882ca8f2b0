"""The CCDD sampler: one joint reverse step t -> s per forward, tokens by a masked commit rule, the latent by
DDIM or the exact Gaussian posterior (DDPM), optional classifier-free guidance on the latent; one `lax.scan`.

Each step: (logits, z0_hat) = f(x_t, z_t, t) (guided: logits = w f(x_t, z_t) + (1 - w) f(x_t, 0), two forwards);
x: the masked rule's proposal + commit (`ancestral`: MDLM's (alpha_s - alpha_t) / (1 - alpha_t) per [MASK];
`topk_confidence`: the k most confident); z: `ddim` or `ddpm` to s. With T steps the NFE budget is T as for MDLM:
T - 1 reverse steps on the grid 1 -> eps and one argmax pass for what is still masked (topk finishes itself);
a guided forward counts 2. Known template tokens never change; the latent starts from N(0, I) everywhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from dlm_jax.diffusion import ccdd, gaussian
from dlm_jax.diffusion.masked import subs_logits
from dlm_jax.sampling.loop import SamplerState, SampleSpec, init_state, option, run_scan
from dlm_jax.sampling.masked import MaskedSampling, reverse_steps, time_grid_option, unmask_schedule_option

Array = jax.Array
# (x_t [N, L], z_t [N, L, C], t [N]) -> (raw logits [N, L, V+1], z0_hat [N, L, C])
JointFn = Callable[[Array, Array, Array], tuple[Array, Array]]
RULES = ("ancestral", "topk_confidence")
LATENT_STEPS = ("ddim", "ddpm")


@dataclasses.dataclass(frozen=True)
class CCDDOptions:
    rule: str = option("ancestral", "how [MASK]s commit each step", RULES)
    latent_step: str = option("ddim", "the latent's reverse step: DDIM or the exact posterior (DDPM)", LATENT_STEPS)
    guidance: float = option(1.0, "w: logits = w f(x, z) + (1 - w) f(x, 0); 1 = unguided (one forward per step)")
    time_grid: str = time_grid_option()
    unmask_schedule: str = unmask_schedule_option()


def joint_forward(net: JointFn, tokens: Array, z: Array, t: Array, guidance: float | None) -> tuple[Array, Array]:
    """(logits, z0_hat) of the joint state; with guidance a batch of 2N rows (z and zeros), the logits combined by
    `ccdd.guided_logits` and z0_hat from the latent-conditioned half."""
    t = jnp.broadcast_to(t, (tokens.shape[0],))
    if guidance is None:
        return net(tokens, z, t)
    both, z0_hat = net(jnp.concatenate([tokens, tokens]), jnp.concatenate([z, jnp.zeros_like(z)]),
                       jnp.concatenate([t, t]))
    cond, uncond = jnp.split(both, 2)
    return ccdd.guided_logits(cond, uncond, guidance), jnp.split(z0_hat, 2)[0]


def sample(net: JointFn, rng: Array, template: Array, spec: SampleSpec, ms: MaskedSampling,
           schedule: gaussian.LatentSchedule, latent_dim: int,
           guidance: float | None) -> tuple[Array, dict[str, Array]]:
    """`spec.num_samples` sequences from the template [L] ([MASK] where generated): (tokens [N, L], {"nfe"}).
    `guidance` None: unguided; a float w: every forward is guided (2 forwards, even at w = 1)."""
    rule, step_kind = spec.options.rule, spec.options.latent_step
    tokens = jnp.broadcast_to(template.astype(jnp.int32), (spec.num_samples, template.shape[0]))
    rng, rng_prior = jax.random.split(rng)
    z = jax.random.normal(rng_prior, tokens.shape + (latent_dim,), jnp.float32)
    state = init_state(tokens, rng, z)
    active = jnp.ones(tokens.shape, bool)
    per_forward = 1 if guidance is None else 2
    steps = reverse_steps(rule, spec.steps)
    m0 = ms.todo(tokens, active).sum(-1)

    def step(st: SamplerState, i: Array) -> SamplerState:
        t, s = ms.grid(i, steps)
        rng, rng_z = jax.random.split(st.rng)
        logits, z0_hat = joint_forward(net, st.tokens, st.cache, t, guidance)
        logits = subs_logits(logits, ms.mask_id)
        st = st.replace(rng=rng)
        if rule == "ancestral":
            st = ms.ancestral_update(st, logits, t, s, active)
        else:
            st = ms.topk_update(st, logits, t, m0, i, steps, active)
        if step_kind == "ddim":
            z_s = gaussian.ddim_step(st.cache, z0_hat, t, s, schedule)
        else:
            z_s = gaussian.ddpm_step(rng_z, st.cache, z0_hat, t, s, schedule)
        return st.replace(cache=z_s, nfe=st.nfe + per_forward)

    state = run_scan(step, state, steps)
    before = state.nfe
    state = ms.final_argmax(lambda x, t: joint_forward(net, x, state.cache, t, guidance)[0], state)
    state = state.replace(nfe=before + (state.nfe - before) * per_forward)
    return state.tokens, {"nfe": state.nfe}
