"""What the gradient check catches and where it stays quiet, at two settings of
``coords_per_tensor``, over several seeds.

Runs :func:`~lightning_diag.checks.gradients.check_gradients` (no Trainer) on the first batch of

- planted gradient bugs: a custom ``Function`` whose backward forgets a factor 2, a detached
  layer (in the gradient-check tests' MLP and in every model family of ``tests/families.py``),
  the corpus's ``wrong_backward``, and harder ones: the gradient of one ReLU unit or of one
  CNN channel dropped, a tanh backward 1.001x too large, a constant 1e-7 added to a backward,
  a ReLU whose backward lets the negatives through;
- healthy programs: every family, every loss program (``tests/loss_programs.py``), the healthy
  corpus (``tests/corpus/healthy.py``, but the GAN: the check steps aside) and two digits nets;

once per seed (the seed sets the weights, and the check's coordinate and direction draws), at
each setting (default: 10 coordinates per tensor, the default before issue 23, against the
default spread, ``None``), and counts bugs caught (a WARN or FAIL), alarms on healthy programs,
whether every verdict, code and tensor named is the same at both settings, the fewest judged
comparisons behind an "ok", and the CPU time.

Usage (from the repository root):
    python benchmarks/gradient_detection.py --seeds 8 --out /tmp/gradient_detection.md
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from lightning_diag.checks.gradients import check_gradients  # noqa: E402
from lightning_diag.findings import Severity  # noqa: E402


def _function(forward: Callable[..., Any], backward: Callable[..., Any]) -> type:
    """A custom autograd Function from its forward and its (possibly wrong) backward."""

    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(x)
            return forward(x)

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
            (x,) = ctx.saved_tensors
            return backward(x, grad)

    return Fn


class Apply(nn.Module):
    def __init__(self, fn: type) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn.apply(x)  # type: ignore[attr-defined, no-any-return]


class Detached(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x).detach()  # type: ignore[no-any-return]


def _first_dropped(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """ReLU's backward with the gradient of unit (or channel) 0 dropped."""
    out = (grad * (x > 0)).clone()
    out[:, 0] = 0
    return out


WRONG_SQUARE = _function(lambda x: x * x, lambda x, g: g * x)
ONE_UNIT = _function(F.relu, _first_dropped)
SCALED_TANH = _function(torch.tanh, lambda x, g: g * (1 - torch.tanh(x) ** 2) * 1.001)
NEGATIVES_THROUGH = _function(F.relu, lambda x, g: g)
OFFSET = _function(lambda x: x.clone(), lambda x, g: g + 1e-7)


@dataclass
class Case:
    name: str
    bug: bool
    build: Callable[[int], tuple[Any, Any]]  # seed -> (module, batch)


def _digits_net(*layers: nn.Module) -> Callable[[int], tuple[Any, Any]]:
    from tests.helpers import Classifier, digits

    def build(seed: int) -> tuple[Any, Any]:
        data = digits(16)
        return Classifier(nn.Sequential(*layers)), (data.tensors[0], data.tensors[1])
    return build


def cases() -> list[Case]:
    from tests import loss_programs
    from tests.corpus.bugs import BUGS
    from tests.corpus.healthy import HEALTHY
    from tests.families import FAMILIES
    from tests.helpers import cnn, mlp

    def fresh(make: Callable[[], nn.Module]) -> Callable[[int], tuple[Any, Any]]:
        def build(seed: int) -> tuple[Any, Any]:
            return _digits_net(*make())(seed)
        return build

    found = [
        Case("wrong_square", True, fresh(lambda: [nn.Flatten(), nn.Linear(64, 8),
                                                  Apply(WRONG_SQUARE), nn.Linear(8, 10)])),
        Case("detached_layer_mlp", True, fresh(lambda: [nn.Flatten(), Detached(nn.Linear(64, 8)),
                                                        nn.Tanh(), nn.Linear(8, 10)])),
        Case("one_relu_unit_dropped", True, fresh(lambda: [nn.Flatten(), nn.Linear(64, 32),
                                                           Apply(ONE_UNIT), nn.Linear(32, 10)])),
        Case("tanh_backward_1.001x", True, fresh(lambda: [nn.Flatten(), nn.Linear(64, 32),
                                                          Apply(SCALED_TANH),
                                                          nn.Linear(32, 10)])),
        Case("relu_negatives_through", True, fresh(lambda: [nn.Flatten(), nn.Linear(64, 32),
                                                            Apply(NEGATIVES_THROUGH),
                                                            nn.Linear(32, 10)])),
        Case("backward_plus_1e-7", True, fresh(lambda: [nn.Flatten(), nn.Linear(64, 32),
                                                        nn.Tanh(), Apply(OFFSET),
                                                        nn.Linear(32, 10)])),
        Case("one_cnn_channel_dropped", True, fresh(lambda: [
            nn.Conv2d(1, 8, 3, padding=1), Apply(ONE_UNIT), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(8 * 16, 10)])),
        Case("corpus.wrong_backward", True,
             lambda seed: _program(BUGS["wrong_backward"].program, seed)),
        Case("digits_cnn", False, fresh(lambda: [cnn(nn.ReLU, dropout=0.5)])),
        Case("digits_mlp_tanh", False, fresh(lambda: [mlp(nn.Tanh, width=16, dropout=0.5)])),
    ]
    for name, family in FAMILIES.items():
        found.append(Case(f"family.{name}.detached_layer", True,
                          lambda seed, f=family: _family(f("detached_layer"))))
        found.append(Case(f"family.{name}", False, lambda seed, f=family: _family(f())))
    found += [Case(f"corpus.{name}", False, lambda seed, p=program: _program(p, seed))
              for name, program in HEALTHY.items() if name != "gan"]
    found += [Case(f"loss.{name}", False, lambda seed, n=name: _loss_program(n, seed))
              for name in loss_programs.PROGRAMS]
    return found


