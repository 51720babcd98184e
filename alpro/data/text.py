"""Text side of the loader: the WordPiece tokenizer, padded encoding and the reference MLM masking.

The paper uses bert-base-uncased's tokenizer. Offline, without that directory, :func:`build_tokenizer` builds
a lower-casing WordPiece vocabulary (BERT's tokenizer class and special tokens) from the corpus texts plus the
words of the 24 PEM prompt templates, so prompts never tokenize to [UNK], and saves it with the run.
"""

from __future__ import annotations

import shutil
import string
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from transformers import BertTokenizerFast

from alpro.errors import AlproError
from alpro.tasks import IMAGE_TEMPLATES, VIDEO_TEMPLATES

# The original's prompt templates (paper Table 8), defined once in alpro.tasks; the data package's names for them.
VIDEO_PROMPT_TEMPLATES = VIDEO_TEMPLATES
IMAGE_PROMPT_TEMPLATES = IMAGE_TEMPLATES
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_ALPHABET = string.ascii_lowercase + string.digits + string.punctuation


def build_tokenizer(
    tokenizer_dir: str | Path | None = None,
    train_texts: Iterable[str] | None = None,
    save_dir: str | Path | None = None,
    vocab_size: int = 30522,
) -> BertTokenizerFast:
    """The run's tokenizer: ``tokenizer_dir`` if given (a Hugging Face directory such as bert-base-uncased),
    else the one already saved in ``save_dir`` (a resumed run), else a WordPiece vocabulary of at most
    ``vocab_size`` tokens (more only if the corpus has more distinct characters) built from ``train_texts``
    (:func:`_word_vocab`, the same in every process) and saved to ``save_dir`` with ``save_pretrained``."""
    if tokenizer_dir is not None:
        return _load(Path(tokenizer_dir))
    if save_dir is not None and _is_tokenizer_dir(Path(save_dir)):
        return _load(Path(save_dir))
    if train_texts is None:
        raise AlproError("no tokenizer: give a tokenizer directory or the corpus texts to train one on")
    texts = [t for t in train_texts if t and t.strip()]
    if not texts:
        raise AlproError("cannot train a tokenizer: the corpus has no captions or questions")
    prompt_words = [t.format("") for t in VIDEO_PROMPT_TEMPLATES + IMAGE_PROMPT_TEMPLATES]
    vocab = _word_vocab(texts + prompt_words, vocab_size)
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True)
    if save_dir is not None:
        _save_atomic(tokenizer, Path(save_dir))
    return tokenizer


def _word_vocab(texts: list[str], vocab_size: int) -> dict[str, int]:
    """A deterministic WordPiece vocabulary: the special tokens, every character of the corpus and of ASCII
    (alone and as a ``##`` continuation, so nothing becomes [UNK]), then whole words by falling frequency
    (ties alphabetical) up to ``vocab_size``. Words are split exactly as BertTokenizerFast will split them
    (BERT normaliser, lower-casing with accent stripping, BERT pre-tokenizer).

    Why not ``tokenizers``' WordPiece trainer: it breaks frequency ties differently in every process (measured:
    three runs on the same texts, three different vocabularies), so a resumed or second run would not get the
    vocabulary the first one trained with. Rare words split into known prefixes and characters."""
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    normalizer, pre_tokenizer = BertNormalizer(lowercase=True), BertPreTokenizer()
    counts: Counter = Counter()
    for text in texts:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted(set(_ALPHABET) | {c for word in counts for c in word})
    pieces = SPECIAL_TOKENS + chars + ["##" + c for c in chars]
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if len(w) > 1]
    pieces += words[: max(0, vocab_size - len(pieces))]
    return {piece: i for i, piece in enumerate(pieces)}


def _is_tokenizer_dir(path: Path) -> bool:
    return (path / "vocab.txt").is_file() or (path / "tokenizer.json").is_file()


def _load(path: Path) -> BertTokenizerFast:
    if not _is_tokenizer_dir(path):
        raise AlproError(f"{path}: not a tokenizer directory (no vocab.txt or tokenizer.json)")
    return BertTokenizerFast.from_pretrained(str(path))


def _save_atomic(tokenizer: BertTokenizerFast, save_dir: Path) -> None:
    """Write to a sibling temporary directory, then rename: a crash never leaves half a tokenizer."""
    save_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{save_dir.name}-", dir=save_dir.parent))
    tokenizer.save_pretrained(str(tmp))
    if save_dir.exists():
        shutil.rmtree(save_dir)
    tmp.rename(save_dir)


def encode(tokenizer: BertTokenizerFast, texts: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (B, max_len) int64: padded to ``max_len`` and truncated, as the original."""
    enc = tokenizer(list(texts), max_length=max_len, padding="max_length", truncation=True, return_tensors="pt")
    return enc["input_ids"].long(), enc["attention_mask"].long()


def mask_tokens(
    input_ids: torch.Tensor, tokenizer: BertTokenizerFast, probability: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference MLM collator (ALPRO.md §2.3): each non-special, non-[PAD] token is selected with
    ``probability``; selected tokens become [MASK] (80%), a random token of the whole vocabulary (10%) or stay
    (10%). Returns (masked ids, labels) with labels -100 on unselected tokens. Word-piece level."""
    labels = input_ids.clone()
    special = torch.isin(input_ids, torch.tensor(tokenizer.all_special_ids, dtype=input_ids.dtype))
    prob = torch.full(input_ids.shape, probability).masked_fill_(special, 0.0)
    selected = torch.bernoulli(prob, generator=generator).bool()
    labels[~selected] = -100
    masked = input_ids.clone()
    to_mask = torch.bernoulli(torch.full(input_ids.shape, 0.8), generator=generator).bool() & selected
    masked[to_mask] = tokenizer.mask_token_id
    to_random = torch.bernoulli(torch.full(input_ids.shape, 0.5), generator=generator).bool() & selected & ~to_mask
    random_words = torch.randint(len(tokenizer), input_ids.shape, generator=generator, dtype=input_ids.dtype)
    masked[to_random] = random_words[to_random]
    return masked, labels
