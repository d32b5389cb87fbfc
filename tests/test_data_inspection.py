"""DataInspection / inspect_dataset: injected problems found with the right indices, clean digits
quiet, the main run unchanged."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

from lightning_diag.callbacks.data_inspection import DataInspection
from lightning_diag.checks.data.inspect import InspectionConfig, inspect_dataset, run_inspection
from lightning_diag.examples.digits import DigitsDataModule, load_digits_tensors
from lightning_diag.findings import FINDINGS_FILE, Finding, Severity
from lightning_diag.tensorboard.tags import (
    DATA_CLASS_COUNTS,
    DATA_SUMMARY,
    FINDINGS_CARD,
    data_grid,
)
from tests.helpers import Classifier, codes, events, loader, mlp, text_events, trainer
from tests.shared_cases import Shared, T, V


def by_code(found: list[Finding], code: str) -> list[Finding]:
    return [f for f in found if f.code == code]


def one(found: list[Finding], code: str) -> Finding:
    hits = by_code(found, code)
    assert len(hits) == 1, [f.format() for f in found]
    return hits[0]


@pytest.fixture(scope="module")
def split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y = load_digits_tensors()
    return x[:400].clone(), y[:400].clone(), x[1500:].clone(), y[1500:].clone()


def test_clean_digits_as_shipped_are_quiet() -> None:
    dm = DigitsDataModule()
    dm.setup("fit")
    found = inspect_dataset(dm.train_set, dm.val_set, num_classes=10)
    assert codes(found, "warn") == set()
    summary = one(found, "data.summary")
    assert summary.details["train"]["class_counts"] is not None
    assert summary.details["train"]["exact_duplicate_groups"] == 0



class OneByOne(TensorDataset):
    """A TensorDataset the inspection reads sample by sample (a subclass may change
    ``__getitem__``: only the exact classes are read all at once)."""


@pytest.mark.parametrize("targets", ["classes", "bool", "float", "multilabel", "none"])
def test_tensors_read_at_once_give_what_one_by_one_gives(targets):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 6, generator=g)
    x[7, 2] = float("nan")
    x[9] = 1.0
    x[100:130] = x[:30]
    x[200] = x[201] * 1.0001
    y = {"classes": torch.randint(0, 3, (3000,), generator=g),
         "bool": torch.randint(0, 2, (3000,), generator=g).bool(),
         "float": torch.randn(3000, generator=g),
         "multilabel": torch.randint(0, 2, (3000, 4), generator=g)}.get(targets)
    parts = (x,) if y is None else (x, y)
    whole, one_by_one = TensorDataset(*parts), OneByOne(*parts)
    split = torch.randperm(3000, generator=g)
    for train, val in [(whole, None), (Subset(whole, split[:2000]), Subset(whole, split[2000:]))]:
        slow = (one_by_one if val is None else Subset(one_by_one, split[:2000]),
                None if val is None else Subset(one_by_one, split[2000:]))
        fast_found = inspect_dataset(train, val, max_samples=2500)
        slow_found = inspect_dataset(*slow, max_samples=2500)
        assert [(f.code, f.message, f.details) for f in fast_found] == [
            (f.code, f.message, f.details) for f in slow_found]
    assert {"data.non_finite", "data.constant_input", "data.exact_duplicate"} <= {
        f.code for f in fast_found}

def test_exact_duplicates_and_conflicting_labels(split: Any) -> None:
    x, y, _, _ = split
    x, y = x.clone(), y.clone()
    x[10], x[11] = x[3], x[3]
    x[200], y[200] = x[100], y[100]
    y[10], y[11] = y[3], (y[3] + 1) % 10
    found = inspect_dataset(TensorDataset(x, y))
    dup = one(found, "data.exact_duplicate")
    assert dup.indices == (3, 10, 11, 100, 200) and dup.severity is Severity.WARN
    assert "2 group(s)" in dup.message
    assert one(found, "data.conflicting_labels").indices == (3, 10, 11)
    assert not by_code(found, "data.near_duplicate")


def test_noisy_near_duplicates(split: Any) -> None:
    x, y, _, _ = split
    x = x.clone()
    gen = torch.Generator().manual_seed(1)
    x[50] = x[7] + 0.01 * torch.randn(1, 8, 8, generator=gen)
    x[60] = x[8] * 0.9 + 0.05  # re-encoded: other contrast and brightness
    near = one(inspect_dataset(TensorDataset(x, y)), "data.near_duplicate")
    assert near.indices == (7, 8, 50, 60)
    assert near.details["groups"] == [[7, 50], [8, 60]]


def test_near_duplicates_of_large_images_through_the_projection() -> None:
    gen = torch.Generator().manual_seed(0)
    x = F.interpolate(torch.randn(300, 1, 7, 7, generator=gen), size=28, mode="bilinear")
    x[120] = x[4] + 0.01 * torch.randn(1, 28, 28, generator=gen)
    x[130] = x[5]
    found = inspect_dataset(TensorDataset(x, torch.arange(300) % 3))
    assert one(found, "data.near_duplicate").indices == (4, 120)
    assert one(found, "data.exact_duplicate").indices == (5, 130)


def test_non_finite_constant_and_out_of_range(split: Any) -> None:
    x, y, xv, yv = split
    x, y, yv = x.clone(), y.clone(), yv.clone()
    x[30, 0, 2, 2] = float("nan")
    x[31, 0, 0, 0] = float("inf")
    x[40] = 0.0
    y[50], y[51] = -1, 10
    yv[5] = 11
    found = inspect_dataset(TensorDataset(x, y), TensorDataset(xv, yv), num_classes=10)
    assert one(found, "data.non_finite").indices == (30, 31)
    assert one(found, "data.constant_input").indices == (40,)
    out = by_code(found, "data.label_out_of_range")
    assert [(f.details["split"], f.indices) for f in out] == [("train", (50, 51)),
                                                              ("validation", (5,))]
    assert all(f.severity is Severity.FAIL for f in out)


def test_validation_leak_reports_train_indices_and_share(split: Any) -> None:
    x, y, xv, yv = split
    xv, yv = xv.clone(), yv.clone()
    xv[0], xv[1] = x[20], x[21]
    xv[2] = x[22] + 0.01 * torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(0))
    leak = one(inspect_dataset(TensorDataset(x, y), TensorDataset(xv, yv)), "data.leakage")
    assert leak.indices == (20, 21, 22)
    assert leak.severity is Severity.FAIL
    share = 3 / len(xv)
    assert leak.value == pytest.approx(share) and f"{share:.1%}" in leak.message
    assert sorted(leak.details["pairs"]) == [(20, 0), (21, 1), (22, 2)]


class Flaky(Dataset):
    """Digits whose reads fail for some indices (a corrupt file)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, broken: set[int]) -> None:
        self.x, self.y, self.broken = x, y, broken

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i in self.broken:
            raise OSError(f"cannot decode image {i}")
        return {"image": self.x[i], "label": int(self.y[i])}


