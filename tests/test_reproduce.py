"""The results protocol: the calib / dev / test splits, tools/reproduce.py's grid (shards + merge = one run), and the
headline table in docs/results.md being what --render makes of the committed summary."""
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from ptq4sam.errors import InputError
from ptq4sam.splits import CALIB_MAX, SPLITS, split


def _reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "tools" / "reproduce.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = mod  # (its dataclasses look their module up)
    spec.loader.exec_module(mod)
    return mod


def _ids(name):
    return sorted(im["id"] for im in json.loads(split(name).ann_file.read_text())["images"])


def _without_times(summary):
    for sp in summary["splits"].values():
        for r in sp["rows"]:
            r.pop("seconds", None)  # wall times differ between two runs of the same cell
    return summary


def test_splits_are_disjoint_and_calib_is_the_first_16_of_calib32_by_id():
    calib, dev, test = (_ids(n) for n in ("calib", "dev", "test"))
    all32 = sorted(im["id"] for im in json.loads((split("calib").ann_file.parent / "instances_calib32.json")
                                                  .read_text())["images"])
    assert calib == all32[:CALIB_MAX] and dev == all32[CALIB_MAX:] and len(test) == 96
    assert not (set(calib) & set(dev)) and not (set(calib) & set(test)) and not (set(dev) & set(test))
    assert set(SPLITS) == {"calib", "dev", "test"}
    with pytest.raises(InputError, match="unknown split 'val'"):
        split("val")


def test_a_method_calibrating_beyond_the_calib_split_is_refused():
    rp = _reproduce()
    st = rp.Settings("dev", (1,), 2, ("calibrate=17",), False, "cpu")
    with pytest.raises(InputError, match="calibrate: 17 images"):
        rp._load_qcfg(rp.recipes.method("minmax_rtn"), 8, st, 1)


def test_quick_budget_does_not_add_a_reconstruction_to_methods_without_one():
    rp = _reproduce()
    st = rp.Settings("dev", (1, 2), 2, tuple(rp.QUICK_OPTIONS), True, "cpu")
    assert rp._load_qcfg(rp.recipes.method("minmax_rtn"), 4, st, 1)[0].recon.iters == 0
    assert rp._load_qcfg(rp.recipes.method("ptq4sam_calib"), 6, st, 1)[0].recon.iters == 0
    assert rp._load_qcfg(rp.recipes.method("qdrop"), 4, st, 1)[0].recon.iters == 4


def test_shard_of_splits_the_groups_round_robin_and_checks_its_argument():
    rp = _reproduce()
    groups = list(range(5))
    assert rp.shard_of(groups, None) == (groups, True)
    assert rp.shard_of(groups, "0/2") == ([0, 2, 4], True) and rp.shard_of(groups, "1/2") == ([1, 3], False)
    for bad in ("2/2", "x", "1/0", "-1/2"):
        with pytest.raises(InputError, match="expected i/N"):
            rp.shard_of(groups, bad)


