"""Safe checkpoint loading: one error type naming the file for every way a checkpoint can be bad."""

from __future__ import annotations

import pathlib
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_diag.examples.digits import DigitsClassifier
from lightning_diag.inference.checkpoints import (
    CheckpointLoadError,
    check_state_dict,
    load_checkpoint,
    module_from_checkpoint,
    state_dict_of,
)


def _good(tmp_path: Path) -> Path:
    path = tmp_path / "good.ckpt"
    model = DigitsClassifier(arch="mlp", width=8)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    return path


def test_good_checkpoint_loads_on_cpu_and_builds_the_module(tmp_path: Path) -> None:
    path = _good(tmp_path)
    ckpt = load_checkpoint(path)
    model = module_from_checkpoint(DigitsClassifier, ckpt, path)
    state = state_dict_of(ckpt, path)
    check_state_dict(model, state, path)
    assert model.hparams["width"] == 8 and all(t.device.type == "cpu" for t in state.values())


@pytest.mark.parametrize("case,reason", [
    ("missing", "file not found"), ("directory", "not a file"), ("empty", "empty"),
    ("truncated", "truncated or corrupt"), ("text", "not a PyTorch checkpoint"),
    ("tensor", "not a checkpoint"),
])
def test_bad_files_raise_one_error_naming_the_file(tmp_path: Path, case: str, reason: str) -> None:
    path = tmp_path / f"{case}.ckpt"
    if case == "directory":
        path.mkdir()
    elif case == "empty":
        path.touch()
    elif case == "truncated":
        data = _good(tmp_path).read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "text":
        path.write_text("hello, I am not a checkpoint\n")
    elif case == "tensor":
        torch.save(torch.ones(3), path)
    with pytest.raises(CheckpointLoadError, match=reason) as err:
        load_checkpoint(path)
    assert err.value.path == path and str(path) in str(err.value)


class Custom:  # a non-allowlisted global, like a user object in hyper_parameters
    def __init__(self) -> None:
        self.x = 1


def test_pickled_globals_are_listed_and_never_loaded_without_trust(tmp_path: Path) -> None:
    path = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"root": pathlib.PurePosixPath("/x"),
                                                       "obj": Custom()}}, path)
    with pytest.raises(CheckpointLoadError, match="pickled globals") as err:
        load_checkpoint(path)
    names = err.value.unsafe_globals
    assert "pathlib.PurePosixPath" in names and any(n.endswith("Custom") for n in names)
    assert "trust=True" in str(err.value)
    assert isinstance(load_checkpoint(path, trust=True)["hyper_parameters"]["obj"], Custom)


def test_architecture_mismatch_lists_keys_and_shapes(tmp_path: Path) -> None:
    path = tmp_path / "net.pt"
    torch.save(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).state_dict(), path)
    state = state_dict_of(load_checkpoint(path), path)  # a bare state_dict works too
    other = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    with pytest.raises(CheckpointLoadError) as err:
        check_state_dict(other, state, path)
    e = err.value
    assert e.missing == ["2.weight", "2.bias"] and e.unexpected == ["1.weight", "1.bias"]
    assert e.mismatched == [("0.weight", (3, 4), (5, 4)), ("0.bias", (3,), (5,))]
    assert "net.pt" in str(e) and "0.weight: checkpoint [3, 4] vs model [5, 4]" in str(e)


def test_no_state_dict_entry(tmp_path: Path) -> None:
    path = tmp_path / "odd.ckpt"
    torch.save({"epoch": 3, "notes": "x"}, path)
    with pytest.raises(CheckpointLoadError, match="no 'state_dict' entry"):
        state_dict_of(load_checkpoint(path), path)


def test_lightning_checkpoint_of_digits_needs_no_globals(tmp_path: Path) -> None:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    model = DigitsClassifier(arch="mlp", width=8)
    ds = TensorDataset(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))
    t = pl.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                   enable_model_summary=False, default_root_dir=str(tmp_path))
    t.fit(model, DataLoader(ds, batch_size=8))
    t.save_checkpoint(tmp_path / "l.ckpt")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(tmp_path / "l.ckpt")) == []
    assert load_checkpoint(tmp_path / "l.ckpt")["hyper_parameters"]["width"] == 8
