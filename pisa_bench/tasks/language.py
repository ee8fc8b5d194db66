"""Language modelling: GPT-2 pretraining, GPT-2 fine-tuning on recipes, LSTM language models on PTB.

- :class:`GPTPretraining` (``task=gpt2``): next-token cross-entropy of the modded-nanogpt GPT
  (:mod:`pisa_bench.models.gpt`) on windows of ``seq_len + 1`` tokens; FineWeb10B ``.bin`` shards
  at paper scale, tiny Shakespeare / WikiText-2 through the GPT-2 tokenizer at small scale.
  Primary metric: validation loss (nats/token), logged against tokens and wall-clock.
- :class:`GPT2Finetune` (``task=gpt2_finetune``): a ``transformers`` GPT-2 on the 1,000 recipes
  of the paper's appendix, from a local pretrained checkpoint or freshly initialised (said in the
  run's notes). Metrics: validation loss and perplexity.
- :class:`LSTMLanguageModel` (``task=lstm{1,2,3}_ptb``): AWD-LSTM-style word model
  (:mod:`pisa_bench.models.lstm`) trained by truncated BPTT; the m workers of a PISA round take
  consecutive pieces of each BPTT window (:meth:`LSTMLanguageModel.split_batch` cuts along time)
  and the hidden state runs through them and across windows; it is task state, so checkpoints
  carry it. One process only (torchrun is refused: a rank cannot receive the hidden state of the
  previous piece). Primary metric: test perplexity.
"""

from __future__ import annotations

import csv
import logging
import math
import sys
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from pisa import distributed as pdist
from pisa_bench.data import text
from pisa_bench.data.keys import check_dataset, require_files
from pisa_bench.data.split import tail_split, validation_indices
from pisa_bench.errors import DatasetMissing
from pisa_bench.models.gpt import build_gpt
from pisa_bench.models.lstm import LSTMLM, detach_hidden
from pisa_bench.runtime import epoch_generator, sum_across_ranks
from pisa_bench.tasks.base import Task

log = logging.getLogger("pisa-bench")


def perplexity(loss: float) -> float:
    """``exp(loss)`` (nats per token), ``inf`` where it overflows a float; never clamped, so an
    exploded loss shows as an exploded (or infinite) perplexity and the run ends ``diverged``."""
    return math.inf if loss >= math.log(sys.float_info.max) else math.exp(loss)  # nan stays nan


def _tokens(tokenizer: object, path: Path) -> np.ndarray:
    return np.asarray(text.encode(tokenizer, path.read_text("utf-8")), np.int64)