def test_unreadable_samples_are_recorded_and_inspection_goes_on(split: Any) -> None:
    x, y, _, _ = split
    x = x.clone()
    x[90] = x[9]
    found = inspect_dataset(Flaky(x, y, {4, 77}))
    bad = one(found, "data.unreadable")
    assert bad.indices == (4, 77) and "cannot decode image 4" in bad.message
    assert one(found, "data.exact_duplicate").indices == (9, 90)


class Decoding(Dataset):
    """Smooth 28x28 images decoded at each read (a uint8 PIL round trip, as torchvision does),
    some unreadable and, with ``odd``, one of another shape and one holding NaN."""

    def __init__(self, x: torch.Tensor, broken: set[int], odd: bool) -> None:
        self.x, self.broken, self.odd = x, broken, odd

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        if i in self.broken:
            raise OSError(f"cannot decode image {i}")
        if self.odd and i == 17:
            return torch.rand(1, 14, 14), 0
        image = Image.fromarray((self.x[i, 0] * 255).round().byte().numpy(), mode="L")
        x = torch.tensor(list(image.getdata()), dtype=torch.float32).reshape(1, 28, 28) / 255
        if self.odd and i == 33:
            x[0, 3, 3] = float("nan")
        return x, i % 7


def _smooth(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.randn(n, 1, 7, 7, generator=gen), size=28, mode="bilinear")
    return (x - x.amin()) / (x.amax() - x.amin())


