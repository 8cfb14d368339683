"""Loads the optional CUDA module (lepton_core._C_cuda) and says whether it can run here."""
from __future__ import annotations


def probe():
    """(module or None, device name or None, reason the CUDA backend is unavailable or None)."""
    try:
        from . import _C_cuda  # type: ignore[attr-defined]
    except ImportError as e:
        msg = str(e)
        if "No module named" in msg or "cannot import name" in msg:
            return None, None, ("lepton_core was built without its CUDA backend (nvcc was not found at "
                                "build time, or LEPTON_CUDA=OFF); see setup_cuda.md")
        return None, None, f"the CUDA backend failed to load: {msg}"
    try:
        import torch
    except ImportError:
        return None, None, "the CUDA backend needs PyTorch, which is not installed"
    if not torch.cuda.is_available():
        why = "this PyTorch build has no CUDA support" if torch.version.cuda is None else \
            "PyTorch sees no CUDA device (no GPU, or no driver)"
        return None, None, why
    n_devices, err = _C_cuda.device_count()
    if n_devices <= 0:
        return None, None, f"the CUDA runtime sees no device: {err}"
    return _C_cuda, torch.cuda.get_device_name(), None
