"""Per-step cost of the EMA update: EMAWeights vs a bare ``torch._foreach_lerp_`` vs Lightning.

Each contender updates the same model's average after a (simulated) optimizer step; the median
wall time of ``--reps`` calls (best of 3 interleaved rounds) is reported for ~1M, ~10M and ~50M
float32 parameters on the CPU, with ``--threads`` intra-op threads (default 1: on a shared
machine a second thread is often descheduled, which adds ~20 ms waits to any parallel op).

    .venv/bin/python benchmarks/bench_ema.py [--reps 20] [--sizes 1 10 50] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from types import SimpleNamespace

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import nn

from lightning_diag.callbacks.ema import EMAWeights


class Net(pl.LightningModule):
    """Square linear layers of width 1000: ~1M parameters each."""

    def __init__(self, millions: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(1000, 1000) for _ in range(millions)])


def median_ms(fn: Callable[[], None], reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def bench(millions: int, reps: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = Net(millions)
    params = [p.detach() for p in model.parameters()]
    ema_bare = [p.clone() for p in params]
    trainer = SimpleNamespace(global_step=0, state=None)

    ours = EMAWeights(decay=0.999, check_weights=True)
    ours.on_fit_start(trainer, model)  # type: ignore[arg-type]
    fast = EMAWeights(decay=0.999)
    fast.on_fit_start(trainer, model)  # type: ignore[arg-type]
    loss = {"loss": torch.tensor(1.0)}

    def step_ours() -> None:
        trainer.global_step += 1
        ours.on_train_batch_end(trainer, model, loss, None, 0)  # type: ignore[arg-type]

    def step_fast() -> None:
        trainer.global_step += 1
        fast.on_train_batch_end(trainer, model, loss, None, 0)  # type: ignore[arg-type]

    theirs = EMAWeightAveraging(decay=0.999)
    theirs.setup(trainer, model, "fit")  # type: ignore[arg-type]

    def step_theirs() -> None:
        trainer.global_step += 1
        theirs.on_train_batch_end(trainer, model, loss, None, 0)  # type: ignore[arg-type]

    def step_bare() -> None:
        torch._foreach_lerp_(ema_bare, params, 0.001)

    n = sum(p.numel() for p in params)
    fns = {"bare": step_bare, "fast": step_fast, "ours": step_ours, "lightning": step_theirs}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(3):  # interleaved rounds: a busy shared machine hits all contenders alike
        for name, fn in fns.items():
            times[name].append(median_ms(fn, reps))
    return {"params": float(n), **{k: min(v) for k, v in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("| params | bare `_foreach_lerp_` (ms) | EMAWeights default (ms) | "
          "ratio | EMAWeights `check_weights=True` (ms) | ratio | "
          "Lightning EMAWeightAveraging (ms) | Lightning / EMAWeights default |")
    print("|---|---|---|---|---|---|---|---|")
    with torch.no_grad():
        for m in args.sizes:
            r = bench(m, args.reps)
            print(f"| {r['params'] / 1e6:.1f}M | {r['bare']:.2f} | {r['fast']:.2f} | "
                  f"{r['fast'] / r['bare']:.2f}x | {r['ours']:.2f} | {r['ours'] / r['bare']:.2f}x "
                  f"| {r['lightning']:.2f} | {r['lightning'] / r['fast']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
