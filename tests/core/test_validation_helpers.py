"""msa.core.validation helpers: each error names the argument and gives expected vs actual."""

from __future__ import annotations

import pytest
import torch
from msa.core.validation import (
    check_bool,
    check_float,
    check_int,
    check_same_device,
    check_scale,
    check_tensor,
    host_int_list,
    validation_enabled,
)


def test_validation_enabled(monkeypatch):
    monkeypatch.delenv("MSA_VALIDATE", raising=False)
    assert validation_enabled() is False and validation_enabled(True) is True
    monkeypatch.setenv("MSA_VALIDATE", "1")
    assert validation_enabled() is True and validation_enabled(False) is False


def test_check_tensor_messages():
    t = torch.randn(4, 3)
    check_tensor("x", t, dtype=torch.float32, ndim=2, shape=[None, 3], device="cpu", contiguous=True)
    with pytest.raises(TypeError, match=r"^x: expected dtype bfloat16 or float16, got float32$"):
        check_tensor("x", t, dtype=(torch.bfloat16, torch.float16))
    with pytest.raises(ValueError, match=r"^x: expected shape \[\*, 4\], got \[4, 3\]$"):
        check_tensor("x", t, shape=[None, 4])
    with pytest.raises(ValueError, match=r"^x: expected a tensor on meta, got one on cpu$"):
        check_tensor("x", t, device="meta")
    with pytest.raises(ValueError, match="^x: expected a contiguous tensor"):
        check_tensor("x", t.T, contiguous=True)
    with pytest.raises(TypeError, match="^x: expected a torch.Tensor, got None"):
        check_tensor("x", None)


def test_check_same_device():
    assert check_same_device(a=torch.ones(1), b=None, c=torch.ones(2)) == torch.device("cpu")
    with pytest.raises(ValueError, match=r"^c: expected a tensor on cpu \(the device of a\), got one on meta"):
        check_same_device(a=torch.ones(1), c=torch.ones(1, device="meta"))


def test_scalar_checks():
    assert check_bool("f", True) is True
    with pytest.raises(TypeError, match="^f: expected a bool, got int"):
        check_bool("f", 1)
    assert check_float("s", 2) == 2.0 and check_float("s", None, allow_none=True) is None
    with pytest.raises(TypeError, match="^s: expected a float, got bool"):
        check_float("s", True)
    with pytest.raises(ValueError, match="^s: expected a finite float, got nan"):
        check_float("s", float("nan"))
    with pytest.raises(ValueError, match="^s: expected > 0, got -1.0"):
        check_float("s", -1.0, positive=True)
    assert check_int("n", 3, min=0, max=5) == 3
    with pytest.raises(ValueError, match="^n: expected <= 5, got 6"):
        check_int("n", 6, max=5)


def test_check_scale():
    check_scale("q_scale", None, heads=4)
    check_scale("q_scale", 0.5, heads=4)
    check_scale("q_scale", torch.ones(4), heads=4, device=torch.device("cpu"))
    with pytest.raises(
        ValueError,
        match=r"^q_scale: expected a float or a per-head tensor of shape \[4\] \(query heads\), got shape \[2\]",
    ):
        check_scale("q_scale", torch.ones(2), heads=4, what="query heads")
    with pytest.raises(TypeError, match="^k_scale: expected a floating-point tensor, got dtype int64"):
        check_scale("k_scale", torch.ones(4, dtype=torch.int64), heads=4)
    with pytest.raises(ValueError, match="^k_scale: expected a tensor on cpu, got one on meta"):
        check_scale("k_scale", torch.ones(4, device="meta"), heads=4, device=torch.device("cpu"))
    with pytest.raises(TypeError, match="^v_scale: expected a float, got str"):
        check_scale("v_scale", "1", heads=4)


def test_host_int_list():
    assert host_int_list("lens", [1, 2]) == [1, 2]
    assert host_int_list("lens", (3,)) == [3]
    assert host_int_list("lens", torch.tensor([4, 5], dtype=torch.int32)) == [4, 5]
    assert host_int_list("lens", []) == []
    with pytest.raises(ValueError, match=r"^lens\[1\]: expected >= 0, got -1"):
        host_int_list("lens", [1, -1], min=0)
    with pytest.raises(TypeError, match="^lens: expected an integer tensor, got dtype float32"):
        host_int_list("lens", torch.ones(2))
    with pytest.raises(ValueError, match=r"^lens: expected a 1-D tensor, got shape \[1, 2\]"):
        host_int_list("lens", torch.ones(1, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"^lens\[0\]: expected an int, got float"):
        host_int_list("lens", [1.0])
    with pytest.raises(TypeError, match="^lens: expected a list, tuple or 1-D integer tensor, got int"):
        host_int_list("lens", 3)
