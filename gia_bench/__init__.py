"""gia-bench: how much private training data leaks through compressed gradients."""

__version__ = "0.1.0"
