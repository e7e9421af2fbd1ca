"""vgcore.lightning: the monitor callback in real Lightning Trainers on the CPU (offline)."""

from __future__ import annotations

import copy
import csv
import importlib
import logging
import math
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pl = pytest.importorskip("lightning.pytorch")
pytest.importorskip("pandas")
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402
from torch import nn  # noqa: E402

from vgcore.lightning import GradientMonitorCallback  # noqa: E402
from vgcore.torch import resolve_layers  # noqa: E402


class Block(nn.Module):
    """``x + sigmoid(W LN(x))`` (``residual=True``) or ``sigmoid(W x)``."""

    def __init__(self, width: int, residual: bool) -> None:
        super().__init__()
        self.residual = residual
        self.norm = nn.LayerNorm(width) if residual else nn.Identity()
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.sigmoid(self.linear(self.norm(x)))
        return x + y if self.residual else y


class Net(pl.LightningModule):
    """``depth`` blocks in an ``nn.ModuleList`` and a linear head; loss: mean squared output."""

    def __init__(self, depth: int = 4, width: int = 8, residual: bool = True, lr: float = 0.1) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, residual) for _ in range(depth))
        self.head = nn.Linear(width, 1)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class TwoOptimizerNet(Net):
    """Manual optimization: one SGD for the first two blocks, another for the rest, stepped in turn."""

    def __init__(self) -> None:
        super().__init__(depth=4)
        self.automatic_optimization = False

    def split(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        first = [p for block in self.blocks[:2] for p in block.parameters()]
        ids = {id(p) for p in first}
        return first, [p for p in self.parameters() if id(p) not in ids]

    def training_step(self, batch, batch_idx):
        (x,) = batch
        for optimizer, scale in zip(self.optimizers(), (1.0, 3.0), strict=True):
            optimizer.zero_grad()
            self.manual_backward(scale * self(x).pow(2).mean())
            optimizer.step()

    def configure_optimizers(self):
        first, rest = self.split()
        return [torch.optim.SGD(first, lr=0.1), torch.optim.SGD(rest, lr=0.1)]


def make_trainer(tmp_path, callback, **kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        logger=CSVLogger(tmp_path, name="run"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[callback],
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def loader(samples: int, batch: int, width: int = 8, seed: int = 0):
    x = torch.randn(samples, width, generator=torch.Generator().manual_seed(seed))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=batch, shuffle=False)


def layer_norms(model: nn.Module) -> np.ndarray:
    """Per-block norms of the model's current gradients (float64), by plain arithmetic."""
    return np.array([
        math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params if p.grad is not None))
        for params in resolve_layers(model).values()
    ])


