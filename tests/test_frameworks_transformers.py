"""vgcore.transformers: the monitor callback in a real Hugging Face Trainer on the CPU (offline)."""

from __future__ import annotations

import copy
import importlib
import logging
import math
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("pandas")
from torch import nn  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments  # noqa: E402

from vgcore.torch import llrd_param_groups, resolve_layers  # noqa: E402
from vgcore.transformers import GradientMonitorCallback  # noqa: E402

transformers.logging.set_verbosity_error()


def tiny_bert(seed: int = 0, layers: int = 4) -> BertForSequenceClassification:
    config = BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
    )
    torch.manual_seed(seed)
    return BertForSequenceClassification(config)


class Examples(torch.utils.data.Dataset):
    """``count`` random token sequences of length 8 with labels 0..2 (the Trainer's dict format)."""

    def __init__(self, count: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(0, 40, (count, 8), generator=generator)
        self.labels = torch.randint(0, 3, (count,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {
            "input_ids": self.input_ids[index],
            "attention_mask": torch.ones(8, dtype=torch.long),
            "labels": self.labels[index],
        }


def arguments(tmp_path, **kwargs) -> TrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=2, logging_steps=1,
        report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
        optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", weight_decay=0.0,
        dataloader_num_workers=0,
    )
    defaults.update(kwargs)
    return TrainingArguments(**defaults)


def block_norms(model: nn.Module) -> np.ndarray:
    return np.array([
        math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params if p.grad is not None))
        for params in resolve_layers(model).values()
    ])


def test_recorded_norms_are_the_accumulated_pre_clip_gradients_and_reach_log_history(tmp_path):
    model = tiny_bert()
    reference = copy.deepcopy(model)
    data = Examples(16)
    clip = 1e-3
    callback = GradientMonitorCallback()
    whole = GradientMonitorCallback(layers={"model": model})  # one layer holding every parameter
    # 2 micro-batches of 8 make each step: every step sees all 16 examples, in some order
    trainer = Trainer(
        model=model, args=arguments(tmp_path, gradient_accumulation_steps=2, max_grad_norm=clip),
        train_dataset=data, callbacks=[callback, whole],
    )
    trainer.train()

    # by hand: the sum over the 2 micro-batches of the loss the Trainer backpropagates (the model's
    # mean loss, divided by 2 unless the Trainer leaves that to the model's loss kwargs); then clip
    # to `clip` and an SGD step
    per_micro_batch = 1.0 if trainer.model_accepts_loss_kwargs else 0.5
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    expected = []
    for _ in range(2):
        optimizer.zero_grad()
        for half in (slice(0, 8), slice(8, 16)):
            batch = {k: torch.stack([data[i][k] for i in range(16)[half]]) for k in ("input_ids", "labels")}
            (reference(**batch).loss * per_micro_batch).backward()
        expected.append(block_norms(reference))
        torch.nn.utils.clip_grad_norm_(reference.parameters(), clip)
        optimizer.step()

    monitor = callback.monitor
    names = [f"bert.encoder.layer.{i}" for i in range(4)]
    assert monitor.layer_names == names
    history = monitor.history
    np.testing.assert_allclose(history[names].to_numpy(), expected, rtol=1e-4)
    assert (history["total"] > 10 * clip).all()  # the Trainer clipped afterwards
    assert monitor.max_norm == clip

    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [1, 2]
    for entry, (_, row) in zip(logs, history.iterrows(), strict=True):
        for name in [*names, "total"]:
            assert entry[f"grad_norm/{name}"] == pytest.approx(row[name], rel=1e-12)
    # independent of the loss normalisation: over every parameter, the total is the pre-clip norm the
    # Trainer itself logs as grad_norm
    np.testing.assert_allclose(
        whole.monitor.history["total"].to_numpy(), [entry["grad_norm"] for entry in logs], rtol=1e-5
    )


