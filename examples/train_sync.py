"""Data-parallel training in a plain (not async) loop, with gradients averaged by aiocoll.

    aiocoll run -n 2 examples/train_sync.py            # any number of ranks dividing the batch
    aiocoll run -n 4 examples/train_sync.py --funcol   # average through aiocoll.torch instead

Every rank holds the same model and a slice of each batch; after backward, the gradients are
averaged over the ranks, so every rank takes the same optimizer step as one process would on the
whole batch. With ``--check``, rank 0 then trains the same model alone on the full batch and
checks that the losses match.

Two ways to average, both blocking for the training loop:
- ``aiocoll.sync.all_reduce_coalesced(grads, "avg")``: one blocking call for all gradients;
- ``aiocoll.torch.all_reduce_coalesced(grads, "avg", group)``: returns at once (the
  ``torch.distributed._functional_collectives`` interface); the first use of each result waits.
"""

from __future__ import annotations

import argparse

import torch

import aiocoll.sync as coll
import aiocoll.torch as funcol

BATCH, FEATURES, HIDDEN = 64, 8, 16


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank
    return torch.nn.Sequential(
        torch.nn.Linear(FEATURES, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 1)
    ).double()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)  # every rank draws the same full batch
    x = torch.randn(BATCH, FEATURES, generator=g, dtype=torch.float64)
    w = torch.linspace(-1.0, 1.0, FEATURES, dtype=torch.float64).unsqueeze(1)
    y = torch.tanh(x @ w) + 0.05 * torch.randn(BATCH, 1, generator=g, dtype=torch.float64)
    return x, y


def train(steps: int, rank: int = 0, world_size: int = 1, use_funcol: bool = False) -> list[float]:
    """Train; return the full-batch loss of every step (averaged over the ranks' slices)."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    params = [p for p in model.parameters()]
    per_rank = BATCH // world_size
    losses = []
    for step in range(steps):
        x, y = batch(step)
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        loss = torch.nn.functional.mse_loss(model(x[mine]), y[mine])
        opt.zero_grad()
        loss.backward()
        if world_size > 1:
            grads = [p.grad for p in params]
            if use_funcol:
                averaged = funcol.all_reduce_coalesced(grads, "avg", None)  # returns at once
            else:
                averaged = coll.all_reduce_coalesced(grads, "avg")
            for p, g in zip(params, averaged):
                p.grad.copy_(g)  # the first real use of a lazy result waits for it
            loss = coll.all_reduce(loss.detach(), "avg")
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--funcol", action="store_true", help="average with aiocoll.torch (lazy results)")
    parser.add_argument("--check", action="store_true", help="rank 0 compares with one process on the full batch")
    args = parser.parse_args()

    world = coll.init()  # rank, size and rendezvous from the environment (`aiocoll run` sets it)
    if BATCH % world.size:
        raise SystemExit(f"the batch of {BATCH} does not split over {world.size} ranks")
    try:
        losses = train(args.steps, world.rank, world.size, args.funcol)
        if world.rank == 0:
            for step in range(0, args.steps, max(1, args.steps // 5)):
                print(f"step {step:3d}  loss {losses[step]:.6f}")
            print(f"final loss {losses[-1]:.6f} on {world.size} ranks")
            if args.check:
                alone = train(args.steps)
                diff = max(abs(a - b) for a, b in zip(losses, alone))
                verdict = "matches" if diff < 1e-9 else "DIFFERS from"
                print(f"data-parallel loss {verdict} the single-process run (max |diff| {diff:.2e})")
                if diff >= 1e-9:
                    raise SystemExit(1)
        # every rank ends with the same weights
        coll.barrier()
    finally:
        coll.destroy()


if __name__ == "__main__":
    main()