def read_csv_metrics(tmp_path, name: str = "run") -> list[dict[str, str]]:
    (path,) = tmp_path.glob(f"{name}/version_*/metrics.csv")
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_recorded_norms_are_the_unscaled_accumulated_pre_clip_gradients(tmp_path, precision):
    torch.manual_seed(0)
    model = Net()
    reference = copy.deepcopy(model)
    clip = 1e-3
    callback = GradientMonitorCallback(every=1)
    if precision == "16-mixed":
        # Lightning runs fp16 on the CPU only through an explicit plugin; the scaler makes the gradients
        # 4096x larger until it unscales them
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        precision_args = dict(plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    else:
        precision_args = dict(precision="bf16-mixed")
    trainer = make_trainer(
        tmp_path, callback, max_steps=2, accumulate_grad_batches=2, gradient_clip_val=clip,
        log_every_n_steps=1, **precision_args,
    )
    data = loader(16, 4)
    trainer.fit(model, data)

    # by hand: each micro-batch's loss / 2 under the same autocast, summed; then clip and SGD
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    batches = [x for (x,) in data]
    expected = []
    for step in range(2):
        optimizer.zero_grad()
        for (x) in batches[2 * step : 2 * step + 2]:
            with torch.autocast("cpu", dtype=dtype):
                loss = reference(x).pow(2).mean()
            (loss / 2).backward()
        expected.append(layer_norms(reference))
        torch.nn.utils.clip_grad_norm_(reference.parameters(), clip)
        optimizer.step()

    monitor = callback.monitor
    history = monitor.history
    assert list(history.index) == [0, 1]
    assert monitor.layer_names == [f"blocks.{i}" for i in range(4)]
    np.testing.assert_allclose(history[monitor.layer_names].to_numpy(), expected, rtol=2e-3)
    assert (history["total"] > 100 * clip).all()  # clipped afterwards: these are pre-clip norms
    assert monitor.max_norm == clip  # taken from gradient_clip_val
    assert monitor.clipping() == pytest.approx((1.0, np.mean(clip / history["total"].to_numpy())))

    trainer.logger.save()
    rows = [r for r in read_csv_metrics(tmp_path) if r.get("grad_norm/blocks.0")]
    assert len(rows) == 2
    logged = np.array([[float(r[f"grad_norm/{name}"]) for name in [*monitor.layer_names, "total"]]
                       for r in rows])
    np.testing.assert_allclose(logged, history.to_numpy(), rtol=1e-6)


def test_two_optimizers_each_measured_at_its_own_step(tmp_path):
    torch.manual_seed(1)
    model = TwoOptimizerNet()
    reference = copy.deepcopy(model)
    callback = GradientMonitorCallback()
    trainer = make_trainer(tmp_path, callback, max_steps=4, logger=False)
    data = loader(8, 4)
    trainer.fit(model, data)

    first, rest = reference.split()
    optimizers = [torch.optim.SGD(first, lr=0.1), torch.optim.SGD(rest, lr=0.1)]
    names = list(resolve_layers(reference))
    expected = []
    for (x,) in data:
        row = np.zeros(len(names))
        for optimizer, scale, layers in zip(optimizers, (1.0, 3.0), ([0, 1], [2, 3]), strict=True):
            optimizer.zero_grad()
            (scale * reference(x).pow(2).mean()).backward()
            row[layers] = layer_norms(reference)[layers]
            optimizer.step()
        expected.append(row)
    history = callback.monitor.history
    assert len(history) == 2  # one row per training batch, both optimizers in it
    np.testing.assert_allclose(history[names].to_numpy(), expected, rtol=1e-5)


def test_sigmoid_mlp_is_flagged_vanishing_and_its_residual_twin_is_not(tmp_path, caplog):
    data = loader(64, 64, width=32, seed=3)
    results = {}
    for residual in (False, True):
        torch.manual_seed(2)
        callback = GradientMonitorCallback()
        logger = CSVLogger(tmp_path, name=f"residual_{residual}")
        trainer = make_trainer(tmp_path, callback, max_epochs=1, logger=logger)
        with caplog.at_level(logging.WARNING, logger="vgcore.lightning"):
            trainer.fit(Net(depth=20, width=32, residual=residual, lr=1e-3), data)
        results[residual] = callback.findings[0]
        if not residual:
            assert any("vanishing" in record.getMessage() for record in caplog.records)
        caplog.clear()
    assert [f.kind for f in results[False]] == ["vanishing"]
    assert "blocks.0" in results[False][0].layers
    assert results[True] == []
    for residual, count in ((False, 1.0), (True, 0.0)):
        rows = read_csv_metrics(tmp_path, f"residual_{residual}")
        (row,) = [r for r in rows if r.get("grad_findings/vanishing")]
        assert float(row["grad_findings/vanishing"]) == count
        imbalance = float(row["grad_profile/imbalance"])
        assert imbalance > 1e3 if count else imbalance < 2


def test_every_logs_every_nth_step(tmp_path):
    callback = GradientMonitorCallback(every=3)
    trainer = make_trainer(tmp_path, callback, max_steps=7)
    trainer.fit(Net(), loader(28, 4))
    trainer.logger.save()
    rows = [r for r in read_csv_metrics(tmp_path) if r.get("grad_norm/total")]
    assert len(callback.monitor.history) == 7
    assert [int(r["step"]) for r in rows] == [3, 6]  # after steps 3 and 6 (global_step)


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        (dict(every=0), ValueError, "every"),
        (dict(every=1.5), TypeError, "every"),
        (dict(max_norm=-1.0), ValueError, "max_norm"),
        (dict(prefix=3), TypeError, "prefix"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, error, name):
    with pytest.raises(error, match=name):
        GradientMonitorCallback(**kwargs)


def test_without_lightning_the_import_error_names_the_extra(monkeypatch):
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning", "vgcore.lightning"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "vgcore.lightning")
    with pytest.raises(ImportError, match=r"pip install vgcore\[lightning\]"):
        importlib.import_module("vgcore.lightning")