def test_sharded_and_merged_grid_equals_the_single_run(tmp_path):
    """A tiny grid (FP + MinMax RTN at 8 and 4 bits, 1 calibration image, 1 dev image) run whole and as two shards
    joined by --merge: the same rows, numbers and bootstrap intervals."""
    rp = _reproduce()
    common = ["--split", "dev", "--eval-images", "1", "--bits", "8", "4", "--methods", "minmax_rtn", "--seeds", "7",
              "--q-options", "calibrate=1", "--samples", "40"]
    assert rp.main(common + ["--out", str(tmp_path / "whole")]) == 0
    assert rp.main(common + ["--out", str(tmp_path / "s0"), "--shard", "0/2"]) == 0
    assert rp.main(common + ["--out", str(tmp_path / "s1"), "--shard", "1/2"]) == 0
    assert not (tmp_path / "s0" / "summary.json").exists()  # a shard writes cells only
    assert rp.main(["--merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "merged"),
                    "--samples", "40"]) == 0
    whole, merged = (_without_times(json.loads((tmp_path / d / "summary.json").read_text()))
                     for d in ("whole", "merged"))
    assert [r["method"] for r in whole["splits"]["dev"]["rows"]] == ["fp", "minmax_rtn", "minmax_rtn"]
    assert [r["bits"] for r in whole["splits"]["dev"]["rows"]] == [32, 8, 4]
    assert whole == merged
    # a cell already there with the same settings is kept, not run again
    cell = tmp_path / "whole" / "cells" / "dev" / "minmax_rtn_w8_s7.json"
    before = cell.read_text()
    assert rp.main(common + ["--out", str(tmp_path / "whole")]) == 0 and cell.read_text() == before
    # two folders holding the same cell with other settings do not merge silently
    other = json.loads(before)
    other["spec"] = "another"
    (tmp_path / "s1" / "cells" / "dev" / "minmax_rtn_w8_s7.json").write_text(json.dumps(other))
    with pytest.raises(InputError, match="with other settings"):
        rp.main(["--merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "m2")])


def test_predictions_of_a_moved_out_folder_are_found_beside_its_cells(tmp_path):
    """A cell records where its predictions were written (an absolute path when --out was outside the repo); the file
    beside the cell's folder is the one read, even where the recorded path still holds another run's file; without
    one beside, the recorded path."""
    rp = _reproduce()
    beside = tmp_path / "out" / "predictions" / "dev" / "x_w4_s1.json.gz"
    elsewhere = tmp_path / "old_out" / "predictions" / "dev" / "x_w4_s1.json.gz"
    for f in (beside, elsewhere):
        f.parent.mkdir(parents=True)
        f.write_bytes(b"")
    cell = {"predictions": "/tmp/gone-elsewhere/predictions/dev/x_w4_s1.json.gz", "_dir": str(tmp_path / "out"),
            "split": "dev"}
    assert rp._pred_path(cell) == beside
    assert rp._pred_path(dict(cell, predictions=str(elsewhere))) == beside  # a later run's file there: not read
    assert rp._pred_path(dict(cell, predictions="docs/nothing/x_w4_s1.json.gz")) == beside  # relative, moved
    assert rp._pred_path(dict(cell, predictions=str(elsewhere), _dir=str(tmp_path / "none"))) == elsewhere


def test_headline_table_in_the_docs_is_the_render_of_the_committed_summary():
    summary = ROOT / "docs" / "results" / "headline" / "summary.json"
    doc = (ROOT / "docs" / "results.md").read_text()
    m = re.search(r"<!-- headline table: generated by tools/reproduce.py; do not edit by hand -->\n(.*?)"
                  r"<!-- end headline table -->", doc, re.S)
    assert m, "docs/results.md lost its headline-table markers"
    if not summary.is_file():  # no table without its summary
        assert m.group(1).strip() == ""
        return
    assert m.group(1).strip() == _reproduce().render(json.loads(summary.read_text())).strip()


def test_every_row_command_names_its_split_method_and_bits():
    rp = _reproduce()
    assert rp._row_command("test", "qdrop", 4) == "python tools/reproduce.py --split test --methods qdrop --bits 4"
    assert Path(ROOT / rp.recipes.method("recommended").q_config(4)).is_file()
    assert Path(ROOT / rp.recipes.method("mixed").q_config(4)).is_file()


def test_committed_headline_cells_are_still_done_for_the_current_code():
    """Every committed headline cell's spec is what the current code computes for its method, bits and seed, so a
    rerun keeps it (a key added with its earlier behaviour as the default, e.g. ``ahcptq.group_range``, changes
    nothing); the same q_config with the key at another value is a different cell."""
    from ptq4sam import recipes

    rep = _reproduce()
    cells = [json.loads(p.read_text()) for p in sorted((ROOT / "docs/results/headline/cells/test").glob("*.json"))]
    checked = set()
    for c in cells:
        if c["method"] == "fp":
            continue
        st = rep.Settings(split=c["split"], seeds=(c["seed"],), eval_images=None, extra_options=(), quick=False,
                          device="cpu")
        q, _ = rep._load_qcfg(recipes.method(c["method"]), c["bits"], st, c["seed"])
        assert rep.cell_spec(q, st) == c["spec"], (c["method"], c["bits"], c["seed"])
        checked.add(c["method"])
    assert {"ahcptq", "recommended", "ahcq_sam", "mixed", "ptq4sam"} <= checked
    from ptq4sam.qconfig import load_qconfig

    q = load_qconfig("exp/recipes/w4a4-cpu.yaml")
    assert rep.spec_q(q) != rep.spec_q(load_qconfig("exp/recipes/w4a4-cpu.yaml", ["ahcptq.group_range=batch"]))


def test_cell_spec_ignores_the_sections_of_methods_that_are_off():
    """A cell stays valid when a method it does not use gains a key or changes a default (its section is not in the
    spec), and is recomputed when anything it uses changes."""
    from ptq4sam.qconfig import load_qconfig

    rep = _reproduce()
    base = rep.spec_q(load_qconfig("exp/demo/config44.yaml"))
    assert "saqsam" not in base and "gptq" not in base and "ptq4sam" in base
    assert rep.spec_q(load_qconfig("exp/demo/config44.yaml", ["saqsam.par_prompts=3", "gptq.damp=0.5"])) == base
    for opt in ["saqsam.PAR=true", "recon.iters=7", "ptq4sam.agq_images=1", "seed=3"]:
        assert rep.spec_q(load_qconfig("exp/demo/config44.yaml", [opt])) != base, opt
    on = load_qconfig("exp/demo/config44.yaml", ["saqsam.PAR=true"])
    assert rep.spec_q(load_qconfig("exp/demo/config44.yaml", ["saqsam.PAR=true", "saqsam.par_prompts=3"])) != \
        rep.spec_q(on)


def test_plan_lists_done_stale_and_missing_cells_and_estimates_from_recorded_times(tmp_path):
    """``--plan`` runs nothing: a committed cell with the current spec is done, the same cell with other settings is
    stale, an absent one missing. The estimate takes the done cells' recorded times (calibration once, reconstruction
    + evaluation per cell left), at the same bits, else at other bits (never a stale cell's); a method without
    reconstruction is one cell whatever the seeds; the FP row is estimated by the done cells' evaluations."""
    import shutil

    from ptq4sam import recipes

    rep = _reproduce()
    src = ROOT / "docs/results/headline/cells/test"
    cells = tmp_path / "cells" / "test"
    cells.mkdir(parents=True)
    for name in ["qdrop_w4_s1005", "qdrop_w6_s1005", "qdrop_w6_s1007", "minmax_rtn_w4_s1005"]:
        shutil.copy(src / f"{name}.json", cells)
    stale = json.loads((src / "qdrop_w4_s1006.json").read_text()) | {"spec": "other settings", "calibration_s": 1e6}
    (cells / "qdrop_w4_s1006.json").write_text(json.dumps(stale))
    st = rep.Settings(split="test", seeds=(1005, 1006, 1007), eval_images=None, extra_options=(), quick=False,
                      device="cpu")
    runner = rep.Runner(tmp_path, st, "test")
    groups = [(recipes.method(n), b) for n, b in [("qdrop", 4), ("qdrop", 6), ("minmax_rtn", 4), ("qdrop", 8)]]
    rows = rep.plan(runner, groups, True)
    assert [(r["method"], r["bits"], r["cells"]) for r in rows] == [
        ("fp", 32, [(None, "missing")]),
        ("qdrop", 4, [(1005, "done"), (1006, "stale"), (1007, "missing")]),
        ("qdrop", 6, [(1005, "done"), (1006, "missing"), (1007, "done")]),
        ("minmax_rtn", 4, [(1005, "done")]),
        ("qdrop", 8, [(1005, "missing"), (1006, "missing"), (1007, "missing")])]
    rec = {n: json.loads((src / f"{n}.json").read_text()) for n in ["qdrop_w4_s1005", "qdrop_w6_s1005",
                                                                  "qdrop_w6_s1007", "minmax_rtn_w4_s1005"]}
    q4, w6a, w6b = rec["qdrop_w4_s1005"], rec["qdrop_w6_s1005"], rec["qdrop_w6_s1007"]
    # W4: only the done s1005 counts (the stale cell's 1e6 s would dominate), 2 cells left
    assert rows[1]["estimate_s"] == round(q4["calibration_s"] + 2 * (q4["reconstruction_s"] + q4["eval_s"]))
    # W6: the median of two values is their mean; 1 cell left
    mean = {k: (w6a[k] + w6b[k]) / 2 for k in ("calibration_s", "reconstruction_s", "eval_s")}
    assert rows[2]["estimate_s"] == round(mean["calibration_s"] + mean["reconstruction_s"] + mean["eval_s"])
    # W8: nothing at W8, so W4's and W6's done cells (median of 3), 3 cells left
    med = {k: sorted([q4[k], w6a[k], w6b[k]])[1] for k in ("calibration_s", "reconstruction_s", "eval_s")}
    assert rows[4]["estimate_s"] == round(med["calibration_s"] + 3 * (med["reconstruction_s"] + med["eval_s"]))
    assert [r["estimate_from"] for r in rows[1:]] == ["same bits", "same bits", None, "other bits"]
    evals = sorted(r["eval_s"] for r in rec.values())
    assert rows[0]["estimate_s"] == round((evals[1] + evals[2]) / 2)
    text = rep.plan_text(rows, "test")
    assert text.splitlines()[0].startswith("grid on test: 11 cells: 4 done, 1 stale")
    assert "to run: qdrop W4, seeds 1006 (stale) 1007;" in text and "minmax_rtn" not in text
    assert "to run: FP (evaluation only)" in text
    assert not (tmp_path / "summary.json").exists() and len(list(cells.iterdir())) == 5


def test_the_default_grid_regenerates_every_row_of_the_committed_table():
    """``python tools/reproduce.py`` with no method or bits named runs every (method, bits) row of the committed
    headline table, so one command remakes it (and ``--plan`` with no names lists what the table still lacks);
    ``--quick`` keeps its smaller grid; named methods or bits replace the defaults."""
    rep = _reproduce()
    summary = json.loads((ROOT / "docs/results/headline/summary.json").read_text())
    rows = {(r["method"], r["bits"]) for r in summary["splits"]["test"]["rows"] if r["method"] != "fp"}

    def grid(*argv):
        methods, bits = rep.grid_of(rep.parse_args(list(argv)))
        return {(m.name, b) for m, b in rep.grid_groups(methods, bits)}

    full = grid()
    assert rows <= full, sorted(rows - full)
    assert {("saq_sam", 5), ("ahcq_sam", 6), ("mixed", 4)} <= full and ("mixed", 8) not in full
    assert len(full) == 8 * 4 + 1
    quick = grid("--quick")
    assert quick == {(m, b) for m in ["minmax_rtn", "qdrop", "ptq4sam", "ahcptq", "recommended"]
                     for b in (8, 6, 4)} | {("mixed", 4)}
    assert grid("--quick", "--bits", "5") == {(m, 5) for m in ["minmax_rtn", "qdrop", "ptq4sam", "ahcptq",
                                                               "recommended"]}
    assert grid("--methods") == set() and grid("--methods", "qdrop", "--bits", "6") == {("qdrop", 6)}
    with pytest.raises(SystemExit):
        rep.parse_args(["--plan", "--merge", "x"])
