"""LSTM language model with AWD-LSTM regularisation (the model of the PISA paper's PTB runs).

The paper's LSTM code (``LSTM/main_mPiAM.py`` of ``Tracy-Wang7/PISA``, from the AdaBelief PTB
experiments, from salesforce/awd-lstm-lm) trains, on tokens x of shape (T, B):

    e   = embedding_dropout(embed, p=dropoute)(x)           (drops whole words of the vocabulary)
    h_0 = locked_dropout(e, dropouti)                        (one mask per sequence, all time steps)
    h_l = LSTM_l(h_{l-1}; W_hh dropped with p=wdrop)         (DropConnect on hidden-to-hidden)
          then locked_dropout(h_l, dropouth) between layers, dropout on the last one
    logits = lm_head(h_L)                                    (lm_head.weight = embed.weight: tied)

Hidden sizes: every layer has ``nhid`` units except the last, which has ``emsize`` so that the
output can share the embedding matrix. Names: ``embed`` and ``lm_head`` (the companion group of
hybrid optimizers), ``rnns.<l>`` (hidden matrices).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

Hidden = list[tuple[torch.Tensor, torch.Tensor]]


def locked_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Variational dropout: one Bernoulli mask per (batch, feature), shared by all time steps."""
    if not training or p == 0:
        return x
    mask = x.new_empty(1, x.shape[1], x.shape[2]).bernoulli_(1 - p) / (1 - p)
    return x * mask


def embedding_dropout(
    embed: nn.Embedding, x: torch.Tensor, p: float, training: bool
) -> torch.Tensor:
    """Drop whole rows (words) of the embedding matrix with probability ``p``, rescale the rest."""
    w = embed.weight
    if training and p > 0:
        mask = w.new_empty(w.shape[0], 1).bernoulli_(1 - p) / (1 - p)
        w = w * mask
    return F.embedding(x, w)


class LSTMLM(nn.Module):
    """``forward(x, hidden)`` -> (logits (T, B, V), new hidden, per-layer outputs for AR/TAR)."""

    def __init__(
        self,
        vocab_size: int,
        emsize: int,
        nhid: int,
        num_layers: int,
        dropout: float = 0.0,
        dropouth: float = 0.0,
        dropouti: float = 0.0,
        dropoute: float = 0.0,
        wdrop: float = 0.0,
        tie_weights: bool = True,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError("num_layers must be >= 1")
        self.num_layers = num_layers
        self.dropout, self.dropouth = dropout, dropouth
        self.dropouti, self.dropoute, self.wdrop = dropouti, dropoute, wdrop
        self.embed = nn.Embedding(vocab_size, emsize)
        last = emsize if tie_weights else nhid
        sizes = [emsize] + [nhid] * (num_layers - 1) + [last]
        self.rnns = nn.ModuleList(nn.LSTM(sizes[i], sizes[i + 1]) for i in range(num_layers))
        self.lm_head = nn.Linear(last, vocab_size)
        self.sizes = sizes
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        nn.init.zeros_(self.lm_head.bias)
        if tie_weights:
            self.lm_head.weight = self.embed.weight

    def init_hidden(self, bsz: int, device: torch.device | None = None) -> Hidden:
        """Zero (h, c) per layer, each of shape (1, bsz, units)."""
        dev = device if device is not None else self.embed.weight.device
        return [(torch.zeros(1, bsz, s, device=dev), torch.zeros(1, bsz, s, device=dev))
                for s in self.sizes[1:]]

    def _rnn(self, i: int, x: torch.Tensor, h: tuple[torch.Tensor, torch.Tensor]) -> tuple:
        rnn = self.rnns[i]
        if self.training and self.wdrop > 0:  # DropConnect on W_hh; the raw weight is the parameter
            w = F.dropout(rnn.weight_hh_l0, p=self.wdrop, training=True)
            return functional_call(rnn, {"weight_hh_l0": w}, (x, h))
        return rnn(x, h)

    def forward(
        self, x: torch.Tensor, hidden: Hidden
    ) -> tuple[torch.Tensor, Hidden, list[torch.Tensor], list[torch.Tensor]]:
        """Returns logits, the new hidden state, raw and dropped outputs of every layer."""
        out = embedding_dropout(self.embed, x, self.dropoute, self.training)
        out = locked_dropout(out, self.dropouti, self.training)
        new_hidden: Hidden = []
        raw_outputs, dropped_outputs = [], []
        for i in range(self.num_layers):
            out, (h, c) = self._rnn(i, out, hidden[i])
            new_hidden.append((h, c))
            raw_outputs.append(out)
            p = self.dropouth if i < self.num_layers - 1 else self.dropout
            out = locked_dropout(out, p, self.training)
            dropped_outputs.append(out)
        return self.lm_head(out), new_hidden, raw_outputs, dropped_outputs


def detach_hidden(hidden: Hidden) -> Hidden:
    """Cut the graph between BPTT windows (truncated back-propagation through time)."""
    return [(h.detach(), c.detach()) for h, c in hidden]
