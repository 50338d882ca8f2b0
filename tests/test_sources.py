"""Document sources: python_stdlib, text_files, tfds (a tiny builder generated here), HF datasets (saved here)."""

import shutil

import pytest

from dlm_jax.data import sources
from dlm_jax.errors import UserError
from tests.data_helpers import data_config, one_line, text_config, texts, write_jsonl


def test_python_stdlib_splits_are_disjoint_deterministic_and_sized():
    data = data_config("max_documents=20")  # val_fraction 0.05 -> ceil(1.0) = 1 val document
    train, val = sources.load_documents(data, "train"), sources.load_documents(data, "validation")
    assert (len(train), len(val)) == (19, 1)
    train_paths, val_paths = list(train._base), list(val._base)
    assert not set(train_paths) & set(val_paths)
    assert all(p.endswith(".py") and "site-packages" not in p for p in train_paths + val_paths)
    with open(val_paths[0], "rb") as f:
        assert texts(val)[0] == f.read().decode("utf-8", errors="replace")
    assert sum(len(t) > 0 for t in texts(train)) > 0
    again = sources.load_documents(data, "train")
    assert list(again._base) == train_paths and texts(again) == texts(train)

    data = data_config("max_documents=20", "val_fraction=0.12")  # ceil(2.4) = 3
    train, val = sources.load_documents(data, "train"), sources.load_documents(data, "validation")
    assert (len(train), len(val)) == (17, 3)
    assert set(train._base) | set(val._base) == set(train_paths) | set(val_paths)  # the same 20 files
    assert list(val._base)[:1] == val_paths  # the val documents come first in the hash order
    with pytest.raises(ValueError):
        sources.load_documents(data, "test")


def test_text_files_single_file_val_is_the_tail(corpus, corpus_text):
    data = text_config(corpus)
    (train,), (val,) = texts(sources.load_documents(data, "train")), texts(sources.load_documents(data, "validation"))
    assert len(val) == int(len(corpus_text) * 0.1) == 600
    assert train + val == corpus_text and val == corpus_text[-600:]


def _write_files(directory, n):
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (directory / f"f{i}.txt").write_text(f"file {i} " * (i + 1), encoding="utf-8")
    return {f"file {i} " * (i + 1) for i in range(n)}


def test_text_files_several_files_split_by_path_hash(tmp_path):
    everything = _write_files(tmp_path / "a", 10)
    data = text_config(tmp_path / "a" / "*.txt", "val_fraction=0.2")
    train, val = texts(sources.load_documents(data, "train")), texts(sources.load_documents(data, "validation"))
    assert (len(train), len(val)) == (8, 2)
    assert not set(train) & set(val) and set(train) | set(val) == everything
    assert texts(sources.load_documents(data, "validation")) == val  # deterministic

    # the split depends on the paths below the glob's directory, not on where the corpus lies
    shutil.copytree(tmp_path / "a", tmp_path / "elsewhere" / "b")
    moved = text_config(tmp_path / "elsewhere" / "b" / "f*.txt", "val_fraction=0.2")
    assert texts(sources.load_documents(moved, "validation")) == val

    limited = text_config(tmp_path / "a" / "*.txt", "val_fraction=0.2", "max_documents=5")
    train, val = texts(sources.load_documents(limited, "train")), texts(sources.load_documents(limited, "validation"))
    assert (len(train), len(val)) == (4, 1) and not set(train) & set(val)


def test_text_files_document_per_line(tmp_path):
    path = tmp_path / "lines.txt"
    lines = [f"doc {i}" for i in range(10)]
    path.write_text("\n".join(lines[:5]) + "\n\n  \n" + "\n".join(lines[5:]) + "\n", encoding="utf-8")
    # 64 chars; val = the last int(0.2 * 64) = 12 chars = "doc 8\ndoc 9\n"
    data = text_config(path, "document_per_line=True", "val_fraction=0.2")
    assert texts(sources.load_documents(data, "train")) == lines[:8]  # blank lines are no documents
    assert texts(sources.load_documents(data, "validation")) == lines[8:]
    data = text_config(path, "document_per_line=True", "val_fraction=0.2", "max_documents=3")
    assert texts(sources.load_documents(data, "train")) == lines[:3]


