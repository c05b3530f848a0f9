"""The ``msa`` command: ``msa demo`` (end-to-end MSA prefill on a planted synthetic problem)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main", "build_parser"]

_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16"}


def _heads(text: str) -> tuple[int, int]:
    try:
        hq, hkv = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected Hq/Hkv such as 64/4, got {text!r}") from None
    if hq < 1 or hkv < 1 or hq % hkv:
        raise argparse.ArgumentTypeError(f"expected positive Hq/Hkv with Hkv dividing Hq, got {text!r}")
    return hq, hkv


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="msa", description="MiniMax Sparse Attention for Hopper: tools.")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    d = sub.add_parser(
        "demo",
        help="run the MSA prefill pipeline (index pass -> top-k -> sparse attention) on a planted long context",
        description="Index pass (msa.core.fmha score-only) -> sparse_topk_select (1 forced local block) -> sparse "
        "attention (msa.bridge.sparse_fmha), compared against dense attention. Defaults fit the machine: "
        "the MiniMax-M3 shape at 128K tokens on a GPU, a small problem on a CPU. Exits 1 if the recall of the "
        "planted blocks is below --min-recall or the sparse output is further than --max-rel-error from dense.",
    )
    d.add_argument("--seq-len", type=_positive, help="context length in tokens (GPU 131072, CPU 8192)")
    d.add_argument("--heads", type=_heads, help="query/KV heads as Hq/Hkv (GPU 64/4, CPU 16/1)")
    d.add_argument("--index-heads", type=_positive, help="index query heads, dividing Hkv (GPU 4, CPU 1)")
    d.add_argument("--topk", type=_positive, help="blocks per query, 1..64 (16)")
    d.add_argument("--head-dim", type=_positive, help="head dim of Q/K/V and the index branch (128)")
    d.add_argument("--needles", type=int, default=4, help="needle blocks planted in the first quarter (4)")
    d.add_argument("--chunk", type=_positive, help="prefill chunk in tokens (GPU 8192, CPU 1024)")
    d.add_argument("--seed", type=int, default=0, help="random seed (0)")
    d.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    d.add_argument("--dtype", default="bf16", choices=sorted(_DTYPES), help="Q/K/V dtype (bf16)")
    d.add_argument("--index-dtype", default=None, choices=sorted([*_DTYPES, "fp8"]),
                   help="index-pass Q/K dtype (default: --dtype); fp8 = e4m3 with per-tensor amax scales")
    d.add_argument("--min-recall", type=float, default=0.9, help="exit 1 below this planted-block recall (0.9)")
    d.add_argument("--max-rel-error", type=float, default=0.25,
                   help="exit 1 above this relative L2 error of sparse vs dense output (0.25)")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(func=_cmd_demo)
    return p


def _version() -> str:
    from . import __version__  # noqa: PLC0415

    return f"msa {__version__}"


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch  # noqa: PLC0415

    from .demo import DemoConfig, default_config, format_table, run_demo  # noqa: PLC0415

    dev = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        print(f"msa demo: --device {args.device}: CUDA is not available on this host", file=sys.stderr)
        return 2
    base = default_config(dev)
    hq, hkv = args.heads if args.heads else (base["num_qo_heads"], base["num_kv_heads"])
    hi = args.index_heads or (base["index_heads"] if hkv % base["index_heads"] == 0 else hkv)
    if hkv % hi:
        print(f"msa demo: --index-heads {hi} must divide the KV head count {hkv}", file=sys.stderr)
        return 2
    topk = args.topk or base["topk"]
    if topk > 64:
        print(f"msa demo: --topk {topk}: expected 1..64", file=sys.stderr)
        return 2
    cfg = DemoConfig(
        seq_len=args.seq_len or base["seq_len"], num_qo_heads=hq, num_kv_heads=hkv, index_heads=hi, topk=topk,
        head_dim=args.head_dim or base["head_dim"], seed=args.seed, device=dev,
        dtype=getattr(torch, _DTYPES[args.dtype]), needles=max(0, args.needles), chunk=args.chunk or base["chunk"],
        min_recall=args.min_recall, max_rel_error=args.max_rel_error, progress=not args.no_progress,
        index_dtype=(torch.float8_e4m3fn if args.index_dtype == "fp8"
                     else getattr(torch, _DTYPES[args.index_dtype]) if args.index_dtype else None),
    )
    result = run_demo(cfg)
    print(format_table(result))
    if not result.ok:
        print(f"msa demo: FAILED - planted-block recall {result.recall:.4f} (--min-recall {cfg.min_recall}), "
              f"rel. L2 error {result.rel_l2:.3e} (--max-rel-error {cfg.max_rel_error})", file=sys.stderr)
        return 1
    print(f"msa demo: OK (recall {100 * result.recall:.2f}% >= {100 * cfg.min_recall:.0f}%, "
          f"rel. L2 error {result.rel_l2:.2e} <= {cfg.max_rel_error})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
