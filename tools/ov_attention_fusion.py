"""Which quantized-attention forms OpenVINO fuses into one attention kernel on this machine (ptq4sam.deploy.fusion):
a markdown table with the CPU's ISA and OpenVINO's version, optionally a JSON file.

    python tools/ov_attention_fusion.py [--json docs/results/deploy/attention_fusion.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ptq4sam.cpuinfo import cpu_info, describe  # noqa: E402
from ptq4sam.deploy.fusion import probe  # noqa: E402
from ptq4sam.errors import command_line  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=40, help="timed inferences per form (0: no timing)")
    ap.add_argument("--shape", type=int, nargs=4, default=[64, 4, 49, 32], metavar=("B", "HEADS", "TOKENS", "DIM"),
                    help="q, k, v shape (default: 64 TinyViT 7x7 windows, 4 heads of 32)")
    args = ap.parse_args(argv)
    import openvino as ov

    rows = probe(threads=args.threads, repeats=args.repeats, shape=tuple(args.shape))
    cpu = cpu_info()
    print(f"CPU: {describe(cpu)}; OpenVINO {ov.__version__}; {args.threads} threads; q, k, v {args.shape}\n")
    print("| attention form | fused into one kernel | ms (median) | compiled ops |\n| --- | --- | --- | --- |")
    for r in rows:
        ops = ", ".join(f"{k} x{v}" for k, v in sorted(r["ops"].items()))
        print(f"| {r['form']} | {'yes' if r['fused'] else 'no'} | {r.get('ms', '-')} | {ops} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"cpu": cpu, "openvino": ov.__version__, "threads": args.threads,
                                               "shape": args.shape, "rows": rows,
                                               "command": command_line("tools/ov_attention_fusion.py", argv)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
