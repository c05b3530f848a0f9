"""Benchmark cases and their inputs: random data (never zeros), paged caches, and the block selections that the
msa rows and the FlexAttention peer share.

Sparse selection (documented in benchmarks/README.md): per request, KV head and 128-query tile, the tile's
*diagonal* block (the last block its last query can see) plus ``topk - 1`` distinct random earlier blocks (all of
them when fewer exist). Every query of a tile uses its tile's list, so the per-token ``kv_block_indexes`` given to
msa and the per-tile FlexAttention ``BlockMask`` describe exactly the same work; causality still applies inside
the selected blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

BLOCK = 128
TP_HEADS = {1: (64, 4), 2: (32, 2), 4: (16, 1)}
DECODE_HEADS = (64, 4)
# --dry (CPU): the same GQA structure with fewer heads, so every code path runs in seconds
DRY_TP_HEADS = {1: (8, 2), 2: (4, 1), 4: (2, 1)}
DRY_DECODE_HEADS = (8, 2)
ELEM_BYTES = {"bf16": 2, "fp8": 1, "nvfp4": 0.5625}  # nvfp4: 4-bit payload + one e4m3 scale per 16
TORCH_DTYPE = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}


@dataclass
class Case:
    section: str
    q_len: int
    kv_len: int
    batch: int
    hq: int
    hkv: int
    d: int
    dtype: str
    causal: bool
    topk: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def total_q(self) -> int:
        return self.batch * self.q_len

    @property
    def total_kv(self) -> int:
        return self.batch * self.kv_len

    @property
    def group(self) -> int:
        return self.hq // self.hkv

    @property
    def num_blocks(self) -> int:
        return -(-self.kv_len // BLOCK)

    @property
    def qo_offset(self) -> int:
        return self.kv_len - self.q_len

    def label(self) -> str:
        c = "causal" if self.causal else "non-causal"
        s = f"{self.section} B{self.batch} q{self.q_len} kv{self.kv_len} H{self.hq}/{self.hkv} d{self.d} {self.dtype} {c}"
        if self.topk:
            s += f" topk{self.topk}"
        return s


def randn(shape, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """Standard-normal data in ``dtype`` (fp8 is drawn in bf16 and cast)."""
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return torch.randn(shape, dtype=torch.bfloat16, device=device, generator=gen).to(dtype)
    return torch.randn(shape, dtype=dtype, device=device, generator=gen)


def ragged_qkv(case: Case, device: torch.device, gen: torch.Generator, dtype=torch.bfloat16):
    q = randn((case.total_q, case.hq, case.d), dtype, device, gen)
    k = randn((case.total_kv, case.hkv, case.d), dtype, device, gen)
    v = randn((case.total_kv, case.hkv, case.d), dtype, device, gen)
    return q, k, v


def to_paged(x: torch.Tensor, batch: int, kv_len: int, perm: torch.Tensor, chunk_pages: int = 4096) -> torch.Tensor:
    """Ragged ``[batch*kv_len, H, D]`` -> paged ``[pages, H, 128, D]`` with logical page ``p`` of request ``b`` at
    physical page ``perm[b * pages_per_seq + p]``; the tail of a partial last page is random, never zeros.
    Copies ``chunk_pages`` pages at a time so a 64 GiB cache needs no second full-size temporary."""
    heads, dim = x.shape[1], x.shape[2]
    pages = -(-kv_len // BLOCK)
    out = torch.empty(batch * pages, heads, BLOCK, dim, dtype=x.dtype, device=x.device)
    xb = x.view(batch, kv_len, heads, dim)
    for b in range(batch):
        for p0 in range(0, pages, chunk_pages):
            p1 = min(pages, p0 + chunk_pages)
            t0, t1 = p0 * BLOCK, min(kv_len, p1 * BLOCK)
            src = torch.empty((p1 - p0) * BLOCK, heads, dim, dtype=x.dtype, device=x.device)
            if t1 - t0 < src.shape[0]:
                src[t1 - t0:] = torch.randn(src.shape[0] - (t1 - t0), heads, dim, device=x.device).to(x.dtype)
            src[: t1 - t0] = xb[b, t0:t1]
            out[perm[b * pages + p0: b * pages + p1]] = src.view(p1 - p0, BLOCK, heads, dim).transpose(1, 2)
    return out


def page_tables(batch: int, kv_len: int, device: torch.device, gen: torch.Generator):
    """Shuffled physical pages: ``perm [batch*pages]``, flat ``kv_indices`` int32 and ``page_table [batch, pages]``."""
    pages = -(-kv_len // BLOCK)
    perm = torch.randperm(batch * pages, device=device, generator=gen)
    table = perm.view(batch, pages).to(torch.int32).contiguous()
    return perm, table.reshape(-1).contiguous(), table


@dataclass
class TileSelection:
    """Selected blocks per (request, 128-query tile, KV head), ascending with a ``-1`` tail."""

    tile_ids: torch.Tensor  # [B, T, Hkv, k] int64
    q_len: int
    kv_len: int
    causal: bool

    def per_token(self) -> torch.Tensor:
        """``[B*q_len, Hkv, k]`` int32 — msa's ``kv_block_indexes`` (batch-local logical block ids)."""
        b, t, h, k = self.tile_ids.shape
        tok = self.tile_ids.repeat_interleave(BLOCK, dim=1)[:, : self.q_len]
        return tok.reshape(b * self.q_len, h, k).to(torch.int32).contiguous()


