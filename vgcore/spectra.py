"""Spectra of the input-output Jacobian: singular values and Lyapunov exponents.

They are computations like the others, served by the one dispatcher of
vgcore._api (see :func:`vgcore.singular_values` and
:func:`vgcore.lyapunov_exponents`); this module keeps their historical import path.
"""

from vgcore._api import lyapunov_exponents, singular_values

__all__ = ["lyapunov_exponents", "singular_values"]
