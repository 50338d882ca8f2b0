"""Lossless speculative decoding: several tokens per step, each step verified so the output is a fixed target's.

  freedave   FreeDave ("Free Draft-and-Verification", lossless parallel decoding for DLMs). Target: greedy
             one-token-per-step masked decoding, semi-AR blocks, each step the most confident [MASK] of the current
             block takes its argmax (ties: lowest index). From the forward on z, draft_j = z + its first j commits
             (j = 1..k); one batched forward of the k drafts verifies them: draft_{j+1} is valid iff the target rule
             on draft_j's prediction commits exactly its (j+1)-th token. The longest valid chain is accepted and its
             forward is the next prediction, so the output is the target's, token for token. `freedave_cached`:
             the same on block diffusion against the exact KV cache (forwards of one block, drafts within it).
  diffuspec  DiffuSpec (a diffusion LM as the drafter of speculative decoding): the DLM drafts x_i ~ q_i for the next
             k positions of [prefix, MASK...] in one forward; the AR verifier scores [last, x_1..x_k] in one KV-cached
             forward; x_i is kept w.p. min(1, p_i(x_i) / q_i(x_i)) while all before it were, the first rejected one
             is redrawn from norm(max(p_i - q_i, 0)), and after k acceptances a bonus comes from p_{k+1}: every token
             follows p exactly (Leviathan et al. 2023), >= 1 token per step. Temperature 0: the AR's greedy output.
Each is one `lax.while_loop` (cached FreeDave: one per block, in a `lax.scan` over the blocks). `nfe` counts
forward calls (a batched verification is one); FreeDave's `forward_rows` counts the sequences they ran (N per
forward on z, N k per verification), the honest cost.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dlm_jax.diffusion.masked import subs_logits
from dlm_jax.errors import UserError
from dlm_jax.sampling.autoregressive import check_prompt
from dlm_jax.sampling.loop import (
    SamplerState,
    SampleSpec,
    argmax_last,
    init_state,
    nucleus_logits,
    option,
    run_while,
    sample_categorical,
)
from dlm_jax.sampling.masked import LogitsFn, check_blocks
from dlm_jax.sampling.parallel import draw_confidence

Array = jax.Array
# decode(tokens [N, Lq], cache, index) -> (logits [N, Lq, V], cache with the queries' K/V written at index)
DecodeFn = Callable[[Array, Any, Array], tuple[Array, Any]]
# decode(tokens [N, Lb], t [N], cache, index, valid=None) -> (logits, cache): sampling/block.py's, read-only with
# `valid` (the block reads cache[:valid] and writes nothing)
BlockDecodeFn = Callable[..., tuple[Array, Any]]


@dataclasses.dataclass(frozen=True)
class FreeDaveOptions:
    draft_size: int = option(4, "k: drafts per step, verified in one forward of N*k rows (1: the target itself)")


@dataclasses.dataclass(frozen=True)
class SemiARFreeDaveOptions(FreeDaveOptions):
    block_length: int = option(0, "tokens per semi-AR block (0: 16, or the whole length if shorter)")


@dataclasses.dataclass(frozen=True)
class DiffuSpecOptions:
    verifier: str = option("", "WORKDIR of a trained `ar` model with this tokenizer that verifies the drafts "
                               "(required)")
    draft_size: int = option(8, "k_max: draft slots per step (all k_max are forwarded: fixed shapes)")
    adaptive: bool = option(False, "k_next = accepted + 1, doubled after a full accept, within [1, k_max] (all k_max "
                                   "slots are forwarded anyway, so this only caps acceptance); false: k = k_max")


# -- checks ----------------------------------------------------------------------------------------
def check_draft_size(spec: SampleSpec) -> None:
    if spec.option("draft_size", 1) < 1:
        raise UserError(f"--sampler.draft_size must be >= 1, got {spec.option('draft_size')}")


def check_length(spec: SampleSpec, seq_len: int, what: str) -> None:
    if spec.length > seq_len:
        raise UserError(f"{spec.sampler}: {what} was trained on data.seq_len={seq_len} tokens; cannot sample "
                        f"--length={spec.length}")


def check_freedave(spec: SampleSpec, block: int, seq_len: int) -> None:
    """One-line errors: draft_size < 1, blocks that do not tile the length, a length past the model's."""
    check_draft_size(spec)
    check_blocks(spec.sampler, spec.length, block, spec.length)  # the target takes one step per token
    check_length(spec, seq_len, "the model")


