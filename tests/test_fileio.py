"""gs:// paths: workdir files, text / array_record data and `prepare` go through dlm_jax.fileio (etils.epath).

The cloud branch runs here against a stand-in `gs` file system: an fsspec DirFileSystem rooted in tmp,
registered under the `gcs` protocol that epath asks fsspec for (what gcsfs provides for real). Everything
dlm-jax does with the URIs is exercised; only the bucket is a local directory.
"""

import json
import os

import fsspec
import numpy as np
import pytest
from etils.epath import backend as epath_backend
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

from dlm_jax import config as config_lib
from dlm_jax import experiment, fileio
from dlm_jax.data import pipeline, prepare, sources, tokenizers
from dlm_jax.errors import UserError
from dlm_jax.train import checkpoint, metrics
from tests.data_helpers import train_hf_tokenizer, train_sentencepiece
from tests.helpers import small_corpus, tiny_config


def _strip(path):
    if isinstance(path, str):
        return path.removeprefix("gs://")
    return [_strip(p) for p in path]


class _LocalBucket(DirFileSystem):
    """gs://BUCKET/KEY -> <root>/BUCKET/KEY; listings come back as BUCKET/KEY, as gcsfs returns them."""

    protocol = ("gs", "gcs")
    root = ""

    def __init__(self, *args, finalize_on_close=False, **kwargs):
        del args, finalize_on_close, kwargs
        super().__init__(path=self.root, fs=LocalFileSystem(auto_mkdir=True))

    def _join(self, path):
        return super()._join(_strip(path))


@pytest.fixture
def bucket(tmp_path):
    """The local directory behind gs://; yields it, with epath's cached file systems reset around the test."""
    root = tmp_path / "gcs"
    root.mkdir()
    _LocalBucket.root = str(root)
    fsspec.register_implementation("gcs", _LocalBucket, clobber=True)
    _LocalBucket.clear_instance_cache()
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    fileio._check_reachable.cache_clear()
    yield root
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    fileio._check_reachable.cache_clear()
    _LocalBucket.clear_instance_cache()


def test_paths_keep_uris_and_expand_local_ones(bucket):
    assert fileio.is_cloud("gs://b/w") and not fileio.is_cloud("~/w")
    assert fileio.join("gs://b/w", "checkpoints") == "gs://b/w/checkpoints"
    assert fileio.absolute("gs://b/w/checkpoints") == "gs://b/w/checkpoints"  # not <cwd>/gs:/b/...
    assert fileio.absolute("w") == os.path.join(os.getcwd(), "w")
    assert fileio.expand("~/w") == os.path.join(os.path.expanduser("~"), "w")
    with pytest.raises(UserError, match="no file system for zz://"):
        fileio.as_path("zz://b/w")


def test_unreachable_bucket_is_a_one_line_error(bucket, monkeypatch):
    def no_network(self, path, **kwargs):
        raise ConnectionError("Cannot connect to host storage.googleapis.com:443\n[Name or service not known]")

    monkeypatch.setattr(_LocalBucket, "exists", no_network)
    with pytest.raises(UserError, match=r"cannot reach gs://bkt \(ConnectionError: Cannot connect") as excinfo:
        experiment.load_workdir_config("gs://bkt/runs/one")
    assert "\n" not in str(excinfo.value) and "credentials" in str(excinfo.value)
    monkeypatch.undo()
    fileio.as_path("gs://bkt/runs/one")  # reachable again: no error, and the success is remembered
    monkeypatch.setattr(_LocalBucket, "exists", no_network)
    fileio.as_path("gs://bkt/other")


