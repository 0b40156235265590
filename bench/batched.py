"""``python -m bench.batched``: would training a round's clients in one ``torch.func`` pass pay?

Ten clients of the embedded default's MLP (64-64, 5 classes), 4 SGD steps of batch 16
each, trained one after another vs all at once with ``vmap(grad(...))``. Prints both
medians and the largest difference between their results (the bare arithmetic; fedrac's
own batched path is ``engine.batched=true``, measured in ``python -m bench``).

``python -m bench.batched --ceiling`` measures the most any batching of clients can give on
pfl-research's CIFAR-10 protocol: one SGD step of the small CNN on one client's batch of 10
against one step on the whole cohort's 500 samples stacked into a single batch of one
model (the densest arithmetic a round's work can take; a batched pass over 50 weight
copies does the same products in smaller pieces). The ratio of their per-sample times bounds
the speed-up of ``engine.batched=true`` over the sequential path on this CPU.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from torch.func import functional_call, grad, vmap

from fedrac.models import build_model

CLIENTS, STEPS, BATCH, LR = 10, 4, 16, 0.05


def main() -> None:
    """Run the comparison and print it."""
    torch.set_num_threads(1)
    model = build_model({"name": "mlp", "hidden": [64, 64]}, (64,), 5)
    params = {k: v.detach() for k, v in model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(CLIENTS, STEPS, BATCH, 64, generator=gen)
    ys = torch.randint(0, 5, (CLIENTS, STEPS, BATCH), generator=gen)

    def loss(p, x, y):
        return torch.nn.functional.cross_entropy(functional_call(model, p, (x,)), y)

    step = grad(loss)
    batched_step = vmap(step)

    def one_by_one():
        outs = []
        for c in range(CLIENTS):
            p = {k: v.clone() for k, v in params.items()}
            for s in range(STEPS):
                g = step(p, xs[c, s], ys[c, s])
                p = {k: p[k] - LR * g[k] for k in p}
            outs.append(p)
        return {k: torch.stack([o[k] for o in outs]) for k in params}

    def all_at_once():
        p = {k: v.unsqueeze(0).expand(CLIENTS, *v.shape).clone() for k, v in params.items()}
        for s in range(STEPS):
            g = batched_step(p, xs[:, s], ys[:, s])
            p = {k: p[k] - LR * g[k] for k in p}
        return p

    a, b = one_by_one(), all_at_once()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    times = {}
    for fn in (one_by_one, all_at_once):
        runs = []
        for _ in range(30):
            start = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - start)
        times[fn.__name__] = statistics.median(runs) * 1e3
    print(f"one by one {times['one_by_one']:.2f} ms, all at once {times['all_at_once']:.2f} ms "
          f"({times['one_by_one'] / times['all_at_once']:.1f}x), max difference {diff:.1e}")


def step_seconds(size: int, repeats: int = 20) -> float:
    """Median time of one SGD step of the pfl CNN on a batch of ``size`` (1 thread)."""
    torch.set_num_threads(1)
    model = build_model({"name": "cnn"}, (3, 32, 32), 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(size, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (size,), generator=gen)
    runs = []
    for i in range(repeats + 2):
        start = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if i >= 2:  # the first two steps warm the allocator and oneDNN's kernels
            runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def speedup_bound(client_step: float, batch: int, cohort_step: float, cohort: int) -> float:
    """Most a batched pass can gain: per-sample time at ``batch`` over that at ``cohort*batch``."""
    return (client_step / batch) / (cohort_step / (cohort * batch))


def ceiling(cohort: int = 50, batch: int = 10, repeats: int = 20) -> None:
    """Print the per-sample step times and the bound they give."""
    client, stacked = step_seconds(batch, repeats), step_seconds(cohort * batch, repeats)
    print(f"pfl CNN, one SGD step: {client / batch * 1e3:.3f} ms/sample at batch {batch}, "
          f"{stacked / (cohort * batch) * 1e3:.3f} ms/sample at batch {cohort * batch} (one "
          f"model, the cohort stacked): batching {cohort} clients can be at most "
          f"{speedup_bound(client, batch, stacked, cohort):.2f}x faster than training them "
          "one by one")


if __name__ == "__main__":
    if "--ceiling" in sys.argv[1:]:
        ceiling()
    else:
        main()
