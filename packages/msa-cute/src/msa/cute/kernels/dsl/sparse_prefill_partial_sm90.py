"""KV-outer sparse prefill for Hopper: one KV block x the queries that selected it -> per-slot partial outputs.

Work item (from :class:`msa.cute.K2qSchedule`): ``(kv_head h, row, batch b, block j, q_start, q_count)``. The CTA
gathers the Q rows of the ``q_count`` tokens listed at ``q_slot[h, q_start:q_start+q_count]`` for the
``G = Hq/Hkv`` query heads of KV head ``h`` (GQA packed along M: tile row ``r`` = token ``r // G``, head ``r % G``;
``q_count * G <= 128``), loads K and V of block ``j`` with TMA, computes ``S = Q K^T`` and ``O = softmax(S) V`` with
wgmma over the block's 128 keys only, and writes the block's normalised partial ``O`` and its LSE to the token's
slot: ``o_part[slot, t, hq, :]``, ``lse_part[slot, t, hq]`` (``q_slot`` packs ``q_local | slot << 24``; the slot is
the block's position in the token's ascending block list). The combine kernel merges the slots.

Masks (per request: ``kv_len = seqused_k`` or the K length, ``q_len``): keys ``>= kv_len`` always; with causal,
keys ``> pos + kv_len - q_len`` (bottom-right). Only the block's own 128 keys are visible to the item, so only
partial / diagonal blocks actually mask anything. V rows past ``kv_len`` are zeroed in smem before P @ V (a page
tail may hold anything, and 0 * NaN would poison every row).

CTA = 2 warpgroups (256 threads), each owns 64 of the 128 tile rows. Persistent: CTA ``c`` of ``grid`` runs the
contiguous share (``n // grid`` items, one more for the first ``n % grid``) of the device-side ``work_count = n``;
the schedule lists a row's chunks back to back, so K/V are loaded (TMA) only when (KV head, block) changes and
otherwise stay in smem.
bf16 partials: the normalised O tile is staged in sQ (free once S = Q K^T is done) and written with 16-byte
row-contiguous stores (a token's G heads are one G x 256 B run of ``o_part``); fp32 partials store straight from
the accumulators. Two CTAs fit an SM (96 KiB smem each), so one CTA's loads overlap the other's math. No warp
specialisation / multi-stage pipeline yet (see benchmarks/sparse_prefill_notes.md).
"""

from __future__ import annotations

import cutlass.cute as cute
import cutlass.utils.hopper_helpers as hopper
from cutlass.cute.nvgpu import cpasync, warpgroup
from msa.cute.jit import CuteCompile
from msa.cute.kernels.dsl.common import DTYPES, LN_2, fake_row_major, sym
from msa.cute.kernels.dsl.sm90 import (
    acc_rows_view,
    quad_max,
    quad_sum,
    smem_layout_rows,
    transpose_view,
    warpgroup_gemm,
)

import cutlass
from cutlass import BFloat16, Float32, Int32, const_expr

HEAD_DIM = 128
BLOCK = 128  # KV block = page = MMA N of S
TILE_M = 128  # query rows (tokens x packed heads) per item
THREADS = 256
Q_SLOT_BITS = 24
Q_CHUNK = 8  # bf16 elements per 16-byte cp.async
THREADS_PER_ROW = HEAD_DIM // Q_CHUNK
ROWS_PER_PASS = THREADS // THREADS_PER_ROW


def frg_a_view(acc: cute.Tensor) -> cute.Tensor:
    """S accumulator ``((2, 2, N/8), M, 1)`` regrouped as the RS-wgmma A fragment ``((2, 2, 2), M, N/16)``.

    The A fragment of an m64nNk16 wgmma holds, per thread, the same (row, column) positions as the C fragment of an
    m64n16 one, so P can be fed from the S registers without moving data; only the grouping of modes changes.
    """
    lay = acc.layout
    split = cute.logical_divide(lay, ((None, None, 2), None, None))
    s, d = split.shape, split.stride
    frg = cute.make_layout(
        ((s[0][0], s[0][1], s[0][2][0]), s[1], (s[0][2][1], s[2])),
        stride=((d[0][0], d[0][1], d[0][2][0]), d[1], (d[0][2][1], d[2])),
    )
    return cute.make_tensor(acc.iterator, frg)


