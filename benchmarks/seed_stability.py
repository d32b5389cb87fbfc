"""False alarms of InitialLossCheck and OverfitSmallBatch over the model's initialization.

A check that is right on one initialization and wrong on another is a false alarm users meet:
this fits every healthy program of ``tests/families.py``, ``tests/loss_programs.py`` and the
quick programs of the healthy corpus (``tests/corpus/healthy.py``) with the two callbacks at
their defaults, once per seed (the seed sets the weights; the loss programs' loader shuffles
with it too), and counts the WARN/FAIL findings; and fits the planted bugs of the initial-loss
and overfit checks (a last layer scaled 30x, a softmax before the loss) on the same seeds, each
of which must be caught on every one.

Each fit runs the two callbacks at fit start and one training step (``limit_train_batches=1``,
no validation). One line of JSON per fit goes to ``--jsonl`` (appended: an interrupted run is
resumed), and the summary table to ``--out``.

Usage (from the repository root):
    python benchmarks/seed_stability.py --seeds 30 --out benchmarks/results/seed_stability.md
    python benchmarks/seed_stability.py --seeds 5 --only families --names segmentation
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: Corpus programs left out: slow to fit (the overfit test's 1000 steps on real images or long
#: sequences), or outside what the two checks judge (several optimizers: both step aside).
SLOW_CORPUS = ("cnn_digits", "gan", "batch_size_1")


@dataclass
class Case:
    source: str  #: "families", "loss_programs", "corpus" or "bugs"
    name: str
    #: Whether this is a planted bug (then ``codes`` must be raised on every seed).
    bug: bool
    codes: tuple[str, ...]
    #: seed -> (module, train loader, trainer kwargs, callback kwargs)
    build: Callable[[int], tuple[Any, Any, dict[str, Any], dict[str, Any]]]


def _families() -> Iterator[Case]:
    import torch

    from tests.families import FAMILIES

    def make(name: str, broken: str | None) -> Callable[[int], Any]:
        def build(seed: int) -> Any:
            torch.manual_seed(seed)
            fam = FAMILIES[name](broken)
            kw = {} if fam.batch_to_target is None else {"batch_to_target": fam.batch_to_target}
            return fam.module, fam.train, dict(fam.trainer_kwargs), kw
        return build

    for name in FAMILIES:
        yield Case("families", name, False, (), make(name, None))
        yield Case("bugs", f"{name}:scaled_last_layer", True, ("initial_loss.mismatch",),
                   make(name, "scaled_last_layer"))
        if name not in ("regression",):
            yield Case("bugs", f"{name}:softmax_before_loss", True,
                       ("overfit.not_reached", "initial_loss.mismatch"),
                       make(name, "softmax_before_loss"))


def _loss_programs() -> Iterator[Case]:
    from tests.loss_programs import PROGRAMS, program

    def make(name: str) -> Callable[[int], Any]:
        def build(seed: int) -> Any:
            prog = program(name, seed)
            return prog.module, prog.train, {}, {}
        return build

    for name in PROGRAMS:
        yield Case("loss_programs", name, False, (), make(name))


def _corpus() -> Iterator[Case]:
    import dataclasses

    from tests.corpus.bugs import BUGS
    from tests.corpus.healthy import HEALTHY

    def make(prog: Any) -> Callable[[int], Any]:
        def build(seed: int) -> Any:
            module, train, _ = dataclasses.replace(prog, seed=seed).build()
            kw = {k: v for k, v in prog.trainer.items()
                  if k in ("precision", "accumulate_grad_batches", "gradient_clip_val",
                           "gradient_clip_algorithm")}
            return module, train, kw, {}
        return build

    for name, prog in HEALTHY.items():
        if name not in SLOW_CORPUS:
            yield Case("corpus", name, False, (), make(prog))
    for name in ("scaled_last_layer", "softmax_before_ce"):
        bug = BUGS[name]
        yield Case("bugs", f"corpus:{name}", True, bug.codes, make(bug.program))


SOURCES = {"families": _families, "loss_programs": _loss_programs, "corpus": _corpus}


def fit(case: Case, seed: int) -> dict[str, Any]:
    import lightning.pytorch as pl

    from lightning_diag.callbacks import InitialLossCheck, OverfitSmallBatch
    from lightning_diag.findings import Severity

    module, train, trainer_kw, cb_kw = case.build(seed)
    callbacks = [InitialLossCheck(**cb_kw), OverfitSmallBatch(progress_bar=False, **cb_kw)]
    with tempfile.TemporaryDirectory() as root:
        opts: dict[str, Any] = {
            "max_epochs": 1, "accelerator": "cpu", "devices": 1, "logger": False,
            "callbacks": callbacks, "enable_progress_bar": False,
            "enable_model_summary": False, "enable_checkpointing": False,
            "default_root_dir": root, "num_sanity_val_steps": 0, "limit_train_batches": 1,
            "limit_val_batches": 0}
        opts.update(trainer_kw)
        start = time.process_time()
        error = None
        try:
            pl.Trainer(**opts).fit(module, train)
        except Exception as err:
            error = f"{type(err).__name__}: {err}"
        cpu = time.process_time() - start
    found = [f for cb in callbacks for f in cb.findings]
    alarms = [f for f in found if f.severity >= Severity.WARN
              and not f.code.startswith("diagnosis.")]  # the diagnosis restates the others
    initial = next((f for f in found if f.code in ("initial_loss.ok", "initial_loss.mismatch",
                                                    "initial_loss.no_expectation")), None)
    overfit = next((f for f in found if f.check == "OverfitSmallBatch"), None)
    return {
        "source": case.source, "name": case.name, "seed": seed, "bug": case.bug,
        "alarms": [f"{f.code} {f.severity.name}" for f in alarms],
        "caught": bool({f.code for f in alarms} & set(case.codes)) if case.bug else None,
        "initial": None if initial is None else {
            "code": initial.code, "value": _num(initial.value),
            "expected": _num(initial.expected)},
        "overfit": None if overfit is None else {
            "code": overfit.code, "value": _num(overfit.value), "message": overfit.message[:300]},
        "error": error, "cpu_s": round(cpu, 2)}


def _num(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_num(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def summarize(rows: list[dict[str, Any]], seeds: int) -> str:
    by_case: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_case[(r["source"], r["name"])].append(r)
    lines = ["| source | program | seeds | false alarms (healthy) / caught (bug) | codes | "
             "overfit verdicts | initial loss: value range (expected range) | CPU s per fit |",
             "|---|---|---|---|---|---|---|---|"]
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for (source, name), rs in sorted(by_case.items()):
        codes: dict[str, int] = defaultdict(int)
        for r in rs:
            for a in set(r["alarms"]):
                codes[a] += 1
        if rs[0]["bug"]:
            hit = sum(bool(r["caught"]) for r in rs)
            verdict = f"caught {hit}/{len(rs)}"
            totals["bugs missed"][0] += len(rs) - hit
            totals["bugs missed"][1] += len(rs)
        else:
            bad = sum(bool(r["alarms"]) for r in rs)
            verdict = f"**{bad}/{len(rs)}**" if bad else f"0/{len(rs)}"
            totals[source][0] += bad
            totals[source][1] += len(rs)
        values = [r["initial"]["value"] for r in rs if r["initial"]
                  and isinstance(r["initial"]["value"], float)]
        # float(): a bound written as "-inf" on some seeds, a number on others
        lows = [float(r["initial"]["expected"][0]) for r in rs if r["initial"]
                and isinstance(r["initial"]["expected"], list)]
        highs = [float(r["initial"]["expected"][1]) for r in rs if r["initial"]
                 and isinstance(r["initial"]["expected"], list)]
        rng = (f"{min(values):.4g}-{max(values):.4g}" if values else "-") + (
            f" ({_fmt(min(lows))}-{_fmt(max(lows))} to {_fmt(min(highs))}-{_fmt(max(highs))})"
            if lows else "")
        cpu = sum(r["cpu_s"] for r in rs) / len(rs)
        # every verdict of the overfit test, INFO included (reached, floor, slow)
        overfit: dict[str, int] = defaultdict(int)
        for r in rs:
            if r["overfit"]:
                overfit[r["overfit"]["code"].removeprefix("overfit.")] += 1
        lines.append(f"| {source} | `{name}` | {len(rs)} | {verdict} | "
                     + (", ".join(f"`{c}` x{k}" for c, k in sorted(codes.items())) or "-")
                     + " | " + (", ".join(f"{c} {k}" for c, k in sorted(overfit.items())) or "-")
                     + f" | {rng} | {cpu:.1f} |")
    head = [f"Seeds 0-{seeds - 1}. Fits with a false alarm, per source: "
            + "; ".join(f"{s} {b} of {n}" for s, (b, n) in sorted(totals.items())
                        if s != "bugs missed")
            + (f". Planted bugs missed: {totals['bugs missed'][0]} of "
               f"{totals['bugs missed'][1]} fits." if "bugs missed" in totals else "."), ""]
    return "\n".join(head + lines) + "\n"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=30)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--only", choices=list(SOURCES), nargs="*")
    parser.add_argument("--names", nargs="*", help="only these programs (bugs: name:bug)")
    parser.add_argument("--healthy-only", action="store_true")
    parser.add_argument("--jsonl", type=Path, default=Path("/tmp/seed_stability.jsonl"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_diag"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    done = set()
    rows = []
    if args.jsonl.exists():
        for line in args.jsonl.read_text().splitlines():
            r = json.loads(line)
            rows.append(r)
            done.add((r["source"], r["name"], r["seed"]))
    cases = [c for s in (args.only or SOURCES) for c in SOURCES[s]()]
    if args.names:
        cases = [c for c in cases if c.name in args.names]
    if args.healthy_only:
        cases = [c for c in cases if not c.bug]
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    with args.jsonl.open("a") as out:
        for case in cases:
            for seed in seeds:
                if (case.source, case.name, seed) in done:
                    continue
                row = fit(case, seed)
                rows.append(row)
                out.write(json.dumps(row) + "\n")
                out.flush()
                if (row["alarms"] and not case.bug) or (case.bug and not row["caught"]):
                    print(f"{case.source} {case.name} seed {seed}: {row['alarms']} "
                          f"{row['initial']} {row['error'] or ''}", flush=True)
    keep = {(c.source, c.name) for c in cases}
    table = summarize([r for r in rows if (r["source"], r["name"]) in keep
                       and r["seed"] in seeds], args.seeds)
    print(table)
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