def test_glob_read_write_append_on_gs(bucket):
    for name in ("b.txt", "a.txt", "notes.md", "sub/c.txt"):
        (bucket / "bkt" / "corpus" / name).parent.mkdir(parents=True, exist_ok=True)
        (bucket / "bkt" / "corpus" / name).write_text(name)
    assert fileio.glob_files("gs://bkt/corpus/*.txt") == ["gs://bkt/corpus/a.txt", "gs://bkt/corpus/b.txt"]
    assert fileio.glob_files("gs://bkt/corpus/*/*.txt") == ["gs://bkt/corpus/sub/c.txt"]
    assert fileio.glob_files("gs://bkt/corpus/a.txt") == ["gs://bkt/corpus/a.txt"]
    assert fileio.glob_files("gs://bkt/corpus/missing.txt") == []
    with pytest.raises(UserError, match=r"recursive '\*\*'"):
        fileio.glob_files("gs://bkt/**/*.txt")
    assert fileio.read_text("gs://bkt/corpus/sub/c.txt") == "sub/c.txt"

    fileio.write_text("gs://bkt/new/dir/x.jsonl", "1\n")  # parents are created
    fileio.append_text("gs://bkt/new/dir/x.jsonl", "2\n")
    fileio.append_text("gs://bkt/new/dir/y.jsonl", "3\n")  # appending creates the object
    assert (bucket / "bkt" / "new" / "dir" / "x.jsonl").read_text() == "1\n2\n"
    assert (bucket / "bkt" / "new" / "dir" / "y.jsonl").read_text() == "3\n"


def test_text_files_source_reads_gs_like_local(bucket, tmp_path):
    local_dir = tmp_path / "local"
    local_dir.mkdir()
    for i in range(5):
        text = f"document {i}\n" * (i + 3)
        (local_dir / f"doc{i}.txt").write_text(text)
        (bucket / "bkt" / "docs").mkdir(parents=True, exist_ok=True)
        (bucket / "bkt" / "docs" / f"doc{i}.txt").write_text(text)
    for split in sources.SPLITS:
        local = tiny_config(str(local_dir / "*.txt")).data
        cloud = tiny_config("gs://bkt/docs/*.txt").data
        assert list(sources.load_documents(cloud, split)) == list(sources.load_documents(local, split))
    with pytest.raises(UserError, match="matches no files"):
        sources.load_documents(tiny_config("gs://bkt/nothing/*.txt").data, "train")


def test_workdir_files_on_gs(bucket, tmp_path, monkeypatch):
    """config.json, metrics.jsonl (append, drop_after on resume), the workdir check and the corrupt-checkpoint
    rename all work on a gs:// workdir; TensorBoard is stubbed (tensorboardX writes gs:// itself)."""
    workdir = "gs://bkt/runs/one"
    config = tiny_config(small_corpus(tmp_path))
    fileio.write_text(experiment.saved_config_path(workdir), config_lib.to_json(config))
    assert experiment.load_workdir_config(workdir).model.d_model == 32
    with pytest.raises(UserError, match="no config.json"):
        experiment.load_workdir_config("gs://bkt/runs/none")

    (bucket / "bkt" / "runs" / "one" / "checkpoints" / "4").mkdir(parents=True)
    experiment.check_workdir_matches(config, workdir)  # same shape: fine
    wider = tiny_config(small_corpus(tmp_path), overrides=("--config.model.d_model=64",))
    with pytest.raises(UserError, match="d_model"):
        experiment.check_workdir_matches(wider, workdir)

    logged = []
    monkeypatch.setattr("tensorboardX.SummaryWriter", lambda logdir: logged.append(logdir) or _NullBoard())
    writer = metrics.MetricsWriter(workdir)
    for step in (1, 2, 3):
        writer.write(step, {"loss": 1.0 / step})
    writer.drop_after(2)
    writer.write(3, {"loss": 0.25})
    writer.close()
    assert logged == ["gs://bkt/runs/one/tensorboard"]
    assert [(r["step"], r["loss"]) for r in metrics.read_metrics(workdir)] == [(1, 1.0), (2, 0.5), (3, 0.25)]

    ckpt = checkpoint.Checkpointer.__new__(checkpoint.Checkpointer)  # the rename only, without orbax
    ckpt.directory = fileio.absolute(fileio.join(workdir, "checkpoints"))
    ckpt.manager = _NullBoard()
    monkeypatch.setattr(ckpt, "_open", lambda: None)
    ckpt._set_aside([4])
    assert sorted(os.listdir(bucket / "bkt" / "runs" / "one" / "checkpoints")) == ["4.corrupt"]


