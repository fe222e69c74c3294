"""The ParC operator: functional spatial / FFT / portable forms, kernel resizing and the ``ParC`` module."""

from .fft import fft_correlate, fft_weight_grad
from .functional import (
    add_pe,
    circulant,
    parc_conv,
    parc_fft,
    parc_spatial,
    portable_form,
    resize_kernel,
    unfolded_pe,
)
from .parc import ParC, choose_impl, resolve_impl, use_impl

__all__ = [
    "ParC",
    "add_pe",
    "choose_impl",
    "circulant",
    "fft_correlate",
    "fft_weight_grad",
    "parc_conv",
    "parc_fft",
    "parc_spatial",
    "portable_form",
    "resize_kernel",
    "resolve_impl",
    "unfolded_pe",
    "use_impl",
]
