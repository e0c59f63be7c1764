"""The package version (a leaf module: the stages record it in what they write)."""

__version__ = "0.1.0"
