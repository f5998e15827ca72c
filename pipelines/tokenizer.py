"""Byte-level BPE tokenizer (Hugging Face ``tokenizers``) trained on a corpus's text.

Special tokens have fixed ids: ``<pad>``=0, ``<bos>``=1, ``<eos>``=2, ``<unk>``=3,
``<mask>``=4. Saved as ``<dir>/tokenizer.json``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<unk>", "<mask>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID, MASK_ID = range(5)
TOKENIZER_FILE = "tokenizer.json"
#: Sub-directory of a prepared-shards or export directory holding the tokenizer.
TOKENIZER_DIR = "tokenizer"


def train_tokenizer(
    texts: Iterable[str], out_dir: str | Path | None, vocab_size: int = 1024
) -> Tokenizer:
    """Trains a byte-level BPE tokenizer on ``texts`` (streamed, not held in memory).

    Args:
        texts: Training strings (any iterable, e.g. a generator over a Ray dataset).
        out_dir: Directory to write ``tokenizer.json`` into (``None``: do not save).
        vocab_size: Target vocabulary size, specials and the 256 byte symbols included.

    Returns:
        The trained tokenizer.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must be >= {len(SPECIAL_TOKENS) + 256}, got {vocab_size}")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),  # ids 0..4 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, f"special token {s} got id {tok.token_to_id(s)}"
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tok.save(str(out / TOKENIZER_FILE))
    return tok


def tokenizer_file(path: str | Path) -> Path:
    """``dir`` or ``dir/tokenizer.json`` -> the JSON file path (must exist)."""
    p = Path(path)
    if p.is_dir():
        p = p / TOKENIZER_FILE
    if not p.is_file():
        raise FileNotFoundError(f"no tokenizer at {path} (expected a dir with {TOKENIZER_FILE})")
    return p


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Loads a tokenizer saved by :func:`train_tokenizer` (dir or JSON file)."""
    tok = Tokenizer.from_file(str(tokenizer_file(path)))
    for i, s in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(s) != i:
            raise ValueError(f"tokenizer at {path}: special {s} must have id {i}")
    return tok
