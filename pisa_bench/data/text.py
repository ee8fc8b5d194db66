"""Text data: FineWeb token shards, the GPT-2 tokenizer, token corpora and the PTB word corpus.

- Token shards (the ``.bin`` format modded-nanogpt / llm.c data scripts write): a header of 256
  little-endian int32 (``[0]`` magic 20240520, ``[1]`` version 1, ``[2]`` token count), then the
  tokens as uint16: :func:`write_shard`, :func:`read_shard_header`, :func:`load_shard` (mmap).
- The GPT-2 byte-level BPE tokenizer from ``vocab.json`` + ``merges.txt`` on disk (never a hub).
- :class:`TokenWindows`: a token stream cut into windows of ``T + 1`` tokens (inputs + shifted
  targets), over one array or over several shards; the order of an epoch comes from a generator.
- PTB-style word corpora: one sentence per line, ``<eos>`` appended to every line, a vocabulary
  built from the training text; :func:`batchify` lays a stream out as ``bsz`` columns.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from pisa_bench.errors import DatasetMissing

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4


# --- token shards ----------------------------------------------------------------------------
def write_shard(path: Path | str, tokens: Sequence[int] | np.ndarray) -> None:
    """Write ``tokens`` (each < 2**16) as a version-1 shard."""
    toks = np.asarray(tokens)
    if toks.size and (toks.min() < 0 or toks.max() >= 2**16):
        raise ValueError("shard tokens must fit in uint16")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, toks.size
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(toks.astype("<u2").tobytes())


def read_shard_header(path: Path | str) -> int:
    """Validate a shard's header and return its token count (``ValueError`` when it is not one)."""
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise ValueError(f"{path}: too short for a token shard header ({len(raw)} bytes)")
    header = np.frombuffer(raw, dtype="<i4")
    if int(header[0]) != SHARD_MAGIC:
        raise ValueError(
            f"{path}: magic number {int(header[0])} != {SHARD_MAGIC}: not a token shard")
    if int(header[1]) != SHARD_VERSION:
        raise ValueError(f"{path}: unsupported shard version {int(header[1])}")
    return int(header[2])


def load_shard(path: Path | str) -> np.ndarray:
    """The tokens of a shard as a read-only uint16 memory map (header and size checked)."""
    n = read_shard_header(path)
    size = Path(path).stat().st_size
    if size != HEADER_BYTES + 2 * n:
        held = (size - HEADER_BYTES) / 2
        raise ValueError(f"{path}: header claims {n} tokens, the file holds {held}")
    if n == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n,))


def find_shards(directory: Path, pattern: str, dataset: str) -> list[Path]:
    """Shards matching ``pattern`` under ``directory``, sorted; DatasetMissing when none."""
    files = sorted(Path(p) for p in glob.glob(str(directory / pattern)))
    if not files:
        raise DatasetMissing(
            dataset, directory, [pattern],
            hint="FineWeb10B shards are written by modded-nanogpt's data/cached_fineweb10B.py "
                 "(or llm.c's dev/data/fineweb.py).",
        )
    return files


