"""The NumPy reference of every vgcore computation: plain, obvious, and what the tests trust.

One module per model kind (``stack``, ``batchnorm``, ``recurrent``) plus the
Jacobian spectra (``spectra``).  Each follows its model's definition line by
line, with no attempt at speed, and is itself checked against central finite
differences, closed forms and PyTorch autograd.  The backend modules
``vgcore.backends.reference_<kind>`` serve them through the backend interface
(docs/ARCHITECTURE.md).
"""
