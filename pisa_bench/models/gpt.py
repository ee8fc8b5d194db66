"""A GPT in one file: the modded-nanogpt architecture that the PISA paper's GPT-2 code trains.

Architecture (``GPT2_new_version/NanoGPT/train_gpt_sisa_*.py`` of ``Tracy-Wang7/PISA``, itself the
modded-nanogpt speedrun model of autumn 2024), for tokens ``x`` of shape (B, T):

    h_0 = wte(x)                                             (no position embedding: rotary)
    h   = h + attn(rms_norm(h));   h = h + mlp(rms_norm(h))  (n_layer pre-norm blocks)
    logits = lm_head(rms_norm(h))                            (lm_head.weight is wte.weight: tied)

    attn:  q, k, v = x W_q, x W_k, x W_v (n_head heads of n_embd / n_head);
           q, k <- rotary(rms_norm(q)), rotary(rms_norm(k))   (QK-norm, rotary positions);
           y = softmax(q k^T / sqrt(d) + causal mask) v;  out = y W_o
    mlp:   relu(x W_fc)^2 W_proj   (4 n_embd hidden units)

No biases, no learned norm gains (``F.rms_norm`` without weight), output projections start at 0.
Parameter count: ``V d + n_layer (4 d^2 + 8 d^2) = V d + 12 n_layer d^2`` (tied head); for the
124M configuration (V = 50304 padded GPT-2 vocabulary, d = 768, 12 layers, 6 heads of 128):
38,633,472 + 84,934,656 = 123,568,128.

Names are chosen for parameter routing: ``transformer.wte`` / ``lm_head`` (embedding and head:
the AdamW companion of Muon/NSISA), ``transformer.h.*`` (hidden matrices). The attention
projections are ``q_proj``/``k_proj``/``v_proj``/``o_proj`` (modded-nanogpt: ``c_q``/``c_k``/
``c_v``/``c_proj``) so that Adam-mini finds its per-head query/key blocks.

The paper's sizes (``conf/task/gpt2/scale/paper.yaml``): 124M = 12 layers x 768 (6 heads),
350M = 24 x 1024 (16 heads), 1.5B = 48 x 1600 (25 heads). (The official medium/XL scripts train
nanoGPT's original GPT-2 module; here every size uses the architecture above.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GPTConfig:
    vocab_size: int = 50304  # GPT-2's 50,257 tokens padded to a multiple of 128
    n_layer: int = 12
    n_head: int = 6
    n_embd: int = 768
    rope_base: float = 10000.0


class Rotary(nn.Module):
    """Rotary position embedding: cos/sin tables of shape (1, T, 1, head_dim / 2)."""

    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.arange(seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq.to(device))
        return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of every head: (x1, x2) -> (x1 cos + x2 sin, -x1 sin + x2 cos)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d].float(), x[..., d:].float()
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise ValueError(f"n_embd={cfg.n_embd} is not a multiple of n_head={cfg.n_head}")
        self.n_head, self.head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.o_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        nn.init.zeros_(self.o_proj.weight)
        self.rotary = Rotary(self.head_dim, cfg.rope_base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q = self.q_proj(x).view(b, t, self.n_head, self.head_dim)
        k = self.k_proj(x).view(b, t, self.n_head, self.head_dim)
        v = self.v_proj(x).view(b, t, self.n_head, self.head_dim)
        q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))
        cos, sin = self.rotary(t, x.device)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        return self.o_proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False)
        nn.init.zeros_(self.c_proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(F.rms_norm(x, (x.shape[-1],)))
        return x + self.mlp(F.rms_norm(x, (x.shape[-1],)))


class GPT(nn.Module):
    """Decoder-only transformer; ``forward(idx)`` -> logits (B, T, vocab) in fp32."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(cfg.vocab_size, cfg.n_embd),
                "h": nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            }
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.transformer.wte(idx)
        for block in self.transformer.h:
            x = block(x)
        x = F.rms_norm(x, (x.shape[-1],))
        return self.lm_head(x).float()

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy; targets of -1 are ignored."""
        logits = self(idx)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=-1)


def build_gpt(
    vocab_size: int, n_layer: int, n_head: int, n_embd: int, rope_base: float = 10000.0
) -> GPT:
    """The GPT of the given shape (weights initialised as torch's defaults, projections zeroed)."""
    return GPT(GPTConfig(vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                         rope_base=rope_base))


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters, each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
