"""The code of both BraTS bundles, by stage: ``data``, ``transforms``, ``losses``, ``training``, ``inference``,
``evaluation`` and ``bundle`` (what a bundle runs), and ``tools`` (synthetic data, ensembles, packaging: run outside a
bundle). The networks live in :mod:`custom_networks`. Map: ``docs/architecture.md``.
"""

#: the version of both bundles (``bundles/*/configs/metadata.json``), which this package ships
__version__ = "0.5.0"
