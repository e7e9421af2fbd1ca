"""vgcore.torch: the gradient monitor, its findings, LLRD parameter groups and freezing."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pandas")
from conftest import child_environment  # noqa: E402
from torch import nn  # noqa: E402

from vgcore.torch import (  # noqa: E402
    GradientMonitor,
    auto_decay,
    freeze_layers,
    llrd_param_groups,
    resolve_layers,
)

# --------------------------------------------------------------------------
# Models


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


class Encoder(nn.Module):
    """Embedding -> ModuleList of blocks -> head, as a transformer encoder lays itself out."""

    def __init__(self, depth: int = 4, width: int = 8, residual: bool = True, vocab: int = 11) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(Block(width, residual) for _ in range(depth))
        self.head = nn.Linear(width, 3)

    def forward(self, tokens: torch.Tensor, skip: int | None = None) -> torch.Tensor:
        x = self.embed(tokens).mean(dim=1)
        for index, block in enumerate(self.blocks):
            if index != skip:
                x = block(x)
        return self.head(x)


def sigmoid_mlp(depth: int, width: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Sigmoid()]
    return nn.Sequential(*layers)


def reference_norms(
    model: nn.Module, loss: torch.Tensor, groups: dict[str, list[nn.Parameter]]
) -> np.ndarray:
    """Per-group gradient norms by plain autograd, independent of any hook."""
    params = [p for ps in groups.values() for p in ps]
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    by_id = {id(p): g for p, g in zip(params, grads, strict=True)}
    out = []
    for ps in groups.values():
        total = sum(float((by_id[id(p)].double() ** 2).sum()) for p in ps if by_id[id(p)] is not None)
        out.append(math.sqrt(total))
    return np.array(out)


def layer_rows(monitor: GradientMonitor) -> np.ndarray:
    """The monitor's recorded per-layer norms (steps, layers), without the total column."""
    return monitor.history[monitor.layer_names].to_numpy()


def grad_norms(groups: dict[str, list[nn.Parameter]]) -> list[float]:
    """Per-group norms of the parameters' current ``.grad``, in float64."""
    return [math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in ps)) for ps in groups.values()]


def tokens(seed: int, batch: int = 16, length: int = 5, vocab: int = 11) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------
# Import behaviour


