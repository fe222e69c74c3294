"""The ParC operator: functional spatial / FFT forms, kernel resizing and the ``ParC`` module."""

from .functional import circulant, parc_conv, parc_fft, parc_spatial, resize_kernel
from .parc import ParC, choose_impl

__all__ = ["ParC", "choose_impl", "circulant", "parc_conv", "parc_fft", "parc_spatial", "resize_kernel"]
