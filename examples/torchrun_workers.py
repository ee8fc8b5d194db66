"""The virtual-worker loop of ``virtual_workers.py`` with one worker per process, under torchrun.

Each rank takes its own sub-batch of the round's batch; every ``step()`` is a whole round with one
all-reduce. The model may come wrapped in ``DistributedDataParallel`` (as from
``accelerate.prepare``): ``pisa.distributed.prepare`` unwraps it (DDP would average the gradients
and make the m workers one) and broadcasts rank 0's weights. The result equals
``virtual_workers.train(n_workers=world_size)``.

    torchrun --standalone --nproc_per_node 2 examples/torchrun_workers.py --rounds 60
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch import nn
from virtual_workers import batch, evaluate, make_model, make_optimizer

import pisa


def main(rounds: int, out: str | None) -> None:
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    model = make_model(seed=rank)  # deliberately different: prepare() copies rank 0's weights
    model = pisa.distributed.prepare(nn.parallel.DistributedDataParallel(model))
    opt = make_optimizer(model, n_workers=None)  # distributed: n_workers = world size
    assert opt.distributed and opt.n_workers == world
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=rounds)
    before = evaluate(model)
    for r in range(rounds):
        x, y = batch(r)
        xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(xs), ys).backward()
        opt.step()  # one round: every rank holds the new global weights afterwards
        sched.step()
    if rank == 0:
        print(f"held-out MSE {before:.4f} -> {evaluate(model):.4f} with {world} ranks")
        if out:
            torch.save(model.state_dict(), out)
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--out", default=None, help="save rank 0's final state_dict here")
    args = parser.parse_args()
    main(args.rounds, args.out)
