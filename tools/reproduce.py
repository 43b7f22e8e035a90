"""Regenerate the headline tables: FP and W8A8 / W6A6 / W5A5 / W4A4 x {MinMax RTN, QDrop, PTQ4SAM (paper-exact),
AHCPTQ, SAQ-SAM (PCC only; PCC + PAR), AHCQ-SAM, the recommended recipe} plus the mixed-precision recipe, on
LiteMedSAM with GT-box prompts, encoder + decoder, on the protocol of ``ptq4sam/splits.py``: calibration on the
``calib`` split, every choice on ``dev``, reports on ``test``; 3 seeds per row (mean +- sd); a paired bootstrap over
the images of each row's difference to the paper-exact PTQ4SAM row at the same bits (a difference whose 95 % interval
holds 0 is a tie).

    python tools/reproduce.py                           # the whole grid on test (over a day on 2 CPU cores; --plan estimates)
    python tools/reproduce.py --quick                   # one seed, fewer images, a shorter budget (< 30 min)
    python tools/reproduce.py --split dev --bits 4 --methods qdrop mine \
        --variant mine=exp/demo/config{b}{b}.yaml,gptq.enabled=true       # a recipe candidate on dev
    python tools/reproduce.py --shard 0/4 --out D0      # one slice of the grid (e.g. a SLURM array task) ...
    python tools/reproduce.py --merge D0 D1 D2 D3 --out D   # ... joined into the table of a single run
    python tools/reproduce.py --render docs/results/headline/summary.json   # the markdown of a committed summary
    python tools/reproduce.py --plan --out docs/results/headline   # which cells of the grid are left, how long

A seed changes QDrop's masks, the reconstruction's sampling and order; the calibration (the first ``calibrate``
images of ``calib`` by id) does not depend on it, so it runs once per (method, bits) and each seed reconstructs a
copy. Methods without reconstruction give one model whatever the seed: they run once (sd 0 by construction).
Every cell (split, method, bits, seed) is a JSON file under ``--out``/cells with its predictions beside it; a rerun
skips the cells already there with the same settings, so an interrupted grid continues where it stopped.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ptq4sam import coco_eval, recipes  # noqa: E402
from ptq4sam.errors import InputError, atomic_write_text, command_line, run_cli  # noqa: E402
from ptq4sam.mixed import bits_label, mac_weighted_bits  # noqa: E402
from ptq4sam.progress import progress  # noqa: E402
from ptq4sam.splits import CALIB_MAX, IMAGES, split  # noqa: E402

# the headline grid in its table's row order at each bit width: the baselines, the published methods by year, then
# this toolkit's recipes (a method runs at the bit widths it has: the mixed recipe at 4)
GRID = ["minmax_rtn", "qdrop", "ptq4sam", "ahcptq", "saq_sam_star", "saq_sam", "ahcq_sam", "recommended", "mixed"]
BITS = [8, 6, 5, 4]
QUICK_GRID = ["minmax_rtn", "qdrop", "ptq4sam", "ahcptq", "recommended", "mixed"]  # --quick's default: < 30 min
QUICK_BITS = [8, 6, 4]
SEEDS = [1005, 1006, 1007]
REFERENCE = "ptq4sam"
QUICK_OPTIONS = ["calibrate=2", "recon.iters=4", "ptq4sam.agq_images=1"]
QUICK_IMAGES = 12
FORMAT = "ptq4sam-reproduce-1"


# ---- one cell ------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Settings:
    split: str
    seeds: Tuple[int, ...]
    eval_images: Optional[int]
    extra_options: Tuple[str, ...]
    quick: bool
    device: str


def _rel(p: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


def cell_name(method: str, bits: int, seed: Optional[int]) -> str:
    return f"{method}_w{bits}" + (f"_s{seed}" if seed is not None else "")


def _spec_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# q_config keys added after cells were written, each with the value that behaves as before the key existed: left out
# of a cell's spec at that value (the earlier cells stay valid), part of it at any other value
ADDED_KEYS = {("ahcptq", "group_range"): "channel"}


def spec_q(q) -> Dict:
    """The part of a q_config a cell's result depends on: all of it but the yaml sections of methods that are off
    (so a new method's section, or a changed default of a method a cell does not use, keeps the cell valid) and the
    :data:`ADDED_KEYS` at their earlier behaviour."""
    from ptq4sam import methods  # noqa: PLC0415

    used = {m.section for m, _ in methods.active(q)}
    out = {k: v for k, v in q.to_dict().items() if k not in methods.SECTIONS or k in used} | {"source": ""}
    for (section, key), before in ADDED_KEYS.items():
        if isinstance(out.get(section), dict) and out[section].get(key) == before:
            out[section] = {k: v for k, v in out[section].items() if k != key}
    return out


def cell_spec(q, st: "Settings") -> str:
    """The hash a cell of q_config ``q`` under settings ``st`` is stored with (a rerun keeps a cell with the same)."""
    return _spec_hash({"q": spec_q(q), "split": st.split, "eval_images": st.eval_images, "device": st.device})


def _load_qcfg(m: recipes.Method, bits: int, st: Settings, seed: int):
    from ptq4sam.qconfig import load_qconfig  # noqa: PLC0415

    opts = list(m.options) + list(st.extra_options) + [f"seed={seed}"]
    if st.extra_options and load_qconfig(m.q_config(bits), list(m.options)).recon.iters == 0:
        opts.append("recon.iters=0")  # a method without reconstruction stays so (--quick's recon.iters is for the rest)
    q = load_qconfig(m.q_config(bits), opts)
    if q.calibrate > CALIB_MAX:
        raise InputError(f"{_rel(m.q_config(bits))}: calibrate: {q.calibrate} images; this protocol calibrates on the "
                         f"{CALIB_MAX} images of the calib split (the dev split's images are never calibrated on)")
    return q, opts


@dataclasses.dataclass
class Cell:
    """One (method, bits, seed) of a grid: its q_config, spec and where it stands under ``--out``."""
    method: str
    bits: int
    seed: Optional[int]
    q: object
    opts: List[str]
    spec: str
    path: Path
    state: str  # done | stale | missing
    deterministic: bool


class Runner:
    def __init__(self, out: Path, st: Settings, command: str, log=print):
        self.out, self.st, self.command, self.log = out, st, command, log
        sp = split(st.split)
        self.ann_file = sp.ann_file
        self.ann = coco_eval.load_ann(sp.ann_file)
        self.prompts = coco_eval.gt_prompts(self.ann)
        self.calib_ann = coco_eval.load_ann(split("calib").ann_file)
        self._base = None
        self.env = {"torch": torch.__version__, "python": platform.python_version(), "device": st.device,
                    "threads": torch.get_num_threads(), "machine": platform.machine()}

    @property
    def base(self):
        if self._base is None:
            from ptq4sam.models import build_sam  # noqa: PLC0415

            self._base = build_sam("lite_medsam").to(self.st.device)
        return self._base

    def cell_path(self, method: str, bits: int, seed: Optional[int]) -> Path:
        return self.out / "cells" / self.st.split / f"{cell_name(method, bits, seed)}.json"

    def _state(self, path: Path, spec: str) -> str:
        """``done`` (a cell with this spec is there), ``stale`` (one with other settings, rerun) or ``missing``."""
        if not path.is_file():
            return "missing"
        try:
            return "done" if json.loads(path.read_text()).get("spec") == spec else "stale"
        except json.JSONDecodeError:
            return "stale"

    def fp_cell(self) -> Cell:
        spec = _spec_hash({"fp": True, "split": self.st.split, "eval_images": self.st.eval_images})
        path = self.cell_path("fp", 32, None)
        return Cell("fp", 32, None, None, [], spec, path, self._state(path, spec), True)

    def cells(self, m: recipes.Method, bits: int) -> List[Cell]:
        """The cells (method, bits) runs: one per seed, or one for a method without reconstruction (its
        ``recon.iters`` 0: every seed gives the same model)."""
        loaded = [(seed, *_load_qcfg(m, bits, self.st, seed)) for seed in self.st.seeds]
        deterministic = loaded[0][1].recon.iters == 0
        out = []
        for seed, q, opts in loaded[:1] if deterministic else loaded:
            spec = cell_spec(q, self.st)
            path = self.cell_path(m.name, bits, seed)
            out.append(Cell(m.name, bits, seed, q, opts, spec, path, self._state(path, spec), deterministic))
        return out

    def _evaluate(self, seg, name: str) -> Tuple[Dict, str, float]:
        pred = self.out / "predictions" / self.st.split / f"{name}.json.gz"
        t = time.time()
        m = coco_eval.evaluate(seg, self.ann_file, IMAGES, self.prompts, max_images=self.st.eval_images,
                               desc=f"{self.st.split} {name}", save_predictions=pred)
        return m, _rel(pred), round(time.time() - t, 1)

    def _write(self, path: Path, rec: Dict) -> None:
        atomic_write_text(path, json.dumps(rec, indent=1, sort_keys=True))

    def run_fp(self) -> None:
        from ptq4sam.models import BoxPromptSegmenter  # noqa: PLC0415

        fp = self.fp_cell()
        path, spec = fp.path, fp.spec
        if fp.state == "done":
            self.log(f"{_rel(path)}: done before, kept")
            return
        m, pred, eval_s = self._evaluate(BoxPromptSegmenter(self.base), "fp")
        self._write(path, {"format": FORMAT, "spec": spec, "split": self.st.split, "method": "fp", "label": "FP",
                           "bits": 32, "seed": None, "metrics": m, "predictions": pred, "eval_s": eval_s,
                           "command": self.command, "env": self.env})

    def run_group(self, m: recipes.Method, bits: int) -> None:
        """Every seed of (method, bits): one calibration, a reconstruction per seed."""
        from ptq4sam.models import BoxPromptSegmenter  # noqa: PLC0415
        from ptq4sam.ptq import calibrate_segmenter, reconstruct_segmenter  # noqa: PLC0415
        from ptq4sam.samples import gt_box_samples  # noqa: PLC0415

        cells = self.cells(m, bits)
        deterministic = cells[0].deterministic
        for c in cells:
            if c.state == "done":
                self.log(f"{_rel(c.path)}: done before, kept")
        todo = [(c.seed, c.q, c.opts, c.spec, c.path) for c in cells if c.state != "done"]
        if not todo:
            return
        q0 = todo[0][1]
        samples = gt_box_samples(self.calib_ann, IMAGES, q0.calibrate)
        torch.manual_seed(q0.seed)
        seg0 = BoxPromptSegmenter(copy.deepcopy(self.base))
        t = time.time()
        cal0 = calibrate_segmenter(seg0, samples, q0, True, torch.device(self.st.device), log=lambda *a: None)
        calib_s = round(time.time() - t, 1)
        for k, (seed, q, opts, spec, path) in enumerate(todo):
            last = k == len(todo) - 1
            seg, cal = (seg0, cal0) if last else (copy.deepcopy(seg0), copy.deepcopy(cal0))
            t = time.time()
            info = reconstruct_segmenter(seg, samples, q, torch.device(self.st.device), cal).to_dict()
            recon_s = round(time.time() - t, 1)
            name = cell_name(m.name, bits, seed)
            metrics, pred, eval_s = self._evaluate(seg, name)
            avg = mac_weighted_bits(seg, samples)
            rec = {"format": FORMAT, "spec": spec, "split": self.st.split, "method": m.name, "label": m.label,
                   "paper": m.paper, "bits": bits, "seed": seed, "deterministic": deterministic,
                   "q_config": _rel(m.q_config(bits)), "options": opts, "mixed": bool(q.overrides),
                   "avg_bits": list(avg), "calibrate": q.calibrate, "recon_iters": q.recon.iters,
                   "metrics": metrics, "predictions": pred, "calibration_s": calib_s, "reconstruction_s": recon_s,
                   "eval_s": eval_s, "phases_s": info.get("ptq_phases_s", {}),
                   "unit_s": [[u["unit"], u.get("unit_s"), u.get("iter_s")] for u in info.get("recon") or []],
                   "agq_tau": [e["tau"] for e in info.get("agq", [])],
                   "big_flipped": [e["layer"] for e in info.get("big", []) if e["bimodal"]],
                   "acnr": [[e["layer"], e["kappa_before"], e["kappa_after"], round(e["rel_change"], 4)]
                            for e in (info.get("acnr") or {}).get("per_layer", [])],
                   "command": self.command, "env": self.env}
            self._write(path, rec)
            self.log(f"{name}: mask mAP {metrics['segm_mAP']:.4f} (calibration {calib_s} s, reconstruction "
                     f"{recon_s} s, evaluation {eval_s} s)")
            del seg


def grid_groups(methods: List[recipes.Method], bits: List[int]) -> List[Tuple[recipes.Method, int]]:
    return [(m, b) for b in bits for m in methods if b in m.bits]


def shard_of(groups: List, spec: Optional[str]) -> Tuple[List, bool]:
    """(the groups of shard ``i/N``, whether this shard runs the FP row): groups i, i + N, ...; FP in shard 0."""
    if not spec:
        return groups, True
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise InputError(f"--shard {spec}: expected i/N with 0 <= i < N, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise InputError(f"--shard {spec}: expected i/N with 0 <= i < N, e.g. 0/4")
    return groups[i::n], i == 0


def _times(cells: List[Cell]) -> List[Dict]:
    """The recorded times of the done ones of ``cells``."""
    keys = ("calibration_s", "reconstruction_s", "eval_s")
    return [{k: rec.get(k, 0.0) for k in keys} for rec in (json.loads(c.path.read_text()) for c in cells
                                                            if c.state == "done")]


def plan(runner: Runner, groups: List[Tuple[recipes.Method, int]], with_fp: bool) -> List[Dict]:
    """What a run of ``groups`` would do, without running: per (method, bits) its cells' states and the seconds left,
    estimated from the recorded times of the done cells of the same method (at the same bits, else at other bits with
    the same kind of run: with or without reconstruction) as their median calibration once plus their median
    reconstruction + evaluation per cell left; the FP row by the median evaluation of every done cell."""
    rows, seen = [], []
    for m, b in groups:
        cells = runner.cells(m, b)
        same = _times(cells)
        seen += same
        left = [c for c in cells if c.state != "done"]
        est = source = None
        if left:
            other = [c for b2 in m.bits if b2 != b for c in runner.cells(m, b2)
                     if c.deterministic == cells[0].deterministic]
            for source, timed in (("same bits", same), ("other bits", _times(other))):
                if timed:
                    med = {k: float(np.median([t[k] for t in timed])) for k in timed[0]}
                    est = round(med["calibration_s"] + len(left) * (med["reconstruction_s"] + med["eval_s"]))
                    break
        rows.append({"method": m.name, "bits": b, "cells": [(c.seed, c.state) for c in cells], "estimate_s": est,
                     "estimate_from": source if est is not None else None})
    if with_fp:
        fp = runner.fp_cell()
        est = round(float(np.median([t["eval_s"] for t in seen]))) if fp.state != "done" and seen else None
        rows.insert(0, {"method": "fp", "bits": 32, "cells": [(None, fp.state)], "estimate_s": est,
                        "estimate_from": "the evaluations of the done cells" if est is not None else None})
    return rows


def plan_text(rows: List[Dict], split_name: str) -> str:
    n = [s for r in rows for _, s in r["cells"]]
    lines = [f"grid on {split_name}: {len(n)} cells: {n.count('done')} done, {n.count('stale')} stale (other "
             f"settings: rerun), {n.count('missing')} missing"]
    left = [r for r in rows if any(s != "done" for _, s in r["cells"])]
    for r in left:
        what = ("FP (evaluation only)" if r["method"] == "fp" else f"{r['method']} W{r['bits']}, seeds " + " ".join(
            f"{seed}" + (" (stale)" if st == "stale" else "") for seed, st in r["cells"] if st != "done"))
        if r["estimate_s"] is None:
            est = "no done cell to estimate from"
        else:
            src = r["estimate_from"] if r["method"] == "fp" else f"the times of its done cells at {r['estimate_from']}"
            est = f"about {max(1, round(r['estimate_s'] / 60))} min by {src}"
        lines.append(f"  to run: {what}; {est}")
    known = [r["estimate_s"] for r in left if r["estimate_s"] is not None]
    if left:
        lines.append(f"known estimates sum to about {sum(known) / 3600:.1f} h on the machines that made the done cells"
                     f" ({len(known)} of {len(left)} groups estimated)")
    return "\n".join(lines)


# ---- summary: seeds, intervals, verdicts ---------------------------------------------------------------------------
def read_cells(dirs: List[Path]) -> List[Dict]:
    """Every cell JSON under ``dirs`` (their ``cells/`` folders); a cell present twice must be the same run."""
    seen: Dict[Tuple, Dict] = {}
    for d in dirs:
        files = sorted((Path(d) / "cells").rglob("*.json"))
        if not files:
            raise InputError(f"--merge {d}: no cells/*.json there (an --out folder of tools/reproduce.py)")
        for f in files:
            c = json.loads(f.read_text())
            if c.get("format") != FORMAT:
                raise InputError(f"{f}: not a cell of {FORMAT}")
            c["_dir"] = str(d)
            key = (c["split"], c["method"], c["bits"], c["seed"])
            if key in seen and seen[key]["spec"] != c["spec"]:
                raise InputError(f"{f}: the cell {key} is also in {seen[key]['_dir']} with other settings")
            seen[key] = c
    return list(seen.values())


def _pred_path(c: Dict) -> Path:
    """The predictions file of cell ``c``: the one beside the cell's folder (cells and predictions travel together:
    an --out folder moved, e.g. from /tmp into docs/results, or a merged shard), else the path it recorded."""
    p = Path(c["predictions"])
    beside = Path(c["_dir"]) / "predictions" / c["split"] / p.name
    if beside.is_file():
        return beside
    return p if p.is_absolute() else ROOT / p


def summarize(cells: List[Dict], samples: int = 1000, seed: int = 0, reference: str = REFERENCE) -> Dict:
    """Rows (split, method, bits): mask mAP mean / sd over seeds, % of FP, and against the reference method at the same
    bits the paired bootstrap (images resampled, the same draws for every model; seeds averaged within a draw) of the
    difference in points of FP mask mAP, its 95 % interval and the verdict (better / worse / tie)."""
    out = {"format": FORMAT, "reference": reference, "bootstrap_samples": samples, "bootstrap_seed": seed,
           "splits": {}}
    for sp in sorted({c["split"] for c in cells}):
        cs = [c for c in cells if c["split"] == sp]
        fps = [c for c in cs if c["method"] == "fp"]
        if not fps:
            raise InputError(f"split {sp}: no FP cell (run the grid's FP row: it is in shard 0)")
        fp = fps[0]
        groups: Dict[Tuple[str, int], List[Dict]] = {}
        for c in cs:
            if c["method"] != "fp":
                groups.setdefault((c["method"], c["bits"]), []).append(c)
        order = [fp] + [c for key in sorted(groups, key=lambda k: (-k[1], _order(k[0])))
                        for c in sorted(groups[key], key=lambda c: c["seed"])]
        preds = [coco_eval.load_predictions(_pred_path(c)) for c in progress(order, desc=f"{sp}: predictions")]
        n_img = len(preds[0]["image_ids"])
        for c, p in zip(order, preds):
            if sorted(p["image_ids"]) != sorted(preds[0]["image_ids"]):
                raise InputError(f"{c['predictions']}: predictions on other images than the FP row's")
        draws = coco_eval.bootstrap_draws(n_img, samples, seed)
        maps = coco_eval.resampled_maps(split(sp).ann_file, preds, draws)  # (samples, cells)
        col = {id(c): j for j, c in enumerate(order)}
        fp_full, fp_draw = fp["metrics"]["segm_mAP"], maps[:, 0]
        rows = [{"method": "fp", "label": "FP", "bits": 32, "seeds": [], "segm_mAP": [fp_full],
                 "mean": fp_full, "sd": 0.0, "pct_of_fp_mean": 100.0, "pct_of_fp_sd": 0.0, "num_images": n_img,
                 "command": _row_command(sp, "fp", 32)}]
        for (method, bits), members in sorted(groups.items(), key=lambda kv: (-kv[0][1], _order(kv[0][0]))):
            members = sorted(members, key=lambda c: c["seed"])
            v = np.array([c["metrics"]["segm_mAP"] for c in members])
            pct = 100 * v / fp_full
            c0 = members[0]
            row = {"method": method, "label": c0["label"], "paper": c0.get("paper", ""), "bits": bits,
                   "label_bits": bits_label(bits, bits, tuple(c0["avg_bits"]), mixed=c0["mixed"]),
                   "seeds": [c["seed"] for c in members], "segm_mAP": v.round(4).tolist(),
                   "mean": round(float(v.mean()), 4), "sd": round(float(v.std(ddof=1)) if len(v) > 1 else 0.0, 4),
                   "pct_of_fp_mean": round(float(pct.mean()), 1),
                   "pct_of_fp_sd": round(float(pct.std(ddof=1)) if len(v) > 1 else 0.0, 1),
                   "deterministic": c0.get("deterministic", False), "q_config": c0["q_config"],
                   "options": [o for o in c0["options"] if not o.startswith("seed=")],
                   "calibrate": c0["calibrate"], "recon_iters": c0["recon_iters"],
                   "seconds": {k: round(float(np.mean([c[k] for c in members])), 1)
                               for k in ("calibration_s", "reconstruction_s", "eval_s")},
                   "command": _row_command(sp, method, bits)}
            ref = groups.get((reference, bits))
            if ref is not None and method != reference:
                a = maps[:, [col[id(c)] for c in members]].mean(1)
                b = maps[:, [col[id(c)] for c in ref]].mean(1)
                d = 100 * (a - b) / fp_draw
                ref_mean = float(np.mean([c["metrics"]["segm_mAP"] for c in ref]))
                lo, hi = (round(float(x), 1) for x in np.percentile(d, [2.5, 97.5]))
                row["vs_reference"] = {"points_of_fp": round(100 * (float(v.mean()) - ref_mean) / fp_full, 1),
                                       "ci95": [lo, hi], "verdict": "better" if lo > 0 else "worse" if hi < 0 else "tie"}
            rows.append(row)
        out["splits"][sp] = {"fp_segm_mAP": fp_full, "num_images": n_img, "rows": rows,
                             "ann_file": _rel(split(sp).ann_file)}
    return out


def _order(method: str) -> int:
    return GRID.index(method) if method in GRID else len(GRID)


def _row_command(sp: str, method: str, bits: int) -> str:
    if method == "fp":
        return f"python tools/reproduce.py --split {sp} --methods"
    return f"python tools/reproduce.py --split {sp} --methods {method} --bits {bits}"


def render(summary: Dict) -> str:
    """The markdown tables of a summary (a pure function of the JSON: docs/results.md includes its output)."""
    lines = []
    ref = summary["reference"]
    for sp, s in summary["splits"].items():
        rows = s["rows"]
        n_seeds = max(len(r["seeds"]) for r in rows)
        lines += [f"LiteMedSAM, GT-box prompts, encoder + decoder, split `{sp}` ({s['num_images']} images, "
                  f"`{s['ann_file']}`), FP mask mAP {s['fp_segm_mAP']:.4f}; up to {n_seeds} seed(s) per row (mean +- sd); "
                  f"the last columns: the paired bootstrap ({summary['bootstrap_samples']} resamples of the images) of "
                  f"the difference to the `{ref}` row at the same bits, in points of FP mask mAP.", "",
                  "| W/A | method | mask mAP | % of FP | vs PTQ4SAM (points of FP) | 95 % interval | verdict | "
                  "q_config (options) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            if r["method"] == "fp":
                lines.append(f"| FP | FP | {r['mean']:.4f} | 100.0 | | | | |")
                continue
            det = " (deterministic)" if r["deterministic"] else "" if len(r["seeds"]) > 1 else " (1 seed)"
            vs = r.get("vs_reference")
            v_cells = (f"{vs['points_of_fp']:+.1f} | [{vs['ci95'][0]:+.1f}, {vs['ci95'][1]:+.1f}] | {vs['verdict']}"
                       if vs else ("reference | | " if r["method"] == ref else " | | "))
            opts = f" ({', '.join(r['options'])})" if r["options"] else ""
            lines.append(f"| {r['label_bits']} | {r['label']} | {r['mean']:.4f} +- {r['sd']:.4f}{det} | "
                         f"{r['pct_of_fp_mean']:.1f} +- {r['pct_of_fp_sd']:.1f} | {v_cells} | `{r['q_config']}`{opts} |")
        lines.append("")
    return "\n".join(lines)


# ---- CLI ------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", default="test", choices=["dev", "test"], help="where the grid is evaluated")
    p.add_argument("--bits", nargs="+", type=int, default=None, help="bit widths (W = A; default: "
                   f"{' '.join(map(str, BITS))}; with --quick: {' '.join(map(str, QUICK_BITS))})")
    p.add_argument("--methods", nargs="*", default=None, help=f"method names (default: {' '.join(GRID)}; with "
                   f"--quick: {' '.join(QUICK_GRID)}); "
                   f"no name: the FP row only. Known: {' '.join(sorted(recipes.METHODS))}")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=YAML[,key=value...]",
                   help="an ad-hoc method (e.g. a recipe candidate on dev); add NAME to --methods")
    p.add_argument("--seeds", nargs="+", type=int, default=SEEDS)
    p.add_argument("--quick", action="store_true", help=f"one seed, the first {QUICK_IMAGES} images, a short budget "
                   f"({' '.join(QUICK_OPTIONS)})")
    p.add_argument("--eval-images", type=int, default=None, help="evaluate the first N images of the split")
    p.add_argument("--q-options", nargs="*", default=[], help="extra q_config overrides for every method")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", default=str(ROOT / "work_dirs" / "reproduce"), help="cells, predictions, summary")
    p.add_argument("--shard", default=None, metavar="i/N", help="run slice i of N of the grid (FP in slice 0)")
    p.add_argument("--samples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--merge", nargs="+", default=None, metavar="DIR", help="no runs: join these --out folders")
    mode.add_argument("--render", default=None, metavar="SUMMARY_JSON", help="no runs: print the markdown of a summary")
    mode.add_argument("--plan", action="store_true", help="no runs: list the grid's cells under --out as done, stale "
                      "(other settings) or missing, with the time left estimated from the done cells' records")
    a = p.parse_args(argv)
    if a.eval_images is not None and a.eval_images < 1:
        p.error(f"--eval-images must be >= 1, got {a.eval_images}")
    if a.samples < 1:
        p.error(f"--samples must be >= 1, got {a.samples}")
    if a.threads < 0:
        p.error(f"--threads must be >= 0, got {a.threads}")
    return a


def write_summary(out: Path, cells: List[Dict], samples: int) -> Dict:
    summary = summarize(cells, samples)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    atomic_write_text(out / "results.md", render(summary))
    print(render(summary))
    print(f"wrote {out / 'summary.json'} and {out / 'results.md'}")
    return summary


def grid_of(a) -> Tuple[List[recipes.Method], List[int]]:
    """The methods and bit widths the parsed arguments ``a`` name (the defaults: the headline grid, or --quick's)."""
    variants = {}
    for v in a.variant:
        if "=" not in v:
            raise InputError(f"--variant {v}: expected NAME=YAML[,key=value...]")
        name, spec = v.split("=", 1)
        variants[name] = spec
    default = QUICK_GRID if a.quick else GRID
    methods = recipes.resolve(default if a.methods is None else a.methods, variants)
    return methods, a.bits or (QUICK_BITS if a.quick else BITS)


def main(argv=None) -> int:
    a = parse_args(argv)
    out = Path(a.out)
    if a.render:
        print(render(json.loads(Path(a.render).read_text())), end="")
        return 0
    if a.merge:
        write_summary(out, read_cells([Path(d) for d in a.merge]), a.samples)
        return 0
    if a.threads:
        torch.set_num_threads(a.threads)
    methods, bits = grid_of(a)
    extra = (QUICK_OPTIONS if a.quick else []) + list(a.q_options)
    st = Settings(a.split, tuple(a.seeds[:1] if a.quick else a.seeds),
                  a.eval_images or (QUICK_IMAGES if a.quick else None), tuple(extra), a.quick, a.device)
    command = command_line("tools/reproduce.py", argv)
    groups, with_fp = shard_of(grid_groups(methods, bits), a.shard)
    runner = Runner(out, st, command)
    if a.plan:
        print(plan_text(plan(runner, groups, with_fp), a.split))
        return 0
    t = time.time()
    if with_fp:
        runner.run_fp()
    for m, b in progress(groups, desc="reproduce: (method, bits)"):
        runner.run_group(m, b)
    print(f"grid done in {time.time() - t:.0f} s")
    if a.shard is None:
        write_summary(out, read_cells([out]), a.samples)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(lambda _: main(), argparse.Namespace(debug=False)))
