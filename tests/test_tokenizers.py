"""Tokenizers: byte, char, HF (trained here) and sentencepiece (trained here); no hub access."""


import numpy as np
import pytest

from dlm_jax.data import tokenizers
from dlm_jax.errors import UserError
from tests.data_helpers import data_config, one_line, train_hf_tokenizer, train_sentencepiece


def test_byte_tokenizer_round_trips_utf8_and_has_fixed_specials():
    tok = tokenizers.get_tokenizer(data_config("tokenizer=byte"))
    assert (tok.vocab_size, tok.eos_id, tok.pad_id, tok.is_character_level) == (258, 256, 257, True)
    text = "héllo ✓ 日本"
    ids = tok.encode(text)
    assert ids.dtype == np.int32
    assert ids.tolist() == list(text.encode("utf-8"))
    assert ids[:3].tolist() == [104, 195, 169]  # 'h', then 'é' as two UTF-8 bytes
    assert len(ids) == 1 + 2 + 3 + 1 + 3 + 1 + 3 + 3
    assert tok.decode(np.concatenate([ids[:3], [256], ids[3:], [257, 257]])) == text  # EOS / PAD dropped
    assert tok.describe() == {"tokenizer": "byte", "vocab_size": 258, "eos_id": 256, "pad_id": 257}


def test_char_tokenizer_is_the_text8_alphabet():
    tok = tokenizers.get_tokenizer(data_config("tokenizer=char"))
    assert (tok.vocab_size, tok.eos_id, tok.pad_id, tok.is_character_level) == (29, 27, 28, True)
    assert tok.encode("abz ").tolist() == [1, 2, 26, 0]
    ids = tok.encode("Hi, Zoë!")
    assert ids.tolist() == [8, 9, 0, 0, 26, 15, 0, 0]  # lower-cased; ',', 'ë', '!' -> space
    assert tok.decode(ids) == "hi  zo  "
    assert tok.decode([8, 27, 9, 28, 28]) == "hi"
    text = "the quick brown fox jumps over the lazy dog"
    assert tok.decode(tok.encode(text)) == text


def test_hf_tokenizer_from_file_and_directory_with_its_own_specials(tmp_path):
    trained = train_hf_tokenizer(tmp_path / "tok" / "tokenizer.json", ["<|endoftext|>", "<pad>"])
    base = trained.get_vocab_size()
    assert 256 < base <= 300
    for where in (tmp_path / "tok" / "tokenizer.json", tmp_path / "tok"):
        tok = tokenizers.get_tokenizer(data_config("tokenizer=hf", f"tokenizer_path={where}"))
        assert (tok.eos_id, tok.pad_id, tok.vocab_size) == (0, 1, base)  # special tokens come first
        assert tok.name == f"hf:{where}" and not tok.is_character_level
        text = "to be or not, héllo"
        ids = tok.encode(text)
        assert ids.dtype == np.int32 and ids.tolist() == trained.encode(text, add_special_tokens=False).ids
        assert len(ids) < len(text.encode("utf-8"))  # merges were learned
        assert tok.decode([0, *ids.tolist(), 1, 1]) == text
        assert [e.tolist() for e in tok.encode_batch(["to be", "that"])] == [tok.encode("to be").tolist(),
                                                                           tok.encode("that").tolist()]


def test_hf_tokenizer_appends_missing_eos_and_pad_after_the_vocab(tmp_path):
    trained = train_hf_tokenizer(tmp_path / "plain.json", [])
    base = trained.get_vocab_size()
    tok = tokenizers.get_tokenizer(data_config("tokenizer=hf", f"tokenizer_path={tmp_path / 'plain.json'}"))
    assert (tok.eos_id, tok.pad_id, tok.vocab_size) == (base, base + 1, base + 2)
    ids = tok.encode("to be")
    assert ids.max() < base and tok.decode([*ids.tolist(), base, base + 1]) == "to be"

    trained = train_hf_tokenizer(tmp_path / "eos_only.json", ["</s>"])
    base = trained.get_vocab_size()
    tok = tokenizers.get_tokenizer(data_config("tokenizer=hf", f"tokenizer_path={tmp_path / 'eos_only.json'}"))
    assert (tok.eos_id, tok.pad_id, tok.vocab_size) == (0, base, base + 1)


@pytest.mark.parametrize("name", ["gpt2", "no/such/dir", "no_such_tokenizer.json", "EMPTY_DIR"])
def test_hf_tokenizer_offline_hub_name_or_missing_path_is_a_one_line_error(offline, tmp_path, name):
    if name == "EMPTY_DIR":
        name = str(tmp_path)  # exists, but holds no tokenizer.json
    elif "/" in name or name.endswith(".json"):
        name = str(tmp_path / name)
    with pytest.raises(UserError) as excinfo:
        tokenizers.get_tokenizer(data_config("tokenizer=hf", f"tokenizer_path={name}"))
    assert repr(name) in one_line(excinfo)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("sp"))


def test_sentencepiece_tokenizer_round_trips_and_appends_a_missing_pad(sp_model):
    tok = tokenizers.get_tokenizer(data_config("tokenizer=sentencepiece",
                                               f"tokenizer_path={sp_model / 'plain.model'}"))
    # sentencepiece defaults: unk 0, bos 1, eos 2, no pad -> PAD appended after the 64 pieces
    assert (tok.eos_id, tok.pad_id, tok.vocab_size, tok.name) == (2, 64, 65, "sentencepiece:plain.model")
    text = "First Citizen: Before we proceed any further, hear me speak."
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and len(ids) < len(text) and ids.max() < 64 and ids.min() > 2
    assert tok.decode([*ids.tolist(), 2, 64, 64]) == text
    assert [e.tolist() for e in tok.encode_batch([text, "speak"])] == [ids.tolist(), tok.encode("speak").tolist()]

    padded = tokenizers.get_tokenizer(data_config("tokenizer=sentencepiece",
                                                  f"tokenizer_path={sp_model / 'padded.model'}"))
    assert (padded.eos_id, padded.pad_id, padded.vocab_size) == (2, 3, 64)
    assert padded.decode([*padded.encode(text).tolist(), 3]) == text


def test_sentencepiece_missing_or_bad_model_is_a_one_line_error(tmp_path):
    missing = tmp_path / "none.model"
    with pytest.raises(UserError) as excinfo:
        tokenizers.get_tokenizer(data_config("tokenizer=sentencepiece", f"tokenizer_path={missing}"))
    assert "not found" in one_line(excinfo)
    bad = tmp_path / "bad.model"
    bad.write_text("not a model")
    with pytest.raises(UserError) as excinfo:
        tokenizers.get_tokenizer(data_config("tokenizer=sentencepiece", f"tokenizer_path={bad}"))
    assert "not a sentencepiece model" in one_line(excinfo)