def run_child(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -c code`` importing the vgcore under test, from a neutral directory."""
    return subprocess.run(
        [sys.executable, "-c", code],
        env=child_environment(),
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )


def test_import_vgcore_does_not_import_torch(tmp_path):
    frameworks = ("torch", "lightning", "pytorch_lightning", "transformers", "jax", "optax")
    out = run_child(f"import sys, vgcore; print([m for m in {frameworks!r} if m in sys.modules])", tmp_path)
    assert out.stdout.strip() == "[]"


def test_import_without_torch_names_the_extra(tmp_path):
    code = (
        "import sys\nsys.modules['torch'] = None\n"
        "try:\n    import vgcore.torch\nexcept ImportError as e:\n    print('ERR', e)\n"
    )
    out = run_child(code, tmp_path)
    assert out.stdout.startswith("ERR")
    assert "pip install vgcore[torch]" in out.stdout


# --------------------------------------------------------------------------
# Layer grouping and exact norms


def test_default_layers_are_blocks_of_the_largest_module_list():
    model = Encoder(depth=5)
    layers = resolve_layers(model)
    assert list(layers) == [f"blocks.{i}" for i in range(5)]
    assert [len(ps) for ps in layers.values()] == [4] * 5  # LayerNorm w, b; Linear w, b


def test_default_layers_without_module_list_are_parameter_owning_modules():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    assert list(resolve_layers(model)) == ["0", "2"]


def test_norms_equal_autograd_norms_per_linear_layer():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    x = torch.randn(12, 6, dtype=torch.float64)
    with GradientMonitor(model) as monitor:
        loss = model(x).pow(2).mean()
        expected = reference_norms(model, loss, resolve_layers(model))
        loss.backward()
        monitor.step()
        history = monitor.history
    assert list(history.columns) == ["0", "2", "4", "total"]
    assert history.shape == (1, 4)
    np.testing.assert_allclose(history.iloc[0, :3].to_numpy(), expected, rtol=1e-6)
    assert history["total"].iloc[0] == pytest.approx(math.sqrt(np.sum(expected**2)), rel=1e-6)


def test_norms_equal_autograd_norms_per_block():
    torch.manual_seed(2)
    model = Encoder(depth=4)
    batch = tokens(0)
    with GradientMonitor(model) as monitor:
        loss = nn.functional.cross_entropy(model(batch), torch.arange(16) % 3)
        expected = reference_norms(model, loss, resolve_layers(model))
        loss.backward()
        monitor.step()
        got = layer_rows(monitor)[0]
    assert np.all(expected > 0)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_explicit_layers_as_names_and_mapping():
    model = Encoder(depth=3)
    by_names = GradientMonitor(model, layers=["embed", "blocks.0", "head"])
    by_mapping = GradientMonitor(model, layers={"bottom": model.blocks[0], "top": [model.head.weight]})
    try:
        assert by_names.layer_names == ["embed", "blocks.0", "head"]
        assert by_mapping.layer_names == ["bottom", "top"]
        loss = model(tokens(1)).sum()
        expected = reference_norms(model, loss, {"w": [model.head.weight]})
        loss.backward()
        by_mapping.step()
        assert by_mapping.history["top"].iloc[0] == pytest.approx(expected[0], rel=1e-6)
    finally:
        by_names.close()
        by_mapping.close()


def test_inplace_relu_norms_equal_autograd():
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(inplace=True), nn.Linear(16, 16), nn.ReLU(inplace=True), nn.Linear(16, 1)
    )
    x = torch.randn(32, 8)
    with GradientMonitor(model) as monitor:
        loss = model(x).pow(2).mean()
        expected = reference_norms(model, loss, resolve_layers(model))
        loss.backward()
        monitor.step()
        got = layer_rows(monitor)[0]
    assert np.all(expected > 0)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_gradient_accumulation_records_the_norm_of_the_summed_gradient():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2))
    batches = [torch.randn(8, 5) for _ in range(3)]
    groups = resolve_layers(model)
    params = [p for ps in groups.values() for p in ps]
    summed = [torch.zeros_like(p) for p in params]
    for x in batches:
        for total, g in zip(summed, torch.autograd.grad(model(x).pow(2).mean(), params), strict=True):
            total += g
    squares = {id(p): float(s.double().pow(2).sum()) for p, s in zip(params, summed, strict=True)}
    expected = [math.sqrt(sum(squares[id(p)] for p in ps)) for ps in groups.values()]
    single = reference_norms(model, model(batches[-1]).pow(2).mean(), groups)
    with GradientMonitor(model) as monitor:
        for x in batches:
            model(x).pow(2).mean().backward()
        monitor.step()
        got = layer_rows(monitor)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert not np.allclose(got, single, rtol=1e-3)  # not the last micro-batch's alone


def test_zero_grad_after_backward_does_not_change_the_recorded_norm():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    x = torch.randn(10, 4)
    with GradientMonitor(model) as monitor:
        loss = model(x).sum()
        expected = reference_norms(model, loss, resolve_layers(model))
        loss.backward()
        model.zero_grad(set_to_none=True)  # before monitor.step()
        monitor.step()
        np.testing.assert_allclose(layer_rows(monitor)[0], expected, rtol=1e-5)


def test_fused_norms_of_mixed_dtypes_equal_plain_norms():
    # the end-of-backward path that accelerator gradients take
    generator = torch.Generator().manual_seed(14)
    grads = [
        torch.randn(7, 3, generator=generator),
        torch.randn(5, generator=generator, dtype=torch.float64),
        (300 * torch.randn(4, 4, generator=generator)).to(torch.bfloat16),
        torch.full((4096,), 60000.0, dtype=torch.float16),  # its norm overflows float16
    ]
    norms = GradientMonitor._norms(grads)
    assert norms.dtype == torch.float64
    expected = [float(torch.linalg.vector_norm(g.double())) for g in grads]
    np.testing.assert_allclose(norms.numpy(), expected, rtol=1e-5)  # float32 accumulation
    assert math.isfinite(float(norms[3]))


def test_sparse_embedding_gradient():
    torch.manual_seed(15)
    model = nn.Sequential(nn.Embedding(20, 4, sparse=True), nn.Linear(4, 1))
    batch = torch.tensor([[1, 2, 2], [5, 1, 7]])
    with GradientMonitor(model) as monitor:
        loss = model(batch).pow(2).mean()
        expected = reference_norms(model, loss, resolve_layers(model))
        loss.backward()
        assert model[0].weight.grad.is_sparse
        monitor.step()
        got = layer_rows(monitor)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_grad_scaler_norms_are_unscaled():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1))
    x = torch.randn(10, 4)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    with GradientMonitor(model, scaler=scaler) as monitor:
        loss = model(x).pow(2).mean()
        expected = reference_norms(model, loss, resolve_layers(model))
        scaler.scale(loss).backward()
        raw = model[0].weight.grad.norm().item()
        monitor.step()
        got = layer_rows(monitor)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert raw > 1000 * got[0]  # the gradients themselves were scaled


# --------------------------------------------------------------------------
# Steps, history and hooks


def test_every_defers_the_host_copy_and_history_flushes():
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1))
    with GradientMonitor(model, every=3, step_on_backward=False) as monitor:
        for _ in range(2):
            model(torch.randn(4, 3)).sum().backward()
            monitor.step()
        assert len(monitor._pending) == 2 and not len(monitor._history)  # still on the device
        model(torch.randn(4, 3)).sum().backward()
        monitor.step()
        assert not monitor._pending and len(monitor._history) == 3  # one copy for three steps
        model(torch.randn(4, 3)).sum().backward()
        monitor.step()
        history = monitor.history  # reading flushes the partial batch
    assert list(history.index) == [0, 1, 2, 3]
    assert history.index.name == "step"
    assert np.all(history.to_numpy() > 0)


def test_optimizer_drives_the_steps_and_steps_without_backward_are_not_recorded():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradientMonitor(model, optimizer=optimizer) as monitor:
        for _ in range(4):
            model(torch.randn(4, 3)).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        optimizer.step()  # no backward since the last step
        assert monitor.steps == 5
        assert list(monitor.history.index) == [0, 1, 2, 3]


def test_without_optimizer_or_step_every_backward_pass_ends_a_step():
    torch.manual_seed(17)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    batches = [torch.randn(5, 3) for _ in range(3)]
    expected = []
    with GradientMonitor(model) as monitor:
        for x in batches:
            model.zero_grad()
            loss = model(x).pow(2).mean()
            expected.append(reference_norms(model, loss, resolve_layers(model)))
            loss.backward()
        assert monitor.steps == 3
        np.testing.assert_allclose(layer_rows(monitor), expected, rtol=1e-5)
        assert list(monitor.history.index) == [0, 1, 2]


def test_first_step_call_takes_the_earlier_backward_passes_as_its_micro_batches():
    torch.manual_seed(18)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    groups = resolve_layers(model)
    micro = [torch.randn(5, 3) for _ in range(4)]
    with GradientMonitor(model) as monitor:
        for x in micro[:2]:  # step 0: two micro-batches, then the first explicit step()
            model(x).pow(2).mean().backward()
        accumulated = grad_norms(groups)
        assert len(monitor.history) == 2  # until step() is called, each backward pass is a step
        monitor.step()
        model.zero_grad()
        for x in micro[2:]:  # step 1: explicit from now on, two micro-batches make one row
            model(x).pow(2).mean().backward()
        accumulated_1 = grad_norms(groups)
        monitor.step()
        assert monitor.steps == 2
        assert list(monitor.history.index) == [0, 1]
        np.testing.assert_allclose(layer_rows(monitor), [accumulated, accumulated_1], rtol=1e-5)


def test_without_hooks_step_measures_the_gradients_as_they_stand_and_measure_takes_a_subset():
    torch.manual_seed(19)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    with GradientMonitor(model, hooks=False) as monitor:
        assert monitor.num_hooks == 0
        loss = model(torch.randn(6, 3)).pow(2).mean()
        expected = reference_norms(model, loss, resolve_layers(model))
        loss.backward()
        assert len(monitor.history) == 0  # no hook saw the backward pass
        monitor.step()
        np.testing.assert_allclose(layer_rows(monitor)[0], expected, rtol=1e-5)
        # measure() of one layer's parameters, with a loss scale to divide out
        for p in model.parameters():
            p.grad.mul_(8.0)
        monitor.measure(model[2].parameters(), scale=8.0)
        monitor.step()
        row = layer_rows(monitor)[1]
        assert row[0] == 0.0  # not measured in this step: no gradient seen
        assert row[1] == pytest.approx(expected[1], rel=1e-5)
    with pytest.raises(ValueError, match="step_on_backward"):
        GradientMonitor(model, hooks=False, step_on_backward=True)


def run_with_known_totals(
    scales: list[float], max_norm: float | None = None
) -> tuple[GradientMonitor, float]:
    """A monitor over steps whose gradients are ``scale * g`` for one fixed g; returns it and ||g||."""
    torch.manual_seed(20)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    base = reference_norms(model, model(x).pow(2).mean(), resolve_layers(model))
    monitor = GradientMonitor(model, max_norm=max_norm)
    for scale in scales:
        model.zero_grad()
        (scale * model(x).pow(2).mean()).backward()
        monitor.step()
    monitor.close()
    return monitor, float(np.sqrt(np.sum(base**2)))


def test_clipping_fraction_and_mean_coefficient_are_exact_on_known_norms():
    scales = [1.0, 2.0, 4.0, 8.0, 0.5]
    monitor, base = run_with_known_totals(scales)
    max_norm = 3.0 * base  # steps with scale 4 and 8 are clipped, 1, 2, 0.5 are not
    totals = monitor.history["total"].to_numpy()
    np.testing.assert_allclose(totals, np.array(scales) * base, rtol=1e-12)
    fraction, coefficient = monitor.clipping(max_norm)
    assert fraction == 2 / 5
    assert coefficient == pytest.approx((max_norm / (4 * base) + max_norm / (8 * base)) / 2, rel=1e-12)
    assert monitor.clipping(max_norm, window=2) == pytest.approx((0.5, max_norm / (8 * base)), rel=1e-12)
    none = monitor.clipping(100 * base)
    assert none.fraction == 0.0 and math.isnan(none.mean_coefficient)
    # the torch clip applies the same factor to the same gradients
    assert monitor.clipping(1e-9 * base).fraction == 1.0


def test_clipping_and_exploding_over_time_findings():
    growing = [2.0**k for k in range(6)]  # the total doubles every step: x32 across the window
    monitor, _ = run_with_known_totals(growing, max_norm=1e-9)
    kinds = [f.kind for f in monitor.check(window=6, max_norm=1e12)]
    assert "clipping" in kinds
    over_time = [f for f in monitor.check(window=6, max_norm=1e12) if "exponentially" in f.message]
    assert over_time and over_time[0].kind == "exploding"
    assert over_time[0].value == pytest.approx(32.0, rel=1e-6)
    slower = monitor.check(window=6, max_norm=1e12, growth_threshold=64)
    assert not [f for f in slower if "exponent" in f.message]
    steady, _ = run_with_known_totals([1.0, 1.1, 0.9, 1.0, 1.05, 0.95], max_norm=1e9)
    assert steady.check(window=6) == []
    with pytest.raises(ValueError, match="max_norm"):
        GradientMonitor(nn.Linear(2, 2), max_norm=0.0)


def test_close_removes_every_hook():
    model = Encoder(depth=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [len(p._post_accumulate_grad_hooks or {}) for p in model.parameters()]
    monitor = GradientMonitor(model, optimizer=optimizer)
    layers = resolve_layers(model).values()
    triggers = [p for ps in layers for p in (ps[0], ps[-1])]  # first and last of each layer
    assert monitor.num_hooks == len(triggers) + 1  # and the optimizer's step post-hook
    assert all(len(p._post_accumulate_grad_hooks) == 1 for p in triggers)
    model(tokens(2)).sum().backward()
    optimizer.step()
    monitor.close()
    assert monitor.num_hooks == 0
    assert [len(p._post_accumulate_grad_hooks or {}) for p in model.parameters()] == before
    rows = len(monitor.history)
    model(tokens(3)).sum().backward()
    optimizer.step()  # the step post-hook is gone too
    assert len(monitor.history) == rows == 1
    assert not monitor._reached and not monitor._callback_queued
    with pytest.raises(RuntimeError, match="closed"):
        monitor.step()
    monitor.close()  # idempotent


def test_context_manager_closes_on_error():
    model = nn.Linear(2, 2)
    with pytest.raises(ZeroDivisionError), GradientMonitor(model, layers=[model]) as monitor:
        raise ZeroDivisionError
    assert monitor.num_hooks == 0
    assert not model.weight._post_accumulate_grad_hooks


# --------------------------------------------------------------------------
# Findings


def run_one_step(model: nn.Module, x: torch.Tensor, **monitor_kwargs) -> GradientMonitor:
    monitor = GradientMonitor(model, **monitor_kwargs)
    model(x).pow(2).mean().backward()
    monitor.step()
    monitor.close()
    return monitor


class DeepNet(nn.Module):
    """``depth`` blocks in an ``nn.ModuleList`` (the monitor's default layers), then a linear readout."""

    def __init__(self, depth: int, width: int, residual: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, residual) for _ in range(depth))
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_deep_sigmoid_mlp_is_vanishing_and_residual_layernorm_is_not(seed):
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    plain = DeepNet(20, 32, residual=False)
    torch.manual_seed(seed)
    residual = DeepNet(20, 32, residual=True)

    plain_monitor = run_one_step(plain, x)
    findings = plain_monitor.check()
    assert [f.kind for f in findings] == ["vanishing"]
    assert plain_monitor.profile()["imbalance"] > 1e3
    assert plain_monitor.profile()["chi"] < 0.5
    assert "blocks.0" in findings[0].layers and "blocks.19" not in findings[0].layers

    residual_monitor = run_one_step(residual, x)
    profile = residual_monitor.profile()
    assert residual_monitor.layer_names == plain_monitor.layer_names  # the same 20 blocks
    assert residual_monitor.check() == []
    assert 0.5 < profile["imbalance"] < 2
    assert 0.8 < profile["chi"] < 1.25
    assert profile["layers"] == residual_monitor.layer_names


def test_frozen_layers_are_frozen_not_vanished():
    torch.manual_seed(8)
    model = Encoder(depth=8)
    frozen = freeze_layers(model, first=4)
    assert frozen == ["embeddings", "blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    monitor = run_one_step(model, tokens(4))
    history = monitor.history
    assert history.iloc[0, :4].isna().all() and (history.iloc[0, 4:8] > 0).all()
    # the total is over the layers not frozen
    assert history["total"].iloc[0] == pytest.approx(np.sqrt(np.square(history.iloc[0, 4:8]).sum()))
    findings = monitor.check()
    assert [f.kind for f in findings] == ["frozen"]
    assert findings[0].layers == ("blocks.0", "blocks.1", "blocks.2", "blocks.3")
    profile = monitor.profile()
    assert profile["frozen"] == list(findings[0].layers)
    assert profile["layers"] == ["blocks.4", "blocks.5", "blocks.6", "blocks.7"]
    assert math.isfinite(profile["total_norm"])


def test_layers_frozen_when_the_monitor_starts_are_watched_once_unfrozen():
    torch.manual_seed(13)
    model = Encoder(depth=4)
    freeze_layers(model, first=2)
    with GradientMonitor(model) as monitor:
        assert all(not p.requires_grad for p in model.blocks[0].parameters())  # left as it was
        model(tokens(6)).sum().backward()
        monitor.step()
        for p in model.parameters():
            p.requires_grad_(True)
        model.zero_grad()
        loss = model(tokens(7)).sum()
        expected = reference_norms(model, loss, resolve_layers(model))
        loss.backward()
        monitor.step()
        history = layer_rows(monitor)
    assert np.isnan(history[0, :2]).all()
    np.testing.assert_allclose(history[1], expected, rtol=1e-5)


def test_layer_whose_hooked_parameters_are_frozen_is_still_measured():
    torch.manual_seed(16)
    model = Encoder(depth=3)
    block = model.blocks[1]
    for p in (block.norm.weight, block.norm.bias, block.linear.bias):  # its first and last parameters
        p.requires_grad_(False)
    with GradientMonitor(model) as monitor:
        loss = model(tokens(8)).sum()
        expected = reference_norms(model, loss, {"w": [block.linear.weight]})[0]
        loss.backward()
        monitor.step()
        assert monitor.history["blocks.1"].iloc[0] == pytest.approx(expected, rel=1e-5)
        assert expected > 0


def test_dead_layer_is_dead_not_frozen():
    torch.manual_seed(9)
    model = Encoder(depth=4)
    monitor = GradientMonitor(model)
    loss = nn.functional.cross_entropy(model(tokens(5), skip=1), torch.arange(16) % 3)
    loss.backward()
    monitor.step()
    monitor.close()
    assert monitor.history["blocks.1"].iloc[0] == 0.0
    kinds = {f.kind: f for f in monitor.check()}
    assert "frozen" not in kinds
    assert kinds["dead"].layers == ("blocks.1",)


def test_exploding_total_norm_and_non_finite_gradients():
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    x = torch.randn(8, 4)
    monitor = GradientMonitor(model)
    (1e6 * model(x).pow(2).mean()).backward()
    monitor.step()
    total = monitor.profile()["total_norm"]
    assert total > 1e3
    too_large = [f for f in monitor.check(max_norm=1e3) if "max_norm" in f.message]
    assert [f.kind for f in too_large] == ["exploding"] and too_large[0].value == pytest.approx(total)
    assert not [f for f in monitor.check(max_norm=10 * total) if "max_norm" in f.message]
    model.zero_grad()
    (model(x).sum() * float("nan")).backward()
    monitor.step()
    findings = monitor.check()
    monitor.close()
    assert findings[0].kind == "exploding" and findings[0].layers == ("0", "2")
    assert "non-finite" in findings[0].message


def test_check_logs_findings(caplog):
    torch.manual_seed(11)
    model = nn.Sequential(sigmoid_mlp(12, 16), nn.Linear(16, 1))
    monitor = run_one_step(model, torch.randn(32, 16))
    with caplog.at_level(logging.WARNING, logger="vgcore.torch"):
        findings = monitor.check(log=True)
    assert findings and findings[0].kind == "vanishing"
    assert any("vanishing" in r.getMessage() and "imbalance" in r.getMessage() for r in caplog.records)
    caplog.clear()
    monitor.check()
    assert not caplog.records


def test_profile_window_is_a_geometric_mean_and_no_step_raises():
    model = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 1))
    monitor = GradientMonitor(model)
    with pytest.raises(RuntimeError, match="no step recorded"):
        monitor.profile()
    for scale in (1.0, 4.0):
        model.zero_grad()
        (scale * model(torch.ones(3, 2)).sum()).backward()
        monitor.step()
    monitor.close()
    rows = layer_rows(monitor)
    geometric = np.sqrt(rows[0] * rows[1])
    got = monitor.profile(window=2)["grad_norm"]
    np.testing.assert_allclose(list(got.values()), geometric, rtol=1e-12)
    np.testing.assert_allclose(rows[1], 4 * rows[0], rtol=1e-5)


