"""Engines: runnable model components (text encoder, UNet, VAE) on one backend each.

Backends know nothing of requests, LoRA files or protobuf (DESIGN.md). Every backend
implements the contract in `impasto.backends.base`.
"""
