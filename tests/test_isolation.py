import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from lightning_diag.batch import map_floats, select_samples, step_loss
from lightning_diag.isolation import (
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