def check_diffuspec(spec: SampleSpec, template: Any, block: int, seq_len: int, verifier_seq_len: int) -> None:
    """One-line errors: not a prompt continuation, draft_size < 1, the drafter's blocks (`block`: 1 for full
    attention) not tiling the length, a length past the drafter's or the verifier's training length."""
    check_prompt(template)
    check_draft_size(spec)
    check_blocks(spec.sampler, spec.length, block, spec.length, "block size")
    check_length(spec, seq_len, "the drafter")
    check_length(spec, verifier_seq_len, f"--sampler.verifier={spec.option('verifier')!r}")


# -- FreeDave --------------------------------------------------------------------------------------
def current_block(masked: Array, block: int) -> Array:
    """[..., L] bool: the positions of the first block that still holds a [MASK] (semi-AR's current block)."""
    pos = jnp.arange(masked.shape[-1])
    first = jnp.min(jnp.where(masked, pos, masked.shape[-1]), axis=-1)  # [...]; L when nothing is masked
    return pos // block == (first // block)[..., None]


def greedy_commit(logits: Array, tokens: Array, mask_id: int, block: int) -> tuple[Array, Array]:
    """The target's next commit on tokens [..., L] from their SUBS logits [..., L, V]: (position, token) [...],
    the most confident argmax (top-1 prob) of the current block's [MASK]s, ties: lowest index."""
    x0 = argmax_last(logits)
    masked = tokens == mask_id
    todo = masked & current_block(masked, block)
    position = argmax_last(jnp.where(todo, draw_confidence(logits, x0), -1.0))
    return position, jnp.take_along_axis(x0, position[..., None], axis=-1)[..., 0]


def block_time(tokens: Array, mask_id: int, block: int) -> Array:
    """t [...] = masked fraction of the current block: the target's 1 - i / steps at step i of a masked block."""
    masked = tokens == mask_id
    return (masked & current_block(masked, block)).sum(-1) / block