def test_defect9_frozen_monitor_message_after_step():
    """Issue 17, defect 9: a monitor whose parameters are all frozen said "call monitor.step()"
    after step() was called; it says that every watched parameter is frozen, naming the layers."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    for p in model.parameters():
        p.requires_grad_(False)
    monitor = GradientMonitor(model)
    with pytest.raises(RuntimeError, match="no step recorded") as before:
        monitor.profile()
    assert "call monitor.step()" in str(before.value)  # step() not called yet: unchanged advice
    model(torch.randn(5, 3, requires_grad=True)).sum().backward()
    monitor.step()
    for result in (monitor.profile, monitor.check, lambda: monitor.recorded.last()):
        with pytest.raises(RuntimeError, match="no step recorded") as after:
            result()
        message = str(after.value)
        assert "every watched parameter is frozen (requires_grad=False)" in message
        assert "frozen layers: 0, 2" in message and "1 step ended" in message
        assert "call monitor.step()" not in message and "run a backward pass" not in message
    monitor.close()
    # steps ended by the optimizer say the same
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradientMonitor(model, optimizer=optimizer) as driven:
        optimizer.step()
        optimizer.step()
        with pytest.raises(RuntimeError, match="2 steps ended, but every watched parameter is frozen"):
            driven.profile()
    # trainable parameters that no backward pass reached before step(): no advice to call step()
    for p in model.parameters():
        p.requires_grad_(True)
    with GradientMonitor(model) as unreached:
        unreached.step()
        with pytest.raises(RuntimeError, match="no backward pass reached a watched parameter") as info:
            unreached.profile()
        assert "call monitor.step()" not in str(info.value) and "frozen" not in str(info.value)


def test_plot_draws_one_line_per_layer():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = Encoder(depth=3)
    with GradientMonitor(model) as monitor:
        for seed in range(3):
            model(tokens(seed)).sum().backward()
            monitor.step()
        ax = monitor.plot()
    assert [line.get_label() for line in ax.get_lines()] == monitor.layer_names
    assert len(ax.get_lines()[0].get_xdata()) == 3
    plt.close(ax.figure)


# --------------------------------------------------------------------------
# LLRD and freezing


def test_llrd_param_groups_exact_learning_rates():
    model = Encoder(depth=4)
    groups = llrd_param_groups(model, base_lr=1e-3, decay=0.5)
    assert [g["name"] for g in groups] == [
        "embeddings",
        "blocks.0",
        "blocks.1",
        "blocks.2",
        "blocks.3",
        "head",
    ]
    assert [g["lr"] for g in groups] == [1e-3 * 0.5**4, 1e-3 * 0.5**3, 1e-3 * 0.5**2, 1e-3 * 0.5, 1e-3, 1e-3]
    assert groups[0]["params"] == [model.embed.weight]
    assert groups[-1]["params"] == [model.head.weight, model.head.bias]
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each exactly once
    optimizer = torch.optim.AdamW(groups)
    assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in groups]


def test_llrd_skips_frozen_parameters():
    model = Encoder(depth=4)
    freeze_layers(model, first=2)
    groups = llrd_param_groups(model, base_lr=0.1, decay=0.8)
    assert [g["name"] for g in groups] == ["blocks.2", "blocks.3", "head"]
    assert groups[0]["lr"] == pytest.approx(0.1 * 0.8)


def test_auto_decay_follows_a_known_synthetic_profile():
    ratio, depth = 0.6, 6
    norms = 3.0 * ratio ** np.arange(depth - 1, -1, -1.0)  # input -> output, each block 0.6x the next
    assert auto_decay(norms) == pytest.approx(ratio, rel=1e-12)
    model = Encoder(depth=depth)
    groups = llrd_param_groups(model, base_lr=2e-4, decay="auto", profile=norms)
    lrs = {g["name"]: g["lr"] for g in groups}
    for index in range(depth):
        assert lrs[f"blocks.{index}"] == pytest.approx(2e-4 * ratio ** (depth - 1 - index), rel=1e-12)
    assert lrs["embeddings"] == pytest.approx(2e-4 * ratio**depth, rel=1e-12)
    assert lrs["head"] == 2e-4
    # growing towards the input: uniform; very steep: the lower bound
    assert auto_decay(norms[::-1]) == 1.0
    assert auto_decay(1e-3 ** np.arange(depth - 1, -1, -1.0), bounds=(0.2, 1.0)) == 0.2


def test_auto_decay_from_a_monitor_uses_its_history():
    torch.manual_seed(12)
    model = nn.Sequential(sigmoid_mlp(6, 16), nn.Linear(16, 1))
    with GradientMonitor(model) as monitor:
        for seed in range(3):
            model.zero_grad()
            model(torch.randn(16, 16, generator=torch.Generator().manual_seed(seed))).pow(2).mean().backward()
            monitor.step()
    mean_log = np.log(layer_rows(monitor)).mean(axis=0)
    slope = np.polyfit(np.arange(mean_log.size), mean_log, 1)[0]
    expected = min(max(math.exp(-slope), 0.1), 1.0)
    assert expected < 1.0  # the sigmoid stack's gradients do shrink towards the input
    assert auto_decay(monitor) == pytest.approx(expected, rel=1e-9)
    assert auto_decay(monitor.history) == pytest.approx(expected, rel=1e-9)


def test_freeze_layers():
    model = Encoder(depth=4)
    assert freeze_layers(model, first=0) == []
    assert all(p.requires_grad for p in model.parameters())
    assert freeze_layers(model, first=2, embeddings=False) == ["blocks.0", "blocks.1"]
    assert model.embed.weight.requires_grad
    assert not any(p.requires_grad for b in model.blocks[:2] for p in b.parameters())
    assert all(p.requires_grad for b in model.blocks[2:] for p in b.parameters())


# --------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    ("call", "error", "name"),
    [
        (lambda m: GradientMonitor("model"), TypeError, "model"),
        (lambda m: GradientMonitor(m, every=0), ValueError, "every"),
        (lambda m: GradientMonitor(m, every=1.5), TypeError, "every"),
        (lambda m: GradientMonitor(m, layers=["nope"]), ValueError, "layers"),
        (lambda m: GradientMonitor(m, layers=42), TypeError, "layers"),
        (lambda m: GradientMonitor(m, layers={"x": nn.Linear(2, 2)}), ValueError, "layers"),
        (lambda m: GradientMonitor(m, optimizer="sgd"), TypeError, "optimizer"),
        (lambda m: llrd_param_groups(m, base_lr=-1.0), ValueError, "base_lr"),
        (lambda m: llrd_param_groups(m, base_lr=1e-3, decay="fast"), ValueError, "decay"),
        (lambda m: llrd_param_groups(m, base_lr=1e-3, decay=0.0), ValueError, "decay"),
        (lambda m: llrd_param_groups(m, base_lr=1e-3, decay="auto"), ValueError, "profile"),
        (lambda m: llrd_param_groups(m, base_lr=1e-3, decay="auto", profile=[1.0]), ValueError, "profile"),
        (lambda m: auto_decay([1.0, 2.0], bounds=(1.0, 0.5)), ValueError, "bounds"),
        (lambda m: freeze_layers(m, first=9), ValueError, "first"),
        (lambda m: freeze_layers(m, first=True), TypeError, "first"),
    ],
)
def test_bad_input_names_the_argument(call, error, name):
    model = Encoder(depth=3)
    with pytest.raises(error, match=name):
        call(model)
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())


def test_check_validates_thresholds():
    model = nn.Linear(2, 1)
    with GradientMonitor(model, layers=[model]) as monitor:
        model(torch.ones(1, 2)).sum().backward()
        monitor.step()
        with pytest.raises(ValueError, match="imbalance_threshold"):
            monitor.check(imbalance_threshold=-1)
        with pytest.raises(TypeError, match="log"):
            monitor.check(log="yes")
        with pytest.raises(ValueError, match="window"):
            monitor.check(window=0)