class SparsePrefillPartialSm90:
    def __init__(self, qhead_per_kv: int, paged: bool, partial_dtype: str, debug: int = 0):
        if qhead_per_kv < 1 or TILE_M % qhead_per_kv:
            raise ValueError(f"qhead_per_kv: expected a divisor of {TILE_M}, got {qhead_per_kv}")
        self.group = qhead_per_kv
        self.paged = paged
        # diagnostic builds (bit mask; 0 = the product kernel): 1 per-item printf + bounded K/V barrier wait,
        # 2 skip the K/V TMA and its wait, 4 skip the Q loads, 8 skip the partial-block V zeroing, 16 skip
        # S = QK^T + softmax, 32 skip O = PV, 64 skip the epilogue stores (which stage hangs?)
        self.debug = int(debug)
        self.partial_dtype = DTYPES[partial_dtype]
        self.dtype = BFloat16
        self.stage_o = partial_dtype == "bfloat16"  # bf16 O tile fits sQ: staged, coalesced epilogue

    @cute.jit
    def __call__(self, q: cute.Tensor, k: cute.Tensor, v: cute.Tensor, work: cute.Tensor, work_count: cute.Tensor,
                 q_slot: cute.Tensor, cu_q: cute.Tensor, cu_k: cute.Tensor, kv_len: cute.Tensor,
                 page_table: cute.Tensor, o_part: cute.Tensor, lse_part: cute.Tensor, scale_log2: Float32,
                 causal: Int32, topk: Int32, num_ctas: Int32, stream):
        s_layout = smem_layout_rows(self.dtype, BLOCK, HEAD_DIM)
        q_layout = smem_layout_rows(self.dtype, TILE_M, HEAD_DIM)
        # K/V as (key, d, head[, page]) so that one TMA box is a block's 128 keys x 128 dims of one head.
        if const_expr(self.paged):
            kv_mode = [2, 3, 1, 0]  # [pages, Hkv, 128, D] -> (128, D, Hkv, pages)
        else:
            kv_mode = [0, 2, 1]  # [total_k, Hkv, D] -> (total_k, D, Hkv)
        k_view = cute.make_tensor(k.iterator, cute.select(k.layout, mode=kv_mode))
        v_view = cute.make_tensor(v.iterator, cute.select(v.layout, mode=kv_mode))
        tma_op = cpasync.CopyBulkTensorTileG2SOp()
        atom_k, tma_k = cpasync.make_tiled_tma_atom(tma_op, k_view, s_layout, (BLOCK, HEAD_DIM))
        atom_v, tma_v = cpasync.make_tiled_tma_atom(tma_op, v_view, s_layout, (BLOCK, HEAD_DIM))

        mma_qk = hopper.make_trivial_tiled_mma(
            self.dtype, self.dtype, cute.nvgpu.OperandMajorMode.K, cute.nvgpu.OperandMajorMode.K, Float32,
            (TILE_M // 64, 1, 1), (64, BLOCK))
        mma_pv = hopper.make_trivial_tiled_mma(
            self.dtype, self.dtype, cute.nvgpu.OperandMajorMode.K, cute.nvgpu.OperandMajorMode.MN, Float32,
            (TILE_M // 64, 1, 1), (64, HEAD_DIM), warpgroup.OperandSource.RMEM)

        copy_atom_q = cute.make_copy_atom(cpasync.CopyG2SOp(cache_mode=cpasync.LoadCacheMode.GLOBAL), self.dtype,
                                          num_bits_per_copy=128)
        copy_q = cute.make_tiled_copy_tv(copy_atom_q,
                                         cute.make_ordered_layout((ROWS_PER_PASS, THREADS_PER_ROW), order=(1, 0)),
                                         cute.make_layout((1, Q_CHUNK)))

        @cute.struct
        class Storage:
            mbar: cute.struct.MemRange[cutlass.Int64, 1]
            sQ: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(q_layout)], 1024]
            sK: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(s_layout)], 1024]
            sV: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(s_layout)], 1024]

        kv_bytes = 2 * cute.size_in_bytes(self.dtype, s_layout)
        self.kernel(q, tma_k, tma_v, work, work_count, q_slot, cu_q, cu_k, kv_len, page_table, o_part, lse_part,
                    atom_k, atom_v, copy_atom_q, copy_q, mma_qk, mma_pv, q_layout, s_layout, scale_log2, causal,
                    topk, Storage, kv_bytes).launch(
            grid=[num_ctas, 1, 1], block=[THREADS, 1, 1], stream=stream, min_blocks_per_mp=2,
            preferred_smem_carveout=100)

    @cute.kernel
    def kernel(self, mQ: cute.Tensor, tma_k: cute.Tensor, tma_v: cute.Tensor, mWork: cute.Tensor,
               mWorkCount: cute.Tensor, mQSlot: cute.Tensor, mCuQ: cute.Tensor, mCuK: cute.Tensor,
               mKvLen: cute.Tensor, mPageTable: cute.Tensor, mOPart: cute.Tensor, mLsePart: cute.Tensor,
               atom_k: cute.CopyAtom, atom_v: cute.CopyAtom, copy_atom_q: cute.CopyAtom, copy_q: cute.TiledCopy,
               mma_qk: cute.TiledMma, mma_pv: cute.TiledMma, q_layout: cute.ComposedLayout,
               s_layout: cute.ComposedLayout, scale_log2: Float32, causal: Int32, topk: Int32,
               Storage: cutlass.Constexpr, kv_bytes: cutlass.Constexpr):
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        gdim, _, _ = cute.arch.grid_dim()
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        wg = cute.arch.make_warp_uniform(tidx // 128)
        lane = tidx % 32
        group = self.group

        storage = cutlass.memory.SmemAllocator().allocate(Storage)
        mbar = storage.mbar.data_ptr()
        if warp == 0:
            cpasync.prefetch_descriptor(atom_k)
            cpasync.prefetch_descriptor(atom_v)
            with cute.arch.elect_one():
                cute.arch.mbarrier_init(mbar, 1)
        cute.arch.mbarrier_init_fence()
        cute.arch.sync_threads()

        sQ = storage.sQ.get_tensor(q_layout.outer, swizzle=q_layout.inner)
        sK = storage.sK.get_tensor(s_layout.outer, swizzle=s_layout.inner)
        sV = storage.sV.get_tensor(s_layout.outer, swizzle=s_layout.inner)
        sVt = transpose_view(sV)

        # wgmma operands are partitioned per warpgroup, accumulators and coordinates per thread.
        wg_qk = mma_qk.get_slice(wg * 128)
        wg_pv = mma_pv.get_slice(wg * 128)
        thr_qk = mma_qk.get_slice(tidx)
        thr_pv = mma_pv.get_slice(tidx)
        tSrQ = wg_qk.make_fragment_A(wg_qk.partition_A(sQ))
        tSrK = wg_qk.make_fragment_B(wg_qk.partition_B(sK))
        tOrVt = wg_pv.make_fragment_B(wg_pv.partition_B(sVt))
        tOrP = wg_pv.make_fragment_A(wg_pv.partition_shape_A((TILE_M, BLOCK)))
        acc_s = cute.make_rmem_tensor(thr_qk.partition_shape_C((TILE_M, BLOCK)), Float32)
        acc_o = cute.make_rmem_tensor(thr_pv.partition_shape_C((TILE_M, HEAD_DIM)), Float32)
        s_rows = acc_rows_view(acc_s)
        o_rows = acc_rows_view(acc_o)
        s_coord = acc_rows_view(thr_qk.partition_C(cute.make_identity_tensor((TILE_M, BLOCK))))
        # Thread 0's coordinates are compile-time constants; any thread's columns are thread 0's shifted by its
        # first column, so masks compare constants against a per-row limit (no per-element coordinate registers).
        s_coord0 = acc_rows_view(mma_qk.get_slice(0).partition_C(cute.make_identity_tensor((TILE_M, BLOCK))))
        col0 = s_coord[0, 0][1]
        o_coord = acc_rows_view(thr_pv.partition_C(cute.make_identity_tensor((TILE_M, HEAD_DIM))))
        n_rows = cute.size(s_rows, mode=[0])
        row_lse = cute.make_rmem_tensor((n_rows,), Float32)
        row_inv = cute.make_rmem_tensor((n_rows,), Float32)

        thr_copy_q = copy_q.get_slice(tidx)
        tQsQ = thr_copy_q.partition_D(sQ)
        tOsO = thr_pv.partition_C(sQ)  # the O tile staged in sQ, in the accumulator's per-thread layout
        store_atom = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), self.dtype, num_bits_per_copy=128)
        q_row0 = tidx // THREADS_PER_ROW
        q_chunk = tidx % THREADS_PER_ROW

        n_items = mWorkCount[0]
        # Contiguous share of the work list per CTA: the schedule lists a row's chunks back to back, so consecutive
        # items mostly share (KV head, block) and K/V stay in smem (reloaded only when the block changes).
        per_cta = n_items // gdim  # (bidx * n_items) // gdim would overflow int32 past ~8M items (1M tokens)
        extra = n_items - per_cta * gdim  # the first `extra` CTAs take one more
        first = bidx * per_cta + cutlass.min(bidx, extra)
        end = first + per_cta + cutlass.min(cutlass.max(extra - bidx, 0), 1)
        prev_h = Int32(-1)
        prev_row = Int32(-1)
        kv_loads = Int32(0)  # K/V loads so far: the barrier's phase
        q_entries = cute.make_rmem_tensor((cute.size(tQsQ, mode=[1]),), Int32)
        for item in cutlass.range(first, end, 1, unroll=1):
            h = mWork[item, 0]
            row = mWork[item, 1]
            b = mWork[item, 2]
            blk = mWork[item, 3]
            q_start = mWork[item, 4]
            q_count = mWork[item, 5]
            kv_len = mKvLen[b]
            q_base = mCuQ[b]
            q_len = mCuQ[b + 1] - q_base
            key0 = blk * BLOCK
            n_keys = kv_len - key0  # keys of this block that exist for the request (may be <= 0 or > 128)
            new_kv = (h - prev_h) | (row - prev_row)  # != 0: another block than the one in smem
            phase = kv_loads % 2

            # ---- loads: K/V by TMA (warp 0; one elected lane issues), Q rows by cp.async (all threads) ----
            # The TMA copy is warp-collective (ELECT + WARPSYNC on the full warp in SASS): issued from a one-thread
            # branch (`tidx == 0`, the first version) lane 0 waited at the WARPSYNC for lanes already parked at
            # the CTA barrier below -- the hang of the first H100 runs.
            if warp == 0 and new_kv != 0 and const_expr(not self.debug & 2):
                with cute.arch.elect_one():
                    cute.arch.mbarrier_arrive_and_expect_tx(mbar, kv_bytes)
                if const_expr(self.paged):
                    page = mPageTable[b, blk]
                    g_k = tma_k[None, None, h, page]
                    g_v = tma_v[None, None, h, page]
                else:
                    row0 = mCuK[b] + key0
                    g_k = cute.local_tile(cute.domain_offset((row0, 0), tma_k[None, None, h]), (BLOCK, HEAD_DIM),
                                          (0, 0))
                    g_v = cute.local_tile(cute.domain_offset((row0, 0), tma_v[None, None, h]), (BLOCK, HEAD_DIM),
                                          (0, 0))
                for atom, g, s in ((atom_k, g_k, sK), (atom_v, g_v, sV)):
                    t_s, t_g = cpasync.tma_partition(atom, 0, cute.make_layout(1), cute.group_modes(s, 0, 2),
                                                     cute.group_modes(g, 0, 2))
                    cute.copy(atom, t_g, t_s, tma_bar_ptr=mbar)
            for m in cutlass.range_constexpr(cute.size(tQsQ, mode=[1]) if not self.debug & 4 else 0):
                r = m * ROWS_PER_PASS + q_row0
                i = r // group
                q_entries[m] = Int32(0)
                if i < q_count:
                    entry = mQSlot[h, q_start + i]
                    q_entries[m] = entry
                    tok = q_base + (entry & ((1 << Q_SLOT_BITS) - 1))
                    src = mQ.iterator + cute.crd2idx((tok, h * group + (r - i * group), 0), mQ.layout)
                    src = cute.make_ptr(self.dtype, src.toint(), cute.AddressSpace.gmem, assumed_align=16)
                    chunks = cute.tiled_divide(cute.make_tensor(src, (HEAD_DIM,)), (Q_CHUNK,))
                    cute.copy(copy_atom_q, chunks[None, q_chunk], tQsQ[None, m, 0])
            cute.arch.cp_async_commit_group()
            cute.arch.cp_async_wait_group(0)
            cute.arch.fence_view_async_shared()  # cp.async (generic proxy) writes -> wgmma (async proxy) reads
            cute.arch.sync_threads()
            if new_kv != 0:
                if const_expr(self.debug & 2):
                    pass
                elif const_expr(self.debug & 1):
                    if tidx == 0:
                        cute.printf("partial dbg: cta %d item %d/%d h %d b %d blk %d q_start %d q_count %d "
                                    "n_keys %d phase %d\n", bidx, item, n_items, h, b, blk, q_start, q_count,
                                    n_keys, phase)
                    done = cute.arch.mbarrier_try_wait(mbar, phase)
                    tries = Int32(0)
                    while not done and tries < 200000:
                        done = cute.arch.mbarrier_try_wait(mbar, phase)
                        tries += 1
                    if not done and tidx == 0:
                        cute.printf("partial dbg: cta %d item %d: K/V barrier wait TIMED OUT (phase %d)\n", bidx,
                                    item, phase)
                else:
                    cute.arch.mbarrier_wait(mbar, phase)
                if n_keys < BLOCK and const_expr(not self.debug & 8):  # partial block: V rows past kv_len -> 0
                    first_dead = cutlass.max(n_keys, 0)
                    for e in cutlass.range((BLOCK * HEAD_DIM) // THREADS, unroll=8):
                        idx = e * THREADS + tidx
                        rr = idx // HEAD_DIM
                        if rr >= first_dead:
                            sV[rr, idx - rr * HEAD_DIM] = self.dtype(0.0)
                    cute.arch.fence_view_async_shared()
                    cute.arch.sync_threads()
                kv_loads += 1
            prev_h = h
            prev_row = row

            # ---- S = Q K^T, masked softmax over the block ----
            if const_expr(not self.debug & 16):
                warpgroup_gemm(mma_qk, acc_s, tSrQ, tSrK, zero_init=True)
                for ri in cutlass.range_constexpr(n_rows):
                    r = s_coord[ri, 0][0]
                    i = r // group
                    limit = n_keys
                    if causal != 0:
                        pos = mQSlot[h, q_start + cutlass.min(i, q_count - 1)] & ((1 << Q_SLOT_BITS) - 1)
                        limit = cutlass.min(limit, pos + kv_len - q_len - key0 + 1)
                    limit -= col0
                    mx = -Float32.inf
                    for ci in cutlass.range_constexpr(cute.size(s_rows, mode=[1])):
                        if s_coord0[ri, ci][1] >= limit:
                            s_rows[ri, ci] = -Float32.inf
                        mx = cute.arch.fmax(mx, s_rows[ri, ci])
                    mx = quad_max(mx)
                    m_scaled = mx * scale_log2 if mx != -Float32.inf else Float32(0.0)
                    total = Float32(0.0)
                    for ci in cutlass.range_constexpr(cute.size(s_rows, mode=[1])):
                        p = cute.math.exp2(s_rows[ri, ci] * scale_log2 - m_scaled, fastmath=True)
                        s_rows[ri, ci] = p
                        total += p
                    total = quad_sum(total)
                    row_lse[ri] = -Float32.inf
                    row_inv[ri] = Float32(0.0)
                    if total > 0.0:
                        row_lse[ri] = (m_scaled + cute.math.log2(total, fastmath=True)) * LN_2
                        row_inv[ri] = cute.arch.rcp_approx(total)

            # ---- O = P V (P from registers) ----
            if const_expr(not self.debug & 32):
                tOrP.store(frg_a_view(acc_s).load().to(self.dtype))
                warpgroup_gemm(mma_pv, acc_o, tOrP, tOrVt, zero_init=True)

            # ---- epilogue: normalised partial O and LSE into the token's slot ----
            if const_expr(not self.debug & 64):
                for ri in cutlass.range_constexpr(n_rows):  # LSE: one lane of the row's quad
                    r = o_coord[ri, 0][0]
                    i = r // group
                    if i < q_count and lane % 4 == 0:
                        entry = mQSlot[h, q_start + i]
                        slot = entry >> Q_SLOT_BITS
                        if slot < topk:
                            tok = q_base + (entry & ((1 << Q_SLOT_BITS) - 1))
                            mLsePart[slot, tok, h * group + (r - i * group)] = row_lse[ri]
                if const_expr(self.stage_o):
                    # bf16: stage the tile in sQ (free since S = QK^T; each warpgroup writes its own rows), then
                    # 16-byte row-contiguous stores with the Q gather's thread map (a token's G heads are one
                    # contiguous G x 256 B run of o_part).
                    for ri in cutlass.range_constexpr(n_rows):
                        for ci in cutlass.range_constexpr(cute.size(o_rows, mode=[1])):
                            o_rows[ri, ci] = o_rows[ri, ci] * row_inv[ri]
                    tOsO.store(acc_o.load().to(self.dtype))
                    cute.arch.sync_threads()
                    for m in cutlass.range_constexpr(cute.size(tQsQ, mode=[1])):
                        r = m * ROWS_PER_PASS + q_row0
                        i = r // group
                        slot = q_entries[m] >> Q_SLOT_BITS
                        if i < q_count and slot < topk:
                            tok = q_base + (q_entries[m] & ((1 << Q_SLOT_BITS) - 1))
                            dst = mOPart.iterator + cute.crd2idx((slot, tok, h * group + (r - i * group),
                                                                  q_chunk * Q_CHUNK), mOPart.layout)
                            dst = cute.make_ptr(self.dtype, dst.toint(), cute.AddressSpace.gmem, assumed_align=16)
                            cute.copy(store_atom, tQsQ[None, m, 0], cute.make_tensor(dst, (Q_CHUNK,)))
                else:
                    for ri in cutlass.range_constexpr(n_rows):
                        r = o_coord[ri, 0][0]
                        i = r // group
                        if i < q_count:
                            entry = mQSlot[h, q_start + i]
                            slot = entry >> Q_SLOT_BITS
                            tok = q_base + (entry & ((1 << Q_SLOT_BITS) - 1))
                            hq = h * group + (r - i * group)
                            if slot < topk:
                                for ci in cutlass.range_constexpr(cute.size(o_rows, mode=[1])):
                                    mOPart[slot, tok, hq, o_coord[ri, ci][1]] = (o_rows[ri, ci] * row_inv[ri]).to(
                                        mOPart.element_type)
            cute.arch.sync_threads()  # smem is reused by the next item
            if const_expr(self.debug):
                if tidx == 0:
                    cute.printf("partial dbg: cta %d item %d done\n", bidx, item)


VARIANTS = ("serial", "ws")


def partial(qhead_per_kv: int, paged: bool = False, partial_dtype: str = "bfloat16", debug: int = 0,
            variant: str = "serial") -> CuteCompile:
    """Factory of the SM90 partial kernel (bf16 Q/K/V, D = 128, block 128); arguments in the module docstring.
    ``debug``: diagnostic build bit mask (see ``SparsePrefillPartialSm90.__init__``); 0 = the product kernel.
    ``variant``: "serial" (this module's kernel: 2 CTAs per SM, every phase in turn) or "ws" (the warp-specialised
    pipeline of :mod:`sparse_prefill_partial_ws_sm90`: 1 CTA per SM, same arguments and results)."""
    if partial_dtype not in ("bfloat16", "float32"):
        raise ValueError(f"partial_dtype: expected bfloat16 or float32, got {partial_dtype!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    if variant == "ws" and debug:
        raise ValueError("debug: the diagnostic builds exist for the serial variant only")
    total_q, hq, hkv, nslots, batch, batch1 = sym(), sym(), sym(), sym(), sym(), sym()
    bf16 = cutlass.BFloat16
    if paged:
        pages = sym()
        k = fake_row_major(bf16, (pages, hkv, BLOCK, HEAD_DIM))
        v = fake_row_major(bf16, (pages, hkv, BLOCK, HEAD_DIM))
    else:
        total_k = sym()
        k = fake_row_major(bf16, (total_k, hkv, HEAD_DIM))
        v = fake_row_major(bf16, (total_k, hkv, HEAD_DIM))
    args = (
        fake_row_major(bf16, (total_q, hq, HEAD_DIM)),
        k,
        v,
        fake_row_major(Int32, (sym(), 6), align=4),  # work
        fake_row_major(Int32, (1,), align=4),  # work_count
        fake_row_major(Int32, (hkv, sym()), align=4),  # q_slot
        fake_row_major(Int32, (batch1,), align=4),  # cu_seqlens_q
        fake_row_major(Int32, (sym(),), align=4),  # cu_seqlens_k (ragged) / unused (paged)
        fake_row_major(Int32, (batch,), align=4),  # kv_len
        fake_row_major(Int32, (sym(), sym()), align=4),  # page_table (paged) / unused (ragged)
        fake_row_major(DTYPES[partial_dtype], (nslots, total_q, hq, HEAD_DIM)),
        fake_row_major(Float32, (nslots, total_q, hq), align=4),
        Float32(1.0),  # softmax_scale * log2(e)
        Int32(0),  # causal
        Int32(16),  # topk (slots per token; a slot >= topk is never written)
        Int32(1),  # CTAs (persistent)
        cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True),
    )
    if variant == "ws":
        if qhead_per_kv < 1 or TILE_M % qhead_per_kv:
            raise ValueError(f"qhead_per_kv: expected a divisor of {TILE_M}, got {qhead_per_kv}")
        from msa.cute.kernels.dsl.sparse_prefill_partial_ws_sm90 import SparsePrefillPartialWsSm90

        return CuteCompile(SparsePrefillPartialWsSm90(qhead_per_kv, paged, DTYPES[partial_dtype], frg_a_view), args)
    return CuteCompile(SparsePrefillPartialSm90(qhead_per_kv, paged, partial_dtype, debug), args)


partial.archs = ("sm_90a",)  # wgmma + TMA as used here are Hopper-only