def freedave_steps(verify: Callable[[Array], Array], state: SamplerState, k: int, mask_id: int,
                   block: int) -> SamplerState:
    """FreeDave steps on state.tokens [N, L] until no [MASK] is left. state.cache: {"logits": the tokens' SUBS
    logits [N, L, V], "accepted", "steps": counters}; `verify(drafts [N, k, L])` -> their SUBS logits [N, k, L, V]
    in one forward (state.step counts these verifications, state.nfe the forwards)."""
    length = state.tokens.shape[1]
    num_blocks = length // block

    def step(st: SamplerState) -> SamplerState:
        z, logits = st.tokens, st.cache["logits"]  # [N, L], [N, L, V]
        masked = z == mask_id
        count = masked.sum(-1)  # [N] commits left
        x0 = argmax_last(logits)
        conf = draw_confidence(logits, x0)
        # the target's commit order from this one forward: block by block, confidence descending, lowest index
        order = jnp.lexsort((-conf, jnp.where(masked, jnp.arange(length) // block, num_blocks)), axis=-1)
        rank = jnp.argsort(order, axis=-1)  # [N, L] position -> place in the order
        drafts = jnp.where(masked[:, None] & (rank[:, None] <= jnp.arange(k)[None, :, None]), x0[:, None],
                           z[:, None])  # [N, k, L]: draft_j holds the first j + 1 commits
        verified = verify(drafts)
        position, token = greedy_commit(verified[:, :-1], drafts[:, :-1], mask_id, block)  # [N, k - 1]
        wanted = order[:, 1:k]
        valid = ((position == wanted) & (token == jnp.take_along_axis(x0, wanted, axis=-1))
                 & (jnp.arange(2, k + 1) <= count[:, None]))
        accepted = 1 + jnp.cumprod(valid, axis=-1).sum(-1)  # [N] in 1..k (a finished row: draft 1 is itself)
        pick = (accepted - 1)[:, None, None]
        active = count > 0
        return st.replace(
            tokens=jnp.take_along_axis(drafts, pick, axis=1)[:, 0], step=st.step + 1, nfe=st.nfe + 1,
            cache={"logits": jnp.take_along_axis(verified, pick[..., None], axis=1)[:, 0],
                   "accepted": st.cache["accepted"] + (accepted * active).sum(),
                   "steps": st.cache["steps"] + active.sum()})

    return run_while(step, state, lambda st: jnp.any(st.tokens == mask_id))


def freedave_stats(state: SamplerState, forward_rows: Array) -> dict[str, Array]:
    c = state.cache
    return {"nfe": state.nfe, "forward_rows": forward_rows,
            "mean_accepted": c["accepted"] / jnp.maximum(c["steps"], 1)}


def freedave(logits_fn: LogitsFn, rng: Array, template: Array, spec: SampleSpec, mask_id: int,
             block: int) -> tuple[Array, dict[str, Array]]:
    """Greedy semi-AR decoding of the template [L] ([MASK] = to generate), k = draft_size commits drafted per step,
    every forward over the whole sequence (drafts may reach into later blocks).

    Returns (tokens [N, L], {"nfe", "forward_rows", "mean_accepted": tokens committed per step}).
    """
    n, length = spec.num_samples, template.shape[0]
    k = spec.option("draft_size", 4)

    def predict(z: Array) -> Array:  # [M, L] -> SUBS logits [M, L, V]
        return subs_logits(logits_fn(z, block_time(z, mask_id, block)), mask_id)

    def verify(drafts: Array) -> Array:  # [N, k, L] -> [N, k, L, V]: one forward of N k rows
        return predict(drafts.reshape(n * k, length)).reshape(n, k, length, -1)

    tokens = jnp.broadcast_to(template.astype(jnp.int32), (n, length))
    zero = jnp.zeros((), jnp.int32)
    state = init_state(tokens, rng, {"logits": predict(tokens), "accepted": zero, "steps": zero})
    state = freedave_steps(verify, state.replace(nfe=jnp.ones((), jnp.int32)), k, mask_id, block)
    return state.tokens, freedave_stats(state, n + n * k * state.step)


def freedave_cached(decode_fn: BlockDecodeFn, kv_cache: Any, rng: Array, template: Array, spec: SampleSpec,
                    mask_id: int, block: int) -> tuple[Array, dict[str, Array]]:
    """`freedave` over exact block decoding (block diffusion: a clean block never sees later ones). Blocks left to
    right; a block with a [MASK] is predicted once against the KV cache of the finished blocks, then FreeDave steps
    run on it alone, the k drafts verified in one forward that reads the cache (shared by the drafts, not copied:
    the decode is vmapped over them); one more forward writes the finished block's K/V (not after the last).
    The same target, so the same tokens as `freedave`, with forwards over one block instead of the sequence.

    Returns (tokens [N, L], {"nfe", "forward_rows", "mean_accepted"}).
    """
    n, length = spec.num_samples, template.shape[0]
    k = spec.option("draft_size", 4)
    num_blocks = length // block

    def predict(z: Array, kv: Any, start: Array) -> Array:  # [M, Lb] -> SUBS logits [M, Lb, V], cache read-only
        return subs_logits(decode_fn(z, block_time(z, mask_id, block), kv, start, start)[0], mask_id)

    def block_body(st: SamplerState, b: Array) -> tuple[SamplerState, None]:
        start, kv, c = b * block, st.cache["kv"], st.cache
        blk = jax.lax.dynamic_slice_in_dim(st.tokens, start, block, axis=1)
        has_mask = jnp.any(blk == mask_id)
        shape = jax.eval_shape(predict, blk, kv, start)
        logits = jax.lax.cond(has_mask, lambda: predict(blk, kv, start), lambda: jnp.zeros(shape.shape, shape.dtype))
        verify = jax.vmap(lambda d: predict(d, kv, start), in_axes=1, out_axes=1)
        inner = init_state(blk, st.rng, {"logits": logits, "accepted": c["accepted"], "steps": c["steps"]})
        inner = freedave_steps(verify, inner.replace(step=st.step, nfe=st.nfe + has_mask), k, mask_id, block)
        is_last = b == num_blocks - 1
        kv = jax.lax.cond(is_last, lambda: kv, lambda: decode_fn(inner.tokens, jnp.zeros((n,)), kv, start)[1])
        return st.replace(tokens=jax.lax.dynamic_update_slice_in_dim(st.tokens, inner.tokens, start, axis=1),
                          step=inner.step, nfe=inner.nfe + (~is_last).astype(jnp.int32),
                          cache={"kv": kv, "accepted": inner.cache["accepted"], "steps": inner.cache["steps"]}), None

    zero = jnp.zeros((), jnp.int32)
    state = init_state(jnp.broadcast_to(template.astype(jnp.int32), (n, length)), rng,
                       {"kv": kv_cache, "accepted": zero, "steps": zero})
    state = jax.lax.scan(block_body, state, jnp.arange(num_blocks))[0]
    verifications = state.step
    return state.tokens, freedave_stats(state, n * (state.nfe - verifications) + n * k * verifications)


# -- DiffuSpec -------------------------------------------------------------------------------------
def token_probs(logits: Array, temperature: float, top_p: float) -> Array:
    """The distribution [..., V] that `sample_categorical` draws from: softmax(nucleus(logits / T)); T = 0: the
    one-hot argmax."""
    logits = logits.astype(jnp.float32)
    if temperature == 0.0:
        return jax.nn.one_hot(argmax_last(logits), logits.shape[-1], dtype=jnp.float32)
    return jax.nn.softmax(nucleus_logits(logits / temperature, top_p), axis=-1)


def speculative_accept(rng: Array, drafts: Array, q: Array, p: Array, usable: Array) -> tuple[Array, Array]:
    """Speculative sampling (Leviathan et al. 2023, Chen et al. 2023) over drafts [N, K] with x_i ~ q [N, K, V],
    verifier distributions p [N, K + 1, V] (p_i given x_{<i}) and `usable` [N] <= K drafts per row.

    Draft i is kept while u_i q_i(x_i) < p_i(x_i) (prob min(1, p/q)) and all before it were; the next token is
    drawn from norm(max(p_a - q_a, 0)) at the first rejection a, or from p_a after a = usable acceptances (the
    bonus). Returns (accepted a [N], next token [N]); the a drafts and the token then follow p exactly.
    """
    rng_u, rng_token = jax.random.split(rng)
    num = drafts.shape[1]
    take = lambda probs, ids: jnp.take_along_axis(probs, ids[..., None], axis=-1)[..., 0]  # noqa: E731
    u = jax.random.uniform(rng_u, drafts.shape)
    keep = (u * take(q, drafts) < take(p[:, :num], drafts)) & (jnp.arange(num) < usable[:, None])
    accepted = jnp.cumprod(keep, axis=-1).sum(-1)  # [N]
    p_a = jnp.take_along_axis(p, accepted[:, None, None], axis=1)[:, 0]  # [N, V]
    q_a = jnp.take_along_axis(q, jnp.minimum(accepted, num - 1)[:, None, None], axis=1)[:, 0]
    residual = jnp.where((accepted < usable)[:, None], jnp.maximum(p_a - q_a, 0.0), p_a)
    residual = jnp.where(residual.sum(-1, keepdims=True) > 0, residual, p_a)  # p == q: never rejected, but round-off
    return accepted, sample_categorical(rng_token, jnp.log(residual))


def per_row(decode: DecodeFn) -> DecodeFn:
    """`decode` run row by row (vmap), each row at its own cache index [N]: KV leaves [layers, N, Lc, H, D]."""

    def one(tokens: Array, cache: Any, index: Array) -> tuple[Array, Any]:
        logits, cache = decode(tokens[None], jax.tree.map(lambda c: c[:, None], cache), index)
        return logits[0], jax.tree.map(lambda c: c[:, 0], cache)

    return jax.vmap(one, in_axes=(0, 1, 0), out_axes=(0, 1))


def diffuspec(drafter: LogitsFn, verifier: DecodeFn, empty_cache: Callable[[int, int], Any], rng: Array,
              template: np.ndarray, spec: SampleSpec, mask_id: int, bos_id: int) -> tuple[Array, dict[str, Array]]:
    """Continues the prompt of `template` [L] (ids, then -1s) by speculative decoding: drafts from `drafter`
    ((z [N, L], t [N]) -> logits [N, L, V + 1], V = mask_id), verified by the AR `verifier` (its input is
    [BOS] + x: the logits at input i give x_i); `empty_cache(batch, length)` its KV cache.

    Returns (tokens [N, L], {"nfe", "nfe_drafter", "nfe_verifier", "mean_accepted": drafts kept per step}).
    """
    num_prompt = check_prompt(template)
    n, length = spec.num_samples, template.shape[0]
    k_max, adaptive = spec.option("draft_size", 8), spec.option("adaptive", False)
    pos = jnp.arange(length)
    prompt = jnp.broadcast_to(jnp.where(template >= 0, template, 0).astype(jnp.int32), (n, length))
    cache = empty_cache(n, length + k_max)  # a step writes K/V at [index, index + k_max + 1), index <= L - 1
    prefills = int(num_prompt > 0)
    if prefills:  # input positions [0, P): [BOS, x_0 .. x_{P-2}]; each step starts with the last committed token
        first = jnp.concatenate([jnp.full((n, 1), bos_id, jnp.int32), prompt[:, : num_prompt - 1]], axis=1)
        cache = verifier(first, cache, 0)[1]
    verify = per_row(verifier)

    def step(st: SamplerState) -> SamplerState:
        c = st.cache
        done = c["done"]  # [N] tokens committed: the cache holds input positions [0, done)
        active = done < length
        rng, rng_draft, rng_accept = jax.random.split(st.rng, 3)
        z = jnp.where(pos < done[:, None], st.tokens, mask_id)
        slots = jnp.minimum(done[:, None] + jnp.arange(k_max), length - 1)  # [N, K]
        logits = jnp.take_along_axis(drafter(z, (z == mask_id).mean(-1)), slots[..., None], axis=1)
        q = token_probs(logits[..., :mask_id], spec.temperature, spec.top_p)  # [N, K, V]; SUBS: [MASK] dropped
        drafts = sample_categorical(rng_draft, jnp.log(q))  # [N, K], x_i ~ q_i independently
        last = jnp.take_along_axis(st.tokens, jnp.maximum(done - 1, 0)[:, None], axis=1)[:, 0]
        last = jnp.where(done > 0, last, bos_id)
        p_logits, kv = verify(jnp.concatenate([last[:, None], drafts], axis=1), c["kv"],
                              jnp.minimum(done, length - 1))
        p = token_probs(p_logits, spec.temperature, spec.top_p)  # [N, K + 1, V]
        usable = jnp.clip(jnp.minimum(c["k"], length - done - 1), 0)
        accepted, token = speculative_accept(rng_accept, drafts, q, p, usable)
        rel = pos[None] - done[:, None]  # [N, L]
        filled = jnp.where((rel >= 0) & (rel < accepted[:, None]),
                           jnp.take_along_axis(drafts, jnp.clip(rel, 0, k_max - 1), axis=1), st.tokens)
        filled = jnp.where(rel == accepted[:, None], token[:, None], filled)
        k_next = jnp.where(accepted >= c["k"], 2 * c["k"], accepted + 1).clip(1, k_max) if adaptive else c["k"]
        return st.replace(tokens=jnp.where(active[:, None], filled, st.tokens), rng=rng, step=st.step + 1,
                          nfe=st.nfe + 2,
                          cache={"kv": kv, "done": jnp.where(active, done + accepted + 1, done), "k": k_next,
                                 "accepted": c["accepted"] + (accepted * active).sum(),
                                 "steps": c["steps"] + active.sum()})

    zero = jnp.zeros((), jnp.int32)
    state = init_state(prompt, rng, {"kv": cache, "done": jnp.full((n,), num_prompt, jnp.int32),
                                     "k": jnp.full((n,), k_max, jnp.int32), "accepted": zero, "steps": zero})
    state = run_while(step, state.replace(nfe=jnp.int32(prefills)), lambda st: jnp.any(st.cache["done"] < length))
    c = state.cache
    return state.tokens, {"nfe": state.nfe, "nfe_drafter": state.step, "nfe_verifier": state.step + prefills,
                          "mean_accepted": c["accepted"] / jnp.maximum(c["steps"], 1)}
