"""vgcore: measure vanishing and exploding gradients in deep stacks, fast."""

from vgcore._activations import ACTIVATIONS
from vgcore._profile import Profile

__version__ = "0.1.0"

__all__ = ["ACTIVATIONS", "Profile", "__version__"]
