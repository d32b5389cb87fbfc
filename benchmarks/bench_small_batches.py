"""Small batches: false alarms on healthy runs and catches on broken ones, by batch size and by
the monitors' ``min_samples`` (issue 20 item 6).

Dead units, vanishing gradients, zero updates and loss jumps are judged over at least
``min_samples`` samples: a logging step (a group of step losses for the advisor) on smaller
batches goes on over the next ones. This script trains healthy and broken models at batch sizes
1, 2, 4, 8, 16 and 64 with ActivationHistogram, UpdateRatioMonitor and LRPlateauAdvisor (at
their defaults but for ``min_samples``, and the two monitors' ``every_n_steps``, lowered to
``--every`` so that each run judges many logging steps: more chances of a false alarm than at
the defaults), for each ``min_samples`` of ``--min-samples`` (1: every batch judged alone, as
before), and reports, per model and batch size, the WARN/FAIL codes raised and each rule's
worst reading against its threshold (the margin):

- ``dead``: the largest dead fraction of a layer that gradients reach (flagged above 0.5);
- ``grad``: the smallest first/last-layer gradient RMS ratio (flagged below 1e-3; 0: no
  gradient reaches the first layers);
- ``still``: the longest run of logging steps whose weights mostly did not move at all
  (flagged at 3);
- ``jump``: the largest loss (group mean) over its jump threshold (flagged above 1).

Healthy: a digits MLP and CNN (Adam), the MLP with plain SGD, a small regressor (MSE), a GRU
over the digits' rows. Broken: dead ReLUs (first-layer bias -20), a deep sigmoid stack
(vanishing gradients), a learning rate of 0, a real divergence (SGD whose learning rate jumps
from 0.05 to 50 half way).

Usage:
    python benchmarks/bench_small_batches.py --min-samples 1 32
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_diag.callbacks import ActivationHistogram, LRPlateauAdvisor, UpdateRatioMonitor
from lightning_diag.checks.activations import gradient_ratio
from lightning_diag.examples.digits import load_digits_tensors
from lightning_diag.functional.curves import jump_threshold

BATCH_SIZES = (1, 2, 4, 8, 16, 64)
N_TRAIN = 512


class Net(pl.LightningModule):
    """``body`` on ``(x, y)`` batches; cross-entropy (``y`` integer) or MSE; Adam or SGD."""

    def __init__(self, body: nn.Module, lr: float = 1e-3, sgd: bool = False,
                 jump_at: int | None = None, margin: bool = False) -> None:
        super().__init__()
        self.body, self.lr, self.sgd, self.jump_at, self.margin = body, lr, sgd, jump_at, margin

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self.body(x)
        if y.is_floating_point():
            loss = F.mse_loss(out.squeeze(-1), y)
        else:  # a multi-class hinge: a sample beyond the margin gives no gradient at all
            loss = F.multi_margin_loss(out, y) if self.margin else F.cross_entropy(out, y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> Any:
        if not self.sgd:
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        if self.jump_at is None:
            return opt
        at = self.jump_at
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s < at else 1000.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class Rows(nn.Module):
    """A GRU over the 8 rows of a digit, then a ReLU head."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(8, 32, batch_first=True)
        self.head = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x.reshape(-1, 8, 8))
        return self.head(out[:, -1])


def mlp(act: type[nn.Module] = nn.ReLU, depth: int = 2, width: int = 64) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    for i in range(depth):
        layers += [nn.Linear(64 if i == 0 else width, width), act()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def cnn() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(),
                         nn.Linear(64, 10))


def dead_mlp() -> nn.Sequential:
    net = mlp()
    with torch.no_grad():
        net[1].bias.fill_(-20.0)  # every first-layer ReLU off for inputs in [0, 1]
    return net


def digits() -> TensorDataset:
    x, y = load_digits_tensors()
    return TensorDataset(x[:N_TRAIN], y[:N_TRAIN])


def regression() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN, 8, generator=g)
    y = torch.sin(x @ torch.randn(8, generator=g)) + 0.1 * torch.randn(N_TRAIN, generator=g)
    return TensorDataset(x, y)


