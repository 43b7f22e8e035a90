"""What a crash costs: one quantization run uninterrupted, the same run crashed after reconstruction unit k, resumed.

Runs ``test_quant.py`` three times (the crash is the PTQ4SAM_CRASH_AFTER_UNIT testing hook, raised right after unit
k's state is saved) and reports: the uninterrupted run's calibration and reconstruction time, the work a crash at unit
k would lose without the saved state (everything before it), what the resumed run spends (state load + replay of the
finished stages + the remaining units), the state file's size and the time spent saving it, and whether the resumed
result is identical (metrics.json without wall times, and the saved quantized state).

    python tools/benchmark_resume.py --crash-after 5 --out-dir docs/results/resume
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ptq4sam.errors import command_line  # noqa: E402


def run(args, work: Path, extra, env=None):
    cmd = [sys.executable, str(ROOT / "ptq4sam/solver/test_quant.py"), "--config", args.config, "--q_config",
           args.q_config, "--max-images", str(args.max_images), "--work-dir", str(work), *extra]
    if args.quant_encoder:
        cmd.append("--quant-encoder")
    if args.q_options:
        cmd += ["--q-options", *args.q_options]
    t = time.time()
    p = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
                       capture_output=True, text=True)
    return p, time.time() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="projects/configs/lite_medsam/gt-box_lite-medsam.py")
    ap.add_argument("--q_config", default="exp/demo/config66.yaml")
    ap.add_argument("--q-options", nargs="*", default=[])
    ap.add_argument("--quant-encoder", action="store_true")
    ap.add_argument("--crash-after", type=int, default=5, help="reconstruction unit after which the run crashes")
    ap.add_argument("--max-images", type=int, default=4, help="evaluation images (the evaluation is not the point)")
    ap.add_argument("--out-dir", default="work_dirs/benchmark_resume")
    args = ap.parse_args(argv)
    import torch  # noqa: PLC0415

    sys.path.insert(0, str(ROOT))
    from ptq4sam.checkpoint import without_wall_times  # noqa: PLC0415
    from ptq4sam.deploy.compact import same_checkpoint  # noqa: PLC0415

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "runs"
    a, t_a = run(args, work / "a", ["--save_sam_path", str(work / "a.pth")])
    if a.returncode:
        sys.exit(a.stderr[-3000:])
    crash, t_crash = run(args, work / "b", [], env={"PTQ4SAM_CRASH_AFTER_UNIT": str(args.crash_after)})
    if "simulated crash" not in crash.stderr:
        sys.exit("the crashed run did not crash:\n" + crash.stderr[-3000:])
    state_mb = (work / "b" / "recon_state.pt").stat().st_size / 2**20
    b, t_b = run(args, work / "b", ["--resume", "--save_sam_path", str(work / "b.pth")])
    if b.returncode:
        sys.exit(b.stderr[-3000:])
    ma, mb = (json.loads((work / x / "metrics.json").read_text()) for x in "ab")
    sa, sb = (torch.load(work / f"{x}.pth", weights_only=True) for x in "ab")
    info_a, info_b = sa.pop("info"), sb.pop("info")  # the saved run records differ in wall times only
    same_state = same_checkpoint(sa, sb) and without_wall_times(json.loads(info_a)) == without_wall_times(json.loads(info_b))
    k, units = args.crash_after, ma["recon"]
    pre = ma["pre_recon_phases_s"]
    res = {
        "command": command_line("tools/benchmark_resume.py", argv),
        "config": args.config, "q_config": args.q_config, "q_options": args.q_options,
        "quant_encoder": args.quant_encoder, "seed": ma["seed"], "calibration_images": len(ma["calibration_images"]),
        "units": len(units), "crash_after_unit": k,
        "uninterrupted": {"wall_s": round(t_a, 1), "calibration_big_agq_s": round(sum(pre.values()), 1),
                          "reconstruction_s": ma["reconstruction_s"],
                          "state_saves_s": ma["ptq_phases_s"].get("recon_state_saves", 0.0)},
        "lost_without_resume_s": round(sum(pre.values()) + sum(u["unit_s"] for u in units[:k]), 1),
        "crashed_run_wall_s": round(t_crash, 1),
        "resumed": {"wall_s": round(t_b, 1), "reconstruction_s": mb["reconstruction_s"],
                    "remaining_units_s_in_uninterrupted": round(sum(u["unit_s"] for u in units[k:]), 1)},
        "state_file_mb": round(state_mb, 1),
        "identical": {"metrics": without_wall_times(ma) == without_wall_times(mb), "quantized_state": same_state},
    }
    res["resumed"]["replay_and_load_overhead_s"] = round(
        res["resumed"]["reconstruction_s"] - res["resumed"]["remaining_units_s_in_uninterrupted"], 1)
    (out / "resume.json").write_text(json.dumps(res, indent=1))
    md = [f"Command: `{res['command']}`  ", f"Config: {args.config}, q_config {args.q_config} {' '.join(args.q_options)}"
          f"{' --quant-encoder' if args.quant_encoder else ''}, seed {res['seed']}, "
          f"{res['calibration_images']} calibration images, {len(units)} reconstruction units, crash after unit {k}",
          "", "| | seconds |", "| --- | --- |",
          f"| uninterrupted run, wall | {res['uninterrupted']['wall_s']} |",
          f"| of which calibration + BIG + AGQ | {res['uninterrupted']['calibration_big_agq_s']} |",
          f"| of which reconstruction ({len(units)} units) | {res['uninterrupted']['reconstruction_s']} |",
          f"| of which saving the state after each unit ({res['state_file_mb']} MB each) | "
          f"{res['uninterrupted']['state_saves_s']} |",
          f"| work lost by a crash after unit {k} without the saved state | {res['lost_without_resume_s']} |",
          f"| resumed run, wall | {res['resumed']['wall_s']} |",
          f"| of which reconstruction (replay of finished stages + units {k + 1}-{len(units)}) | "
          f"{res['resumed']['reconstruction_s']} |",
          f"| the same units in the uninterrupted run | {res['resumed']['remaining_units_s_in_uninterrupted']} |",
          "", f"Resumed result identical to the uninterrupted one: metrics.json {res['identical']['metrics']}, "
          f"quantized state {res['identical']['quantized_state']}."]
    (out / "resume.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
