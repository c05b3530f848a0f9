"""Q-outer union tables on the GPU (msa.core.kernels.qouter_union) against the torch builder, bit for bit.

The oracle is ``msa.cute.qouter.build_qouter_unions`` on CPU tensors (torch ops: one sort per item); its own
tests (tests/cute/test_qouter.py) check it against a plain Python loop of the contract.

- CPU replay (needs g++): csrc/qouter_union/qouter_union_emulate.cc runs the kernel's per-item code
  (qouter_union_core.cuh) with one host thread per lane, real barriers / atomics with random yields and
  garbage-filled shared memory, on the staged and the in-place row paths and with 64-id windows (so the
  multi-window path runs on small ids); every output is poisoned first and must equal the torch builder's.
- CPU: argument errors name the argument; MSA_QOUTER_UNION dispatch; warmup registration.
- compile (``-m compile``): the module builds for sm_90a and sm_100a, with a cubin for each.
- GPU (``-m gpu``): ``build_qouter_unions`` on CUDA tensors (the kernel) equals the torch builder on the same
  tensors, bit for bit: random + correlated selections, G in {16, 8, 4, 2, 1} (T 8..128), ragged requests with a
  1-token request and all -1 tokens, route_max (unrouted items), duplicate ids, ids past item_kv_blocks, huge ids,
  unsorted lists, a strided (transposed) selection view, wide items (ids over 8192 blocks; over 40000 without
  item_kv_blocks: several windows), poisoned outputs (launch level), the in-place row path, a CUDA-graph replay.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import zlib
from pathlib import Path

import pytest
import torch
from msa.core.kernels import qouter_union as qu
from msa_core_testutil import built_module, need_kernel

qouter = pytest.importorskip("msa.cute.qouter")

CSRC = Path(qu.__file__).resolve().parent.parent / "csrc"
BLOCK = 128
POISON = 0x5A5A5A5A


# ---- inputs ------------------------------------------------------------------------------------------------------
def make_selection(gen, q_lens, kv_lens, hkv, topk, *, kind="random", causal=True, corr_len=24):
    """``[total_q, Hkv, topk]`` int32, ascending with a -1 tail. ``random``: each token its own random visible
    blocks (random count, every 5th token none); ``correlated``: top ``topk - 1`` of value noise smooth in the
    token position + the local block (neighbouring tokens pick nearly the same blocks)."""
    rows = []
    for ql, kl in zip(q_lens, kv_lens):
        nblk = max(1, -(-kl // BLOCK))
        pos = torch.arange(ql)
        vis = (torch.div(pos + kl - ql, BLOCK, rounding_mode="floor") + 1).clamp(0, nblk) if causal \
            else torch.full((ql,), nblk)
        if kind == "random":
            score = torch.rand(ql, hkv, nblk, generator=gen)
        else:
            anchors = torch.rand(ql // corr_len + 2, hkv, nblk, generator=gen)
            a = torch.div(pos, corr_len, rounding_mode="floor")
            frac = ((pos % corr_len).float() / corr_len).view(ql, 1, 1)
            score = anchors[a] * (1 - frac) + anchors[a + 1] * frac
            local = (vis - 1).clamp(min=0).view(ql, 1, 1).expand(ql, hkv, 1)
            score.scatter_(2, local, 2.0)
        blocks = torch.arange(nblk).view(1, 1, nblk)
        score = torch.where(blocks < vis.view(ql, 1, 1), score, -1.0)
        k = min(topk, nblk)
        top = torch.topk(score, k, dim=-1)
        ids = torch.where(top.values >= 0, top.indices, -1)
        if kind == "random":  # random list lengths: drop a random tail of the (random-order) picks
            keep = torch.randint(0, k + 1, (ql, hkv, 1), generator=gen)
            keep[::5] = 0
            ids = torch.where(torch.arange(k).view(1, 1, k) < keep, ids, -1)
        ids = torch.where(ids < 0, nblk + 1, ids).sort(dim=-1).values
        ids = torch.where(ids > nblk, -1, ids)
        full = torch.full((ql, hkv, topk), -1, dtype=torch.int64)
        full[..., :k] = ids
        rows.append(full)
    return torch.cat(rows).to(torch.int32) if rows else torch.zeros(0, hkv, topk, dtype=torch.int32)


def malform(gen, sel, nblk_max):
    """Duplicate ids, ids past the request's blocks, huge ids and unsorted lists on random rows (in place)."""
    n, hkv, topk = sel.shape
    if n == 0 or topk < 2:
        return sel
    r = torch.randint(0, n, (max(1, n // 6),), generator=gen)
    sel[r, :, 1] = sel[r, :, 0]  # duplicate id in one token's list
    r = torch.randint(0, n, (max(1, n // 7),), generator=gen)
    sel[r, :, topk - 1] = nblk_max + torch.randint(0, 5, (len(r), hkv), generator=gen, dtype=torch.int32)
    r = torch.randint(0, n, (max(1, n // 11),), generator=gen)
    sel[r, 0, 0] = 2**30 + 7  # past every item_kv_blocks (and past INT32_MAX // T for T >= 2)
    r = torch.randint(0, n, (max(1, n // 8),), generator=gen)
    sel[r, :, topk - 2] = 5 * nblk_max + torch.randint(0, 999, (len(r), hkv), generator=gen, dtype=torch.int32)
    r = torch.randint(0, n, (max(1, n // 9),), generator=gen)
    sel[r] = sel[r].flip(-1)  # descending, -1 first
    return sel


def case(seed, q_lens, kv_lens, hkv, g, topk, *, kind="correlated", route=False, bad=False, umax=None,
         causal=True, kv_blocks=True):
    """(selection, items, builder kwargs). ``route``: route_max = the median union size, so that about half
    the items are not routed."""
    gen = torch.Generator().manual_seed(seed)
    sel = make_selection(gen, q_lens, kv_lens, hkv, topk, kind=kind, causal=causal)
    if bad:
        malform(gen, sel, max(-(-k // BLOCK) for k in kv_lens))
    items = qouter.qouter_items(q_lens, hkv, g, kv_lens=kv_lens)
    kw = dict(T=items.T, num_items=items.num_items, umax=umax, route_max=None,
              item_kv_blocks=items.item_kv_blocks if kv_blocks else None)
    if route:
        u = torch_build(sel, items, {**kw, "umax": None}).union_len
        kw["route_max"] = int(u.float().median())
    if umax is None:
        kw["umax"] = qouter.default_umax(items.T, topk, items.max_blocks, kw["route_max"])
    return sel, items, kw


def torch_build(sel, items, kw):
    """The oracle: the torch builder on CPU copies (forced, whatever MSA_QOUTER_UNION a test set for the kernel:
    "cuda" refuses CPU tensors by design)."""
    kvb = kw["item_kv_blocks"]
    saved = os.environ.get("MSA_QOUTER_UNION")
    os.environ["MSA_QOUTER_UNION"] = "torch"
    try:
        return qouter.build_qouter_unions(sel.cpu(), items.item_token0.cpu(), items.item_ntok.cpu(),
                                          items.item_kv_head.cpu(), **{**kw, "item_kv_blocks": None if kvb is None
                                                                       else kvb.cpu()})
    finally:
        if saved is None:
            os.environ.pop("MSA_QOUTER_UNION", None)
        else:
            os.environ["MSA_QOUTER_UNION"] = saved


def assert_same(got, want, what=""):
    for name, a, b in zip(("union", "union_len", "mask", "order"), got, want):
        a = a.cpu()
        assert a.dtype == torch.int32 and a.shape == b.shape, f"{what}{name}: {a.dtype} {list(a.shape)} vs {list(b.shape)}"
        if not torch.equal(a, b):
            bad = (a != b).reshape(a.shape[0], -1).any(dim=1).nonzero().view(-1) if a.ndim else None
            i = int(bad[0]) if bad is not None and len(bad) else 0
            raise AssertionError(f"{what}{name} differs at item {i} ({len(bad)} items): got {a[i].tolist()}, "
                                 f"expected {b[i].tolist()}")


# ---- CPU replay of the kernel code -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler on this host (the CPU replay of the union kernel needs g++)")
    so = tmp_path_factory.mktemp("qouter_union_emulate") / "qouter_union_emulate.so"
    cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-pthread", "-Wall", "-Wno-unknown-pragmas",
           f"-I{CSRC / 'qouter_union'}", str(CSRC / "qouter_union" / "qouter_union_emulate.cc"), "-o", str(so)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"building the union emulator failed:\n{proc.stderr[-4000:]}"
    f = ctypes.CDLL(str(so)).msa_qouter_union_emulate
    f.restype = ctypes.c_int
    vp, i64, i32 = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int
    f.argtypes = [vp, i64, i64, i64, i32, i32, i32, vp, vp, vp, vp, vp, vp, vp, i64, i32, i32, i32, i32, i32,
                  ctypes.c_ulonglong]

    def run(sel, items, kw, *, staged, bitmap_words=qu.BITMAP_WORDS, seed=1):
        n, T, umax = kw["num_items"], kw["T"], kw["umax"]
        cap = umax if kw["route_max"] is None else min(umax, kw["route_max"])
        words = -(-T // 32)
        union = torch.full((n, umax), POISON, dtype=torch.int32)
        union_len = torch.full((n,), POISON, dtype=torch.int32)
        mask = torch.full((n, umax, words), POISON, dtype=torch.int32)
        tables = [t.contiguous() for t in (items.item_token0, items.item_ntok, items.item_kv_head)]
        kvb = kw["item_kv_blocks"]
        rc = f(sel.data_ptr(), *sel.stride(), *sel.shape, *(t.data_ptr() for t in tables),
               None if kvb is None else kvb.data_ptr(), union.data_ptr(), union_len.data_ptr(), mask.data_ptr(),
               n, T, umax, cap, int(staged), bitmap_words, seed)
        assert rc == 0, "emulator rejected its arguments"
        order = torch.sort(union_len, descending=True, stable=True).indices.to(torch.int32)
        return union, union_len, mask, order

    return run


EMU_CASES = [
    # (name, q_lens, kv_lens, hkv, G, topk, kwargs)
    ("g16-corr-route", [37, 1, 20], [5000, 700, 3000], 2, 16, 8, dict(route=True)),
    ("g16-random-bad", [24, 9], [4000, 900], 2, 16, 6, dict(kind="random", bad=True)),
    ("g8-corr-bad-route", [33, 1], [6000, 200], 1, 8, 8, dict(bad=True, route=True)),
    ("g4-random", [40], [4000], 1, 4, 5, dict(kind="random")),
    ("g2-corr-smallumax", [70], [9000], 1, 2, 4, dict(umax=20)),
    ("g1-random-bad", [130, 1], [20000, 128], 1, 1, 3, dict(kind="random", bad=True)),
    ("g16-wide-nokvb", [16], [1 << 20], 2, 16, 16, dict(kind="random", causal=False, kv_blocks=False, bad=True)),
    ("g8-umax0", [20, 1], [3000, 100], 1, 8, 4, dict(kind="random", umax=0)),
]


@pytest.mark.parametrize("staged", [True, False], ids=["staged", "in_place"])
@pytest.mark.parametrize("name,q_lens,kv_lens,hkv,g,topk,kw", EMU_CASES, ids=[c[0] for c in EMU_CASES])
def test_emulated_kernel_equals_torch_builder(emulator, staged, name, q_lens, kv_lens, hkv, g, topk, kw):
    sel, items, bk = case(zlib.crc32(name.encode()) % 1000, q_lens, kv_lens, hkv, g, topk, **kw)
    want = torch_build(sel, items, bk)
    if kw.get("route"):
        assert (want.union_len < 0).any() and (want.union_len >= 0).any(), "case must mix routed and unrouted"
    assert_same(emulator(sel, items, bk, staged=staged), want, f"{name}: ")


@pytest.mark.parametrize("seed", range(3))
def test_emulated_multi_window_and_strided(emulator, seed):
    """64-id windows (bitmap_words = 2): items span several windows, with gaps; a transposed selection view."""
    sel, items, bk = case(seed, [21, 3, 40], [4000, 300, 9000], 2, 8, 7, kind="random", bad=True, route=seed == 1)
    view = sel.transpose(0, 1).contiguous().transpose(0, 1)  # [total_q, Hkv, topk] with non-default strides
    assert view.stride() != sel.stride()
    want = torch_build(sel, items, bk)
    for staged in (True, False):
        assert_same(emulator(view, items, bk, staged=staged, bitmap_words=2, seed=seed + 5), want, f"s{staged}: ")


def test_emulated_unvalidated_tables_stay_in_bounds(emulator):
    """Out-of-range tables (validation off): token rows clamp like the torch builder; a bad KV head selects
    nothing (the torch builder would raise) -- the replay reads only valid rows (an out-of-range read would
    crash or differ)."""
    sel, items, bk = case(3, [10, 7], [2000, 900], 2, 16, 5, kind="random")
    items.item_token0[-2:] = torch.tensor([15, 40], dtype=torch.int32)  # past total_q = 17: clamped rows
    items.item_ntok[0] = 0
    bk["validate"] = False
    want = torch_build(sel, items, bk)
    got = emulator(sel, items, bk, staged=True)
    assert_same(got, want)
    items.item_kv_head[1] = 5
    got = emulator(sel, items, bk, staged=True)
    assert int(got[1][1]) == 0 and not got[2][1].any() and not got[0][1].any()


# ---- CPU: arguments, dispatch, registration ----------------------------------------------------------------------
def _tiny():
    sel, items, bk = case(0, [5], [600], 1, 16, 4)
    return sel, items, bk


def test_build_argument_errors_name_the_argument():
    sel, it, _ = _tiny()
    args = (it.item_token0, it.item_ntok, it.item_kv_head)
    with pytest.raises((TypeError, ValueError), match="kv_block_indexes"):
        qu.build(sel.float(), *args, T=8, num_items=1)
    with pytest.raises((TypeError, ValueError), match="kv_block_indexes"):
        qu.build(sel[0], *args, T=8, num_items=1)
    with pytest.raises(RuntimeError, match="kv_block_indexes: the Q-outer union kernel is not available"):
        qu.build(sel, *args, T=8, num_items=1)  # CPU tensors


def test_available_reason_on_cpu():
    ok, why = qu.available(torch.device("cpu"))
    assert not ok and "CUDA" in why


def test_dispatch_env_switch(monkeypatch):
    sel, it, bk = _tiny()
    args = (sel, it.item_token0, it.item_ntok, it.item_kv_head)
    monkeypatch.setenv("MSA_QOUTER_UNION", "bogus")
    with pytest.raises(ValueError, match="MSA_QOUTER_UNION"):
        qouter.build_qouter_unions(*args, **bk)
    monkeypatch.setenv("MSA_QOUTER_UNION", "cuda")
    with pytest.raises(RuntimeError, match="MSA_QOUTER_UNION=cuda"):
        qouter.build_qouter_unions(*args, **bk)
    for mode in ("torch", "auto"):  # CPU tensors: the torch builder either way
        monkeypatch.setenv("MSA_QOUTER_UNION", mode)
        un = qouter.build_qouter_unions(*args, **bk)
        assert int(un.union_len[0]) > 0 and un.mask.any()


def test_registered_for_warmup():
    from msa.core import variants

    assert "msa.core.kernels.qouter_union" in variants.KERNEL_MODULES
    specs = [s for s in variants.specs_for({"dtypes": ["bf16"], "head_dim": [128]}, ["sm_90a"])
             if s.family == "qouter_union"]
    assert [s.arch for s in specs] == ["sm_90a"] and specs[0].params == {"bitmap_words": qu.BITMAP_WORDS}


@pytest.mark.compile
@pytest.mark.slow
@pytest.mark.parametrize("arch,sm", [("sm_90a", 90), ("sm_100a", 100)])
def test_module_builds_for_arch(arch, sm, module_arch_check):
    module_arch_check(built_module(qu.spec, arch), arch, sm)


# ---- GPU ---------------------------------------------------------------------------------------------------------
def _need_kernel():
    need_kernel(qu)


def _to(items, dev):
    for name in ("item_token0", "item_ntok", "item_kv_head", "token_tile", "item_kv_blocks"):
        t = getattr(items, name)
        if t is not None:
            setattr(items, name, t.to(dev))
    return items


def gpu_build(sel, items, kw, monkeypatch, mode="cuda"):
    monkeypatch.setenv("MSA_QOUTER_UNION", mode)
    kvb = kw["item_kv_blocks"]
    return qouter.build_qouter_unions(sel.cuda(), items.item_token0.cuda(), items.item_ntok.cuda(),
                                      items.item_kv_head.cuda(),
                                      **{**kw, "item_kv_blocks": None if kvb is None else kvb.cuda()})


GPU_CASES = [
    # (name, q_lens, kv_lens, hkv, G, topk, kwargs)
    ("g16-corr", [1000, 1, 517], [9000, 700, 3000], 4, 16, 16, {}),
    ("g16-corr-route", [1000, 1, 517], [9000, 700, 3000], 4, 16, 16, dict(route=True)),
    ("g16-random-bad", [300, 1, 77], [40000, 128, 5000], 2, 16, 16, dict(kind="random", bad=True)),
    ("g8-corr-bad-route", [600, 1], [20000, 300], 2, 8, 16, dict(bad=True, route=True)),
    ("g4-random", [500, 3], [30000, 1000], 2, 4, 16, dict(kind="random", route=True)),
    ("g2-corr-bad", [700], [60000], 1, 2, 16, dict(bad=True)),
    ("g1-corr-route", [900, 1], [70000, 128], 2, 1, 16, dict(route=True)),
    ("g1-random-bad", [400], [100000], 1, 1, 32, dict(kind="random", bad=True)),
    ("g16-wide", [64], [1 << 20], 4, 16, 16, dict(kind="random", causal=False)),
    ("g16-wide-nokvb", [64], [1 << 20], 4, 16, 16, dict(kind="random", causal=False, kv_blocks=False, bad=True)),
    ("g8-smallumax", [300], [20000], 2, 8, 16, dict(umax=40)),
    ("g8-umax0", [300, 1], [20000, 100], 2, 8, 16, dict(umax=0)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("name,q_lens,kv_lens,hkv,g,topk,kw", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_gpu_builder_equals_torch_builder(monkeypatch, name, q_lens, kv_lens, hkv, g, topk, kw):
    _need_kernel()
    sel, items, bk = case(zlib.crc32(name.encode()) % 1000, q_lens, kv_lens, hkv, g, topk, **kw)
    want = torch_build(sel, items, bk)
    if kw.get("route"):
        assert (want.union_len < 0).any() and (want.union_len >= 0).any(), "case must mix routed and unrouted"
    assert_same(gpu_build(sel, items, bk, monkeypatch), want, f"{name}: ")
    # the torch ops on the GPU agree too (same tensors, the forced torch path)
    assert_same(gpu_build(sel, items, bk, monkeypatch, mode="torch"), want, f"{name} (torch on GPU): ")


@pytest.mark.gpu
@pytest.mark.parametrize("in_place", [False, True], ids=["staged", "in_place"])
def test_gpu_launch_overwrites_poisoned_outputs(in_place):
    _need_kernel()
    sel, items, bk = case(7, [333, 1, 90], [20000, 256, 4000], 2, 8, 16, bad=True, route=True)
    want = torch_build(sel, items, bk)
    n, umax, T = bk["num_items"], bk["umax"], bk["T"]
    dev = torch.device("cuda")
    union = torch.full((n, umax), POISON, dtype=torch.int32, device=dev)
    union_len = torch.full((n,), POISON, dtype=torch.int32, device=dev)
    mask = torch.full((n, umax, -(-T // 32)), POISON, dtype=torch.int32, device=dev)
    it = _to(items, dev)
    qu.launch(sel.to(dev), it.item_token0, it.item_ntok, it.item_kv_head, it.item_kv_blocks, union, union_len, mask,
              T=T, umax=umax, cap=min(umax, bk["route_max"]), in_place=in_place)
    order = torch.sort(union_len, descending=True, stable=True).indices.to(torch.int32)
    assert_same((union, union_len, mask, order), want)


@pytest.mark.gpu
def test_gpu_strided_selection_view(monkeypatch):
    _need_kernel()
    sel, items, bk = case(11, [400, 5], [30000, 900], 4, 16, 16)
    q2k = sel.transpose(0, 1).contiguous().cuda()  # [Hkv, total_q, topk] as the benchmarks keep it
    want = torch_build(sel, items, bk)
    monkeypatch.setenv("MSA_QOUTER_UNION", "cuda")
    it = _to(items, torch.device("cuda"))
    got = qouter.build_qouter_unions(q2k.transpose(0, 1), it.item_token0, it.item_ntok, it.item_kv_head,
                                     **{**bk, "item_kv_blocks": it.item_kv_blocks})
    assert_same(got, want)


@pytest.mark.gpu
def test_gpu_binding_errors_name_the_argument():
    _need_kernel()
    sel, items, bk = case(0, [40], [3000], 2, 16, 8)
    dev = torch.device("cuda")
    it = _to(items, dev)
    n, umax = bk["num_items"], bk["umax"]
    mod = qu.load_module(dev)
    good = dict(u=torch.empty(n, umax, dtype=torch.int32, device=dev), ul=torch.empty(n, dtype=torch.int32, device=dev),
                m=torch.empty(n, umax, 1, dtype=torch.int32, device=dev))
    tables = (it.item_token0, it.item_ntok, it.item_kv_head, it.item_kv_blocks)
    with pytest.raises(Exception, match="mask"):
        mod.qouter_union(sel.to(dev), *tables, good["u"], good["ul"], good["m"][:, :-1], 8, umax, umax, True, False)
    with pytest.raises(Exception, match="union"):
        mod.qouter_union(sel.to(dev), *tables, good["u"][:, :-1], good["ul"], good["m"], 8, umax, umax, True, False)
    with pytest.raises(Exception, match="item_ntok"):
        mod.qouter_union(sel.to(dev), it.item_token0, it.item_ntok[:-1], it.item_kv_head, it.item_kv_blocks,
                         good["u"], good["ul"], good["m"], 8, umax, umax, True, False)
    with pytest.raises(Exception, match="cap"):
        mod.qouter_union(sel.to(dev), *tables, good["u"], good["ul"], good["m"], 8, umax, umax + 1, True, False)


@pytest.mark.gpu
def test_gpu_cuda_graph_replay(monkeypatch):
    """Captured once, replayed on new selections of the same shape: equals the torch builder each time."""
    _need_kernel()
    monkeypatch.setenv("MSA_QOUTER_UNION", "cuda")
    q_lens, kv_lens = [300, 1], [20000, 500]
    sel0, items, bk = case(21, q_lens, kv_lens, 2, 16, 16, route=True)
    dev = torch.device("cuda")
    it = _to(items, dev)
    dkw = {**bk, "item_kv_blocks": it.item_kv_blocks}
    static_sel = sel0.to(dev)
    qouter.build_qouter_unions(static_sel, it.item_token0, it.item_ntok, it.item_kv_head, **dkw)  # JIT + warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = qouter.build_qouter_unions(static_sel, it.item_token0, it.item_ntok, it.item_kv_head, **dkw)
    for seed in (22, 23):
        sel, _, _ = case(seed, q_lens, kv_lens, 2, 16, 16, route=True)
        static_sel.copy_(sel.to(dev))
        graph.replay()
        torch.cuda.synchronize()
        assert_same(out, torch_build(sel, items, bk))


@pytest.mark.gpu
def test_gpu_build_without_host_sync(monkeypatch):
    _need_kernel()
    monkeypatch.setenv("MSA_QOUTER_UNION", "cuda")
    sel, items, bk = case(31, [200, 3], [9000, 400], 2, 8, 16, route=True)
    dev = torch.device("cuda")
    it = _to(items, dev)
    args = (sel.to(dev), it.item_token0, it.item_ntok, it.item_kv_head)
    dkw = {**bk, "item_kv_blocks": it.item_kv_blocks, "validate": False}
    qouter.build_qouter_unions(*args, **dkw)  # JIT load outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = qouter.build_qouter_unions(*args, **dkw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_same(got, torch_build(sel, items, bk))


def test_tile_order_is_a_cached_int32_arange_for_eager_calls():
    """The "tile" order is arange(n) (int32), one shared tensor per (n, device) for eager calls, the cache bounded."""
    qu._TILE_ORDERS.clear()
    a = qu._tile_order(37, torch.device("cpu"))
    assert a.dtype == torch.int32 and torch.equal(a, torch.arange(37, dtype=torch.int32))
    assert qu._tile_order(37, torch.device("cpu")) is a
    assert qu.item_order(torch.full((3000,), 5, dtype=torch.int32), "tile") is qu._tile_order(3000, torch.device("cpu"))
    for n in range(100):
        qu._tile_order(n, torch.device("cpu"))
    assert len(qu._TILE_ORDERS) <= 64


@pytest.mark.gpu
def test_gpu_tile_order_under_capture_is_recorded_fresh():
    """Under CUDA-graph capture the order is a fresh arange recorded in the graph (a cached tensor could be evicted and
    freed while the graph still holds its pointer); replays give arange(n)."""
    _need_kernel()
    dev = torch.device("cuda")
    cached = qu._tile_order(4099, dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        with torch.cuda.graph(graph, stream=side):
            fresh = qu._tile_order(4099, dev)
    assert fresh.data_ptr() != cached.data_ptr()
    fresh.fill_(-1)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(fresh.cpu(), torch.arange(4099, dtype=torch.int32))
