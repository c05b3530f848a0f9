"""KV-outer sparse prefill partial kernel, warp-specialised variant ("ws") for Hopper.

Same contract, arguments and results as :mod:`sparse_prefill_partial_sm90` (the "serial" variant: read its
docstring for the work item, the q_slot packing, the masks and the slot layout). What differs is the schedule of
the phases inside a CTA:

- **1 CTA per SM, 3 warpgroups (384 threads).** Warpgroup 0 is the producer, warpgroups 1 and 2 the consumers
  (64 rows each of the 128-row item, as in the serial kernel).
- **Producer**: walks the CTA's contiguous item range ahead of the consumers. Per item it waits for a free Q stage
  (``q_empty``), gathers the item's Q rows with 16-byte ``cp.async`` (128 threads, 16 per thread) into that stage
  of a ``Q_STAGES``-deep ring, writes the item's metadata (KV head, block, q_count, kv_len, q_base, q_len, flags and
  the per-token q_slot entries) next to it in smem, and arrives on ``q_full`` twice per thread: once plainly (after
  the metadata stores: release) and once with ``cp.async.mbarrier.arrive.noinc`` (fires when the thread's copies
  have landed). When (KV head, block) changes it waits for the consumers to release the K/V buffer (``kv_empty``)
  and warp 0 (the whole warp: the DSL TMA copy is warp-collective) issues the K/V TMA on ``kv_full``. The work row
  of the next item is loaded one item ahead (it is the head of the producer's dependency chain and decides the
  K/V release flag).
- **Consumers**: wait ``q_full`` of the stage, read the metadata from smem (no global loads on their critical
  path), wait ``kv_full`` on a block change (then zero V rows past kv_len, as the serial kernel), compute
  ``S = Q K^T``, the masked block softmax and ``O = P V``; after the last item of a block they arrive on
  ``kv_empty``; the epilogue writes the LSEs, stages the normalised bf16 O tile in the warpgroup's own rows of the
  Q stage (free: its S = Q K^T is done) and stores it with 16-byte row-contiguous ``STG.E.128`` (fire and forget),
  then arrives on ``q_empty``. fp32 partials are stored from the accumulators and the stage is released right
  after P V.

So a CTA keeps up to ``Q_STAGES - 1`` items' Q gathers in flight while its consumers compute, instead of every
phase being serial. K/V are single-buffered: a block change stalls the producer until the consumers finish the
old block (once per row of the CSR, i.e. every ~16-256 items in the benchmark shapes).
"""

from __future__ import annotations

import cutlass.cute as cute
import cutlass.utils.hopper_helpers as hopper
from cutlass.cute.nvgpu import cpasync, warpgroup
from msa.cute.kernels.dsl.common import LN_2
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
BLOCK = 128
TILE_M = 128
THREADS = 384  # producer warpgroup + 2 consumer warpgroups
Q_STAGES = 4  # 4 x 32 KiB Q ring + 64 KiB K/V = 192 KiB smem (1 CTA per SM)
Q_SLOT_BITS = 24
Q_CHUNK = 8  # bf16 elements per 16-byte cp.async / store
THREADS_PER_ROW = HEAD_DIM // Q_CHUNK
ROWS_PER_PASS = 128 // THREADS_PER_ROW  # one warpgroup moves 8 rows per pass
META = 16 + TILE_M  # per stage: 16 scalar fields + one q_slot entry per token
# metadata fields
F_HEAD, F_BLOCK, F_QCOUNT, F_KVLEN, F_QBASE, F_QLEN, F_FLAGS = range(7)
FLAG_NEW_KV, FLAG_RELEASE_KV = 1, 2
# named barriers (0 is __syncthreads)
BAR_CONSUMERS = 1
BAR_WG0 = 2  # + consumer warpgroup index