# ============================================================================================
# GPT-2 pretraining
# ============================================================================================
class GPTPretraining(Task):
    """Next-token prediction on token windows; batches are (B, seq_len + 1) int64 tensors."""

    DATASETS = ("fineweb10B", "tinyshakespeare", "wikitext2")

    @classmethod
    def accepted_data_keys(cls, data: DictConfig) -> frozenset[str]:
        """Every dataset's keys (the task config holds them all; ``synthetic_*``: smoke scale)."""
        check_dataset(data, cls.DATASETS)
        return frozenset({
            "name", "synthetic", "seq_len", "shuffle", "val_tokens", "synthetic_vocab",
            "synthetic_tokens", "dir", "train_pattern", "val_pattern", "tokenizer_dir",
            "train_frac", "compact_vocab", "val_fraction",
        })

    train_windows: text.TokenWindows
    val_windows: text.TokenWindows
    select_windows: text.TokenWindows | None = None  # carved from training (val_fraction)
    vocab_size: int

    def setup(self) -> None:
        d = self.tcfg.data
        T = int(d.seq_len)
        if d.synthetic:
            g = torch.Generator().manual_seed(self.seed)
            v = int(d.synthetic_vocab)
            toks = torch.randint(0, v, (int(d.synthetic_tokens),), generator=g)
            n = int(0.9 * len(toks))
            train, select = self._carve([toks[:n]])
            val, vocab = [toks[n:]], v
        elif d.name == "fineweb10B":
            root = self.data_dir / str(d.dir)
            train, select = self._carve([text.load_shard(p) for p in
                                         text.find_shards(root, str(d.train_pattern), d.name)])
            val = [text.load_shard(p) for p in text.find_shards(root, str(d.val_pattern), d.name)]
            vocab = 50257
        elif d.name in ("tinyshakespeare", "wikitext2"):
            train, select, val, vocab = self._text_corpus()
        else:
            raise ValueError(
                f"unknown gpt2 data '{d.name}': fineweb10B | tinyshakespeare | wikitext2")
        self.train_windows = text.TokenWindows(train, T)
        self.val_windows = text.TokenWindows(val, T)
        if select is not None:
            self.select_windows = text.TokenWindows([select], T)
            self.notes.append(
                f"validation split for selection: the last {len(select)} training tokens "
                f"(val_loss / val_ppl); loss / ppl are on the held-out split "
                f"({self.tcfg.metric.get('split', 'val')})")
        mv = self.tcfg.model.get("vocab_size")
        self.vocab_size = int(mv) if mv is not None else vocab
        if self.vocab_size < vocab:
            raise ValueError(f"task.model.vocab_size={self.vocab_size} < the data's {vocab} tokens")
        n_tok = sum(len(a) for a in train)
        log.info("gpt2 data %s: %d train tokens, %d train windows of %d, %d val windows, vocab %d",
                 d.name if not d.synthetic else "synthetic", n_tok, len(self.train_windows), T,
                 len(self.val_windows), self.vocab_size)

    def _carve(self, train: list[Any]) -> tuple[list[Any], Any | None]:
        """``(train, selection)``: the last ``data.val_fraction`` of the last training array is
        the selection stream (contiguous; :func:`~pisa_bench.data.split.tail_split`)."""
        *head, last = train
        last, select = tail_split(last, self.tcfg.data.get("val_fraction"))
        return [*head, last], select

    def _text_corpus(self) -> tuple[list[np.ndarray], np.ndarray | None, list[np.ndarray], int]:
        """GPT-2 tokens of a small corpus, ``(train, selection, held-out, vocab)``, and the split
        it is used under (with a note saying so). The selection stream is carved before the
        vocabulary is compacted, so that only the training tokens define it."""
        d = self.tcfg.data
        tok_dir = text.gpt2_tokenizer_dir([self.data_dir / str(d.tokenizer_dir)])
        tokenizer = text.load_gpt2_tokenizer(tok_dir)
        if d.name == "tinyshakespeare":
            folder = self.data_dir / "tinyshakespeare"
            require_files(folder, ["input.txt"], "tinyshakespeare")
            ids = _tokens(tokenizer, folder / "input.txt")
            n = int(float(d.train_frac) * len(ids))
            train, val = ids[:n], ids[n:]
            self.notes.append(
                f"tiny Shakespeare, GPT-2 tokens: first {float(d.train_frac):.0%} train / rest "
                "validation (nanoGPT's split; no official split exists)")
        else:
            folder = self.data_dir / "wikitext-2"
            require_files(folder, ["valid.txt", "test.txt"], "wikitext-2")
            train = _tokens(tokenizer, folder / "valid.txt")
            val = _tokens(tokenizer, folder / "test.txt")
            self.notes.append("WikiText-2 train split unavailable: trained on valid.txt, validated "
                              "on test.txt (non-standard split)")
        vocab = 50257
        [train], select = self._carve([train])
        if d.get("compact_vocab"):
            (train, val, select), vocab, _ = text.compact_vocabulary(train, val, select)
            self.notes.append(
                f"vocabulary compacted to the {vocab - 1} GPT-2 tokens present in the training "
                "text (+1 id for validation tokens unseen in training), a CPU-sized softmax")
        return [train], select, [val], vocab

    def build_model(self) -> nn.Module:
        m = self.tcfg.model
        model = build_gpt(self.vocab_size, int(m.n_layer), int(m.n_head), int(m.n_embd),
                          float(m.get("rope_base", 10000.0)))
        if self.tcfg.get("compile"):
            model = torch.compile(model)  # type: ignore[assignment]
        return model

    def steps_per_epoch(self) -> int:
        return max(len(self.train_windows) // int(self.cfg.train.batch_size), 1)

    def train_batches(self, epoch: int, start: int = 0) -> Iterator[torch.Tensor]:
        bs = int(self.cfg.train.batch_size)
        n = len(self.train_windows)
        if self.tcfg.data.get("shuffle", True):
            order = torch.randperm(n, generator=epoch_generator(self.seed, epoch))
        else:
            order = torch.arange(n)
        for i in range(start, self.steps_per_epoch()):
            yield self.train_windows.batch(order[i * bs : (i + 1) * bs].tolist())

    def count(self, batch: torch.Tensor) -> int:
        return int(batch.shape[0] * (batch.shape[1] - 1))  # tokens

    def loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        logits = model(batch[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """``loss``/``ppl`` on the held-out split, ``val_loss``/``val_ppl`` on the selection
        stream when ``data.val_fraction`` carved one; each over its first ``data.val_tokens``
        tokens (all when null)."""
        out = {}
        sets = {"": self.val_windows, "val_": self.select_windows}
        for prefix, windows in sets.items():
            if windows is not None:
                loss = self._windows_loss(model, windows)
                out |= {f"{prefix}loss": loss, f"{prefix}ppl": perplexity(loss)}
        return out

    def _windows_loss(self, model: nn.Module, windows: text.TokenWindows) -> float:
        """Mean next-token loss (nats) over the first ``data.val_tokens`` tokens of ``windows``."""
        T = int(self.tcfg.data.seq_len)
        cap = self.tcfg.data.get("val_tokens")
        n = len(windows)
        if cap is not None:
            n = min(n, max(int(cap) // T, 1))
        rank, world = pdist.rank(), pdist.world_size()
        mine = list(range(rank, n, world))
        bs = int(self.cfg.train.eval_batch_size)
        total, count = 0.0, 0.0
        for i in range(0, len(mine), bs):
            b = windows.batch(mine[i : i + bs]).to(self.device)
            logits = model(b[:, :-1]).float()
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                           b[:, 1:].reshape(-1), reduction="sum"))
            count += b[:, 1:].numel()
        total, count = sum_across_ranks([total, count], self.device)
        return total / max(count, 1.0)


# ============================================================================================
# GPT-2 fine-tuning on recipes
# ============================================================================================
RECIPE_SPECIALS = ("<|startoftext|>", "<|pad|>", "<|unknown|>")  # as the paper's script adds


def recipe_text(ingredients: str, instructions: str) -> str:
    """The paper's recipe format (between <|startoftext|> and <|endoftext|>)."""
    return f"Ingredients: {ingredients.strip()}. Instructions: {instructions.strip()}"


class GPT2Finetune(Task):
    """Causal LM loss on recipes, padded to ``data.max_length``; padding is not scored."""

    @classmethod
    def accepted_data_keys(cls, data: DictConfig) -> frozenset[str]:
        check_dataset(data, ("recipes",))
        return frozenset({
            "name", "synthetic", "dir", "file", "max_length", "split_seed", "train_frac",
            "tokenizer_dir", "compact_vocab", "synthetic_samples", "synthetic_vocab",
            "val_fraction",
        })

    train_ids: torch.Tensor
    val_ids: torch.Tensor
    select_ids: torch.Tensor | None = None  # carved from training (val_fraction)
    vocab_size: int
    pad_id: int
    bos_id: int | None = None
    eos_id: int | None = None

    def setup(self) -> None:
        d = self.tcfg.data
        L = int(d.max_length)
        path = self.tcfg.model.get("pretrained_path")
        self.pretrained = Path(str(path)).expanduser() if path else None
        if self.pretrained is not None and not (self.pretrained / "config.json").exists():
            raise DatasetMissing("pretrained GPT-2 checkpoint", self.pretrained,
                                 ["config.json", "model.safetensors (or pytorch_model.bin)"],
                                 hint="task.model.pretrained_path must be a local directory "
                                      "written by save_pretrained(); nothing is downloaded.")
        if d.synthetic:
            g = torch.Generator().manual_seed(self.seed)
            v = int(d.synthetic_vocab)
            self.pad_id, self.vocab_size = v - 1, v
            n = int(d.synthetic_samples)
            ids = torch.randint(0, v - 1, (n, L), generator=g)
            lengths = torch.randint(L // 2, L + 1, (n,), generator=g)
            ids[torch.arange(L)[None, :] >= lengths[:, None]] = self.pad_id
        else:
            ids = self._recipes(L)
        n_train = round(float(d.train_frac) * len(ids))
        perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(int(d.split_seed)))
        self.train_ids, self.val_ids = ids[perm[:n_train]], ids[perm[n_train:]]
        if d.get("val_fraction"):
            keep, sel = validation_indices(len(self.train_ids), float(d.val_fraction))
            self.train_ids, self.select_ids = self.train_ids[keep], self.train_ids[sel]
            self.notes.append(
                f"validation split for selection: {len(sel)} of the training recipes "
                f"(val_loss / val_ppl); loss / ppl are on the {len(self.val_ids)} held-out ones")
        if d.get("compact_vocab") and self.pretrained is None and not d.synthetic:
            sel = None if self.select_ids is None else self.select_ids.numpy()
            (tr, va, sel), self.vocab_size, table = text.compact_vocabulary(
                self.train_ids.numpy(), self.val_ids.numpy(), sel)
            self.train_ids, self.val_ids = torch.from_numpy(tr), torch.from_numpy(va)
            self.select_ids = None if sel is None else torch.from_numpy(sel)
            self.pad_id = int(table[self.pad_id])
            self.bos_id = int(table[self.bos_id]) if self.bos_id is not None else None
            self.eos_id = int(table[self.eos_id]) if self.eos_id is not None else None
            self.notes.append(
                f"vocabulary compacted to the {self.vocab_size - 1} GPT-2 tokens present in the "
                "training recipes (+1 id for unseen validation tokens): a CPU-sized softmax for "
                "the freshly initialised model")
        if self.pretrained is None:
            msg = ("GPT-2 freshly initialised from a config (no task.model.pretrained_path given): "
                   "this is training from scratch on 1,000 recipes, not the paper's fine-tuning")
            log.warning(msg)
            self.notes.append(msg)
        else:
            self.notes.append(f"GPT-2 fine-tuned from the local checkpoint {self.pretrained}")

    def _recipes(self, L: int) -> torch.Tensor:
        d = self.tcfg.data
        folder = self.data_dir / str(d.dir)
        require_files(folder, [str(d.file)], "recipes")
        candidates = [self.data_dir / str(d.tokenizer_dir)]
        if self.pretrained is not None:
            candidates.append(self.pretrained)
        tokenizer = text.load_gpt2_tokenizer(text.gpt2_tokenizer_dir(candidates), RECIPE_SPECIALS)
        bos = self.bos_id = tokenizer.token_to_id("<|startoftext|>")
        eos = self.eos_id = tokenizer.token_to_id("<|endoftext|>")
        self.pad_id = tokenizer.token_to_id("<|pad|>")
        self.vocab_size = tokenizer.get_vocab_size()
        rows = []
        with open(folder / str(d.file), newline="", encoding="utf-8") as f:
            for rec in csv.DictReader(f):
                body = text.encode(tokenizer, recipe_text(rec["ingredients"], rec["instructions"]))
                ids = [bos, *body, eos][:L]
                rows.append(ids + [self.pad_id] * (L - len(ids)))
        return torch.tensor(rows, dtype=torch.long)

    def build_model(self) -> nn.Module:
        from transformers import GPT2Config, GPT2LMHeadModel

        m = self.tcfg.model
        if self.pretrained is not None:
            model = GPT2LMHeadModel.from_pretrained(str(self.pretrained), local_files_only=True)
            model.resize_token_embeddings(self.vocab_size)
        else:
            cfg = GPT2Config(vocab_size=self.vocab_size, n_positions=int(m.n_positions),
                             n_embd=int(m.n_embd), n_layer=int(m.n_layer), n_head=int(m.n_head),
                             resid_pdrop=float(m.dropout), embd_pdrop=float(m.dropout),
                             attn_pdrop=float(m.dropout), pad_token_id=self.pad_id,
                             bos_token_id=self.bos_id, eos_token_id=self.eos_id)
            model = GPT2LMHeadModel(cfg)
        return model

    def steps_per_epoch(self) -> int:
        return max(len(self.train_ids) // int(self.cfg.train.batch_size), 1)

    def train_batches(self, epoch: int, start: int = 0) -> Iterator[torch.Tensor]:
        bs = min(int(self.cfg.train.batch_size), len(self.train_ids))
        perm = torch.randperm(len(self.train_ids), generator=epoch_generator(self.seed, epoch))
        for i in range(start, self.steps_per_epoch()):
            yield self.train_ids[perm[i * bs : (i + 1) * bs]]

    def _loss_sum(self, model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        mask = ids != self.pad_id
        logits = model(input_ids=ids, attention_mask=mask.long()).logits.float()
        tgt = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                               ignore_index=-100, reduction="sum")
        return loss, int(mask[:, 1:].sum())

    def count(self, batch: torch.Tensor) -> int:
        return int(batch.shape[0])  # recipes

    def loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        total, n = self._loss_sum(model, batch)
        return total / max(n, 1)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """``loss``/``ppl`` on the held-out recipes, ``val_loss``/``val_ppl`` on the selection
        recipes when ``data.val_fraction`` carved them (padding not scored)."""
        out = {}
        for prefix, ids in {"": self.val_ids, "val_": self.select_ids}.items():
            if ids is not None:
                loss = self._ids_loss(model, ids)
                out |= {f"{prefix}loss": loss, f"{prefix}ppl": perplexity(loss)}
        return out

    def _ids_loss(self, model: nn.Module, ids: torch.Tensor) -> float:
        """Mean next-token loss (nats) of padded rows ``ids``, split across ranks."""
        bs = int(self.cfg.train.eval_batch_size)
        rank, world = pdist.rank(), pdist.world_size()
        ids = ids[rank::world]
        total, count = 0.0, 0.0
        for i in range(0, len(ids), bs):
            s, n = self._loss_sum(model, ids[i : i + bs].to(self.device))
            total, count = total + float(s), count + n
        total, count = sum_across_ranks([total, count], self.device)
        return total / max(count, 1.0)


# ============================================================================================
# LSTM language models on PTB
# ============================================================================================
class LSTMLanguageModel(Task):
    """Truncated BPTT over ``train.batch_size`` columns; batches are ``{"tokens", "start"}``.

    ``tokens``: rows ``start .. start + L`` of the batchified stream, shape (L + 1, B) (inputs are
    the first L rows, targets the last L); ``start``: the row of the first input in the stream.
    The training hidden state continues from the previous piece; it restarts at zero at row 0
    (a new epoch). One process only: the m workers run in sequence (virtual workers, as the
    paper's code simulates them on one GPU), because piece k needs the hidden state piece k - 1
    ends with; under torchrun a rank could not receive it, so ``setup`` refuses ``WORLD_SIZE > 1``.
    """

    train_data: torch.Tensor
    eval_sets: dict[str, torch.Tensor]
    vocab_size: int

    @classmethod
    def accepted_data_keys(cls, data: DictConfig) -> frozenset[str]:
        check_dataset(data, ("ptb",))
        return frozenset({
            "name", "synthetic", "dir", "train_file", "val_file", "test_file", "note", "bptt",
            "val_fraction", "synthetic_vocab", "synthetic_tokens",
        })

    def __init__(self, cfg: Any, device: torch.device) -> None:
        super().__init__(cfg, device)
        self.hidden: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def setup(self) -> None:
        world = pdist.world_size()
        if world > 1:
            raise ValueError(
                f"task {self.tcfg.name} runs in one process (got {world} torchrun processes): its "
                f"workers take consecutive pieces of each BPTT window, each starting from the "
                f"hidden state the previous piece ends with; run `python run.py` without torchrun "
                f"(the m workers are virtual: optim.n_workers)")
        if int(self.cfg.train.get("grad_accum") or 1) != 1:
            raise ValueError(
                f"task {self.tcfg.name} takes no train.grad_accum: micro-batches would cut each "
                f"worker's piece of the BPTT window along time again, truncating backpropagation "
                f"at every cut (set train.grad_accum=1)")
        d = self.tcfg.data
        bsz, ebsz = int(self.cfg.train.batch_size), int(self.cfg.train.eval_batch_size)
        if d.synthetic:
            g = torch.Generator().manual_seed(self.seed)
            v = int(d.synthetic_vocab)
            train = torch.randint(0, v, (int(d.synthetic_tokens),), generator=g)
            test = torch.randint(0, v, (int(d.synthetic_tokens) // 4,), generator=g)
            self.vocab_size, splits = v, {"test": test}
        else:
            folder = self.data_dir / str(d.dir)
            names = {"train": d.train_file, "val": d.get("val_file"), "test": d.test_file}
            files = {k: str(v) for k, v in names.items() if v}
            require_files(folder, list(files.values()), "ptb")
            order = [k for k in ("train", "val", "test") if k in files]
            vocab, tensors = text.build_word_corpus(*(folder / files[k] for k in order))
            self.vocab_size = len(vocab)
            train, splits = tensors[0], dict(zip(order[1:], tensors[1:]))
            if d.get("note"):
                self.notes.append(str(d.note))
        frac = d.get("val_fraction")  # a validation stream carved from the training tokens
        if frac:
            if "val" in splits:
                raise ValueError("task.data: set either val_file or val_fraction, not both")
            train, splits["val"] = tail_split(train, float(frac))
            self.notes.append(f"validation split: the last {len(splits['val'])} training tokens "
                              f"(val_ppl / val_loss)")
        self.train_data = text.batchify(train, bsz)
        self.eval_sets = {k: text.batchify(v, ebsz) for k, v in splits.items()}
        if self.steps_per_epoch() < 1:
            raise ValueError("training stream shorter than one BPTT window")

    def build_model(self) -> nn.Module:
        m = OmegaConf.to_container(self.tcfg.model, resolve=True)
        assert isinstance(m, dict)
        m.pop("name", None)
        return LSTMLM(vocab_size=self.vocab_size, **m)

    @property
    def bptt(self) -> int:
        return int(self.tcfg.data.bptt)

    def steps_per_epoch(self) -> int:
        return (self.train_data.shape[0] - 1) // self.bptt

    def train_batches(self, epoch: int, start: int = 0) -> Iterator[dict[str, Any]]:
        for i in range(start, self.steps_per_epoch()):
            s = i * self.bptt
            yield {"tokens": self.train_data[s : s + self.bptt + 1], "start": s}

    def split_batch(self, batch: dict[str, Any], m: int) -> list[dict[str, Any]]:
        """Cut the window along time into m consecutive pieces (the last takes the remainder).

        Piece k holds input rows ``[a_k, b_k)`` and the one extra row its targets need, so the
        pieces' inputs tile the window exactly and each target is predicted once.
        """
        if m == 1:
            return [batch]
        tokens, start = batch["tokens"], int(batch["start"])
        L = tokens.shape[0] - 1
        if m > L:
            raise ValueError(f"a BPTT window of {L} steps cannot feed {m} workers")
        piece = L // m
        cuts = [k * piece for k in range(m)] + [L]
        return [{"tokens": tokens[a : b + 1], "start": start + a} for a, b in pairwise(cuts)]

    def count(self, batch: dict[str, Any]) -> int:
        t = batch["tokens"]
        return int((t.shape[0] - 1) * t.shape[1])  # tokens

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """Cross-entropy + AR + TAR (AWD-LSTM).

        AR: ``alpha E[h^2]`` on the dropped last-layer output; TAR: ``beta E[(h_t - h_{t-1})^2]``
        on the raw one.
        """
        tokens = batch["tokens"]
        x, y = tokens[:-1], tokens[1:]
        bsz = x.shape[1]
        hidden = self.hidden
        if int(batch["start"]) == 0 or hidden is None or hidden[0][0].shape[1] != bsz:
            hidden = model.init_hidden(bsz, x.device)  # type: ignore[operator]
        logits, new_hidden, raw, dropped = model(x, hidden)
        self.hidden = detach_hidden(new_hidden)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        ar, tar = float(self.tcfg.get("ar_alpha", 0.0)), float(self.tcfg.get("tar_beta", 0.0))
        if ar:
            loss = loss + ar * dropped[-1].pow(2).mean()
        if tar and raw[-1].shape[0] > 1:
            loss = loss + tar * (raw[-1][1:] - raw[-1][:-1]).pow(2).mean()
        return loss

    def _stream_loss(self, model: nn.Module, data: torch.Tensor) -> float:
        hidden = model.init_hidden(data.shape[1], self.device)  # type: ignore[operator]
        total, n = 0.0, 0
        for i in range(0, data.shape[0] - 1, self.bptt):
            L = min(self.bptt, data.shape[0] - 1 - i)
            chunk = data[i : i + L + 1].to(self.device)
            logits, hidden, _, _ = model(chunk[:-1], hidden)
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                           chunk[1:].reshape(-1), reduction="sum"))
            n += chunk[1:].numel()
        return total / n

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Perplexity per evaluation split: ``ppl``/``loss`` (test), ``val_ppl``/``val_loss``."""
        out: dict[str, float] = {}
        for split, data in self.eval_sets.items():
            loss = self._stream_loss(model, data)
            prefix = "" if split == self.metric_split else f"{split}_"
            out[f"{prefix}loss"] = loss
            out[f"{prefix}ppl"] = perplexity(loss)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"hidden": self.hidden}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        h = state.get("hidden")
        self.hidden = None if h is None else [(a.to(self.device), b.to(self.device)) for a, b in h]
