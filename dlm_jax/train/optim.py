"""AdamW with linear warmup then constant or cosine decay, and global-norm gradient clipping."""

import ml_collections
import optax


def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
    warmup = optax.linear_schedule(0.0, train.learning_rate, max(train.warmup_steps, 1))
    if train.lr_schedule == "cosine":
        decay = optax.cosine_decay_schedule(train.learning_rate, max(train.num_steps - train.warmup_steps, 1))
    else:
        decay = optax.constant_schedule(train.learning_rate)
    return optax.join_schedules([warmup, decay], [train.warmup_steps])


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
    adamw = optax.adamw(
        learning_rate_schedule(train), b1=train.b1, b2=train.b2, weight_decay=train.weight_decay
    )
    # the chain keeps one state structure whether or not clipping is on, so toggling it keeps checkpoints usable
    clip = optax.clip_by_global_norm(train.grad_clip) if train.grad_clip > 0 else optax.identity()
    return optax.chain(clip, adamw)
