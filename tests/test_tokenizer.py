"""tokenizer.py with a tiny byte-level BPE tokenizer.json (GPT-NeoX's kind) and a tiny sentencepiece model, both
trained here on a few sentences."""
import io
import json

import pytest
import sentencepiece
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from tokenizer import JsonTokenizer, SentencePieceTokenizer, load_tokenizer

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Mamba is a selective state space model.",
             "ML-Mamba reads images and text; it answers questions!", "Hello world, hello Mamba."] * 10
TEXTS = ["the lazy fox answers", "Hello, Mamba-2!", "  spaces  and\nnew lines ", "unseen: Ω ∑ 😀"]


@pytest.fixture
def neox_json(tmp_path):
    """A byte-level BPE with GPT-NeoX's special tokens, saved as tokenizer.json."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    return tmp_path / "tokenizer.json", tok


@pytest.fixture
def sp_model(tmp_path):
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES), model_writer=model, vocab_size=320,
                                             model_type="bpe", pad_id=3, byte_fallback=True, minloglevel=2,
                                             hard_vocab_limit=False)
    path = tmp_path / "tiny.model"
    path.write_bytes(model.getvalue())
    return path


def test_tokenizer_json(neox_json):
    path, tok = neox_json
    for source in (path, path.parent):                     # the file, or the directory holding it
        t = load_tokenizer(source)
        assert isinstance(t, JsonTokenizer)
        assert (t.bos_id, t.eos_id, t.pad_id) == (0, 0, 1)   # <|endoftext|>, <|padding|>
        assert t.vocab_size == tok.get_vocab_size() > 256
        for text in TEXTS:
            ids = t.encode(text)
            assert ids == tok.encode(text).ids and all(0 <= i < t.vocab_size for i in ids)
            assert t.decode(ids) == text                    # byte-level: every string round-trips
        assert t.decode([t.eos_id] + t.encode("fox") + [t.pad_id]) == "fox"
    assert len(t.encode("The quick brown fox")) < len("The quick brown fox")   # merges were learnt


def test_tokenizer_json_special_tokens_from_config(neox_json):
    path, tok = neox_json
    (path.parent / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": "<|padding|>"}, "bos_token": "<|endoftext|>", "pad_token": None}))
    t = load_tokenizer(path)
    assert (t.bos_id, t.eos_id, t.pad_id) == (0, 1, 1)      # pad_token null: keeps the default


def test_sentencepiece(sp_model):
    t = load_tokenizer(sp_model)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_model))
    assert isinstance(t, SentencePieceTokenizer)
    assert (t.bos_id, t.eos_id, t.pad_id, t.vocab_size) == (1, 2, 3, sp.get_piece_size()) and t.vocab_size > 260
    for text in (TEXTS[0], TEXTS[1], TEXTS[3]):     # sentencepiece normalises whitespace; byte fallback keeps the rest
        ids = t.encode(text)
        assert ids == sp.encode(text) and t.bos_id not in ids
        assert t.decode(ids) == text
    assert t.decode([t.bos_id] + t.encode("fox") + [t.eos_id]) == "fox"


def test_errors(tmp_path, sp_model):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "bad.json").write_text('{"model": 1}')
    with pytest.raises(ValueError, match="bad.json: not a readable tokenizer.json"):
        load_tokenizer(tmp_path / "bad.json")
    (tmp_path / "bad.model").write_bytes(sp_model.read_bytes()[:50])
    with pytest.raises(ValueError, match="bad.model: not a readable sentencepiece model"):
        load_tokenizer(tmp_path / "bad.model")
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="expected a tokenizer .json or a sentencepiece .model"):
        load_tokenizer(tmp_path / "vocab.txt")
