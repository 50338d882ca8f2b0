"""Training curves of a workdir (`dlm-jax plot`): WORKDIR/metrics.jsonl -> PNG files.

Two figures: `loss.png`, the train loss against the step (the records that hold `loss`), and `val.png`, one panel per
val metric of the evals (`val_nelbo`, AR's `val_nll`, or a family's own val metrics such as Cosmos's token
accuracies), written only when the run evaluated. The val keys derived from the plotted one (`val_ppl`,
`val_bits_per_token`, `val_bpc`) and the token count are left out.
"""

from __future__ import annotations

import io
import math
from typing import Any

from dlm_jax import fileio
from dlm_jax.errors import UserError
from dlm_jax.train.metrics import read_metrics

DERIVED = ("val_ppl", "val_bits_per_token", "val_bpc", "val_num_tokens")  # functions of the main val metric, or sizes


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that hold `key`, in the file's order (steps increase: runs roll it back)."""
    rows = [(r["step"], r[key]) for r in records if key in r]
    return [s for s, _ in rows], [v for _, v in rows]


def _save(fig: Any, path: str) -> None:
    """Writes a matplotlib figure as PNG to a local path or a cloud URI, then closes it."""
    import matplotlib.pyplot as plt

    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=120)
    fileio.write_bytes(path, image.getvalue())
    plt.close(fig)


def plot_curves(workdir: str, output_dir: str) -> dict[str, Any]:
    """Writes OUTPUT_DIR/loss.png (train loss) and, when the run evaluated, OUTPUT_DIR/val.png (one panel per val
    metric) from WORKDIR/metrics.jsonl. Returns {"workdir", "outputs": [png paths], "train_points", "val_points",
    "val_metrics"}; a workdir without logged records is a one-line error."""
    path = fileio.join(workdir, "metrics.jsonl")
    if not fileio.as_path(path).is_file():
        raise UserError(f"no metrics.jsonl in {workdir!r}; train first: dlm-jax train --config=... --workdir={workdir}")
    records = read_metrics(workdir)
    steps, losses = _series(records, "loss")
    val_keys = list(dict.fromkeys(k for r in records for k in r if k.startswith("val_") and k not in DERIVED))
    val_points = sum(1 for r in records if any(k in r for k in val_keys))
    if not steps and not val_points:
        raise UserError(f"{path} holds no logged steps yet; train longer than train.log_every steps first")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outputs = []
    if steps:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(steps, losses, marker="." if len(steps) < 50 else None)
        ax.set_xlabel("step")
        ax.set_ylabel("train loss")
        ax.set_title(f"train loss ({len(steps)} points)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        outputs.append(fileio.join(output_dir, "loss.png"))
        _save(fig, outputs[-1])
    if val_keys:
        cols = min(3, len(val_keys))
        rows = math.ceil(len(val_keys) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
        for i, ax in enumerate(axes.flat):
            if i >= len(val_keys):  # the empty cells of the last row
                ax.set_visible(False)
                continue
            ax.plot(*_series(records, val_keys[i]), marker="o")
            ax.set_xlabel("step")
            ax.set_title(val_keys[i])
            ax.grid(alpha=0.3)
        fig.tight_layout()
        outputs.append(fileio.join(output_dir, "val.png"))
        _save(fig, outputs[-1])
    return {"workdir": workdir, "outputs": outputs, "train_points": len(steps), "val_points": val_points,
            "val_metrics": val_keys}
