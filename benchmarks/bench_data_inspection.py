"""Benchmark of inspect_dataset: 60,000 (or 1,000,000) synthetic 28x28 images with injected
duplicates.

Measures wall time, throughput (samples/s over train + validation), peak extra memory (the
resident set size of this process plus the private memory of its loader workers, sampled by a
thread, minus the size before the inspection), and recall and precision on injected exact
duplicates, near duplicates and train/validation leaks. Every sample is inspected
(``max_samples`` is set to the set's size).

Run: ``.venv/bin/python benchmarks/bench_data_inspection.py`` (writes
``benchmarks/results/data_inspection.md``); a million samples whose ``__getitem__`` decodes a
uint8 image through PIL, read by two loader workers::

    .venv/bin/python benchmarks/bench_data_inspection.py --train 1000000 --val 100000 \
        --decode --num-workers 2 --out benchmarks/results/data_inspection_1m.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, TensorDataset

import lightning_diag.checks.data.inspect as inspect_module
from lightning_diag.checks.data.inspect import inspect_dataset

PAGE = os.sysconf("SC_PAGE_SIZE")


def _private(pid: str) -> int:
    """Pages only process ``pid`` holds, in bytes (a loader worker's own memory: the dataset
    pages it shares with this process are not counted twice)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return sum(int(line.split()[1]) for line in f
                       if line.startswith(("Private_Clean:", "Private_Dirty:"))) * 1024
    except (FileNotFoundError, ProcessLookupError):  # a worker that just ended
        return 0


def _children() -> list[str]:
    found: list[str] = []
    for task in Path("/proc/self/task").iterdir():
        try:
            found += (task / "children").read_text().split()
        except FileNotFoundError:  # a thread that just ended
            continue
    return found


def rss() -> int:
    """Resident memory of this process (``statm``: cheap enough to read every 10 ms)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS(threading.Thread):
    """Peak of this process's resident memory plus its workers' own memory. Reading a worker's
    ``smaps_rollup`` walks its page tables (as large as this process's), so workers are read
    every 100 ms only."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.running = rss(), True

    def run(self) -> None:
        workers, tick = 0, 0
        while self.running:
            if tick % 10 == 0:
                workers = sum(_private(pid) for pid in _children())
            self.peak = max(self.peak, rss() + workers)
            tick += 1
            time.sleep(0.01)


class Decoded(Dataset):
    """uint8 images decoded at each read, as torchvision's MNIST does (PIL image, then a float
    tensor in [0, 1]); the pixels are the float images mapped by ``(x + 3) / 6``."""

    def __init__(self, data: TensorDataset) -> None:
        x, y = data.tensors
        self.images = ((x[:, 0] + 3) / 6 * 255).round().clamp(0, 255).to(torch.uint8).numpy()
        self.labels = y.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = Image.fromarray(self.images[i], mode="L")
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255)
        return pixels.unsqueeze(0), self.labels[i]


