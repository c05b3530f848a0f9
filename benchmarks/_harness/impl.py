"""What a benchmark row runs: an implementation prepared on one input set."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


class Skip(Exception):
    """An implementation cannot run this case; the message is the reason printed to the user."""


@dataclass
class Prepared:
    fn: Callable[[], Any]  # the timed call
    canonical: Callable[[Any], Any] | None = None  # fn's result -> comparable tensor (see CHECK_KINDS)
    poison: Callable[[], None] | None = None  # fill preallocated outputs with NaN before the checked call


@dataclass
class Impl:
    name: str
    prepare: Callable[[dict], Prepared]  # input set -> Prepared
    graph_ok: bool = True
    dtype: str | None = None  # the row's dtype when it differs from the case's (bf16 peers in an fp8 sweep)
    work: tuple[float, float] | None = None  # (flops, bytes) when the row does different work than the case
    note: str = ""
    kind: str = "msa"  # "msa" or "peer"
    extra: dict = field(default_factory=dict)
