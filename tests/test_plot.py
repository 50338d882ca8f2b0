"""`dlm-jax plot`: WORKDIR/metrics.jsonl -> loss.png and val.png; a workdir without metrics is a one-line error."""

import json

import pytest

from dlm_jax import main as cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_metrics(workdir, records: list[dict]) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _train_record(step: int) -> dict:
    """A record as the train loop logs it every train.log_every steps."""
    return {"step": step, "grad_norm": 1.0, "learning_rate": 1e-3, "loss": 5.0 - step / 100, "mask_rate": 0.5,
            "tokens_per_second": 1000.0}


def _val_record(step: int) -> dict:
    """A record as the train loop logs it after each eval (MDLM: val_nelbo and the keys derived from it)."""
    nelbo = 4.0 - step / 200
    return {"step": step, "val_nelbo": nelbo, "val_ppl": 2.718 ** nelbo, "val_bits_per_token": nelbo / 0.693,
            "val_num_tokens": 1024.0, "val_bpc": nelbo / 0.693}


def _plot(capsys, *args: str) -> dict:
    cli.main(["plot", *args])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_plot_writes_the_loss_and_val_pngs_with_every_logged_point(tmp_path, capsys):
    workdir = tmp_path / "run"
    records = [_train_record(s) for s in (5, 10)] + [_val_record(10)] + [_train_record(s) for s in (15, 20)]
    _write_metrics(workdir, records + [_val_record(20)])
    out = _plot(capsys, f"--workdir={workdir}", f"--output_dir={tmp_path / 'plots'}")
    assert out["outputs"] == [str(tmp_path / "plots" / "loss.png"), str(tmp_path / "plots" / "val.png")]
    assert (out["train_points"], out["val_points"], out["val_metrics"]) == (4, 2, ["val_nelbo"])
    for path in out["outputs"]:
        data = open(path, "rb").read()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


def test_plot_defaults_to_the_workdir_and_draws_a_panel_per_val_metric(tmp_path, capsys):
    """A family without a token likelihood logs its val loss and metrics (e.g. Cosmos's autoencoder); no eval: no
    val.png."""
    _write_metrics(tmp_path / "ae", [_train_record(2), {"step": 2, "val_loss": 1.0, "val_token_accuracy": 0.5}])
    out = _plot(capsys, f"--workdir={tmp_path / 'ae'}")
    assert out["outputs"] == [str(tmp_path / "ae" / "loss.png"), str(tmp_path / "ae" / "val.png")]
    assert out["val_metrics"] == ["val_loss", "val_token_accuracy"]
    _write_metrics(tmp_path / "no_eval", [_train_record(2)])
    out = _plot(capsys, f"--workdir={tmp_path / 'no_eval'}")
    assert out["outputs"] == [str(tmp_path / "no_eval" / "loss.png")] and out["val_points"] == 0


@pytest.mark.parametrize("records,message", [(None, "no metrics.jsonl in"), ([], "holds no logged steps")])
def test_plot_without_records_is_one_line_error(tmp_path, capsys, monkeypatch, records, message):
    monkeypatch.delenv("DLM_JAX_DEBUG", raising=False)
    workdir = tmp_path / "run"
    if records is not None:
        _write_metrics(workdir, records)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["plot", f"--workdir={workdir}"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0] and "train" in lines[0]


def test_plot_takes_no_config_overrides(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["plot", f"--workdir={tmp_path}", "--config.train.num_steps=3"])
    assert "do not go with `dlm-jax plot`" in capsys.readouterr().err