def make_data(n_train: int, n_val: int, n_inject: int, seed: int = 0) -> dict:
    """Smooth random images (7x7 noise upsampled) with injected copies; returns data and truth."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.empty(n_train + n_val, 1, 28, 28)
    for k in range(0, len(images), 5000):  # in blocks: keeps the generation's own peak small
        low = torch.randn(min(5000, len(images) - k), 1, 7, 7, generator=gen)
        images[k:k + len(low)] = F.interpolate(low, size=28, mode="bilinear")
    train, val = images[:n_train], images[n_train:].clone()
    order = torch.randperm(n_train, generator=gen).tolist()
    pick = iter(order)

    def noisy(x: torch.Tensor) -> torch.Tensor:  # a re-encoding: new contrast, noise, 8-bit grid
        y = 0.95 * x + 0.02 + 0.02 * torch.randn(x.shape, generator=gen)
        return torch.round(y * 255) / 255

    exact = [(next(pick), next(pick)) for _ in range(n_inject)]
    near = [(next(pick), next(pick)) for _ in range(n_inject)]
    for src, dst in exact:
        train[dst] = train[src]
    for src, dst in near:
        train[dst] = noisy(train[src])
    # hard negatives: similar but distinct samples (centred cosine about 0.96-0.99) that must
    # not be flagged; some pass the loose projected search and must be rejected on verification
    hard = [(next(pick), next(pick)) for _ in range(n_inject)]
    for k, (src, dst) in enumerate(hard):
        std = 0.1 + 0.1 * k / n_inject
        train[dst] = train[src] + std * torch.randn(train[src].shape, generator=gen)
    leaks = [(next(pick), j) for j in range(n_inject)]
    for src, j in leaks:
        val[j] = train[src] if j % 2 == 0 else noisy(train[src])
    labels = torch.randint(0, 10, (n_train + n_val,), generator=gen)
    return {"train": TensorDataset(train, labels[:n_train]),
            "val": TensorDataset(val, labels[n_train:]),
            "exact": exact, "near": near, "leaks": leaks, "hard": hard}


def recall_precision(truth: list[tuple[int, int]], groups: list[list[int]]) -> tuple[float, float]:
    """Recall: injected pairs inside one reported group; precision: reported members injected."""
    group_of = {i: g for g, members in enumerate(groups) for i in members}
    found = sum(1 for a, b in truth if a in group_of and group_of.get(a) == group_of.get(b))
    injected = {i for pair in truth for i in pair}
    members = [i for g in groups for i in g]
    precision = sum(i in injected for i in members) / len(members) if members else 1.0
    return found / len(truth), precision


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train", type=int, default=60_000)
    parser.add_argument("--val", type=int, default=10_000)
    parser.add_argument("--inject", type=int, default=300)
    parser.add_argument("--out", default="benchmarks/results/data_inspection.md")
    parser.add_argument("--num-threads", type=int, default=1,
                        help="torch threads during the inspection; 0 keeps torch's setting")
    parser.add_argument("--decode", action="store_true",
                        help="store uint8 images and decode each read through PIL")
    parser.add_argument("--num-workers", type=int, default=0,
                        help="loader workers reading the samples (inspect_dataset's num_workers)")
    parser.add_argument("--exact-search", action="store_true",
                        help="compare every pair however large the sets (the search before "
                             "hashing; quadratic)")
    args = parser.parse_args()
    if args.exact_search:
        inspect_module.EXACT_SEARCH_PAIRS = 10**30
    load_before = os.getloadavg()[0]
    data = make_data(args.train, args.val, args.inject)
    train, val = data["train"], data["val"]
    if args.decode:
        train, val = Decoded(train), Decoded(val)
        data["train"] = data["val"] = None  # the float copies go: the data is the uint8 images
    before = rss()
    sampler = PeakRSS()
    sampler.start()
    start, cpu = time.perf_counter(), time.process_time()
    found = inspect_dataset(train, val, num_classes=10, progress=False,
                            max_samples=max(args.train, args.val),
                            num_threads=args.num_threads or None, num_workers=args.num_workers)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    sampler.running = False
    sampler.join()
    peak_mib = (sampler.peak - before) / 2**20

    def groups(code: str) -> list[list[int]]:
        return [g for f in found if f.code == code and f.details.get("split") == "train"
                for g in f.details["groups"]]

    r_exact, p_exact = recall_precision(data["exact"], groups("data.exact_duplicate"))
    r_near, p_near = recall_precision(data["near"], groups("data.near_duplicate"))
    flagged_members = {i for code in ("data.exact_duplicate", "data.near_duplicate")
                       for g in groups(code) for i in g}
    hard_flagged = sum(1 for a, b in data["hard"] if a in flagged_members and b in flagged_members)
    hard_sims = [float(torch.nn.functional.cosine_similarity(
        *(t - t.mean() for t in (train[a][0].flatten(), train[b][0].flatten())),
        dim=0)) for a, b in data["hard"]]
    leak = next((f for f in found if f.code == "data.leakage"), None)
    flagged = set(leak.indices) if leak else set()
    truth = {i for i, _ in data["leaks"]}
    r_leak = len(flagged & truth) / len(truth)
    p_leak = len(flagged & truth) / len(flagged) if flagged else 1.0
    n = args.train + args.val
    stored = "uint8, decoded through PIL at each read" if args.decode else "float32"
    data_mib = n * 784 * (1 if args.decode else 4) / 2**20
    rows = [
        ("samples (train + validation)", f"{args.train:,} + {args.val:,}, 1x28x28 {stored}"),
        ("injected", f"{args.inject} exact copies, {args.inject} near copies (contrast, noise "
                     f"std 0.02, 8-bit), {args.inject} validation leaks (half exact, half near), "
                     f"{args.inject} hard negatives"),
        ("wall time", f"{seconds:.1f} s (target: < 60 s at 70,000, < 180 s at 1,100,000)"),
        ("CPU time of the main process", f"{cpu:.1f} s"),
        ("throughput", f"{n / seconds:,.0f} samples/s"),
        ("peak extra memory (RSS, with the workers' own)",
         f"{peak_mib:.0f} MiB (the data itself: {data_mib:.0f} MiB)"),
        ("exact duplicates: recall / precision", f"{r_exact:.3f} / {p_exact:.3f}"),
        ("near duplicates: recall / precision", f"{r_near:.3f} / {p_near:.3f}"),
        ("leaks (train indices): recall / precision", f"{r_leak:.3f} / {p_leak:.3f}"),
        ("hard negatives flagged", f"{hard_flagged} of {len(data['hard'])} similar distinct pairs "
                                   f"(similarity {min(hard_sims):.3f}-{max(hard_sims):.3f})"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    text = (
        "## Data inspection (`inspect_dataset` / `DataInspection`)\n\n"
        f"Measured {datetime.date.today().isoformat()} on {platform.machine()}, "
        f"{os.cpu_count()} CPU cores (shared with other jobs), torch {torch.__version__}, "
        f"`num_threads={args.num_threads or None}` ({torch.get_num_threads()} torch threads "
        f"outside), `num_workers={args.num_workers}`; "
        f"load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; "
        "defaults (dim 64, chunk 2048, near threshold 0.997).\n\n| measure | value |\n"
        "|---|---|\n" + table + "\n\n"
        "Command: `.venv/bin/python benchmarks/bench_data_inspection.py"
        + "".join(f" {arg}" for arg in sys.argv[1:]) + "`\n"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