class SparsePrefillPartialWsSm90:
    def __init__(self, qhead_per_kv: int, paged: bool, partial_dtype, frg_a_view):
        self.group = qhead_per_kv
        self.paged = paged
        self.partial_dtype = partial_dtype
        self.dtype = BFloat16
        self.stage_o = partial_dtype is BFloat16
        self.frg_a_view = frg_a_view

    @cute.jit
    def __call__(self, q: cute.Tensor, k: cute.Tensor, v: cute.Tensor, work: cute.Tensor, work_count: cute.Tensor,
                 q_slot: cute.Tensor, cu_q: cute.Tensor, cu_k: cute.Tensor, kv_len: cute.Tensor,
                 page_table: cute.Tensor, o_part: cute.Tensor, lse_part: cute.Tensor, scale_log2: Float32,
                 causal: Int32, topk: Int32, num_ctas: Int32, stream):
        s_layout = smem_layout_rows(self.dtype, BLOCK, HEAD_DIM)
        q_layout = smem_layout_rows(self.dtype, TILE_M, HEAD_DIM, stages=Q_STAGES)
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
        # one warpgroup: 8 rows x 16 chunks of 16 B per pass
        copy_q = cute.make_tiled_copy_tv(copy_atom_q,
                                         cute.make_ordered_layout((ROWS_PER_PASS, THREADS_PER_ROW), order=(1, 0)),
                                         cute.make_layout((1, Q_CHUNK)))

        @cute.struct
        class Storage:
            # q_full[Q_STAGES], q_empty[Q_STAGES], kv_full, kv_empty
            mbar: cute.struct.MemRange[cutlass.Int64, 2 * Q_STAGES + 2]
            meta: cute.struct.MemRange[Int32, META * Q_STAGES]
            sQ: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(q_layout)], 1024]
            sK: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(s_layout)], 1024]
            sV: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(s_layout)], 1024]

        kv_bytes = 2 * cute.size_in_bytes(self.dtype, s_layout)
        self.kernel(q, tma_k, tma_v, work, work_count, q_slot, cu_q, cu_k, kv_len, page_table, o_part, lse_part,
                    atom_k, atom_v, copy_atom_q, copy_q, mma_qk, mma_pv, q_layout, s_layout, scale_log2, causal,
                    topk, Storage, kv_bytes).launch(
            grid=[num_ctas, 1, 1], block=[THREADS, 1, 1], stream=stream, min_blocks_per_mp=1)

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
        group = self.group
        slot_mask = (1 << Q_SLOT_BITS) - 1

        storage = cutlass.memory.SmemAllocator().allocate(Storage)
        mbar = storage.mbar.data_ptr()
        q_full = mbar
        q_empty = mbar + Q_STAGES
        kv_full = mbar + 2 * Q_STAGES
        kv_empty = mbar + 2 * Q_STAGES + 1
        if warp == 0:
            cpasync.prefetch_descriptor(atom_k)
            cpasync.prefetch_descriptor(atom_v)
            with cute.arch.elect_one():
                for s in cutlass.range_constexpr(Q_STAGES):
                    cute.arch.mbarrier_init(q_full + s, 256)  # 128 plain + 128 cp.async arrivals (producer)
                    cute.arch.mbarrier_init(q_empty + s, 256)  # every consumer thread
                cute.arch.mbarrier_init(kv_full, 1)  # expect_tx by the producer's elected lane
                cute.arch.mbarrier_init(kv_empty, 256)
        cute.arch.mbarrier_init_fence()
        cute.arch.sync_threads()

        sMeta = storage.meta.get_tensor(cute.make_layout((META, Q_STAGES)))
        sQ_all = storage.sQ.get_tensor(q_layout.outer, swizzle=q_layout.inner)  # (128, 128, Q_STAGES)
        sK = storage.sK.get_tensor(s_layout.outer, swizzle=s_layout.inner)
        sV = storage.sV.get_tensor(s_layout.outer, swizzle=s_layout.inner)
        sVt = transpose_view(sV)

        n_items = mWorkCount[0]
        per_cta = n_items // gdim
        extra = n_items - per_cta * gdim
        first = bidx * per_cta + cutlass.min(bidx, extra)
        end = first + per_cta + cutlass.min(cutlass.max(extra - bidx, 0), 1)

        if wg == 0:
            # ================================ producer ================================
            thr_copy_q = copy_q.get_slice(tidx)
            q_row0 = tidx // THREADS_PER_ROW
            q_chunk = tidx % THREADS_PER_ROW
            kv_loads = Int32(0)
            # work row of the current item, loaded one item ahead
            nh = Int32(-1)
            nrow = Int32(-1)
            nb = Int32(0)
            nblk = Int32(0)
            nqs = Int32(0)
            nqc = Int32(0)
            if first < end:
                nh = mWork[first, 0]
                nrow = mWork[first, 1]
                nb = mWork[first, 2]
                nblk = mWork[first, 3]
                nqs = mWork[first, 4]
                nqc = mWork[first, 5]
            prev_h = Int32(-1)
            prev_row = Int32(-1)
            for item in cutlass.range(first, end, 1, unroll=1):
                h, row, b, blk, q_start, q_count = nh, nrow, nb, nblk, nqs, nqc
                if item + 1 < end:
                    nh = mWork[item + 1, 0]
                    nrow = mWork[item + 1, 1]
                    nb = mWork[item + 1, 2]
                    nblk = mWork[item + 1, 3]
                    nqs = mWork[item + 1, 4]
                    nqc = mWork[item + 1, 5]
                else:
                    nh = Int32(-1)
                    nrow = Int32(-1)
                n = item - first
                stage = n % Q_STAGES
                new_kv = ((h - prev_h) | (row - prev_row)) != 0
                # the next item uses another block (or there is none: one spare kv_empty phase, never waited on)
                release = ((h - nh) | (row - nrow)) != 0
                prev_h = h
                prev_row = row
                kv_len = mKvLen[b]
                q_base = mCuQ[b]
                q_len = mCuQ[b + 1] - q_base

                # K/V: only on a block change, after the consumers released the old block. Whole warp 0 (the
                # TMA copy is warp-collective), one elected lane arms the barrier.
                if warp == 0 and new_kv:
                    if kv_loads > 0:
                        cute.arch.mbarrier_wait(kv_empty, (kv_loads - 1) % 2)
                    with cute.arch.elect_one():
                        cute.arch.mbarrier_arrive_and_expect_tx(kv_full, kv_bytes)
                    if const_expr(self.paged):
                        page = mPageTable[b, blk]
                        g_k = tma_k[None, None, h, page]
                        g_v = tma_v[None, None, h, page]
                    else:
                        row0 = mCuK[b] + blk * BLOCK
                        g_k = cute.local_tile(cute.domain_offset((row0, 0), tma_k[None, None, h]),
                                              (BLOCK, HEAD_DIM), (0, 0))
                        g_v = cute.local_tile(cute.domain_offset((row0, 0), tma_v[None, None, h]),
                                              (BLOCK, HEAD_DIM), (0, 0))
                    for atom, g, s in ((atom_k, g_k, sK), (atom_v, g_v, sV)):
                        t_s, t_g = cpasync.tma_partition(atom, 0, cute.make_layout(1), cute.group_modes(s, 0, 2),
                                                         cute.group_modes(g, 0, 2))
                        cute.copy(atom, t_g, t_s, tma_bar_ptr=kv_full)
                if new_kv:
                    kv_loads += 1

                # Q: wait for the stage, gather, publish metadata, arrive (plain + when the copies land).
                if n >= Q_STAGES:
                    cute.arch.mbarrier_wait(q_empty + stage, (n // Q_STAGES - 1) % 2)
                sQ = sQ_all[None, None, stage]
                tQsQ = thr_copy_q.partition_D(sQ)
                for m in cutlass.range_constexpr(cute.size(tQsQ, mode=[1])):
                    r = m * ROWS_PER_PASS + q_row0
                    i = r // group
                    if i < q_count:
                        entry = mQSlot[h, q_start + i]
                        tok = q_base + (entry & slot_mask)
                        src = mQ.iterator + cute.crd2idx((tok, h * group + (r - i * group), 0), mQ.layout)
                        src = cute.make_ptr(self.dtype, src.toint(), cute.AddressSpace.gmem, assumed_align=16)
                        chunks = cute.tiled_divide(cute.make_tensor(src, (HEAD_DIM,)), (Q_CHUNK,))
                        cute.copy(copy_atom_q, chunks[None, q_chunk], tQsQ[None, m, 0])
                if tidx < q_count:
                    sMeta[16 + tidx, stage] = mQSlot[h, q_start + tidx]
                if tidx == 0:
                    sMeta[F_HEAD, stage] = h
                    sMeta[F_BLOCK, stage] = blk
                    sMeta[F_QCOUNT, stage] = q_count
                    sMeta[F_KVLEN, stage] = kv_len
                    sMeta[F_QBASE, stage] = q_base
                    sMeta[F_QLEN, stage] = q_len
                    flags = Int32(0)
                    if new_kv:
                        flags = flags | FLAG_NEW_KV
                    if release:
                        flags = flags | FLAG_RELEASE_KV
                    sMeta[F_FLAGS, stage] = flags
                cute.arch.mbarrier_arrive(q_full + stage)
                cute.arch.cp_async_mbarrier_arrive_noinc(q_full + stage)
            cute.arch.cp_async_commit_group()
            cute.arch.cp_async_wait_group(0)
        else:
            # ================================ consumers ================================
            ct = tidx - 128  # 0..255
            cwg = wg - 1  # 0 / 1: rows [64 cwg, 64 cwg + 64) of the item
            lane = tidx % 32
            wg_qk = mma_qk.get_slice(cwg * 128)
            wg_pv = mma_pv.get_slice(cwg * 128)
            thr_qk = mma_qk.get_slice(ct)
            thr_pv = mma_pv.get_slice(ct)
            tSrK = wg_qk.make_fragment_B(wg_qk.partition_B(sK))
            tOrVt = wg_pv.make_fragment_B(wg_pv.partition_B(sVt))
            tOrP = wg_pv.make_fragment_A(wg_pv.partition_shape_A((TILE_M, BLOCK)))
            acc_s = cute.make_rmem_tensor(thr_qk.partition_shape_C((TILE_M, BLOCK)), Float32)
            acc_o = cute.make_rmem_tensor(thr_pv.partition_shape_C((TILE_M, HEAD_DIM)), Float32)
            s_rows = acc_rows_view(acc_s)
            o_rows = acc_rows_view(acc_o)
            s_coord = acc_rows_view(thr_qk.partition_C(cute.make_identity_tensor((TILE_M, BLOCK))))
            s_coord0 = acc_rows_view(mma_qk.get_slice(0).partition_C(cute.make_identity_tensor((TILE_M, BLOCK))))
            col0 = s_coord[0, 0][1]
            o_coord = acc_rows_view(thr_pv.partition_C(cute.make_identity_tensor((TILE_M, HEAD_DIM))))
            n_rows = cute.size(s_rows, mode=[0])
            row_lse = cute.make_rmem_tensor((n_rows,), Float32)
            row_inv = cute.make_rmem_tensor((n_rows,), Float32)
            # staged epilogue: this warpgroup's 64 rows, 8 rows x 16 chunks per pass
            u = ct % 128
            st_row0 = u // THREADS_PER_ROW
            st_chunk = u % THREADS_PER_ROW
            store_atom = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), self.dtype, num_bits_per_copy=128)
            thr_st = copy_q.get_slice(u)
            kv_seen = Int32(0)
            for item in cutlass.range(first, end, 1, unroll=1):
                n = item - first
                stage = n % Q_STAGES
                cute.arch.mbarrier_wait(q_full + stage, (n // Q_STAGES) % 2)
                cute.arch.fence_view_async_shared()  # the producer's cp.async (generic) writes -> wgmma reads
                h = sMeta[F_HEAD, stage]
                blk = sMeta[F_BLOCK, stage]
                q_count = sMeta[F_QCOUNT, stage]
                kv_len = sMeta[F_KVLEN, stage]
                q_base = sMeta[F_QBASE, stage]
                q_len = sMeta[F_QLEN, stage]
                flags = sMeta[F_FLAGS, stage]
                key0 = blk * BLOCK
                n_keys = kv_len - key0
                sQ = sQ_all[None, None, stage]
                tSrQ = wg_qk.make_fragment_A(wg_qk.partition_A(sQ))

                if (flags & FLAG_NEW_KV) != 0:
                    cute.arch.mbarrier_wait(kv_full, kv_seen % 2)
                    kv_seen += 1
                    if n_keys < BLOCK:  # partial block: V rows past kv_len -> 0 (a page tail may hold NaN)
                        first_dead = cutlass.max(n_keys, 0)
                        for e in cutlass.range((BLOCK * HEAD_DIM) // 256, unroll=8):
                            idx = e * 256 + ct
                            rr = idx // HEAD_DIM
                            if rr >= first_dead:
                                sV[rr, idx - rr * HEAD_DIM] = self.dtype(0.0)
                        cute.arch.fence_view_async_shared()
                        cute.arch.barrier(barrier_id=BAR_CONSUMERS, number_of_threads=256)

                # ---- S = Q K^T, masked softmax over the block ----
                warpgroup_gemm(mma_qk, acc_s, tSrQ, tSrK, zero_init=True)
                for ri in cutlass.range_constexpr(n_rows):
                    r = s_coord[ri, 0][0]
                    i = r // group
                    limit = n_keys
                    if causal != 0:
                        pos = sMeta[16 + cutlass.min(i, q_count - 1), stage] & slot_mask
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

                # ---- O = P V ----
                tOrP.store(self.frg_a_view(acc_s).load().to(self.dtype))
                warpgroup_gemm(mma_pv, acc_o, tOrP, tOrVt, zero_init=True)
                if (flags & FLAG_RELEASE_KV) != 0:  # last item of this block in the CTA's range: K/V may be reloaded
                    cute.arch.mbarrier_arrive(kv_empty)

                # ---- epilogue ----
                for ri in cutlass.range_constexpr(n_rows):  # LSE: one lane of the row's quad
                    r = o_coord[ri, 0][0]
                    i = r // group
                    if i < q_count and lane % 4 == 0:
                        entry = sMeta[16 + i, stage]
                        slot = entry >> Q_SLOT_BITS
                        if slot < topk:
                            tok = q_base + (entry & slot_mask)
                            mLsePart[slot, tok, h * group + (r - i * group)] = row_lse[ri]
                if const_expr(self.stage_o):
                    for ri in cutlass.range_constexpr(n_rows):
                        for ci in cutlass.range_constexpr(cute.size(o_rows, mode=[1])):
                            o_rows[ri, ci] = o_rows[ri, ci] * row_inv[ri]
                    thr_pv.partition_C(sQ).store(acc_o.load().to(self.dtype))  # own rows only
                    cute.arch.barrier(barrier_id=BAR_WG0 + cwg, number_of_threads=128)
                    sQ_wg = cute.local_tile(sQ, (64, HEAD_DIM), (cwg, 0))
                    tOsO = thr_st.partition_S(sQ_wg)
                    for m in cutlass.range_constexpr(cute.size(tOsO, mode=[1])):
                        r = cwg * 64 + m * ROWS_PER_PASS + st_row0
                        i = r // group
                        if i < q_count:
                            entry = sMeta[16 + i, stage]
                            slot = entry >> Q_SLOT_BITS
                            if slot < topk:
                                tok = q_base + (entry & slot_mask)
                                dst = mOPart.iterator + cute.crd2idx((slot, tok, h * group + (r - i * group),
                                                                      st_chunk * Q_CHUNK), mOPart.layout)
                                dst = cute.make_ptr(self.dtype, dst.toint(), cute.AddressSpace.gmem,
                                                    assumed_align=16)
                                cute.copy(store_atom, tOsO[None, m, 0], cute.make_tensor(dst, (Q_CHUNK,)))
                else:
                    for ri in cutlass.range_constexpr(n_rows):
                        r = o_coord[ri, 0][0]
                        i = r // group
                        if i < q_count:
                            entry = sMeta[16 + i, stage]
                            slot = entry >> Q_SLOT_BITS
                            tok = q_base + (entry & slot_mask)
                            hq = h * group + (r - i * group)
                            if slot < topk:
                                for ci in cutlass.range_constexpr(cute.size(o_rows, mode=[1])):
                                    mOPart[slot, tok, hq, o_coord[ri, ci][1]] = (o_rows[ri, ci] * row_inv[ri]).to(
                                        mOPart.element_type)
                # Stage (Q, staged O, metadata) free: every read of it by this thread is above.
                cute.arch.mbarrier_arrive(q_empty + stage)
