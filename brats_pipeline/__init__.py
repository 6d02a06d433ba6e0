"""BraTS data layer, label conventions, metrics, inference helpers and the synthetic case generator.

The networks live in :mod:`custom_networks`; everything else the two bundles need lives here.
"""

__version__ = "0.1.0"