def test_text_files_missing_or_empty_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError) as excinfo:
        sources.load_documents(text_config(tmp_path / "nothing*.txt"), "train")
    assert "matches no files" in one_line(excinfo)
    (tmp_path / "e1.txt").write_text("")
    (tmp_path / "e2.txt").write_text("")
    with pytest.raises(UserError) as excinfo:
        sources.load_documents(text_config(tmp_path / "e*.txt"), "train")
    assert "every matching file is empty" in one_line(excinfo)


TFDS_TRAIN = [f"train document {i} é" for i in range(20)]
TFDS_TEST = [f"test document {i}" for i in range(3)]


def _tiny_tfds_builder():
    import tensorflow_datasets as tfds

    class DlmTinyText(tfds.core.GeneratorBasedBuilder):
        """20 train and 3 test documents."""

        # a top-level module name: tfds then skips looking for the builder's code path, which in a package
        # (tests.test_data) needs the `importlib_resources` backport on Python 3.11
        __module__ = "dlm_tiny_text_builder"
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(TFDS_TRAIN), "test": self._generate_examples(TFDS_TEST)}

        def _generate_examples(self, docs):
            for i, doc in enumerate(docs):
                yield i, {"text": doc}

    return DlmTinyText


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    builder = _tiny_tfds_builder()(data_dir=data_dir, file_format="array_record")
    assert builder.name == "dlm_tiny_text"
    builder.download_and_prepare()
    return data_dir


def test_tfds_source_with_its_own_val_split(tfds_dir):
    data = data_config("source=tfds", "name=dlm_tiny_text", f"path={tfds_dir}", "val_split=test")
    train, val = texts(sources.load_documents(data, "train")), texts(sources.load_documents(data, "validation"))
    assert sorted(train) == sorted(TFDS_TRAIN) and sorted(val) == sorted(TFDS_TEST)  # bytes decoded as UTF-8
    limited = data_config("source=tfds", "name=dlm_tiny_text", f"path={tfds_dir}", "val_split=test",
                          "max_documents=5")
    assert len(sources.load_documents(limited, "train")) == 5
    assert len(sources.load_documents(limited, "validation")) == 3


def test_tfds_source_carves_val_from_train_when_the_val_split_is_missing(tfds_dir):
    data = data_config("source=tfds", "name=dlm_tiny_text", f"path={tfds_dir}", "val_fraction=0.1")
    train, val = texts(sources.load_documents(data, "train")), texts(sources.load_documents(data, "validation"))
    assert (len(train), len(val)) == (18, 2)  # ceil(0.1 * 20)
    assert not set(train) & set(val) and sorted(train + val) == sorted(TFDS_TRAIN)
    stored = texts(sources.load_documents(data_config("source=tfds", "name=dlm_tiny_text", f"path={tfds_dir}",
                                                      "val_split=test"), "train"))
    assert train == stored[:18] and val == stored[18:]  # val: the tail of the train split
    same = data_config("source=tfds", "name=dlm_tiny_text", f"path={tfds_dir}", "val_fraction=0.1", "val_split=train")
    assert texts(sources.load_documents(same, "validation")) == val  # val_split == train_split: carved too


def test_tfds_unknown_dataset_or_train_split_is_a_one_line_error(tfds_dir):
    with pytest.raises(UserError) as excinfo:
        sources.load_documents(data_config("source=tfds", "name=dlm_no_such_dataset", f"path={tfds_dir}"), "train")
    assert "dlm_no_such_dataset" in one_line(excinfo)
    with pytest.raises(UserError) as excinfo:
        sources.load_documents(data_config("source=tfds", "name=dlm_tiny_text", f"path={tfds_dir}",
                                           "train_split=nope"), "train")
    assert "no split 'nope'" in one_line(excinfo)