@dataclass
class Case:
    name: str
    healthy: bool
    make: Callable[[int], Net]  # from the run's number of steps
    data: Callable[[], TensorDataset]
    expected: tuple[str, ...] = ()  # the codes a broken case must raise


CASES = [
    Case("digits MLP (Adam 1e-3)", True, lambda n: Net(mlp()), digits),
    Case("digits CNN (Adam 1e-3)", True, lambda n: Net(cnn()), digits),
    Case("digits CNN (Adam 3e-4)", True, lambda n: Net(cnn(), lr=3e-4), digits),
    Case("digits MLP (SGD 0.05)", True, lambda n: Net(mlp(), lr=0.05, sgd=True), digits),
    Case("digits MLP (multi-class hinge, SGD 0.05)", True,
         lambda n: Net(mlp(), lr=0.05, sgd=True, margin=True), digits),
    Case("regressor (MSE, Adam)", True,
         lambda n: Net(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                                     nn.Linear(32, 1))), regression),
    Case("GRU over rows (Adam)", True, lambda n: Net(Rows()), digits),
    Case("dead ReLUs (bias -20)", False, lambda n: Net(dead_mlp()), digits,
         ("activations.dead_units", "gradients.vanishing")),
    Case("deep sigmoid stack (SGD 0.01)", False,
         lambda n: Net(mlp(nn.Sigmoid, depth=8, width=32), lr=0.01, sgd=True), digits,
         ("gradients.vanishing",)),
    Case("learning rate 0 (SGD)", False, lambda n: Net(mlp(), lr=0.0, sgd=True), digits,
         ("update_ratio.zero_updates",)),
    Case("divergence (SGD lr 0.05 -> 50)", False,
         lambda n: Net(mlp(), lr=0.05, sgd=True, jump_at=n // 2), digits,
         ("advisor.divergence",)),
]


class Readings(pl.Callback):
    """Records each rule's worst reading from the callbacks it watches."""

    def __init__(self, hist: ActivationHistogram, ratio: UpdateRatioMonitor,
                 advisor: LRPlateauAdvisor) -> None:
        self.dead, self.grad, self.jump = 0.0, math.inf, 0.0
        self.still = self.run = 0
        self.advisor = advisor
        apply, judge = hist._apply, ratio._judge

        def on_apply(trainer: Any, event: Any, last: Any, scalars: Any) -> None:
            reached = [s["dead_fraction"] for s in last.values()
                       if not math.isnan(s["grad_norm"])]  # as the rule: gradients reach it
            self.dead = max([self.dead, *reached])
            ratio_ = gradient_ratio(last)
            if not math.isnan(ratio_):
                self.grad = min(self.grad, ratio_)
            apply(trainer, event, last, scalars)

        def on_judge(trainer: Any, reading: Any, window: Any, judged: bool = True) -> None:
            if judged:
                still = (window or reading).median == 0.0
                self.run = self.run + 1 if still else 0
                self.still = max(self.still, self.run)
            judge(trainer, reading, window, judged)

        hist._apply, ratio._judge = on_apply, on_judge  # type: ignore[method-assign]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        jumps, advisor = self.advisor.jumps, self.advisor
        push = jumps.push

        def on_push(mean: float) -> None:
            reference = jumps.reference()
            if reference is not None:
                limit = jump_threshold(reference, advisor.config.jump_factor,
                                       advisor._min_jump())
                self.jump = max(self.jump, mean / limit if limit > 0 else math.inf)
            push(mean)

        jumps.push = on_push  # type: ignore[method-assign]


