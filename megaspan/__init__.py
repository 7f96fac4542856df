"""megaspan: Megatron-Core training with selectable normalization placements."""

__version__ = "0.1.0"