# --- token windows ---------------------------------------------------------------------------
class TokenWindows:
    """Non-overlapping windows of ``T + 1`` tokens (stride ``T``) over one or more token arrays.

    Window ``i`` of array ``a`` holds tokens ``a[i T : i T + T + 1]``, so that inputs are
    ``w[:-1]`` and next-token targets ``w[1:]``. Windows never cross an array boundary.
    """

    def __init__(self, arrays: Sequence[np.ndarray | torch.Tensor], seq_len: int) -> None:
        self.arrays = list(arrays)
        self.T = int(seq_len)
        counts = [max((len(a) - 1) // self.T, 0) for a in self.arrays]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        if self.offsets[-1] == 0:
            raise ValueError(f"no window of {self.T + 1} tokens fits in the data")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def window(self, i: int) -> torch.Tensor:
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        j = (i - int(self.offsets[k])) * self.T
        w = self.arrays[k][j : j + self.T + 1]
        if isinstance(w, torch.Tensor):
            return w.long()
        return torch.from_numpy(np.asarray(w, dtype=np.int64))

    def batch(self, indices: Iterable[int]) -> torch.Tensor:
        """Windows ``indices`` stacked into a (B, T + 1) int64 tensor."""
        return torch.stack([self.window(int(i)) for i in indices])


# --- GPT-2 tokenizer -------------------------------------------------------------------------
GPT2_TOKENIZER_FILES = ("vocab.json", "merges.txt")
GPT2_EOT = 50256  # <|endoftext|>


def gpt2_tokenizer_dir(candidates: Sequence[Path]) -> Path:
    """The first directory with ``vocab.json`` + ``merges.txt`` (DatasetMissing names the first)."""
    for d in candidates:
        if all((d / f).exists() for f in GPT2_TOKENIZER_FILES):
            return d
    raise DatasetMissing("gpt2-tokenizer", candidates[0], list(GPT2_TOKENIZER_FILES))


def load_gpt2_tokenizer(directory: Path, special_tokens: Sequence[str] = ()) -> object:
    """GPT-2's byte-level BPE (a ``tokenizers.Tokenizer``) from ``vocab.json`` + ``merges.txt``.

    ``<|endoftext|>`` is registered as a special token (id 50256); ``special_tokens`` are added
    after it in order (ids 50257, 50258, ...).
    """
    from tokenizers import ByteLevelBPETokenizer

    missing = [f for f in GPT2_TOKENIZER_FILES if not (directory / f).exists()]
    if missing:
        raise DatasetMissing("gpt2-tokenizer", directory, list(GPT2_TOKENIZER_FILES))
    tok = ByteLevelBPETokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
    tok.add_special_tokens(["<|endoftext|>", *special_tokens])
    return tok


def encode(tokenizer: object, text: str) -> list[int]:
    """Token ids of ``text`` (no special tokens added)."""
    return list(tokenizer.encode(text).ids)  # type: ignore[attr-defined]


def compact_vocabulary(
    train: np.ndarray, *others: np.ndarray | None
) -> tuple[list[np.ndarray | None], int, np.ndarray]:
    """Renumber token ids by rank among the ids present in ``train``; unseen ids -> one extra id.

    Returns the renumbered arrays (train first; a ``None`` among ``others``, e.g. an absent
    validation split, comes back as ``None``), the new vocabulary size and the lookup table
    (old id -> new id). Used at small scale to keep the softmax over the ~10k GPT-2 tokens a
    small corpus uses instead of all 50,257.
    """
    arrays = [a for a in (train, *others) if a is not None]
    used = np.unique(train)
    table = np.full(int(max(a.max(initial=0) for a in arrays)) + 1, len(used), np.int64)
    table[used] = np.arange(len(used))
    return [None if a is None else table[a] for a in (train, *others)], len(used) + 1, table


# --- word corpora (PTB) ----------------------------------------------------------------------
class Dictionary:
    """Word <-> id, ids in order of first appearance."""

    def __init__(self) -> None:
        self.word2idx: dict[str, int] = {}
        self.idx2word: list[str] = []

    def add(self, word: str) -> int:
        if word not in self.word2idx:
            self.word2idx[word] = len(self.idx2word)
            self.idx2word.append(word)
        return self.word2idx[word]

    def __len__(self) -> int:
        return len(self.idx2word)

    def to_json(self) -> str:
        return json.dumps(self.idx2word)


def read_words(path: Path) -> list[str]:
    """The words of a PTB-style file: each line's whitespace-separated tokens, then ``<eos>``."""
    words: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            words.extend([*line.split(), "<eos>"])
    return words


def build_word_corpus(train: Path, *others: Path) -> tuple[Dictionary, list[torch.Tensor]]:
    """Dictionary of ``train`` and the id tensors of every file (``KeyError`` on an unseen word).

    PTB's three splits share one 10k vocabulary with ``<unk>`` already substituted, so every word
    of valid/test is in the training vocabulary; when training on another split (small scale),
    words unseen in training are mapped to ``<unk>``.
    """
    d = Dictionary()
    train_words = read_words(train)
    for w in train_words:
        d.add(w)
    tensors = [torch.tensor([d.word2idx[w] for w in train_words], dtype=torch.long)]
    for path in others:
        words = read_words(path)
        unk = d.word2idx.get("<unk>")
        ids = []
        for w in words:
            i = d.word2idx.get(w, unk)
            if i is None:
                raise KeyError(f"{path}: word '{w}' is not in the vocabulary of {train} (no <unk>)")
            ids.append(i)
        tensors.append(torch.tensor(ids, dtype=torch.long))
    return d, tensors


def batchify(data: torch.Tensor, bsz: int) -> torch.Tensor:
    """A 1-D stream as ``bsz`` contiguous columns: shape (len // bsz, bsz), the tail dropped."""
    n = data.numel() // bsz
    if n == 0:
        raise ValueError(f"{data.numel()} tokens cannot fill {bsz} columns")
    return data[: n * bsz].view(bsz, n).t().contiguous()
