"""Hugging Face ``transformers.Trainer`` with SISA as the optimizer (no change to the Trainer).

A two-layer GPT-2 built from a config (no download) learns arithmetic progressions mod ``V``.
The optimizer reaches the Trainer either as an instance, ``Trainer(optimizers=(opt, sched))``,
or as ``optimizer_cls_and_kwargs=(pisa.SISA, kwargs)`` (then the Trainer builds its two groups,
with and without ``weight_decay``, and its own ``lr_scheduler_type`` schedule).

Virtual workers: every ``optimizer.step()`` the Trainer makes is one worker's local step, so with
``n_workers=m`` each ``m`` consecutive Trainer steps form one round, every one of them taking its
gradient at the same global weights (make ``max_steps`` a multiple of ``m`` so the last round
closes). ``gradient_accumulation_steps=k`` accumulates ``k`` micro-batches into *one* worker's
gradient before its ``step()``: a round sees ``m * k`` micro-batches. The Trainer steps its LR
scheduler once per ``optimizer.step()`` (``max_steps`` counts those calls, not rounds); SISA
reads ``lr`` at a round's first step and holds it for the round, so a schedule written in
Trainer steps is sampled once per round and needs no change. The logged ``loss`` is taken at the
global weights (inside a round the parameters hold ``w``). Checkpoints (``save_strategy``,
``resume_from_checkpoint``) carry the round position in the optimizer's ``state_dict``.

Not supported: multi-process Trainer runs (``torchrun`` / ``accelerate launch``). The Trainer
wraps the model in ``DistributedDataParallel``, which averages the gradients in ``backward()``
and would make the ranks' workers one. PISA refuses rather than train wrongly: in distributed
mode ``n_workers`` must equal the world size, and the first ``step()`` checks that the ranks'
gradients differ and raises if they do not (``check_distributed``). Plain loops fix it with
``pisa.distributed.prepare`` or ``pisa.distributed.no_sync`` (``examples/torchrun_workers.py``);
the Trainer has no hook for either. Single-process training (CPU or one GPU) with any ``m`` is
what this example covers.

    python examples/hf_trainer.py --workers 4 --steps 120
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainingArguments,
    get_cosine_schedule_with_warmup,
)

import pisa

VOCAB = 16
SEQ_LEN = 16


class Progressions(Dataset):
    """Sequences ``(a + k * j) mod VOCAB``, ``j < SEQ_LEN``, with random start ``a`` and step
    ``k in {1, 2, 3}``: after the first two tokens every next token is determined."""

    def __init__(self, size: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (size, 1), generator=gen)
        step = torch.randint(1, 4, (size, 1), generator=gen)
        self.ids = (start + step * torch.arange(SEQ_LEN)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def make_model(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ_LEN, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=0, eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def sisa_kwargs(n_workers: int, lr: float) -> dict[str, Any]:
    """SISA used like Adam: sigma 0.1, so c = sigma * lr = 1e-3 at lr 1e-2 (README: "Choosing
    sigma and lr")."""
    return {"lr": lr, "sigma": 0.1, "n_workers": n_workers}


def train(
    n_workers: int = 4,
    steps: int = 120,
    lr: float = 1e-2,
    via: str = "optimizers",
    grad_accum: int = 1,
    seed: int = 0,
) -> tuple[GPT2LMHeadModel, list[float], pisa.SISA]:
    """Trains with ``steps`` Trainer (optimizer) steps, i.e. ``steps / n_workers`` rounds.

    ``via``: ``"optimizers"`` passes ``(SISA, cosine schedule)`` instances;
    ``"cls_and_kwargs"`` passes ``(pisa.SISA, kwargs)`` and lets the Trainer build the groups and
    its linear schedule. Returns the model, the logged training losses (one per step) and SISA.
    """
    if steps % n_workers:
        raise ValueError(f"steps ({steps}) must be a multiple of n_workers ({n_workers})")
    model = make_model(seed)
    kwargs = sisa_kwargs(n_workers, lr)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=16,
            gradient_accumulation_steps=grad_accum,
            learning_rate=kwargs["lr"],
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=seed,
        )
        data = Progressions(size=steps * 16 * grad_accum, seed=seed)
        if via == "optimizers":
            opt = pisa.SISA(model.parameters(), **kwargs)
            sched = get_cosine_schedule_with_warmup(opt, steps // 10, steps)  # in Trainer steps
            trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, sched))
        elif via == "cls_and_kwargs":
            trainer = Trainer(
                model=model, args=args, train_dataset=data,
                optimizer_cls_and_kwargs=(pisa.SISA, kwargs),  # the Trainer passes no lr itself
            )
        else:
            raise ValueError(f"via must be 'optimizers' or 'cls_and_kwargs', got {via!r}")
        trainer.train()
    opt = trainer.optimizer.optimizer  # accelerate's AcceleratedOptimizer wraps it
    assert isinstance(opt, pisa.SISA) and opt.round_done
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return model, losses, opt


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--via", choices=["optimizers", "cls_and_kwargs"], default="optimizers")
    args = parser.parse_args()
    _, losses, opt = train(args.workers, args.steps, via=args.via, grad_accum=args.grad_accum)
    print(f"training loss {losses[0]:.4f} -> {losses[-1]:.4f} with {args.workers} workers "
          f"({opt.rounds} rounds)")