def _family(family: Any) -> tuple[Any, Any]:
    return family.module, next(iter(family.train))


def _program(program: Any, seed: int) -> tuple[Any, Any]:
    import dataclasses
    module, train, _ = dataclasses.replace(program, seed=seed).build()
    return module, next(iter(train))


def _loss_program(name: str, seed: int) -> tuple[Any, Any]:
    from tests import loss_programs
    p = loss_programs.program(name, seed)
    return p.module, next(iter(p.train))


@dataclass
class Result:
    code: str
    alarm: bool
    named: tuple[str, ...]
    judged: int | None
    cpu: float


def check(case: Case, seed: int, coords: int | None) -> Result:
    torch.manual_seed(seed)
    module, batch = case.build(seed)
    start = time.thread_time()
    (f,) = check_gradients(module, batch, coords_per_tensor=coords, seed=seed)
    cpu = time.thread_time() - start
    tol = f.details.get("tolerance", float("inf"))
    named = tuple(t.name for t in f.details.get("table", []) if t.worst_error > tol)
    return Result(f.code, f.severity >= Severity.WARN, named, f.details.get("judged"), cpu)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--before", type=int, default=10,
                        help="coords_per_tensor of the first setting (default 10)")
    parser.add_argument("--out", type=Path, default=None, help="markdown file to write")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    settings: list[int | None] = [args.before, None]
    rows, same, diffs = [], 0, []
    totals = {s: {"caught": 0, "bugs": 0, "alarms": 0, "healthy": 0, "cpu": 0.0,
                  "least_judged": None} for s in settings}
    for case in cases():
        per = {s: [check(case, seed, s) for seed in range(args.seeds)] for s in settings}
        for s, results in per.items():
            t = totals[s]
            t["cpu"] += sum(r.cpu for r in results)
            if case.bug:
                t["bugs"] += len(results)
                t["caught"] += sum(r.alarm for r in results)
            else:
                t["healthy"] += len(results)
                t["alarms"] += sum(r.alarm for r in results)
                oks = [r.judged for r in results if r.code == "gradient_check.ok" and r.judged]
                if oks:
                    least = t["least_judged"]
                    t["least_judged"] = min(oks) if least is None else min(least, *oks)
        a, b = ([(r.code, r.named) for r in per[s]] for s in settings)
        same += a == b
        if a != b:
            diffs.append(case.name)
        rows.append(f"| {case.name} | {'bug' if case.bug else 'healthy'} | "
                    + " | ".join(f"{sum(r.alarm for r in per[s])}/{args.seeds}"
                                 for s in settings) + f" | {'yes' if a == b else 'no'} |")
        print(rows[-1], flush=True)
    name = {args.before: f"coords_per_tensor={args.before}", None: "default (None)"}
    lines = [f"# Gradient check: detection at two settings, {args.seeds} seeds", "",
             "| setting | bugs caught | alarms on healthy programs | fewest judged behind an ok "
             "| CPU s (check only) |", "|---|---|---|---|---|"]
    for s in settings:
        t = totals[s]
        lines.append(f"| {name[s]} | {t['caught']}/{t['bugs']} | {t['alarms']}/{t['healthy']} | "
                     f"{t['least_judged']} | {t['cpu']:.1f} |")
    lines += ["", f"Same verdict, code and tensors named at both settings on every seed: "
              f"{same} of {len(rows)} programs" + (f" (not: {', '.join(diffs)})" if diffs else ""),
              "", "| program | kind | " + " | ".join(f"alarms, {name[s]}" for s in settings)
              + " | same |", "|---|---|---|---|---|", *rows]
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
