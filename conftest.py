"""Repository-wide pytest configuration: GPU tests skip with a reason when there is no CUDA device."""

import pytest


def _cuda_reason():
    try:
        import torch
    except Exception as e:  # pragma: no cover - torch missing is a set-up error
        return f"torch not importable: {e}"
    if not torch.cuda.is_available():
        return "no CUDA device on this host (GPU tests run on the GPU box: scripts/gpu_env.sh)"
    return None


def pytest_collection_modifyitems(config, items):
    reason = None
    checked = False
    for item in items:
        if "gpu" in item.keywords:
            if not checked:
                reason, checked = _cuda_reason(), True
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
