import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from lightning_diag.batch import map_floats, select_samples, step_loss
from lightning_diag.isolation import (
    OptimizationSettings,
    SideTraining,
    StepState,
    clone_module,
    disable_regularization,
    first_batches,
    fresh_optimizer,
    preserved_rng,
)
from tests.helpers import Classifier, digits, loader, mlp


def test_preserved_rng_restores_every_stream_even_on_error():
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    expected = (torch.rand(1), np.random.rand(), random.random())
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    with pytest.raises(ValueError), preserved_rng():
        torch.rand(5), np.random.rand(5), random.random()
        raise ValueError
    assert (torch.rand(1), np.random.rand(), random.random()) == expected


def test_rng_state_puts_numpy_back_exactly_with_its_cached_gaussian():
    from lightning_diag.isolation import RNGState

    np.random.seed(3)
    np.random.randn(1)  # the legacy generator now holds a second Gaussian
    before = np.random.get_state()
    state = RNGState.capture()
    expected = (np.random.rand(4), np.random.randn(3))
    np.random.seed(9)
    state.restore()
    after = np.random.get_state()
    assert after[0] == before[0] and np.array_equal(after[1], before[1])
    assert after[2:] == before[2:] and before[3] == 1
    got = (np.random.rand(4), np.random.randn(3))
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))


def test_first_batches_do_not_advance_the_users_sampler_generator():
    data = digits(100)
    dl = loader(data, batch_size=16)
    state = dl.generator.get_state().clone()
    with preserved_rng():
        batches = first_batches(dl, 2, torch.device("cpu"))
    assert torch.equal(dl.generator.get_state(), state)
    assert len(batches) == 2 and torch.equal(batches[0][0], data.tensors[0][:16])


def test_first_batches_iterable_and_empty():
    class Stream(IterableDataset):
        def __iter__(self):
            for i in range(5):
                yield torch.full((2,), float(i)), i

    (batch,) = first_batches(DataLoader(Stream(), batch_size=4), 1, torch.device("cpu"))
    assert batch[0].shape == (4, 2)
    with pytest.raises(ValueError, match="no batch"):
        first_batches(DataLoader(digits(0)), 1, torch.device("cpu"))


def test_clone_logs_nothing_and_shares_no_tensors():
    model = Classifier(mlp())
    clone = clone_module(model)
    batch = next(iter(loader(digits(32))))
    loss = step_loss(clone, batch)  # training_step calls self.log: must be a no-op here
    assert loss.ndim == 0
    for a, b in zip(model.parameters(), clone.parameters(), strict=False):
        assert a.data_ptr() != b.data_ptr() and torch.equal(a, b)


def test_fresh_optimizer_shapes_and_regularization_off():
    model = Classifier(mlp(dropout=0.5), weight_decay=0.1)
    opt = fresh_optimizer(model)
    changed = disable_regularization(model, opt, reg_attr="reg_strength")
    assert opt.param_groups[0]["weight_decay"] == 0.0
    assert any("dropout" in c for c in changed) and "`reg_strength`" in changed

    class Dict(Classifier):
        def configure_optimizers(self):
            return {"optimizer": torch.optim.SGD(self.parameters(), lr=0.1)}

    assert isinstance(fresh_optimizer(Dict(mlp())), torch.optim.SGD)

    class NoOpt(Classifier):
        def configure_optimizers(self):
            return None

    with pytest.raises(ValueError, match="configure_optimizers"):
        fresh_optimizer(NoOpt(mlp()))


def test_batch_helpers_keep_structure():
    batch = {"x": torch.ones(4, 2), "y": torch.arange(4), "name": "a"}
    doubled = map_floats(batch, lambda t: t.double())
    assert doubled["x"].dtype == torch.float64 and doubled["y"].dtype == torch.int64
    picked = select_samples((torch.arange(4.0), torch.arange(4)), torch.tensor([1, 3]))
    assert picked[1].tolist() == [1, 3]


def test_first_batches_of_a_loader_without_automatic_batching():
    data = [(torch.full((2, 3), float(i)), torch.tensor([i, i])) for i in range(4)]
    batches = first_batches(DataLoader(data, batch_size=None), 3, torch.device("cpu"))
    expected = list(DataLoader(data, batch_size=None))[:3]  # each item already is a batch
    assert len(batches) == 3
    for got, want in zip(batches, expected, strict=True):
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_settings_are_read_from_the_trainer():
    import lightning.pytorch as pl

    trainer = pl.Trainer(gradient_clip_val=0.5, gradient_clip_algorithm="value",
                         accumulate_grad_batches=3, precision="bf16-mixed", logger=False,
                         accelerator="cpu")
    assert OptimizationSettings.from_trainer(trainer) == OptimizationSettings(0.5, "value", 3,
                                                                              "bf16-mixed")
    assert OptimizationSettings.from_trainer(pl.Trainer(logger=False)) == OptimizationSettings()
    with pytest.raises(ValueError, match="precision"):
        OptimizationSettings(precision="transformer-engine")