def test_hf_save_to_disk_dataset_dict_and_single_dataset(offline, tmp_path):
    import datasets

    train_docs, val_docs = [f"train {i}" for i in range(10)], ["val 0", "val 1"]
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": train_docs, "n": list(range(10))}),
        "validation": datasets.Dataset.from_dict({"text": val_docs, "n": [0, 1]}),
    }).save_to_disk(str(tmp_path / "dict"))
    data = data_config("source=hf", f"path={tmp_path / 'dict'}")
    assert texts(sources.load_documents(data, "train")) == train_docs
    assert texts(sources.load_documents(data, "validation")) == val_docs

    datasets.Dataset.from_dict({"text": train_docs}).save_to_disk(str(tmp_path / "single"))
    data = data_config("source=hf", f"path={tmp_path / 'single'}", "val_fraction=0.25")  # ceil(2.5) = 3
    assert texts(sources.load_documents(data, "train")) == train_docs[:7]
    assert texts(sources.load_documents(data, "validation")) == train_docs[7:]


def test_hf_jsonl_files_carve_val_from_the_tail(offline, tmp_path):
    docs = [f"json doc {i} ü" for i in range(12)]
    write_jsonl(tmp_path / "docs.jsonl", docs)
    data = data_config("source=hf", f"path={tmp_path / 'docs.jsonl'}", "val_fraction=0.2")  # ceil(2.4) = 3
    assert texts(sources.load_documents(data, "train")) == docs[:9]
    assert texts(sources.load_documents(data, "validation")) == docs[9:]
    limited = data_config("source=hf", f"path={tmp_path / 'docs.jsonl'}", "val_fraction=0.2", "max_documents=5")
    assert texts(sources.load_documents(limited, "train")) == docs[:4]
    assert texts(sources.load_documents(limited, "validation")) == docs[4:5]


def test_hf_streaming_jsonl_val_is_the_first_documents(offline, tmp_path):
    docs = [f"stream doc {i}" for i in range(12)]
    write_jsonl(tmp_path / "docs.jsonl", docs)
    data = data_config("source=hf", f"path={tmp_path / 'docs.jsonl'}", "streaming=True", "streaming_val_documents=4")
    train, val = sources.load_documents(data, "train"), sources.load_documents(data, "validation")
    assert isinstance(train, sources.StreamingDocuments) and not hasattr(train, "__len__")
    assert list(val) == docs[:4] and list(train) == docs[4:]
    assert list(train) == docs[4:]  # re-opened from the start
    limited = data_config("source=hf", f"path={tmp_path / 'docs.jsonl'}", "streaming=True",
                          "streaming_val_documents=4", "max_documents=3")
    assert list(sources.load_documents(limited, "train")) == docs[4:7]


@pytest.mark.parametrize("streaming", [False, True])
def test_hf_missing_text_column_is_a_one_line_error(offline, tmp_path, streaming):
    write_jsonl(tmp_path / "docs.jsonl", ["a", "b", "c"], key="content")
    data = data_config("source=hf", f"path={tmp_path / 'docs.jsonl'}", f"streaming={streaming}")
    with pytest.raises(UserError) as excinfo:
        sources.load_documents(data, "train")
    assert "no column 'text'" in one_line(excinfo) and "content" in one_line(excinfo)
    fixed = data_config("source=hf", f"path={tmp_path / 'docs.jsonl'}", f"streaming={streaming}", "text_key=content")
    expected = ["a", "b", "c"] if streaming else ["c"]  # streaming: the first 1000 documents are val
    assert list(sources.load_documents(fixed, "validation")) == expected


def test_hf_without_name_or_with_missing_files_is_a_one_line_error(offline, tmp_path):
    with pytest.raises(UserError) as excinfo:
        sources.load_documents(data_config("source=hf"), "train")
    assert "needs --config.data.name" in one_line(excinfo)
    with pytest.raises(UserError) as excinfo:
        sources.load_documents(data_config("source=hf", f"path={tmp_path / 'none*.jsonl'}"), "train")
    assert "matches no files" in one_line(excinfo)
    with pytest.raises(UserError) as excinfo:
        sources.load_documents(data_config("source=array_record", f"path={tmp_path}"), "train")
    assert "array_record" in one_line(excinfo)
