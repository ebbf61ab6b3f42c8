"""Which backends can run on this machine, and if not, why. Cheap: no engine is loaded."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

BACKEND_NAMES = ("torch", "onnxruntime", "openvino", "tensorrt")


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str = ""
    version: str = ""


def _module_version(module_name: str) -> tuple[object | None, str]:
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or a broken native library
        return None, f"{module_name} is not importable: {exc}"
    return module, getattr(module, "__version__", "")


def _nvidia_gpu_reason() -> str:
    """Empty when an NVIDIA GPU is visible to CUDA, else why not."""
    try:
        import torch

        if torch.cuda.is_available():
            return ""
        return "no NVIDIA GPU visible to CUDA" if torch.version.cuda else "torch is a CPU build and no CUDA runtime is present"
    except Exception as exc:
        return f"cannot query CUDA: {exc}"


def backend_status(name: str) -> BackendStatus:
    if name == "torch":
        module, info = _module_version("torch")
        return BackendStatus(name, module is not None, "" if module else info, info if module else "")
    if name == "onnxruntime":
        module, info = _module_version("onnxruntime")
        return BackendStatus(name, module is not None, "" if module else info, info if module else "")
    if name == "openvino":
        module, info = _module_version("openvino")
        if module is None:
            return BackendStatus(name, False, info)
        version = module.get_version() if hasattr(module, "get_version") else info
        return BackendStatus(name, True, "", version)
    if name == "tensorrt":
        module, info = _module_version("tensorrt")
        if module is None:
            return BackendStatus(name, False, info)
        gpu = _nvidia_gpu_reason()
        return BackendStatus(name, not gpu, f"tensorrt needs an NVIDIA GPU: {gpu}" if gpu else "", info)
    raise ValueError(f"unknown backend '{name}'; known: {', '.join(BACKEND_NAMES)}")


def all_backend_status() -> list[BackendStatus]:
    return [backend_status(name) for name in BACKEND_NAMES]
