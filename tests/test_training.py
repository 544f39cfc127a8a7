import dataclasses

import numpy as np
import pytest
import torch

import explaind.training as training
from explaind import History, InputError
from explaind.data import export_digits, load_image_pair
from explaind.training import CNNConfig, TransformerConfig, train_cnn, train_transformer, triangular_lr

TINY_TRANSFORMER = TransformerConfig(p=11, train_size=40, val_size=20, d_model=8, n_heads=2, d_mlp=16,
                                     lr=1e-2, weight_decay=1.0, max_steps=5)
TINY_CNN = CNNConfig(width=4, batch_size=64, epochs=2, peak_epoch=1.0)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    export_digits(folder)
    return folder


class CapturingRecorder:
    """Stands in for the Recorder and keeps what the loop hands to it."""

    def __init__(self):
        self.batches = []

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return None

    def batch(self, indices, inputs, targets):
        self.batches.append((indices.clone(), inputs.clone(), targets.clone()))


@pytest.fixture
def capture(monkeypatch):
    recorder = CapturingRecorder()
    monkeypatch.setattr(training, "_recorder", lambda history_dir, model, optimizer, scheduler=None: recorder)
    return recorder


def same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_configs_paper_settings():
    t, c = TransformerConfig.paper(), CNNConfig.paper()
    assert (t.p, t.train_size, t.val_size, t.d_model, t.n_heads, t.d_mlp) == (113, 4000, 2000, 64, 4, 512)
    assert (t.lr, t.beta1, t.beta2, t.eps, t.weight_decay) == (1e-3, 0.9, 0.98, 1e-8, 4.0)
    assert (c.dataset, c.classes, c.width, c.batch_size, c.epochs) == ("cifar2", (3, 5), 64, 256, 12)
    assert (c.lr, c.peak_epoch, c.momentum, c.weight_decay, c.flip) == (0.1, 5.0, 0.9, 5e-3, True)
    assert 10_000 // c.batch_size * c.epochs == 468  # the paper's step count


def test_transformer_runs_max_steps_and_logs_each(capture):
    result = train_transformer(TINY_TRANSFORMER, history_dir="unused", progress=False)
    assert len(capture.batches) == 5
    indices, inputs, targets = capture.batches[0]
    assert torch.equal(indices, torch.arange(40))  # full batch
    assert inputs.shape == (40, 4) and torch.equal(targets, (inputs[:, 0] + inputs[:, 2]) % 11)
    assert list(result.log["step"]) == [0, 1, 2, 3, 4, 5]
    assert list(result.log.columns) == ["step", "train_loss", "train_acc", "val_loss", "val_acc", "param_norm"]
    assert result.metrics["steps"] == 5 and next(result.model.parameters()).dtype == torch.float64


def test_transformer_log_matches_returned_model():
    result = train_transformer(TINY_TRANSFORMER, progress=False)
    data = training.modular_addition(11, 40, 20, seed=0)
    loss = torch.nn.functional.cross_entropy(result.model(data.train_inputs), data.train_targets)
    assert result.log["train_loss"].iloc[-1] == pytest.approx(loss.item(), rel=1e-12)


def test_transformer_stops_when_train_and_val_are_perfect(monkeypatch):
    # validation accuracy is faked to 1.0, so the run stops as soon as it has memorised
    monkeypatch.setattr(training, "_evaluate", lambda model, x, y: (0.0, 1.0))
    cfg = dataclasses.replace(TINY_TRANSFORMER, max_steps=2000, lr=3e-2, weight_decay=0.0, d_model=16, d_mlp=32)
    result = train_transformer(cfg, progress=False)
    assert result.metrics["steps"] < 2000
    assert result.log["train_acc"].iloc[-1] == 1.0 and (result.log["train_acc"].iloc[:-1] < 1.0).all()


