"""Loss functions of the BraTS bundles, one module per paper."""