class _NullBoard:
    def add_scalar(self, *args):
        pass

    def flush(self):
        pass

    def close(self):
        pass


def test_prepare_to_gs_then_read_array_record_from_gs(bucket, tmp_path, monkeypatch):
    data = tiny_config(small_corpus(tmp_path, 20_000)).data
    local = tmp_path / "prepared"
    prepare.prepare(data, str(local), num_shards=2)
    summary = prepare.prepare(data, "gs://bkt/prepared", num_shards=2)
    uploaded = bucket / "bkt" / "prepared"
    assert summary["output_dir"] == "gs://bkt/prepared"
    assert sorted(os.listdir(uploaded)) == sorted(os.listdir(local))
    for name in os.listdir(local):
        assert (uploaded / name).read_bytes() == (local / name).read_bytes()
    with pytest.raises(UserError, match="already holds a prepared dataset"):
        prepare.prepare(data, "gs://bkt/prepared", num_shards=2)

    # array_record reads gs:// natively (C++); here its URIs are pointed at the local bucket directory
    real_source = pipeline.grain.sources.ArrayRecordDataSource
    opened = []

    def local_source(paths):
        opened.extend(paths)
        return real_source([str(bucket / p.removeprefix("gs://")) for p in paths])

    monkeypatch.setattr(pipeline.grain.sources, "ArrayRecordDataSource", local_source)
    def stored(path):
        return tiny_config(path, overrides=("--config.data.source=array_record",)).data

    meta = json.loads((uploaded / "meta.json").read_text())
    for split in sources.SPLITS:
        cloud = pipeline.load_rows(stored("gs://bkt/prepared"), tokenizers.ByteTokenizer(), split)
        here = pipeline.load_rows(stored(str(local)), tokenizers.ByteTokenizer(), split)
        assert len(cloud) == len(here) == meta["splits"][split]["rows"] > 0
        for i in range(len(cloud)):
            np.testing.assert_array_equal(cloud[i]["tokens"], here[i]["tokens"])
    assert opened[:2] == ["gs://bkt/prepared/train-00000-of-00002.array_record",
                          "gs://bkt/prepared/train-00001-of-00002.array_record"]
    assert not list(tmp_path.glob("dlm_jax_prepare_*"))  # the local staging copy is gone


def test_tokenizer_files_from_gs(bucket):
    """An HF tokenizer.json (file or directory) and a sentencepiece model in a bucket load like local ones."""
    train_hf_tokenizer(bucket / "bkt" / "tok" / "tokenizer.json", ["<|endoftext|>", "<pad>"])
    train_sentencepiece(bucket / "bkt")
    text = "to be or not, héllo"
    def load(kind, path):
        overrides = (f"--config.data.tokenizer={kind}", f"--config.data.tokenizer_path={path}")
        return tokenizers.get_tokenizer(tiny_config("unused", overrides=overrides).data)

    for kind, where in [("hf", "tok/tokenizer.json"), ("hf", "tok"), ("sentencepiece", "padded.model")]:
        local, cloud = load(kind, f"{bucket}/bkt/{where}"), load(kind, f"gs://bkt/{where}")
        assert cloud.encode(text).tolist() == local.encode(text).tolist()
        assert (cloud.eos_id, cloud.pad_id, cloud.vocab_size) == (local.eos_id, local.pad_id, local.vocab_size)
    for kind, where in [("hf", "gs://bkt/nothing"), ("sentencepiece", "gs://bkt/nothing.model")]:
        with pytest.raises(UserError, match="gs://bkt/nothing"):
            load(kind, where)