def test_transformer_is_deterministic():
    one, two = (train_transformer(TINY_TRANSFORMER, progress=False) for _ in range(2))
    assert same_parameters(one.model, two.model)
    assert one.log.equals(two.log)


@pytest.mark.parametrize("key, value", [("dtype", "float16"), ("val_size", 0), ("max_steps", -5), ("d_model", 0),
                                        ("n_heads", 3), ("lr", -0.1), ("stop_val_acc", 0.0), ("val_size", 10_000)])
def test_transformer_config_refuses_values_out_of_range(key, value):
    # refused when the config is built, before a stage deletes or trains anything
    with pytest.raises(InputError, match=f"train_transformer.{key} is .*Fix: set train_transformer.{key}"):
        dataclasses.replace(TINY_TRANSFORMER, **{key: value})


@pytest.mark.parametrize("key, value", [("batch_size", 0), ("batch_size", -4), ("width", 0), ("lr", -0.1),
                                        ("epochs", 0), ("peak_epoch", 3.0), ("classes", (3, 3)),
                                        ("classes", (3, 10)), ("test_size", 1.0), ("dataset", "mnist")])
def test_cnn_config_refuses_values_out_of_range(key, value):
    with pytest.raises(InputError, match=f"train_cnn.{key} is .*Fix: set train_cnn.{key}"):
        dataclasses.replace(TINY_CNN, **{key: value})


def test_training_refuses_a_device_it_cannot_use(data_dir):
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU: on no machine
    with pytest.raises(InputError, match="(?s)device=.*Fix: pass device='cpu'"):
        train_transformer(TINY_TRANSFORMER, device=missing, progress=False)
    with pytest.raises(InputError, match="(?s)device=.*Fix: pass device='cpu'"):
        train_cnn(TINY_CNN, data_dir, device=missing, progress=False)


def test_triangular_schedule_peaks_and_never_hits_zero():
    factor = triangular_lr(steps_per_epoch=10, epochs=12, peak_epoch=5)
    values = np.array([factor(s) for s in range(120)])
    assert values.argmax() == 49 and values.max() == 1.0  # step 49 is the 50th update
    assert (values > 0).all() and values[0] == pytest.approx(1 / 50)
    assert (np.diff(values[:50]) > 0).all() and (np.diff(values[49:]) < 0).all()
    for bad_peak in (0, 12.5):
        with pytest.raises(ValueError, match="peak_epoch"):
            triangular_lr(10, 12, bad_peak)


def test_cnn_records_flipped_batches_without_repeats(data_dir, capture):
    result = train_cnn(TINY_CNN, data_dir, history_dir="unused", progress=False)
    pair = load_image_pair(data_dir, "digits", TINY_CNN.classes, TINY_CNN.test_size, TINY_CNN.data_seed)
    steps_per_epoch = len(pair.train_y) // 64
    assert len(capture.batches) == result.metrics["steps"] == 2 * steps_per_epoch
    epoch = torch.cat([indices for indices, _, _ in capture.batches[:steps_per_epoch]])
    assert len(epoch.unique()) == len(epoch) == steps_per_epoch * 64  # drop_last, no repeats
    flipped = 0
    for indices, inputs, targets in capture.batches:
        original = pair.train_x[indices].double()
        is_flipped = (inputs == original.flip(-1)).flatten(1).all(1)
        assert ((inputs == original).flatten(1).all(1) | is_flipped).all()
        assert torch.equal(targets, pair.train_y[indices])
        flipped += int(is_flipped.sum())
    assert 0.3 < flipped / (len(capture.batches) * 64) < 0.7


