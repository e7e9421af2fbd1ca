"""vgcore: measure vanishing and exploding gradients in deep stacks, fast.

Compiled (Cython) kernels compute forward and backward passes, per-layer
gradient norms and Jacobian products of deep dense stacks; ``vgcore.stats``
turns gradient profiles into decay statistics and ``vgcore.theory`` gives
mean-field theory's predictions for the same networks.

>>> import vgcore as vg
>>> stack = vg.Stack.random(50, 64, activation="tanh", sigma_w=1.0, seed=0)
>>> profile = vg.gradient_profile(stack, vg.random_inputs(stack, 16, seed=1))
>>> profile.log_grad_norm.shape
(16, 51)
"""

import importlib

from vgcore._activations import ACTIVATIONS
from vgcore._api import forward, gradient_profile, jacobian, jvp, lyapunov_exponents, singular_values, vjp
from vgcore._profile import Profile
from vgcore._recurrent import Recurrent
from vgcore._stack import Stack
from vgcore._utils import random_inputs
from vgcore._version import __version__
from vgcore.sweep import SweepResult, sweep

# Submodules imported on first use: `vgcore.torch` must never import torch
# before it is asked for, and the others keep `import vgcore` quick.
_LAZY_SUBMODULES = ("jax", "lightning", "stats", "theory", "torch", "transformers")

__all__ = [
    "ACTIVATIONS",
    "Profile",
    "Recurrent",
    "Stack",
    "SweepResult",
    "__version__",
    "forward",
    "gradient_profile",
    "jacobian",
    "jvp",
    "lyapunov_exponents",
    "random_inputs",
    "singular_values",
    "stats",
    "sweep",
    "theory",
    "vjp",
]


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"vgcore.{name}")
    raise AttributeError(f"module 'vgcore' has no attribute {name!r}")
