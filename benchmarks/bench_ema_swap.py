"""Cost of putting the EMA average in the model for validation and back: EMAWeights vs Lightning.

One swap-in plus one swap-out, as a validation inside ``fit`` does, for ~1M, ~10M and ~50M
float32 parameters on the CPU. EMAWeights trades storage (each parameter's ``.data`` and the
average's tensor change places); Lightning's ``EMAWeightAveraging._swap_models``, called twice,
clones every tensor and copies it twice. Median of ``--reps`` round trips, best of 3 interleaved
rounds; each round trip also checks that the raw weights came back bit-identical.

    .venv/bin/python benchmarks/bench_ema_swap.py [--reps 20] [--sizes 1 10 50] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
from types import SimpleNamespace

import torch
from bench_ema import Net, median_ms  # the same models and timer as the update benchmark
from lightning.pytorch.callbacks import EMAWeightAveraging

from lightning_diag.callbacks.ema import EMAWeights


def bench(millions: int, reps: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = Net(millions)
    raw = [p.detach().clone() for p in model.parameters()]
    trainer = SimpleNamespace(global_step=0, state=None)

    ours = EMAWeights(decay=0.5)
    ours.on_fit_start(trainer, model)  # type: ignore[arg-type]
    slots = ours._built()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the raw weights move away from the average
        slots.update(0.5)
        for p, r in zip(model.parameters(), raw, strict=True):
            p.copy_(r)

    def swap_ours() -> None:
        slots.swap_in()
        slots.restore()

    theirs = EMAWeightAveraging(decay=0.999)
    theirs.setup(trainer, model, "fit")  # type: ignore[arg-type]

    def swap_theirs() -> None:
        theirs._swap_models(model)  # type: ignore[arg-type]
        theirs._swap_models(model)  # type: ignore[arg-type]

    fns = {"ours": swap_ours, "lightning": swap_theirs}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(3):  # interleaved rounds: a busy shared machine hits both alike
        for name, fn in fns.items():
            times[name].append(median_ms(fn, reps))
            if not all(torch.equal(p, r) for p, r in zip(model.parameters(), raw, strict=True)):
                raise RuntimeError(f"{name}: the raw weights did not come back bit-identical")
    slots.swap_in()  # and in between, the model holds the average
    moved = all(torch.equal(p, e) for p, e in zip(model.parameters(), slots.ema, strict=True))
    slots.restore()
    if not moved:
        raise RuntimeError("EMAWeights: the swapped-in model does not hold the average")
    n = sum(p.numel() for p in raw)
    return {"params": float(n), "tensors": float(len(raw)), **{k: min(v) for k, v in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print("| params | tensors | EMAWeights swap in + out (ms) | Lightning `_swap_models` x2 (ms) "
          "| Lightning / EMAWeights |")
    print("|---|---|---|---|---|")
    with torch.no_grad():
        for m in args.sizes:
            r = bench(m, args.reps)
            print(f"| {r['params'] / 1e6:.1f}M | {r['tensors']:.0f} | {r['ours']:.3f} | "
                  f"{r['lightning']:.2f} | {r['lightning'] / r['ours']:.0f}x |", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