def run(case: Case, batch_size: int, min_samples: int, every: int) -> dict[str, Any]:
    data = case.data()
    steps = max(2 * len(data) // batch_size, 300)
    pl.seed_everything(0, verbose=False)
    model = case.make(steps)
    hist = ActivationHistogram(every_n_steps=every, min_samples=min_samples)
    ratio = UpdateRatioMonitor(every_n_steps=every, min_samples=min_samples)
    advisor = LRPlateauAdvisor(save_batch=False, min_samples=min_samples)
    readings = Readings(hist, ratio, advisor)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False,
                         callbacks=[hist, ratio, advisor, readings], enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False,
                         limit_val_batches=0, num_sanity_val_steps=0)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    trainer.fit(model, loader)
    found = sorted({f.code for cb in (hist, ratio, advisor) for f in cb.findings
                    if f.severity >= "warn"})
    flagged = {f.subject for f in hist.findings if f.code == "activations.dead_units"}
    return {"found": found, "dead": readings.dead, "grad": readings.grad,
            "still": readings.still, "jump": readings.jump, "steps": steps,
            "dead_on_all": {name: dead_on_all(model, name, data) for name in sorted(flagged)}}


def dead_on_all(model: Net, layer: str, data: TensorDataset) -> float:
    """The share of ``layer``'s units that are zero on every training sample once trained: a
    dead-unit finding is right when most are."""
    out: list[torch.Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: out.append(o))
    model.eval()
    with torch.no_grad():
        model.body(data.tensors[0])
    handle.remove()
    units = out[0].transpose(0, 1).reshape(out[0].shape[1], -1)
    return float((units.abs().amax(dim=1) == 0).float().mean())


def cell(r: dict[str, Any], case: Case) -> str:
    if case.healthy:
        verdict = "silent" if not r["found"] else "**" + ", ".join(r["found"]) + "**"
        if r["dead_on_all"]:  # is the finding right? the flagged layers on all samples
            shares = ", ".join(f"{name} {v:.0%}" for name, v in r["dead_on_all"].items())
            verdict += f" (dead on all {N_TRAIN} training samples after training: {shares})"
    else:
        missed = [c for c in case.expected if c not in r["found"]]
        verdict = "caught" if not missed else "**missed " + ", ".join(missed) + "**"
    grad = "-" if math.isinf(r["grad"]) else f"{r['grad']:.2g}"
    return (f"{verdict} (dead {r['dead']:.2f}, grad {grad}, still {r['still']}, "
            f"jump {r['jump']:.3g})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-samples", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCH_SIZES))
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--cases", nargs="*", default=None, help="substrings of case names")
    parser.add_argument("--out", default="benchmarks/results/small_batches.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = [c for c in CASES if args.cases is None or any(s in c.name for s in args.cases)]
    start, load = time.perf_counter(), os.getloadavg()
    lines = [
        "## Small batches: false alarms and catches by batch size (issue 20 item 6)", "",
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} CPU "
        f"cores ({platform.processor() or platform.machine()}), torch {torch.__version__}. "
        f"Command: `python benchmarks/bench_small_batches.py --min-samples "
        f"{' '.join(map(str, args.min_samples))} --every {args.every}`. ActivationHistogram "
        f"and UpdateRatioMonitor log every {args.every} steps (defaults: 200 and 100), "
        f"everything else at its defaults; {N_TRAIN} training samples, max(2 epochs, 300 "
        "steps). Each cell: the verdict (healthy: silent or the codes raised; broken: caught "
        "or the codes missed), then each rule's worst reading: dead fraction (flagged > 0.5), "
        "first/last gradient RMS ratio (flagged < 0.001), longest run of still logging steps "
        "(flagged at 3), loss over its jump threshold (flagged > 1).", ""]
    for min_samples in args.min_samples:
        lines += [f"### min_samples = {min_samples}", "",
                  "| model | " + " | ".join(f"batch {b}" for b in args.batch_sizes) + " |",
                  "|---|" + "---|" * len(args.batch_sizes)]
        for case in cases:
            cells = []
            for b in args.batch_sizes:
                r = run(case, b, min_samples, args.every)
                cells.append(cell(r, case))
                print(f"  min_samples {min_samples} {case.name} batch {b}: {cells[-1]} "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)
            kind = "healthy" if case.healthy else "broken"
            lines.append(f"| {case.name} ({kind}) | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(f"{time.perf_counter() - start:.0f} s in all; 1-minute load average "
                 f"{load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.")
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write(text)


if __name__ == "__main__":
    main()
