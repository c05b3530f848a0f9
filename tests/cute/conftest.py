"""Shared oracles and input builders for the msa.cute tests (exposed as fixtures: importlib import mode)."""

from __future__ import annotations

import math

import pytest
import torch


def random_selection(gen, q_lens, kv_lens, hkv, topk, block, *, mode="random"):
    """q2k [Hkv, total_q, topk] int32, ascending + -1 tail, only blocks that exist in the token's request.

    mode: "random" (random subsets, random fill level), "all_same" (every token of a request picks the same
    blocks), "disjoint" (tokens pick round-robin non-overlapping blocks), "causal" (only blocks the token can see
    under bottom-right causal, so early tokens have fewer than topk).
    """
    total_q = sum(q_lens)
    out = torch.full((hkv, total_q, topk), -1, dtype=torch.int32)
    t = 0
    for ql, kl in zip(q_lens, kv_lens):
        nblk = -(-kl // block)
        shared = {h: sorted(torch.randperm(nblk, generator=gen)[: min(topk, nblk)].tolist()) for h in range(hkv)}
        for i in range(ql):
            for h in range(hkv):
                if mode == "all_same":
                    sel = shared[h]
                elif mode == "disjoint":
                    sel = [(i * topk + s) % max(nblk, 1) for s in range(min(topk, nblk))] if nblk else []
                    sel = sorted(set(sel))
                elif mode == "causal":
                    vis_blocks = (i + kl - ql) // block + 1 if i + kl - ql >= 0 else 0
                    vis_blocks = min(vis_blocks, nblk)
                    n = int(torch.randint(0, min(topk, vis_blocks) + 1, (1,), generator=gen)) if vis_blocks else 0
                    n = max(n, min(topk, vis_blocks)) if i % 2 == 0 else n
                    sel = sorted(torch.randperm(vis_blocks, generator=gen)[:n].tolist()) if vis_blocks else []
                else:
                    n = int(torch.randint(0, min(topk, nblk) + 1, (1,), generator=gen)) if nblk else 0
                    sel = sorted(torch.randperm(nblk, generator=gen)[:n].tolist()) if nblk else []
                out[h, t, : len(sel)] = torch.tensor(sel, dtype=torch.int32)
            t += 1
    return out


def cu(lens, device="cpu"):
    c = [0]
    for n in lens:
        c.append(c[-1] + n)
    return torch.tensor(c, dtype=torch.int32, device=device)


def naive_attention(q, k_tokens, v_tokens, q_lens, kv_lens, allowed, *, scale, causal, qo_offset=None, temp=None):
    """fp64 loop oracle. k_tokens/v_tokens: per-request lists of [kv_len, Hkv, D]; allowed(h_kv, t, j) -> bool.

    qo_offset: per-request list (default kv_len - q_len). Returns (O [T,Hq,Dv], LSE [T,Hq], LSE_temp [T,Hq]).
    """
    total_q, hq, _ = q.shape
    hkv = k_tokens[0].shape[1] if k_tokens else 1
    g = hq // hkv
    dv = v_tokens[0].shape[-1] if v_tokens else q.shape[-1]
    o = torch.zeros(total_q, hq, dv, dtype=torch.float64)
    lse = torch.full((total_q, hq), -math.inf, dtype=torch.float64)
    lse_t = torch.full((total_q, hq), -math.inf, dtype=torch.float64)
    t = 0
    for b, (ql, kl) in enumerate(zip(q_lens, kv_lens)):
        off = (kl - ql) if qo_offset is None else qo_offset[b]
        kk = k_tokens[b].double()
        vv = v_tokens[b].double()
        for i in range(ql):
            for h in range(hq):
                hk = h // g
                js = [j for j in range(kl) if allowed(hk, t, j) and (not causal or j <= i + off)]
                if js:
                    idx = torch.tensor(js)
                    logits = (kk[idx, hk] @ q[t, h].double()) * scale
                    m = torch.logsumexp(logits, 0)
                    o[t, h] = torch.softmax(logits, 0) @ vv[idx, hk]
                    lse[t, h] = m
                    if temp is not None:
                        lse_t[t, h] = torch.logsumexp(logits / temp, 0)
            t += 1
    return o, lse, lse_t


@pytest.fixture
def helpers():
    class H:
        pass

    h = H()
    h.random_selection = random_selection
    h.cu = cu
    h.naive_attention = naive_attention
    return h


@pytest.fixture(params=["union", "per_token"])
def attn_path(request, monkeypatch):
    """Run an attention test through both reference paths (CPU default: union GEMM; GPU default: per-token)."""
    import msa.cute.reference as ref

    monkeypatch.setattr(ref, "_union_default", lambda device: request.param == "union")
    calls = []
    real = ref._union_chunk
    monkeypatch.setattr(ref, "_union_chunk", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    yield request.param
    assert bool(calls) == (request.param == "union"), f"{request.param} path not exercised"