def test_a_cnn_epochs_train_metrics_average_the_images_its_batches_trained_on(data_dir, capture):
    """Batches of 100 train on 200 of the digits' 250 training images (the last incomplete batch is
    dropped): the epoch's loss and accuracy are over those 200, here of a model that barely moves
    (peak learning rate 1e-12), so the returned one scores them."""
    cfg = dataclasses.replace(TINY_CNN, batch_size=100, epochs=1, lr=1e-12, flip=False)
    result = train_cnn(cfg, data_dir, history_dir="unused", progress=False)
    assert len(load_image_pair(data_dir, "digits", cfg.classes, cfg.test_size, cfg.data_seed).train_y) == 250
    inputs = torch.cat([inputs for _, inputs, _ in capture.batches])
    targets = torch.cat([targets for _, _, targets in capture.batches])
    assert len(targets) == 200
    with torch.no_grad():
        out = result.model(inputs)
    epoch = result.log.iloc[1]
    assert epoch["step"] == 2
    assert epoch["train_acc"] == (out.argmax(-1) == targets).double().mean().item()
    assert epoch["train_loss"] == pytest.approx(torch.nn.functional.cross_entropy(out, targets).item(), rel=1e-9)


def test_evaluation_in_batches_is_the_mean_over_every_row():
    """Batches of 4, 4 and 2 rows: the loss is the mean over the 10 rows, not over the batches' means."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4).double()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 4, (10,))
    loss, accuracy = training._evaluate(model, x, y, batch_size=4)
    with torch.no_grad():
        out = model(x)
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(out, y).item(), rel=1e-12)
    assert accuracy == (out.argmax(-1) == y).double().mean().item()


def test_cnn_is_deterministic(data_dir):
    one, two = (train_cnn(TINY_CNN, data_dir, progress=False) for _ in range(2))
    assert same_parameters(one.model, two.model)
    assert one.metrics["test_acc"] == two.metrics["test_acc"]
    assert len(one.log) == 3  # step 0 and two epoch ends


def test_cnn_rejects_batch_larger_than_data(data_dir):
    with pytest.raises(ValueError, match="batch_size"):
        train_cnn(dataclasses.replace(TINY_CNN, batch_size=10_000), data_dir, progress=False)


def test_recorded_history_matches_the_run(tmp_path, data_dir):
    transformer = train_transformer(TINY_TRANSFORMER, history_dir=tmp_path / "transformer", progress=False)
    history = History(tmp_path / "transformer")
    assert history.n_steps == 5 and history.optimizer == "adamw"
    final = history.params(5)
    assert all(torch.equal(final[name], p.detach()) for name, p in transformer.model.named_parameters())

    cnn = train_cnn(TINY_CNN, data_dir, history_dir=tmp_path / "cnn", progress=False)
    history = History(tmp_path / "cnn")
    assert history.n_steps == cnn.metrics["steps"] and history.optimizer == "sgd"


def test_recorded_histories_are_byte_identical_whatever_the_global_generators(tmp_path, data_dir):
    """The Recorder stores numpy's and Python's global generators in each resume state, and the
    pipeline's runs left them as the operating system had seeded them: two runs of the same stage
    wrote histories whose resume files differed (so did dvc.lock's md5 of them). Training seeds them."""
    import random

    def files(folder):
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    for run, draws in enumerate((1, 2)):
        np.random.rand(draws), random.random()  # generators left elsewhere by what ran before
        train_cnn(TINY_CNN, data_dir, history_dir=tmp_path / f"cnn{run}", progress=False)
        train_transformer(TINY_TRANSFORMER, history_dir=tmp_path / f"transformer{run}", progress=False)
    for name in ("cnn", "transformer"):
        first, second = files(tmp_path / f"{name}0"), files(tmp_path / f"{name}1")
        assert any(path.startswith("resume") for path in first) and first == second, name


def test_params_yaml_trains_the_transformer_default():
    """params.yaml's train_transformer section is TransformerConfig's default (the setting chosen
    in docs/grokking_search.md), so the pipeline and a bare TransformerConfig() run the same thing."""
    from pathlib import Path

    from explaind import pipeline

    params = pipeline.load_params("train_transformer", params_file=Path(__file__).parents[1] / "params.yaml")
    assert pipeline.make_config("train_transformer", params) == TransformerConfig()