@pytest.mark.parametrize("how", ["workers", "hashed"])
def test_loader_workers_and_hashed_search_find_what_one_process_finds(
        how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_diag.checks.data.inspect as inspect_module

    x, xv = _smooth(2600, 0), _smooth(300, 1)  # three blocks of 1,024 samples
    x[2000], x[2100] = x[5], x[6] + 0.004  # an exact copy, a re-encoded one
    x[1500] = 0.5  # blank
    xv[10], xv[11] = x[1200], x[2500] + 0.004  # leaks
    train, val = Decoding(x, {4, 1800}, odd=True), Decoding(xv, set(), odd=False)
    kw: dict[str, Any] = {"num_classes": 7, "progress": False}
    expected = inspect_dataset(train, val, **kw)
    if how == "workers":
        found = inspect_dataset(train, val, num_workers=2, **kw)
    else:
        monkeypatch.setattr(inspect_module, "EXACT_SEARCH_PAIRS", 0)
        found = inspect_dataset(train, val, **kw)
    assert [f.to_dict() for f in found] == [f.to_dict() for f in expected]
    assert one(found, "data.exact_duplicate").indices == (5, 2000)
    assert one(found, "data.near_duplicate").indices == (6, 2100)
    assert one(found, "data.unreadable").indices == (4, 1800)
    assert one(found, "data.non_finite").indices == (33,)
    assert one(found, "data.constant_input").indices == (1500,)
    assert one(found, "data.leakage").details["pairs"] == [(1200, 10), (2500, 11)]
    assert one(found, "data.summary").details["train"]["other_shape"] == 1


def test_a_users_reader_failing_in_a_loader_worker_is_the_users_error() -> None:
    from lightning_diag.batch import UserCodeError

    def reader(sample: Any) -> torch.Tensor:
        if sample[1] == 2000:
            raise KeyError("no pixels")
        return sample[0]

    data = TensorDataset(torch.rand(2600, 4), torch.arange(2600))
    with pytest.raises(UserCodeError, match="`batch_to_input` raised KeyError: 'no pixels'"):
        inspect_dataset(data, batch_to_input=reader, num_workers=2, progress=False)


def test_removed_class_and_imbalance(split: Any) -> None:
    x, y, _, _ = split
    keep = y != 3
    found = inspect_dataset(TensorDataset(x[keep], y[keep]))
    imb = one(found, "data.class_imbalance")
    assert imb.details["missing"] == [3] and "[3]" in imb.message
    rare = (y != 5) | (torch.arange(len(y)) % 20 == 0)  # class 5 cut to a couple of samples
    imb = one(inspect_dataset(TensorDataset(x[rare], y[rare]), imbalance_ratio=5.0),
              "data.class_imbalance")
    assert imb.value is not None and imb.value >= 5.0 and imb.details["missing"] == []


def test_regression_targets_skip_label_checks_and_sampling_is_said(split: Any) -> None:
    x, _, _, _ = split
    targets = torch.rand(len(x))
    before, threads = torch.get_rng_state(), torch.get_num_threads()
    found = inspect_dataset(TensorDataset(x, targets), max_samples=100, num_threads=1)
    assert torch.equal(before, torch.get_rng_state()) and torch.get_num_threads() == threads
    assert {f.code for f in found} == {"data.summary", "data.sampled", "data.no_labels"}
    assert one(found, "data.sampled").value == 100


@pytest.mark.parametrize("kw", [{"num_classes": 0}, {"max_samples": 1.5},
                                {"near_threshold": 1.0}, {"imbalance_ratio": 1},
                                {"batch_to_input": 3}, {"num_threads": 0}, {"max_images": 0},
                                {"num_workers": -1}])
def test_bad_arguments_name_themselves(kw: dict[str, Any]) -> None:
    with pytest.raises((ValueError, TypeError), match=next(iter(kw))):
        DataInspection(**kw)


def _fit(tmp_path: Path, callbacks: list[pl.Callback], train: Any, val: Any) -> torch.Tensor:
    pl.seed_everything(0)
    model = Classifier(mlp(dropout=0.1))
    run = trainer(tmp_path, callbacks, max_epochs=1, deterministic=True, limit_train_batches=3)
    run.fit(model, loader(train, 32), loader(val, 64, shuffle=False))
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_callback_leaves_the_main_run_unchanged_and_logs(tmp_path: Path, split: Any) -> None:
    x, y, xv, yv = split
    x, y, xv = x.clone(), y.clone(), xv.clone()
    x[10], y[10] = x[3], y[3]
    xv[0] = x[20]
    train, val = TensorDataset(x, y), TensorDataset(xv, yv)
    reference = _fit(tmp_path / "ref", [], train, val)
    check = DataInspection()
    weights = _fit(tmp_path / "cb", [check], train, val)
    assert torch.equal(reference, weights)
    assert codes(check.findings) == {"data.exact_duplicate", "data.leakage"}
    assert one(check.findings, "data.leakage").indices == (20,)
    assert len(check.hooks) == 0
    acc = events(tmp_path / "cb" / "tb" / "version_0")
    images = set(acc.Tags()["images"])
    assert {DATA_CLASS_COUNTS, data_grid("samples_per_class"), data_grid("exact_duplicates"),
            data_grid("leakage_train_vs_validation")} <= images
    assert not acc.Tags()["histograms"]  # the labels are the class counts' bars
    assert "exact_duplicate_groups | 1" in text_events(acc, DATA_SUMMARY)[0]
    leftovers = {p.name for p in (tmp_path / "cb").rglob("*") if p.is_file()}
    assert all(name.startswith("events.out.tfevents") or name in ("hparams.yaml", FINDINGS_FILE)
               for name in leftovers), leftovers


class Manual(Classifier):
    def __init__(self) -> None:
        super().__init__(mlp())
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        assert isinstance(opt, torch.optim.Optimizer | pl.core.optimizer.LightningOptimizer)
        loss = F.cross_entropy(self(batch[0]), batch[1])
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()


def test_datamodule_and_manual_optimization_are_inspected(tmp_path: Path) -> None:
    check = DataInspection()
    run = trainer(tmp_path, [check], logger=False, max_steps=1, limit_val_batches=0)
    run.fit(Manual(), datamodule=DigitsDataModule(flatten=True))
    assert codes(check.findings, "warn") == set()
    summary = one(check.findings, "data.summary")
    assert summary.details["train"]["samples"] == 1437
    assert summary.details["validation"]["samples"] == 360
    assert "data.no_tensorboard" in {f.code for f in check.findings}


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self) -> Any:
        yield from zip(torch.rand(8, 4), torch.arange(8), strict=True)


