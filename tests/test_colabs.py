"""colabs/*.ipynb: each executes top to bottom (nbclient, this venv's python3 kernel, DLM_JAX_NOTEBOOK_TINY=1) and
leaves what it promises; stored clean (no outputs), each with its Open in Colab badge, all linked from the READMEs."""

import glob
import json
import os
import re

import pytest

from tests.helpers import ROOT

COLABS = os.path.join(ROOT, "colabs")
NOTEBOOKS = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(COLABS, "*.ipynb")))
BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# what each notebook leaves in its working directory (globs), and whether it prints a Gen PPL
EXPECTED = {
    "quickstart": (["workdirs/mdlm/loss.png", "workdirs/mdlm/val.png", "workdirs/mdlm/samples/cached_*.jsonl",
                    "workdirs/mdlm/samples/semi_ar_*.jsonl"], True),
    "samplers": (["frontier.png", "denoising.png", "workdirs/mdlm/gen_sweep.json", "workdirs/ar/samples/ar_*.jsonl"],
                 True),
    "block_diffusion": (["workdirs/block/samples/block_T*.jsonl", "workdirs/block/samples/block_nocache_*.jsonl"],
                        True),
    "ccdd": (["workdirs/ccdd/samples/ccdd_*.jsonl"], True),
    "edlm": (["workdirs/edlm/samples/edlm_*.jsonl", "workdirs/edlm/samples/ancestral_*.jsonl"], True),
    "cosmos": (["workdirs/cosmos_ae/statistics.npz", "workdirs/cosmos/loss.png",
                "workdirs/cosmos/samples/cosmos_*.jsonl"], False),
}


def _load(name: str):
    import nbformat

    return nbformat.read(os.path.join(COLABS, f"{name}.ipynb"), as_version=4)


def _badge(name: str) -> str:
    return f"https://colab.research.google.com/github/dlm-jax/dlm-jax/blob/main/colabs/{name}.ipynb"


def test_every_notebook_is_expected_clean_and_badged():
    import nbformat

    assert NOTEBOOKS and set(NOTEBOOKS) <= set(EXPECTED)
    for name in NOTEBOOKS:
        nb = _load(name)
        nbformat.validate(nb)
        first = nb.cells[0]
        assert first.cell_type == "markdown" and BADGE in first.source and _badge(name) in first.source, name
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{name}: stored outputs (clear them)"
        assert any("DLM_JAX_NOTEBOOK_TINY" in c.source for c in nb.cells), name


@pytest.mark.parametrize("readme", ["README.md", "colabs/README.md"])
def test_readmes_link_every_notebook_with_its_badge(readme):
    text = open(os.path.join(ROOT, readme), encoding="utf-8").read()
    for name in NOTEBOOKS:
        assert f"[![Open In Colab]({BADGE})]({_badge(name)})" in text, f"{readme} lacks the badge of {name}"


def _outputs_text(nb) -> str:
    """Everything the executed notebook printed (streams and text results)."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", "") or out.get("data", {}).get("text/plain", ""))
    return "".join(parts)


@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory) -> str:
    """A persistent compilation cache shared by the notebooks of one test process: they train and sample the same
    tiny models (the AR judge in most of them), so later notebooks skip those compiles (about half a command's time)."""
    return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, tmp_path, monkeypatch, jax_cache):
    from nbclient import NotebookClient

    # the kernel and the commands it starts see one CPU device, as a user's machine (not conftest's 8 fake ones)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")).strip()
    monkeypatch.setenv("XLA_FLAGS", flags)
    monkeypatch.setenv("DLM_JAX_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", jax_cache)
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    nb = _load(name)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    patterns, gen_ppl = EXPECTED[name]
    for pattern in patterns:
        paths = glob.glob(str(tmp_path / pattern))
        assert paths, f"{name} did not write {pattern}"
        data = open(paths[0], "rb").read()
        assert data, f"{paths[0]} is empty"
        if pattern.endswith(".png"):
            assert data.startswith(PNG_SIGNATURE)
        if pattern.endswith(".jsonl"):  # one row per sample
            rows = [json.loads(line) for line in data.decode().splitlines()]
            assert rows and all(row["tokens"] and isinstance(row["text"], str) for row in rows), paths[0]
    text = _outputs_text(nb)
    assert "Traceback" not in text
    if gen_ppl:
        assert re.search(r"Gen PPL \d+\.\d", text), f"{name} printed no Gen PPL"
