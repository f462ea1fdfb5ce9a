"""Tokenizers behind one small interface, from local files only.

- a `tokenizer.json` (the `tokenizers` library), e.g. GPT-NeoX's, which the Mamba-2 checkpoints were trained with;
- a sentencepiece `.model` file.

Both give encode(text) -> ids without adding special tokens, decode(ids) -> text without special tokens, and
eos_id, bos_id, pad_id (None where the tokenizer has none) and vocab_size.
"""
import json
from pathlib import Path

import sentencepiece
import tokenizers


class JsonTokenizer:
    """A tokenizer.json. Special tokens come from tokenizer_config.json or special_tokens_map.json beside it when one
    of them names them, otherwise from GPT-NeoX's convention: <|endoftext|> begins and ends documents (Mamba uses it
    for both), <|padding|> pads."""

    def __init__(self, path):
        path = Path(path)
        try:
            self.tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:                      # the Rust side raises a bare Exception for any parse error
            raise ValueError(f"{path}: not a readable tokenizer.json ({e})") from None
        names = {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "pad": "<|padding|>"}
        names.update(_special_tokens_beside(path))
        self.bos_id, self.eos_id, self.pad_id = (self.tok.token_to_id(names[k]) for k in ("bos", "eos", "pad"))
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tok.decode(list(ids), skip_special_tokens=True)


class SentencePieceTokenizer:
    """A sentencepiece .model; its own bos/eos/pad ids (sentencepiece says -1 for none)."""

    def __init__(self, path):
        path = Path(path)
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path}: not a readable sentencepiece model ({e})") from None
        self.bos_id, self.eos_id, self.pad_id = (i if i >= 0 else None
                                                 for i in (self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()))
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text):
        return self.sp.encode(text)

    def decode(self, ids):
        return self.sp.decode(list(ids))


def load_tokenizer(path):
    """A tokenizer from a tokenizer.json, a sentencepiece .model, or a directory holding tokenizer.json or
    tokenizer.model."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in ("tokenizer.json", "tokenizer.model") if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(f"load_tokenizer: no tokenizer.json or tokenizer.model in {path}")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"load_tokenizer: {path} does not exist")
    if path.suffix == ".json":
        return JsonTokenizer(path)
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    raise ValueError(f"load_tokenizer: {path}: expected a tokenizer .json or a sentencepiece .model")


def _special_tokens_beside(path):
    """{'bos'|'eos'|'pad': token text} from transformers' tokenizer_config.json or special_tokens_map.json."""
    names = {}
    for file in ("special_tokens_map.json", "tokenizer_config.json"):     # the latter wins, as in transformers
        file = path.parent / file
        if not file.is_file():
            continue
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file}: not valid JSON ({e})") from None
        for kind in ("bos", "eos", "pad"):
            token = config.get(f"{kind}_token")
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str):
                names[kind] = token
    return names