def test_mixed_shapes_and_iterable_training_data() -> None:
    samples = [(torch.rand(4), 0), (torch.rand(4), 1), (torch.rand(6), 1), (torch.rand(4), 0)]
    found = inspect_dataset(samples)
    assert one(found, "data.mixed_shapes").details["split"] == "train"
    assert codes(found, "warn") == set()  # 4 values: too few for a near-duplicate search
    check = DataInspection()
    run = pl.Trainer(max_steps=1, logger=False, callbacks=[check], enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False)
    model = Classifier(mlp(in_features=4, classes=8))
    run.fit(model, torch.utils.data.DataLoader(Stream(), batch_size=4))
    assert [f.code for f in check.findings] == ["data.skipped"]


def test_dict_batches_family_is_read_by_its_key_names(tmp_path: Path) -> None:
    from tests.families import FAMILIES

    fam = FAMILIES["dict_batches"]()  # samples {"pixel_values": (1, 8, 8), "labels": int}
    check = DataInspection()
    run = trainer(tmp_path, [check], max_steps=1, limit_val_batches=1)
    run.fit(fam.module, fam.train, fam.val)
    assert codes(check.findings, "info") == {"data.summary"}, check.findings
    summary = one(check.findings, "data.summary").details
    assert summary["train"]["inspected"] == 384 and summary["validation"]["inspected"] == 128
    assert sum(summary["train"]["class_counts"]) == 384  # labels read from "labels"
    assert data_grid("samples_per_class") in events(tmp_path / "tb" / "version_0").Tags()[
        "images"]


class Keyed(Dataset):
    """Dict samples under the given keys: an 8x8 input, an int label, an attention mask."""

    def __init__(self, input_key: str, n: int = 16) -> None:
        self.x, self.y = load_digits_tensors()
        self.key, self.n = input_key, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {self.key: self.x[i], "attention_mask": torch.ones(8), "label": self.y[i]}


@pytest.mark.parametrize("key", ["pixel_values", "input_ids", "input_values", "image"])
def test_common_library_keys_are_inputs_and_the_mask_never_is(key: str) -> None:
    found = inspect_dataset(Keyed(key))
    summary = one(found, "data.summary").details["train"]
    assert summary["inspected"] == 16 and summary["class_counts"] is not None
    assert not by_code(found, "data.mixed_shapes")  # read the (1, 8, 8) input, not the mask


def test_unreadable_structure_is_an_info_finding_not_a_crash(tmp_path: Path) -> None:
    found = inspect_dataset(Keyed("pixels"))  # no known input key; attention_mask is not one
    (skipped,) = found
    assert skipped.code == "data.skipped" and skipped.severity is Severity.INFO
    assert "dicts with keys ['attention_mask', 'label', 'pixels']" in skipped.message
    assert "`batch_to_input=`" in skipped.message and "`batch_to_target=`" in skipped.message
    text = [{"text": "a sentence", "label": 1}] * 4  # raw strings: nothing numeric to compare
    (skipped,) = inspect_dataset(text)
    assert skipped.code == "data.skipped" and "str" in skipped.message
    # the callback: the fit goes on and the finding names the argument
    check = DataInspection()
    batches = torch.utils.data.DataLoader(Keyed("pixels", 64), batch_size=16)

    class Step(Classifier):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return F.cross_entropy(self(batch["pixels"]), batch["label"])

    run = trainer(tmp_path, [check], logger=False, max_steps=2)
    run.fit(Step(mlp()), batches)
    assert run.global_step == 2
    assert [f.code for f in check.findings] == ["data.skipped"]
    assert "`batch_to_input=`" in check.findings[0].message
    # the named argument fixes it
    fixed = inspect_dataset(Keyed("pixels"), batch_to_input=lambda s: s["pixels"])
    assert one(fixed, "data.summary").details["train"]["inspected"] == 16


