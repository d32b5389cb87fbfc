import pytest
import torch
from torch import nn

from lightning_diag.callbacks.first_layer import FirstLayerVisualization
from lightning_diag.tensorboard.figures import filter_grid
from lightning_diag.tensorboard.tags import FIRST_LAYER_FILTERS
from tests.helpers import Classifier, cnn, digits, events, loader, mlp, trainer
from tests.shared_cases import Shared, T, V


def _fit(tmp_path, model, cb, epochs=2, flatten=False, **kw):
    t = trainer(tmp_path, [cb], max_epochs=epochs, limit_train_batches=2, **kw)
    t.fit(model, loader(digits(64, flatten=flatten), batch_size=32))
    return t


def test_conv_filters_are_logged_as_image_and_png(tmp_path):
    cb = FirstLayerVisualization(every_n_epochs=1)
    model = Classifier(cnn())
    before = [p.detach().clone() for p in model.parameters()]
    t = _fit(tmp_path, model, cb)
    images = events(t.logger.log_dir).Images(FIRST_LAYER_FILTERS)
    assert [i.step for i in images] == [2, 4]  # end of each epoch; train end adds no copy
    assert images[0].width > 50
    pngs = sorted(p.name for p in (tmp_path / "tb" / "version_0").glob("first_layer_*.png"))
    assert pngs == ["first_layer_step0000002.png", "first_layer_step0000004.png"]
    assert [f.code for f in cb.findings] == ["first_layer.summary"]  # its verdict, nothing else
    assert cb.findings[0].details["drawn_at"] == [2, 4] and any(not torch.equal(a, b) for a, b in
                                     zip(before, model.parameters(), strict=True))


def test_filter_grid_is_captioned_with_the_layer_and_its_type(tmp_path):
    import numpy as np
    from PIL import Image

    from lightning_diag.tensorboard.figures import CARD_WIDTH, Cell, annotated_grid

    model = Classifier(cnn())
    _fit(tmp_path, model, FirstLayerVisualization(every_n_epochs=5), epochs=1)
    png = tmp_path / "tb" / "version_0" / "first_layer_step0000002.png"
    logged = np.asarray(Image.open(png).convert("RGB"))
    note = ["each filter scaled to its own range: black lowest, white highest"]

    def drawn(title: str) -> np.ndarray:
        return annotated_grid([[Cell(filter_grid(model.net[0].weight))]], title, notes=note)

    assert logged.shape[1] == CARD_WIDTH  # the 4x4 grid of 3x3 filters enlarged to the card
    assert np.array_equal(logged, drawn("net.0 (Conv2d): 8 filters of 3x3; step 2"))
    assert not np.array_equal(logged, drawn("net.0: 8 filters of 3x3; step 2"))


def test_linear_on_images_needs_input_shape(tmp_path):
    cb = FirstLayerVisualization(every_n_epochs=5, input_shape=(8, 8))
    drawn = cb.filters(Classifier(mlp()))
    assert drawn is not None and drawn.shape == (32, 1, 8, 8)
    t = _fit(tmp_path, Classifier(mlp()), cb, epochs=1)
    assert len(events(t.logger.log_dir).Images(FIRST_LAYER_FILTERS)) == 1
    quiet = FirstLayerVisualization()
    _fit(tmp_path, Classifier(mlp()), quiet, epochs=1, logger=False)
    assert [f.code for f in quiet.findings] == ["first_layer.not_found"]


def test_filter_grid_normalizes_each_filter():
    w = torch.stack([torch.arange(9.0).reshape(1, 3, 3) * k for k in (1.0, -2.0, 50.0)])
    grid = filter_grid(w, pad=1)
    assert grid.shape == (2 * 4 + 1, 2 * 4 + 1)
    for i in range(3):
        r, c = divmod(i, 2)
        tile = grid[1 + 4 * r:4 + 4 * r, 1 + 4 * c:4 + 4 * c]
        ref = (w[i, 0] - w[i, 0].min()) / (w[i, 0].max() - w[i, 0].min())
        assert torch.allclose(tile, ref)
    rgb = filter_grid(torch.randn(4, 3, 5, 5))
    assert rgb.shape == (13, 13, 3) and rgb.min() >= 0 and rgb.max() <= 1
    assert filter_grid(torch.zeros(2, 1, 3, 3)).isfinite().all()


def test_named_layer_and_argument_validation():
    model = Classifier(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 6, 3)))
    drawn = FirstLayerVisualization(layer="net.1").filters(model)
    assert drawn is not None and drawn.shape == (6, 4, 3, 3)
    with pytest.raises(ValueError, match="net.7"):
        FirstLayerVisualization(layer="net.7").filters(model)
    with pytest.raises(ValueError, match="every_n_epochs"):
        FirstLayerVisualization(every_n_epochs=0)
    with pytest.raises(ValueError, match="input_shape"):
        FirstLayerVisualization(input_shape=(8,))
    cb = FirstLayerVisualization()
    cb._drawn_step = 7
    other = FirstLayerVisualization()
    other.load_state_dict(cb.state_dict())
    assert other._drawn_step == 7


SHARED = Shared(
    FirstLayerVisualization,
    run={"every_n_epochs": 1},
    guard={"every_n_epochs": 1, "input_shape": (8, 8)},
    bad=[("every_n_epochs", 0, V), ("every_n_epochs", True, T), ("input_shape", (8,), V),
         ("input_shape", (8, 0), V), ("input_shape", "8x8", T), ("input_shape", (8.0, 8), T),
         ("layer", 3, T), ("layer", "", V), ("strict", 1, T)],
    state=(lambda d: (FirstLayerVisualization(every_n_epochs=1, input_shape=(8, 8)),
                      FirstLayerVisualization(every_n_epochs=2, input_shape=(8, 8))),
           lambda cb: cb._drawn_step, lambda cb: setattr(cb, "_drawn_step", 1234)),
)