def test_the_callback_moves_before_the_reporters_so_they_receive_the_norms(tmp_path):
    received = []

    class Reporter(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            received.append(dict(logs))

    callback = GradientMonitorCallback()
    trainer = Trainer(model=tiny_bert(), args=arguments(tmp_path), train_dataset=Examples(16))
    # a reporting integration ahead of the user's callback, as report_to= puts them
    trainer.callback_handler.callbacks.insert(1, Reporter())
    trainer.add_callback(callback)
    trainer.train()
    training = [r for r in received if "loss" in r]
    assert len(training) == 2 and all("grad_norm/bert.encoder.layer.0" in r for r in training)


def test_sigmoid_mlp_is_flagged_vanishing_and_its_residual_twin_is_not(tmp_path, caplog):
    class Block(nn.Module):
        def __init__(self, width: int, residual: bool) -> None:
            super().__init__()
            self.residual = residual
            self.norm = nn.LayerNorm(width) if residual else nn.Identity()
            self.linear = nn.Linear(width, width)

        def forward(self, x):
            y = torch.sigmoid(self.linear(self.norm(x)))
            return x + y if self.residual else y

    class Net(nn.Module):
        def __init__(self, residual: bool) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(Block(32, residual) for _ in range(20))
            self.head = nn.Linear(32, 1)

        def forward(self, x, labels=None):
            for block in self.blocks:
                x = block(x)
            return {"loss": self.head(x).pow(2).mean()}

    class Inputs(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.x = torch.randn(64, 32, generator=torch.Generator().manual_seed(3))

        def __len__(self) -> int:
            return 64

        def __getitem__(self, index):
            return {"x": self.x[index], "labels": torch.tensor(0.0)}

    findings = {}
    for residual in (False, True):
        torch.manual_seed(4)
        callback = GradientMonitorCallback()
        args = arguments(tmp_path, per_device_train_batch_size=64, max_steps=-1, num_train_epochs=1,
                         learning_rate=1e-3, remove_unused_columns=False, max_grad_norm=0.0)
        trainer = Trainer(model=Net(residual), args=args, train_dataset=Inputs(), callbacks=[callback])
        with caplog.at_level(logging.WARNING, logger="vgcore.transformers"):
            trainer.train()
        findings[residual] = callback.findings[0]
        if not residual:
            assert any("vanishing" in r.getMessage() for r in caplog.records)
        key = "grad_findings/vanishing"
        counts = [entry[key] for entry in trainer.state.log_history if key in entry]
        assert counts == [0.0 if residual else 1.0]
    assert [f.kind for f in findings[False]] == ["vanishing"]
    assert "blocks.0" in findings[False][0].layers
    assert findings[True] == []


def test_llrd_param_groups_through_the_trainer_optimizers_argument(tmp_path):
    model = tiny_bert(layers=3)
    groups = llrd_param_groups(model, base_lr=1e-2, decay=0.5)
    trainer = Trainer(
        model=model, args=arguments(tmp_path, max_steps=1), train_dataset=Examples(8),
        optimizers=(torch.optim.AdamW(groups), None), callbacks=[GradientMonitorCallback()],
    )
    trainer.train()
    lrs = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    # the Trainer's (constant) schedule keeps each group's rate
    assert lrs["bert.encoder.layer.2"] == pytest.approx(1e-2)
    assert lrs["bert.encoder.layer.0"] == pytest.approx(1e-2 * 0.25)
    assert lrs["embeddings"] == pytest.approx(1e-2 * 0.125)


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        (dict(every=0), ValueError, "every"),
        (dict(max_norm=0.0), ValueError, "max_norm"),
        (dict(prefix=None), TypeError, "prefix"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, error, name):
    with pytest.raises(error, match=name):
        GradientMonitorCallback(**kwargs)


def test_without_transformers_the_import_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "vgcore.transformers")
    with pytest.raises(ImportError, match=r"pip install vgcore\[transformers\]"):
        importlib.import_module("vgcore.transformers")