def test_a_later_sample_without_the_input_is_unreadable_not_fatal() -> None:
    samples: list[Any] = [{"image": torch.rand(16), "label": i % 2} for i in range(6)]
    samples[4] = {"picture": torch.rand(16), "label": 0}
    found = inspect_dataset(samples)
    bad = one(found, "data.unreadable")
    assert bad.indices == (4,) and "input not readable" in bad.details["errors"][4]


def test_a_failing_batch_to_input_is_the_users_error(tmp_path: Path) -> None:
    check = DataInspection(batch_to_input=lambda sample: sample["missing"])
    run = trainer(tmp_path, [check], logger=False, max_steps=1)
    run.fit(Classifier(mlp()), loader(TensorDataset(*load_digits_tensors()), 32))
    (f,) = check.findings
    assert f.code == "data.user_error" and f.severity is Severity.WARN
    assert "`batch_to_input` raised TypeError" in f.message


def _image(acc: Any, tag: str, index: int = -1) -> Any:
    """One logged image of ``tag`` as an ``(H, W, 3)`` uint8 array."""
    import io

    import numpy as np
    from PIL import Image

    png = acc.Images(tag)[index].encoded_image_string
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _tile_rows(image: Any, left: int) -> list[tuple[int, int]]:
    """(first, end) of each band of rows holding pure black right of ``left``: the rows of digit
    images (black backgrounds) in a grid; text is drawn in dark grey, never pure black."""
    black = [*(image[:, left:] == 0).all(2).any(1).tolist(), False]
    starts = [i for i, b in enumerate(black) if b and (i == 0 or not black[i - 1])]
    return [(s, black.index(False, s)) for s in starts]


