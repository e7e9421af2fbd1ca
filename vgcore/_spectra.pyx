# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled spectra of deep stacks (Lyapunov exponents by QR renormalisation); work in progress."""
