"""A secure front door for production model inference."""

__version__ = "0.1.0"
__all__ = ["__version__"]
