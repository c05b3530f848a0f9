"""Unit checks of the benchmark harness pieces that every speed number depends on: work counting, the shared
sparse selection, the FlexAttention block mask built from it, output comparison, FA4 manifest handling, reports."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

from _harness import flops as W  # noqa: E402
from _harness import peers, report  # noqa: E402
from _harness.cases import Case, causal_tile_blocks, random_tile_selection, token_positions  # noqa: E402
from _harness.timing import TimerConfig, measure  # noqa: E402


def _brute_pairs(q_len, kv_len, causal, offset=None):
    off = kv_len - q_len if offset is None else offset
    return sum(1 for i in range(q_len) for j in range(kv_len) if not causal or j <= i + off)


@pytest.mark.parametrize("q_len,kv_len", [(1, 1), (4, 300), (128, 128), (200, 130), (300, 40), (7, 0)])
@pytest.mark.parametrize("causal", [True, False])
def test_visible_pairs_matches_brute_force(q_len, kv_len, causal):
    assert W.visible_pairs(q_len, kv_len, causal) == _brute_pairs(q_len, kv_len, causal)


@pytest.mark.parametrize("offset", [-5, 0, 17, 1000])
def test_visible_pairs_explicit_offset(offset):
    assert W.visible_pairs(40, 90, True, offset) == _brute_pairs(40, 90, True, offset)


def test_dense_flops_is_4_d_h_pairs():
    # 2 * (Dqk + Dv) per pair and query head: 4 * 128 * H * S(S+1)/2 for square causal
    s, h = 1024, 8
    assert W.dense_flops(1, s, s, h, 128, 128, True) == 4 * 128 * h * s * (s + 1) // 2
    assert W.dense_flops(2, s, s, h, 128, 128, False) == 2 * 4 * 128 * h * s * s


def _selection(batch, q_len, kv_len, hkv, topk, causal, seed=0):
    g = torch.Generator().manual_seed(seed)
    return random_tile_selection(batch, q_len, kv_len, hkv, topk, causal, torch.device("cpu"), g)


@pytest.mark.parametrize("q_len,kv_len,topk", [(256, 256, 3), (8, 1000, 4), (384, 1024, 16), (128, 640, 2)])
def test_tile_selection_is_sorted_distinct_causal_and_keeps_the_diagonal(q_len, kv_len, topk):
    sel = _selection(2, q_len, kv_len, 3, topk, True)
    ids = sel.tile_ids
    nblk = -(-kv_len // 128)
    offset = kv_len - q_len
    for b in range(2):
        for t in range(ids.shape[1]):
            last_pos = min((t + 1) * 128, q_len) - 1 + offset
            diag = min(last_pos // 128, nblk - 1)
            for h in range(3):
                row = ids[b, t, h].tolist()
                valid = [x for x in row if x >= 0]
                assert row == valid + [-1] * (topk - len(valid)), row  # -1 tail
                assert valid == sorted(set(valid)), row  # ascending, distinct
                assert diag in valid and max(valid) == diag, (row, diag)
                assert len(valid) == min(topk, diag + 1), row  # as many as exist


def test_selected_pairs_and_bytes_match_brute_force():
    batch, q_len, kv_len, hkv, topk = 2, 200, 700, 2, 3
    sel = _selection(batch, q_len, kv_len, hkv, topk, True, seed=3)
    kbi = sel.per_token()
    pos = token_positions(batch, q_len, kv_len, torch.device("cpu"))
    want = 0
    used = set()
    for t in range(batch * q_len):
        for h in range(hkv):
            for blk in kbi[t, h].tolist():
                if blk < 0:
                    continue
                used.add((t // q_len, h, blk))
                want += sum(1 for j in range(blk * 128, min((blk + 1) * 128, kv_len)) if j <= pos[t])
    assert W.sparse_selected_pairs(kbi, pos, kv_len, True) == want
    tokens = sum(min(128, kv_len - blk * 128) for _, _, blk in used)
    got = W.sparse_kv_bytes(kbi.view(batch, q_len, hkv, topk), batch, kv_len, hkv, 128, 128, 2)
    assert got == tokens * 256 * 2


def _dense_mask_from_selection(sel, hq, group):
    """[B, Hq, Lq, Lk] bool: token attends key j iff j's block is selected for its tile (and causal)."""
    ids = sel.per_token()  # [B*Lq, Hs, k]
    b = sel.tile_ids.shape[0]
    lq, lk = sel.q_len, sel.kv_len
    hs = ids.shape[1]
    blk_of_key = torch.arange(lk) // 128
    member = (ids.view(b, lq, hs, -1, 1) == blk_of_key.view(1, 1, 1, 1, lk)).any(3)  # [B, Lq, Hs, Lk]
    if hs != hq:
        member = member.repeat_interleave(group if hs > 1 else hq, dim=2)
    mask = member.permute(0, 2, 1, 3)
    if sel.causal:
        pos = torch.arange(lq) + (lk - lq)
        mask = mask & (torch.arange(lk).view(1, -1) <= pos.view(-1, 1))
    return mask