def random_tile_selection(batch: int, q_len: int, kv_len: int, hkv: int, topk: int, causal: bool,
                          device: torch.device, gen: torch.Generator, chunk_tiles: int = 256) -> TileSelection:
    nblk = -(-kv_len // BLOCK)
    tiles = -(-q_len // BLOCK)
    offset = kv_len - q_len
    out = torch.full((batch, tiles, hkv, topk), -1, dtype=torch.int64, device=device)
    blk = torch.arange(nblk, device=device)
    for t0 in range(0, tiles, chunk_tiles):
        t1 = min(tiles, t0 + chunk_tiles)
        t = torch.arange(t0, t1, device=device)
        if causal:
            last_pos = torch.clamp((t + 1) * BLOCK, max=q_len) - 1 + offset
            diag = torch.clamp(last_pos // BLOCK, max=nblk - 1)  # [n]
            n_rand = topk - 1
        else:
            diag = None
            n_rand = topk
        score = torch.rand(batch, t1 - t0, hkv, nblk, device=device, generator=gen)
        if diag is not None:
            score = score.masked_fill(blk.view(1, 1, 1, -1) >= diag.view(1, -1, 1, 1), -1.0)
        take = min(n_rand, nblk)
        chosen = torch.full((batch, t1 - t0, hkv, topk), -1, dtype=torch.int64, device=device)
        if take > 0:
            val, idx = torch.topk(score, take, dim=-1)
            chosen[..., :take] = torch.where(val >= 0, idx, torch.full_like(idx, -1))
        if diag is not None:
            chosen[..., topk - 1] = diag.view(1, -1, 1).expand(batch, -1, hkv)
        key = torch.where(chosen >= 0, chosen, torch.full_like(chosen, nblk + 1))
        key, _ = key.sort(dim=-1)
        out[:, t0:t1] = torch.where(key > nblk, torch.full_like(key, -1), key)
    return TileSelection(out, q_len, kv_len, causal)


def causal_tile_blocks(batch: int, q_len: int, kv_len: int, causal: bool, device: torch.device) -> TileSelection:
    """All blocks each 128-query tile can see (dense attention as a tile selection), head-broadcast (H=1)."""
    nblk = -(-kv_len // BLOCK)
    tiles = -(-q_len // BLOCK)
    blk = torch.arange(nblk, device=device).view(1, 1, 1, -1).expand(1, tiles, 1, nblk)
    if causal:
        t = torch.arange(tiles, device=device)
        last_pos = torch.clamp((t + 1) * BLOCK, max=q_len) - 1 + (kv_len - q_len)
        visible = blk * BLOCK <= last_pos.view(1, -1, 1, 1)
        ids = torch.where(visible, blk, torch.full_like(blk, -1))
    else:
        ids = blk.clone()
    return TileSelection(ids.expand(batch, tiles, 1, nblk), q_len, kv_len, causal)


def token_positions(batch: int, q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """Key-space position of every token (bottom-right causal): ``i + kv_len - q_len``."""
    return (torch.arange(q_len, device=device) + (kv_len - q_len)).repeat(batch)
