"""Stack.from_torch: nn.Sequential stacks loaded exactly (Recurrent.from_torch: test_recurrent_reference)."""

from __future__ import annotations

import numpy as np
import pytest

import vgcore as vg

torch = pytest.importorskip("torch")
nn = torch.nn

ACTIVATION_MODULES = {
    "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.01),
    "elu": nn.ELU, "selu": nn.SELU, "gelu": nn.GELU, "silu": nn.SiLU, "softplus": nn.Softplus,
}


def _blocks(width, depth, activation, norm, bias=True):
    layers = []
    for _ in range(depth):
        block = [nn.Linear(width, width, bias=bias)]
        if activation is not None:
            block.append(ACTIVATION_MODULES[activation]())
        if norm == "pre":
            block.insert(0, nn.LayerNorm(width, elementwise_affine=False))
        elif norm == "post":
            block.append(nn.LayerNorm(width, elementwise_affine=False))
        layers += block
    return layers


@pytest.mark.parametrize("activation", sorted(ACTIVATION_MODULES))
@pytest.mark.parametrize("norm", [None, "pre", "post"])
def test_sequential_loads_exactly_and_computes_what_torch_computes(activation, norm):
    torch.manual_seed(0)
    width, depth = 6, 3
    module = nn.Sequential(*_blocks(width, depth, activation, norm)).double()
    stack = vg.Stack.from_torch(module)
    assert (stack.depth, stack.width, stack.activation, stack.norm) == (depth, width, activation, norm)
    linears = [m for m in module if isinstance(m, nn.Linear)]
    np.testing.assert_array_equal(stack.weights, np.stack([m.weight.detach().numpy() for m in linears]))
    np.testing.assert_array_equal(stack.biases, np.stack([m.bias.detach().numpy() for m in linears]))
    x = 2 * np.random.default_rng(1).standard_normal((4, width))
    with torch.no_grad():
        expected = module(torch.tensor(x)).numpy()
    np.testing.assert_allclose(vg.forward(stack, x, backend="numpy"), expected, rtol=1e-12, atol=1e-13)


def test_linear_only_nested_and_biasless_sequentials():
    torch.manual_seed(1)
    module = nn.Sequential(nn.Sequential(nn.Linear(4, 4, bias=False), nn.Identity()),
                           nn.Linear(4, 4, bias=False))
    stack = vg.Stack.from_torch(module)
    assert stack.activation == "linear" and stack.depth == 2 and stack.dtype == np.float32
    assert not np.any(stack.biases)
    x = np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)
    with torch.no_grad():
        expected = module(torch.tensor(x)).numpy()
    np.testing.assert_allclose(vg.forward(stack, x, backend="numpy"), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("module,error,fragment", [
    (lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh()), ValueError, "square"),
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.ReLU()), ValueError,
     "one activation"),
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1)), ValueError, "Dropout"),
    (lambda: nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4), nn.Tanh()), ValueError, "LayerNorm"),
    (lambda: nn.Sequential(nn.Tanh(), nn.Linear(4, 4)), ValueError, "block"),
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(3, 3), nn.Tanh()), ValueError, "width"),
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.LeakyReLU(0.2)), ValueError, "LeakyReLU"),
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.GELU(approximate="tanh")), ValueError, "GELU"),
    (lambda: nn.Sequential(), ValueError, "no layers"),
    (lambda: nn.Linear(4, 4), TypeError, "Sequential"),
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.Tanh()).half(), TypeError, "dtype"),
])
def test_what_cannot_be_loaded_is_refused_naming_the_module(module, error, fragment):
    with pytest.raises(error, match="module") as raised:
        vg.Stack.from_torch(module())
    assert fragment in str(raised.value)