@pytest.mark.parametrize("q_len,kv_len", [(256, 384), (8, 640)])
def test_flex_block_mask_equals_the_selection(q_len, kv_len):
    """The FlexAttention peer computes exactly the function of the msa selection (checked through its output)."""
    from torch.nn.attention.flex_attention import flex_attention

    batch, hq, hkv, d = 1, 4, 2, 32
    g = torch.Generator().manual_seed(5)
    sel = _selection(batch, q_len, kv_len, hkv, 3, True, seed=7)
    q = torch.randn(batch, hq, q_len, d, generator=g)
    k = torch.randn(batch, hkv, kv_len, d, generator=g)
    v = torch.randn(batch, hkv, kv_len, d, generator=g)
    # eager flex (CPU) ignores the block lists and evaluates mask_mod everywhere: the exact mask_mod is required
    mask = peers.flex_block_mask(sel, hq, torch.device("cpu"), exact_mask_mod=True)
    got = flex_attention(q, k, v, block_mask=mask, enable_gqa=True)
    dense = _dense_mask_from_selection(sel, hq, hq // hkv)
    kk, vv = k.repeat_interleave(2, 1).double(), v.repeat_interleave(2, 1).double()
    s = (q.double() @ kk.transpose(-1, -2)) / math.sqrt(d)
    ref = s.masked_fill(~dense, float("-inf")).softmax(-1) @ vv
    err = float((got.double() - ref).norm() / ref.norm())
    assert err < 1e-5, err


@pytest.mark.parametrize("q_len,kv_len,causal", [(256, 384, True), (8, 640, True), (300, 500, True),
                                                 (256, 384, False)])
def test_flex_block_lists_are_the_selection_with_full_blocks_fully_visible(q_len, kv_len, causal):
    """What the compiled kernel relies on: listed blocks == selected blocks, and a block is 'full' (mask_mod
    skipped) only when every real query of the tile sees every key of it."""
    hq, hkv = 4, 2
    sel = _selection(2, q_len, kv_len, hkv, 3, causal, seed=11)
    mask = peers.flex_block_mask(sel, hq, torch.device("cpu"))
    nblk = -(-kv_len // 128)
    offset = kv_len - q_len
    for b in range(2):
        for h in range(hq):
            for t in range(sel.tile_ids.shape[1]):
                chosen = {x for x in sel.tile_ids[b, t, h // 2].tolist() if x >= 0}
                n_full = int(mask.full_kv_num_blocks[b, h, t])
                n_part = int(mask.kv_num_blocks[b, h, t])
                full = set(mask.full_kv_indices[b, h, t, :n_full].tolist())
                part = set(mask.kv_indices[b, h, t, :n_part].tolist())
                assert full | part == chosen and not full & part, (full, part, chosen)
                rows = range(t * 128, min((t + 1) * 128, q_len))
                for blk in full:
                    keys = range(blk * 128, (blk + 1) * 128)
                    assert keys[-1] < kv_len and blk < nblk
                    if causal:
                        assert all(keys[-1] <= i + offset for i in rows), (blk, t)


def test_dense_causal_tiles_cover_exactly_the_visible_blocks():
    sel = causal_tile_blocks(1, 256, 640, True, torch.device("cpu"))
    ids = sel.tile_ids[0, :, 0]
    # tile 0: queries 0..127 at positions 384..511 -> blocks 0..3; tile 1 -> blocks 0..4
    assert [x for x in ids[0].tolist() if x >= 0] == [0, 1, 2, 3]
    assert [x for x in ids[1].tolist() if x >= 0] == [0, 1, 2, 3, 4]


def test_fold_gqa_round_trip():
    case = Case("decode", 4, 256, 2, 8, 2, 16, "bf16", True)
    q = torch.randn(case.total_q, case.hq, case.d)
    folded = peers.fold_gqa_q(q, case)
    assert folded.shape == (2, 2, 16, 16)
    assert torch.equal(peers.unfold_gqa_o(folded, case), q)
    # row (g, i) of KV head h is query head h*G+g of token i
    assert torch.equal(folded[1, 1, 3 * 4 + 2], q[4 + 2, 1 * 4 + 3])


def test_fa4_args_follow_the_manifest_signature():
    sig = [{"name": "mQ", "type": "Tensor"}, {"name": "mK", "type": "Tensor"}, {"name": "mV", "type": "Tensor"},
           {"name": "mO", "type": "Tensor"}, {"name": "mLSE", "type": "None"},
           {"name": "softmax_scale", "type": "float32"}, {"name": "aux_data", "type": "Tuple[None, None]"},
           {"name": "mCuTotalMBlocks", "type": "None"}]
    args = peers.fa4_args(sig, {"mQ": "q", "mK": "k", "mV": "v", "mO": "o"}, 0.125)
    assert args == ["q", "k", "v", "o", None, 0.125, (None, None), None]
    with pytest.raises(peers.Skip, match="mPageTable"):
        peers.fa4_args([{"name": "mPageTable", "type": "Tensor([n0, n1], int32)"}], {}, 1.0)


def test_fa4_build_parses_the_embedded_signature(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "benchmarks", "peers"))
    import fa4_build

    blob = (b"\x00junk\x00Expects 3 parameters\x00\x00\x00 when calling: `__call__(mQ: Tensor([n0, n1], bfloat16), "
            b"softmax_scale: float32, aux_data: Tuple[None, None])`\x00more")
    path = tmp_path / "k.o"
    path.write_bytes(blob)
    assert fa4_build.parse_signature(str(path)) == [
        {"name": "mQ", "type": "Tensor([n0, n1], bfloat16)"}, {"name": "softmax_scale", "type": "float32"},
        {"name": "aux_data", "type": "Tuple[None, None]"}]
    assert fa4_build.parse_shapes("1:8192:64:4:128,2:4096:16:16:128") == [(1, 8192, 64, 4, 128),
                                                                          (2, 4096, 16, 16, 128)]


def test_fa4_artifacts_without_a_directory_skip_with_a_reason(tmp_path):
    case = Case("prefill", 128, 128, 1, 8, 2, 128, "bf16", True)
    with pytest.raises(peers.Skip, match="no FA4 artifact directory"):
        peers.FA4Artifacts(None).find(case, True)
    with pytest.raises(peers.Skip, match="no manifest.json"):
        peers.FA4Artifacts(str(tmp_path)).find(case, True)


def test_compare_flags_nan_and_wrong_values():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import bench_sparse_attention_ops as bench

    ref = torch.randn(64, 4, 8)
    assert bench.compare("attention", ref.clone(), ref) == 0.0
    poisoned = ref.clone()
    poisoned[3, 1, 2] = float("nan")
    assert not bench.compare("attention", poisoned, ref) <= 1e-2  # NaN never passes
    assert bench.compare("attention", ref * 1.1, ref) == pytest.approx(0.1, rel=1e-4)
    scores = torch.randn(2, 3, 5)
    scores[0, 1, 2] = float("-inf")
    moved = scores.clone()
    moved[0, 1, 2], moved[0, 1, 3] = 0.0, float("-inf")
    assert bench.compare("scores", moved, scores) == 1.0  # -inf pattern differs
    idx = torch.tensor([[0, 1, -1]], dtype=torch.int32)
    assert bench.compare("indices", idx, idx.clone()) == 0.0
    assert bench.compare("indices", torch.tensor([[0, 2, -1]], dtype=torch.int32), idx) == pytest.approx(1 / 3)


def test_host_timing_reports_a_positive_median():
    calls = []
    t = measure([lambda: calls.append(1) or sum(range(20000))], torch.device("cpu"),
                TimerConfig(dry_run_ms=0, repeat_ms=5, min_samples=3))
    assert t.median_ms > 0 and t.samples >= 3 and len(calls) >= 4 and t.mode == "host"


def test_results_md_appends_and_tsv_has_exact_columns(tmp_path):
    row = report.Row("prefill", False, 8192, 8192, "bf16", 1, 64, 4, 128, 1.5, 0.01, 612.3, 50.0, 82.6, "sdpa-cudnn")
    assert row.tag == "prefill-nc/sdpa-cudnn"
    tsv = tmp_path / "x.tsv"
    w = report.TsvWriter(str(tsv))
    w.write(row)
    w.close()
    lines = tsv.read_text().splitlines()
    assert lines[0].split("\t") == report.TSV_COLUMNS
    assert lines[1].split("\t")[-1] == "prefill-nc/sdpa-cudnn" and lines[1].split("\t")[9] == "612.30"
    md = tmp_path / "R.md"
    md.write_text("# Results\n\nold entry\n")
    for _ in range(2):
        report.append_results_md(str(md), device_name="cpu", repo_dir=REPO, argv=["b.py", "--dry"],
                                 roofline_line="n/a", rows=[row], skipped=["x: y"], mismatches=[])
    text = md.read_text()
    assert text.startswith("# Results\n\nold entry\n") and text.count("- command: `python b.py --dry`") == 2


def test_fmha_prebuild_set_is_valid_and_covers_both_fp8_softmax_builds():
    """bench_fmha.py --prebuild DIR (the module set a GPU host without CUTLASS headers loads): every entry is a spec
    the JIT accepts, names are unique, and fp8 O / sparse-Q come in both softmax builds."""
    import bench_fmha
    from msa.core.kernels import fmha_sm90 as k90

    variants = bench_fmha.prebuild_variants()
    tags = [k90.variant_tag(dt, hd, c, pg, m, dv, p8) for dt, hd, c, pg, m, dv, p8 in variants]
    assert len(tags) == len(set(tags)) == 74
    for dt, hd, c, pg, m, dv, p8 in variants:
        k90.jit_spec(dt, hd, c, pg, mode=m, head_dim_v=dv, fp8_p=p8)  # raises for a variant that is not built
    fp8 = {(m, c, p8) for dt, _, c, _, m, _, p8 in variants if dt == "float8_e4m3fn" and m in k90.FP8_P_MODES}
    assert fp8 == {(m, c, p8) for m in k90.FP8_P_MODES for c in (True, False) for p8 in k90.FP8_P_VARIANTS}


# -- SM clock / power sampling (benchmarks/_harness/clocks.py) --------------------------------------------------

def test_parse_smi_line_reads_timestamp_clock_power():
    from _harness.clocks import parse_smi_line

    s = parse_smi_line("2026/11/28 21:00:00.250, 1650, 612.34\n")
    assert s is not None and s.sm_mhz == 1650.0 and abs(s.power_w - 612.34) < 1e-9
    s2 = parse_smi_line("2026/11/28 21:00:01.250, 1700, 600.00")
    assert abs((s2.t - s.t) - 1.0) < 1e-6
    for bad in ("timestamp, clocks.sm [MHz], power.draw [W]", "2026/11/28 21:00:00.250, [N/A], 600", "", "1, 2"):
        assert parse_smi_line(bad) is None


def test_window_mean_averages_only_the_window():
    from _harness.clocks import ClockSample, window_mean

    samples = [ClockSample(float(t), 1000.0 + 100 * t, 500.0 + t) for t in range(10)]
    assert window_mean(samples, 2.0, 4.0) == (1300.0, 503.0)  # t = 2, 3, 4
    assert window_mean(samples, 20.0, 30.0) is None
    assert window_mean([], 0.0, 1.0) is None


def test_clock_sampler_absent_without_nvidia_smi(monkeypatch):
    from _harness import clocks

    monkeypatch.setattr(clocks.shutil, "which", lambda name: None)
    assert clocks.ClockSampler.start() is None


def test_clock_sampler_reads_a_stream_and_closes(tmp_path, monkeypatch):
    import time as _time

    from _harness import clocks

    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho '2026/11/28 21:00:00.100, 1600, 650.0'\necho 'garbage'\n"
                    "echo '2026/11/28 21:00:00.200, 1700, 660.0'\nexec sleep 30\n")
    fake.chmod(0o755)
    monkeypatch.setattr(clocks.shutil, "which", lambda name: str(fake))
    sampler = clocks.ClockSampler.start()
    assert sampler is not None
    t0 = clocks.parse_smi_line("2026/11/28 21:00:00.000, 0, 0").t
    deadline = _time.time() + 10
    got = None
    while got is None or got[0] != 1650.0:
        assert _time.time() < deadline, f"sampler did not deliver both samples (got {got})"
        _time.sleep(0.05)
        got = sampler.window(t0, t0 + 1.0)
    assert got == (1650.0, 655.0)
    sampler.close()
    assert sampler._proc.poll() is not None  # the background nvidia-smi is gone


def test_smi_id_maps_cuda_visible_devices():
    from _harness.clocks import smi_id

    assert smi_id(0, "") == "0" and smi_id(1, "") == "1"
    assert smi_id(1, "3,5") == "5"
    assert smi_id(0, "GPU-1234-abcd") == "GPU-1234-abcd"
    assert smi_id(2, "3,5") == "2"  # out of range: torch would not see it either; pass the index through


# -- bench_ab_sparse.py (interleaved A/B of module builds in the bridge call) -------------------------------------

def test_bench_ab_sparse_parsing_and_fixed_selection():
    import bench_ab_sparse as ab

    assert ab.parse_variants("base=,x=") == [("base", ""), ("x", "")]
    assert ab.parse_variants("base=,pair=@MSA_QOUTER_PAIR=1@X=") == [("base", ""), ("pair", "")]
    assert ab.PLAN_ENV == {"base": {}, "pair": {"MSA_QOUTER_PAIR": "1", "X": ""}}
    for bad in ("nolabel", "=dir", "a=,a=", "", "a=/no/such/dir", "a=@NOVALUE", "a=@=1"):
        with pytest.raises(ValueError, match="--variants"):
            ab.parse_variants(bad)
    assert ab.parse_shapes("32768:64:4, 256:4:1") == [(32768, 64, 4), (256, 4, 1)]
    for bad in ("32768:64", "64:4:1", "1024:6:4", "a:b:c"):
        with pytest.raises(ValueError, match="--shapes"):
            ab.parse_shapes(bad)
    g = ab.group_selection(3000, 2, torch.device("cpu"), torch.Generator().manual_seed(0))  # [3000, 2, 16]
    assert g.shape == (3000, 2, 16) and g.dtype == torch.int32
    assert torch.equal(g[2600], g[2607]) and not torch.equal(g[2600], g[2608])  # one draw per 8-token run
    for t in (0, 130, 2999):
        ids = [b for b in g[t, 1].tolist() if b >= 0]
        assert ids == sorted(set(ids)) and ids[-1] == min(t // 8 * 8 + 7, 2999) // 128
    assert (g[2600, 0] >= 0).all()  # 16 blocks once 20 are visible
    sel = ab.fixed_selection(20 * 128, 2, torch.device("cpu")).tile_ids  # [1, tiles, hkv, 16]
    assert sel.shape == (1, 20, 2, 16)
    assert sel[0, 0, 0].tolist() == [0] + [-1] * 15  # tile 0: only its diagonal
    assert sel[0, 3, 1].tolist() == [0, 1, 2, 3] + [-1] * 12
    assert sel[0, 19, 0].tolist() == list(range(15)) + [19]


def test_bench_ab_sparse_dry_run(capsys):
    import bench_ab_sparse as ab

    assert ab.main(["--dry", "--variants", "a=,b="]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("S256 4/1")]
    assert len(lines) == 2 and " a: " in lines[0] and " b: " in lines[1]
    assert "differs" not in "\n".join(lines)


def test_bench_ab_sparse_restores_the_module_loader():
    import bench_ab_sparse as ab
    from msa.core.kernels import fmha_sm90 as k90

    before = k90._load_module
    ab.main(["--dry"])
    assert k90._load_module is before


def test_per_call_ms_runs_each_call_once_on_cpu():
    from _harness.timing import per_call_ms

    n = []
    ms = per_call_ms(lambda: n.append(1), 7, torch.device("cpu"))
    assert len(n) == 7 and ms >= 0.0


def test_temporary_env_sets_then_restores_and_unsets(monkeypatch):
    from _harness.env import temporary_env

    monkeypatch.setenv("MSA_TEST_KEPT", "old")
    monkeypatch.delenv("MSA_TEST_NEW", raising=False)
    with pytest.raises(RuntimeError):
        with temporary_env({"MSA_TEST_KEPT": "new", "MSA_TEST_NEW": "1"}):
            assert os.environ["MSA_TEST_KEPT"] == "new" and os.environ["MSA_TEST_NEW"] == "1"
            raise RuntimeError("restored on the way out too")
    assert os.environ["MSA_TEST_KEPT"] == "old" and "MSA_TEST_NEW" not in os.environ
