"""Pick per-module bit overrides under an average-bit budget from a sensitivity run, and write the q_config.

Units (from tools/sensitivity.py) are raised from the low to the high bit width, most logit error removed per MAC
first, while the MAC-weighted average of the quantized layers' bits stays within the budget (weights and activations
alike). The yaml inherits the sensitivity run's q_config (``root:``) and adds ``overrides``; evaluate it with
``tools/benchmark_accuracy.py --q-config``, whose rows then show the average bits (never "W4A4").

    python tools/mixed_precision.py docs/results/w4/sensitivity/sensitivity.json --budget 4.5 --high 8 \\
        --out exp/recipes/mixed-w4-cpu.yaml
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ptq4sam.errors import command_line  # noqa: E402
from ptq4sam.mixed import choose_overrides  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sensitivity", help="sensitivity.json of tools/sensitivity.py")
    p.add_argument("--budget", type=float, default=4.5, help="MAC-weighted average bits (weights and activations)")
    p.add_argument("--high", type=int, default=8)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    path = Path(a.sensitivity)
    try:
        doc = json.loads(path.read_text())
        units, macs, low = doc["units"], doc["macs"], int(doc["bits"])
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"{path}: not a sensitivity.json of tools/sensitivity.py ({e})") from None
    if not low <= a.budget:
        raise SystemExit(f"--budget {a.budget} is below the sensitivity run's {low} bits")
    overrides = choose_overrides(units, macs, low, a.high, a.budget)
    total = sum(macs.values()) or 1
    raised = [o["pattern"] for o in overrides if not o["pattern"].endswith(".*")]
    avg = low + sum(u["macs"] for u in units if u["name"] in raised) * (a.high - low) / total
    root = doc["q_config"]
    try:
        root = str(Path(root).resolve().relative_to(ROOT))
    except ValueError:
        pass
    qopts = [o for o in doc.get("q_options", []) if o != "recon.iters=0"]
    out = {"root": root, "overrides": overrides}
    text = (f"# written by: {command_line('tools/mixed_precision.py', argv)}\n"
            f"# {len(raised)} of {len(units)} units at W{a.high}A{a.high}, the rest W{low}A{low}: MAC-weighted average "
            f"{avg:.3f} bits (budget {a.budget})\n"
            + (f"# the sensitivity run also had --q-options {' '.join(qopts)}\n" if qopts else "")
            + yaml.safe_dump(out, sort_keys=False))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    print(f"wrote {a.out}: raised {raised}; average {avg:.3f} bits")


if __name__ == "__main__":
    main()