def test_grids_label_every_class_and_mark_split_index_and_label(
        tmp_path: Path, split: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    from lightning_diag.callbacks import data_inspection
    from lightning_diag.tensorboard.figures import CARD_WIDTH
    from lightning_diag.tensorboard.tags import data_grid
    from lightning_diag.tensorboard.writer import tensorboard_writer

    x, y, xv, yv = (t.clone() for t in split)
    x[10], y[10] = x[3], (y[3] + 1) % 10  # a duplicate with a conflicting label
    xv[0], yv[0] = x[20], y[20]  # a leak with the same label...
    xv[1], yv[1] = x[21], (y[21] + 1) % 10  # ...and one whose label differs
    check = DataInspection(max_images=3)
    run = trainer(tmp_path, [check], max_steps=1, limit_val_batches=1)
    run.fit(Classifier(mlp()), loader(TensorDataset(x, y)),
            loader(TensorDataset(xv, yv), shuffle=False))
    acc = events(tmp_path / "tb" / "version_0")

    per_class = _image(acc, data_grid("samples_per_class"))
    rows = _tile_rows(per_class, left=120)
    # every class a row of its own, labelled ("class k") left of its images; the rows flow
    # into columns side by side (a landscape card), each column's rows labelled alike
    tiles = [*(per_class[rows[0][0]:rows[0][1]] == 0).all(2).any(0).tolist(), False]
    starts = [i for i, t in enumerate(tiles) if t and not any(tiles[max(0, i - 25):i])]
    assert per_class.shape[1] == CARD_WIDTH and len(rows) * len(starts) >= 10 > (
        len(rows) - 1) * len(starts)
    for first, end in rows:
        for start in starts:
            assert (per_class[first:end, start - 24:start - 2] < 100).any()  # its label
    pitch = rows[1][0] - rows[0][0]
    assert per_class.shape[0] >= rows[0][0] + len(rows) * pitch - 8  # the height holds them

    def red(image: Any) -> Any:
        return (image[..., 0] > 150) & (image[..., 1] < 90) & (image[..., 2] < 90)

    dup = _image(acc, data_grid("exact_duplicates"))
    assert len(_tile_rows(dup, left=10)) == 1 and red(dup).sum() > 100  # conflicting: red
    leak = _image(acc, data_grid("leakage_train_vs_validation"))
    # two pairs: side by side (a landscape image for Time Series), the one whose labels
    # differ first, framed and captioned in red; the agreeing one right of it, not red
    (first, end), = _tile_rows(leak, left=10)
    reds = np.flatnonzero(red(leak).any(0))
    assert red(leak).sum() > 100 and (leak[first:end, reds[-1] + 5:] == 0).all(2).any()
    captions = np.flatnonzero(red(leak[end + 2:]).any(0))  # index and label under each sample
    middle = (reds[0] + reds[-1]) // 2
    assert (captions < middle).any() and (captions > middle).any()

    # a cap on classes says how many are left out
    monkeypatch.setattr(data_inspection, "_MAX_CLASSES", 4)
    writer = tensorboard_writer(run)
    assert writer is not None and check.report is not None
    view = data_inspection._TensorBoardView(run, writer, check.report, 3)
    view._per_class()
    writer.flush()
    capped = _image(events(tmp_path / "tb" / "version_0"), data_grid("samples_per_class"))
    brown = (abs(capped.astype(int) - (140, 75, 0)).sum(2) < 60)
    assert len(_tile_rows(capped, left=120)) in (2, 4) and brown[: rows[0][0]].any()
    assert not (abs(per_class.astype(int) - (140, 75, 0)).sum(2) < 60).any()  # no note


# --- token ids compared as sequences; the class count from every split and the model ---------
def zipf_text(n: int, seed: int, lengths: tuple[int, int] = (4, 20), width: int = 24,
              vocab: int = 500) -> torch.Tensor:
    """Sentences of Zipf-distributed words (ids 1..vocab), padded with 0 at the end."""
    g = torch.Generator().manual_seed(seed)
    p = 1 / torch.arange(1, vocab + 1, dtype=torch.float)
    ids = torch.zeros(n, width, dtype=torch.long)
    for i in range(n):
        size = int(torch.randint(*lengths, (1,), generator=g))
        ids[i, :size] = torch.multinomial(p / p.sum(), size, replacement=True, generator=g) + 1
    return ids


class Text(Dataset):
    """Hugging Face style samples: ``input_ids`` (padded with 0), ``attention_mask``,
    ``labels``; ``ragged`` drops the padding (sequences of their own lengths)."""

    def __init__(self, ids: torch.Tensor, labels: torch.Tensor, ragged: bool = False) -> None:
        self.ids, self.labels, self.ragged = ids, labels, ragged

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ids = self.ids[i][self.ids[i] > 0] if self.ragged else self.ids[i]
        return {"input_ids": ids, "attention_mask": (ids > 0).long(), "labels": self.labels[i]}


def text_split(lengths: tuple[int, int] = (4, 20), width: int = 24,
               ragged: bool = False) -> tuple[Text, Text]:
    g = torch.Generator().manual_seed(5)
    train = Text(zipf_text(300, 0, lengths, width), torch.randint(0, 3, (300,), generator=g),
                 ragged)
    val = Text(zipf_text(80, 1, lengths, width), torch.randint(0, 3, (80,), generator=g), ragged)
    return train, val


@pytest.mark.parametrize("ragged", [False, True])
def test_padded_sentences_sharing_no_token_are_not_near_duplicates(ragged: bool) -> None:
    train, val = text_split(ragged=ragged)
    found = inspect_dataset(train, val, progress=False)
    assert codes(found) == set(), [f.format() for f in found]
    assert "token sequences" in one(found, "data.summary").message
    short = by_code(found, "data.near_duplicates_skipped")  # 4-19 words: too short to judge
    assert [f.subject for f in short] == ["train", "validation"]
    assert all(f.severity is Severity.INFO and "fewer than 27 distinct" in f.message
               for f in short)


def test_long_token_sequences_near_copies_and_leaks_are_found() -> None:
    train, val = text_split(lengths=(30, 60), width=64)
    assert codes(inspect_dataset(train, val, progress=False)) == set()
    ids, vids = train.ids.clone(), val.ids.clone()
    ids[7] = ids[3]
    ids[7, 10] = 499  # one word changed: a near copy
    ids[9] = ids[4]  # an exact copy
    vids[2] = ids[20]  # a training text in validation
    vids[5] = ids[21]
    vids[5, 5] = 498  # and a near copy of another
    found = inspect_dataset(Text(ids, train.labels), Text(vids, val.labels), progress=False)
    assert one(found, "data.near_duplicate").details["groups"] == [[3, 7]]
    assert one(found, "data.exact_duplicate").details["groups"] == [[4, 9]]
    leak = one(found, "data.leakage")
    assert leak.details["pairs"] == [(20, 2), (21, 5)] and leak.severity is Severity.FAIL
    assert "Jaccard" in one(found, "data.near_duplicate").message


def test_integer_codes_over_a_few_symbols_are_not_searched_for_near_copies() -> None:
    g = torch.Generator().manual_seed(0)
    codes_ = torch.randint(0, 3, (200, 200), generator=g)  # 200 features in {0, 1, 2}
    found = inspect_dataset(TensorDataset(codes_, torch.arange(200) % 2), progress=False)
    assert codes(found) == set()
    skipped = one(found, "data.near_duplicates_skipped")
    assert "of random pairs" in skipped.message and "not text" in skipped.message


def test_images_stored_as_uint8_stay_intensities(split: Any) -> None:
    x, y, _, _ = split
    pixels = (x * 255 / x.max()).to(torch.uint8)
    pixels[50] = pixels[10]
    found = inspect_dataset(TensorDataset(pixels, y), progress=False)
    assert "input shape (1, 8, 8)" in one(found, "data.summary").message
    assert one(found, "data.exact_duplicate").indices == (10, 50)


def test_a_validation_class_absent_from_training_is_in_range(split: Any) -> None:
    x, y, xv, yv = split
    keep = y != 9
    found = inspect_dataset(TensorDataset(x[keep], y[keep]), TensorDataset(xv, yv),
                            progress=False)
    assert not by_code(found, "data.label_out_of_range")
    assert "10 classes, inferred from the labels of both splits" in one(
        found, "data.summary").message
    # training never shows class 9, validation does: a fact about the splits, not a warning
    assert codes(found) == set(), [f.format() for f in found]
    absent = one(found, "data.class_absent")
    assert absent.severity is Severity.INFO and absent.details["split"] == "train"
    assert absent.details["classes"] == [9]
    assert absent.details["held_by"] == {"9": {"validation": int((yv == 9).sum())}}
    assert "class(es) [9] have no sample in the train split" in absent.message
    assert f"class 9: {int((yv == 9).sum())} in validation" in absent.message


def test_a_class_in_no_split_stays_as_it_was(split: Any) -> None:
    """A class no split holds: below the largest training label, a gap in the labels (WARN, as
    before the class count read every split); above it, nothing (only the model's output
    width allows it, which says nothing about the data)."""
    x, y, xv, yv = split
    gap = (y != 4) & (y != 9)
    vgap = (yv != 4) & (yv != 9)
    found = inspect_dataset(TensorDataset(x[gap], y[gap]), TensorDataset(xv[vgap], yv[vgap]),
                            progress=False)
    warned = by_code(found, "data.class_imbalance")
    assert [(f.details["split"], f.details["missing"]) for f in warned] == [
        ("train", [4]), ("validation", [4])]
    assert all("class(es) [4] have no sample in any split" in f.message for f in warned)
    assert not by_code(found, "data.class_absent")
    # a 10-output model: class 9 is in range, held by no split and above every label
    config = InspectionConfig(output_classes=10, progress=False)
    report = run_inspection(TensorDataset(x[gap], y[gap]), TensorDataset(xv[vgap], yv[vgap]),
                            config, lambda code, severity, message, **kw: Finding(
                                "t", code, severity, message, **kw))
    assert "10 classes, the model's output width" in one(report.findings,
                                                         "data.summary").message
    assert [f.details["missing"] for f in by_code(report.findings, "data.class_imbalance")] == [
        [4], [4]]
    assert not by_code(report.findings, "data.class_absent")


def test_a_small_validation_set_lacking_a_class_is_a_fact(split: Any) -> None:
    x, y, xv, yv = split
    keep = yv != 2
    found = inspect_dataset(TensorDataset(x, y), TensorDataset(xv[keep], yv[keep]),
                            progress=False)
    assert codes(found) == set(), [f.format() for f in found]
    absent = one(found, "data.class_absent")
    assert absent.details["split"] == "validation" and absent.details["classes"] == [2]
    assert absent.message.startswith("Validation set: class(es) [2]")


def _fit_digits(tmp_path: Path, check: DataInspection, y: torch.Tensor, yv: torch.Tensor,
                split: Any) -> None:
    x, _, xv, _ = split
    run = trainer(tmp_path, [check], logger=False, max_steps=1, limit_val_batches=0)
    run.fit(Classifier(mlp()), loader(TensorDataset(x, y), 32),
            loader(TensorDataset(xv, yv), 64, shuffle=False))


def test_the_models_output_width_counts_the_classes(tmp_path: Path, split: Any) -> None:
    _, y, _, yv = split
    healthy = DataInspection()
    keep = y != 9
    y_no9 = torch.where(keep, y, torch.zeros_like(y))  # class 9 only in validation
    _fit_digits(tmp_path, healthy, y_no9, yv, split)
    assert codes(healthy.findings) == set(), [f.format() for f in healthy.findings]
    assert one(healthy.findings, "data.class_absent").details["classes"] == [9]
    assert "10 classes, the model's output width" in one(healthy.findings,
                                                         "data.summary").message
    broken = DataInspection()
    y_bad = y.clone()
    y_bad[17] = 10  # one label past the 10 outputs: cross-entropy would fail on it
    _fit_digits(tmp_path, broken, y_bad, yv, split)
    out = one(broken.findings, "data.label_out_of_range")
    assert out.indices == (17,) and "the model's output width" in out.message


def test_token_classifier_fit_is_quiet(tmp_path: Path) -> None:
    class Bag(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.EmbeddingBag(501, 16, padding_idx=0)
            self.out = torch.nn.Linear(16, 3)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.out(self.embed(ids))

        def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
            return F.cross_entropy(self(batch["input_ids"]), batch["labels"])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters())

    train, val = text_split()
    check = DataInspection()
    run = trainer(tmp_path, [check], max_steps=1, limit_val_batches=0)
    run.fit(Bag(), loader(train, 32), loader(val, 32, shuffle=False))
    assert codes(check.findings) == set(), [f.format() for f in check.findings]
    assert "3 classes, the model's output width" in one(check.findings, "data.summary").message
    images = events(tmp_path / "tb" / "version_0").Tags()["images"]
    # the counts chart (and the findings card); text makes no image grid
    assert set(images) == {DATA_CLASS_COUNTS, FINDINGS_CARD}


def closest_distinct_pair(a: torch.Tensor, b: torch.Tensor | None = None) -> float:
    """The largest exact Jaccard of 3-gram sets over distinct pairs (within ``a``, or across),
    through an inverted index: only pairs sharing an n-gram are counted."""
    from collections import Counter

    from lightning_diag.functional.tokens import shingles

    rows = a if b is None else torch.cat([a, b])
    sets = [set(g.tolist()) for g in shingles(rows)]
    holders: dict[int, list[int]] = {}
    for i, grams in enumerate(sets):
        for g in grams:
            holders.setdefault(g, []).append(i)
    shared: Counter[tuple[int, int]] = Counter()
    for ids in holders.values():
        for i, j in itertools.combinations(ids, 2):
            if b is None or (i < len(a)) != (j < len(a)):
                shared[i, j] += 1
    return max((k / (len(sets[i]) + len(sets[j]) - k) for (i, j), k in shared.items()
                if not torch.equal(rows[i], rows[j])), default=0.0)


def template_paragraphs(n: int, seed: int) -> torch.Tensor:
    """Three sentences of 11 tokens each: `the <adj> <noun> <verb> a <noun> on the <adj> <noun>
    .` from slot lists of 10-20 words (ids 1-45), padded to 40."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(n, 40, dtype=torch.long)
    for i in range(n):
        words = []
        for _ in range(3):
            pick = [int(torch.randint(lo, hi, (1,), generator=g))
                    for lo, hi in ((33, 43), (3, 23), (23, 33), (1, 3), (3, 23), (43, 45),
                                   (33, 43), (3, 23))]
            words += [1, *pick[:6], 1, *pick[6:], 45]
        out[i, :33] = torch.tensor(words)
    return out


def test_margin_of_the_token_threshold_on_healthy_text() -> None:
    """The closest distinct pairs of texts long enough to judge, against 0.8 (the numbers in
    docs/callbacks/data_inspection.md)."""
    texts = (zipf_text(200, 0, (30, 60), 64, 2000), zipf_text(50, 1, (30, 60), 64, 2000))
    paragraphs = (template_paragraphs(200, 0), template_paragraphs(50, 1))
    for train, val in (texts, paragraphs):
        within, across = closest_distinct_pair(train), closest_distinct_pair(train, val)
        assert max(within, across) < 0.3, (within, across)  # a margin of 0.5 at least
        found = inspect_dataset(TensorDataset(train, torch.zeros(len(train), dtype=torch.long)),
                                TensorDataset(val, torch.zeros(len(val), dtype=torch.long)),
                                progress=False)
        assert codes(found) == set() and not by_code(found, "data.near_duplicates_skipped")


SHARED = Shared(
    DataInspection,
    run={},
    guard={"num_classes": 10, "max_images": 2},
    bad=[("num_classes", 0, V), ("max_samples", 1.5, T), ("max_samples", 1, V),
         ("near_threshold", 1.0, V), ("imbalance_ratio", 1, V), ("batch_to_input", 3, T),
         ("batch_to_target", "y", T), ("max_images", 0, V), ("seed", 0.5, T),
         ("num_threads", 0, V), ("num_workers", -1, V), ("num_workers", 1.5, T),
         ("token_threshold", 1.0, V), ("token_threshold", "0.8", T), ("strict", "x", T)],
    state=(lambda d: (DataInspection(max_samples=50, max_images=1),
                      DataInspection(max_samples=60, max_images=1)),
           lambda cb: cb.done, lambda cb: setattr(cb, "done", False)),
)
