"""vgcore's compiled tier: Cython kernels that assume validated, C-contiguous input.

- ``_layers.pxd``: one dense layer's forward, JVP and VJP pieces (inline, nogil), cimported by both modules;
- ``_kernels``: forward, gradient profile (plain and segmented), JVP / VJP, the multi-config sweep runner;
- ``_spectra``: QR-renormalised Lyapunov growth.

Nothing here validates or raises from inside ``nogil``: the Python layer (vgcore._api and the backends in
vgcore.backends) checks every argument first.  See docs/ARCHITECTURE.md.
"""
