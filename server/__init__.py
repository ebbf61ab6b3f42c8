"""impasto: a gRPC inference and training server for Stable-Diffusion-family models."""

__version__ = "0.1.0"
