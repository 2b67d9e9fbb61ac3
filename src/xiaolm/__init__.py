"""xiaolm: train a small Chinese chat language model from scratch."""

__version__ = "0.1.0"
