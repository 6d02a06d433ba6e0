"""Network classes of the project's bundles: Myronenko's SegResNet with its VAE branch, and 3D-ESPNet."""