def linear_and_batches():
    torch.manual_seed(0)
    return torch.nn.Linear(4, 1), [torch.randn(8, 4) for _ in range(2)]


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_side_training_clips_as_torch_does(algorithm):
    model, (x, _) = linear_and_batches()
    reference = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    run = SideTraining(opt, OptimizationSettings(0.01, algorithm), torch.device("cpu"))
    assert run.backward(model(x).pow(2).sum() * 100, last=False)
    # by hand: the same gradient, clipped by torch's own function, one SGD step
    ref = torch.nn.Linear(4, 1)
    with torch.no_grad():
        for p, r in zip(ref.parameters(), reference, strict=True):
            p.copy_(r)
    ref(x).pow(2).sum().mul(100).backward()
    clip = (torch.nn.utils.clip_grad_norm_ if algorithm == "norm"
            else torch.nn.utils.clip_grad_value_)
    clip(list(ref.parameters()), 0.01)
    for p, r in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.allclose(p, r.detach() - r.grad)


def test_side_training_accumulates_as_one_step_on_the_mean_loss():
    model, batches = linear_and_batches()
    twin, _ = linear_and_batches()
    run = SideTraining(torch.optim.SGD(model.parameters(), lr=0.1),
                       OptimizationSettings(accumulate_grad_batches=2), torch.device("cpu"))
    assert not run.backward(model(batches[0]).pow(2).mean(), last=False)
    assert run.backward(model(batches[1]).pow(2).mean(), last=False)  # the window is full
    opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    (sum(twin(b).pow(2).mean() for b in batches) / 2).backward()
    opt.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.allclose(p, q)


def test_step_state_puts_back_what_a_step_carries():
    module = torch.nn.Linear(2, 2)
    module.hidden = None
    module.cache = {"h": torch.zeros(2)}
    state = StepState(module, torch.float64)
    state.restore()
    assert module.cache["h"].dtype == torch.float64
    module.hidden = (torch.ones(1), torch.ones(1))
    module.cache["h"].add_(1.0)  # in place
    module.extra = torch.ones(1)  # added by a step
    assert state.changed() == ["cache", "extra", "hidden"]
    state.restore()
    assert module.hidden is None and not hasattr(module, "extra")
    assert torch.equal(module.cache["h"], torch.zeros(2, dtype=torch.float64))
    assert state.changed() == []



def test_step_state_scanned_once_still_sees_every_way_a_step_changes_state():
    """restore() looks only at what a step can change: each way is seen, in a submodule too."""
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    inner = module[0]
    inner.hidden, inner.count, inner.history, inner.shape = torch.zeros(2), 3, [], (1, 2)
    state = StepState(module)
    inner.hidden.add_(1.0)  # in place, on the value restore put there
    inner.count = torch.ones(1)  # a number become a tensor: carried now
    inner.history.append(torch.ones(1))  # a list filled in place
    inner.shape = (torch.ones(1),)  # a tuple replaced by one holding a tensor
    inner.steps = 4  # added, not carried: the step's own bookkeeping, kept
    inner.extra = [torch.ones(1)]  # added, carried
    del inner.hidden  # a captured attribute removed
    assert state.changed() == ["0.count", "0.extra", "0.hidden", "0.history", "0.shape"]
    state.restore()
    assert torch.equal(inner.hidden, torch.zeros(2)) and inner.steps == 4
    assert not any(hasattr(inner, k) for k in ("count", "history", "shape", "extra"))
    assert state.changed() == []
    inner.hidden.add_(1.0)
    state.restore()  # the clone it put back, changed in place: a fresh one again
    assert torch.equal(inner.hidden, torch.zeros(2)) and state.changed() == []
    assert inner.weight.shape == (2, 2) and "weight" not in vars(inner)  # parameters untouched

def test_clone_copies_a_state_still_attached_to_the_graph_detached():
    model = Classifier(mlp(width=8))
    out = model(torch.ones(2, 64))
    model.hidden = (out, torch.zeros(1))  # kept from the step, with its history
    clone = clone_module(model)
    assert clone.hidden[0].grad_fn is None and torch.equal(clone.hidden[0], out)
    assert model.hidden[0] is out and out.grad_fn is not None


def test_preserved_generators_finds_them_in_nested_datasets_and_transforms():
    import random as stdlib_random

    import numpy as np
    from torch.utils.data import ConcatDataset, Dataset

    from lightning_diag.isolation import preserved_generators

    class Jitter:
        def __init__(self) -> None:
            self.rng = stdlib_random.Random(0)

    class Part(Dataset):
        def __init__(self) -> None:
            self.gen = torch.Generator().manual_seed(1)
            self.legacy = np.random.RandomState(2)
            self.transform = Jitter()
            self.np = np  # a module: not walked

        def __len__(self) -> int:
            return 2

        def __getitem__(self, i: int) -> float:
            return float(torch.rand(1, generator=self.gen)) + self.legacy.rand() + \
                self.transform.rng.random()

    data = ConcatDataset([Part(), Part()])
    with preserved_generators(data):
        inside = [data[i] for i in range(4)]
    assert [data[i] for i in range(4)] == inside  # every generator put back
    assert [data[i] for i in range(4)] != inside  # and drawing on, outside the block
