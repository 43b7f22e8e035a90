import atexit
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# every on-disk cache of the toolkit (weight ranges, FP evaluations) in a folder of this pytest run only, so a warm
# ~/.cache or work_dirs/ can neither hide a change nor be written by the tests; subprocesses inherit it. The
# pytest-xdist workers share their controller's folder (it is made before they start; its files are written
# atomically; the controller removes it): a weight's range search runs once per test run.
if os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get("PTQ4SAM_TEST_CACHE"):
    _CACHE = os.environ["PTQ4SAM_TEST_CACHE"]
else:
    _CACHE = tempfile.mkdtemp(prefix="ptq4sam-test-cache-")
    atexit.register(shutil.rmtree, _CACHE, True)
    os.environ["PTQ4SAM_TEST_CACHE"] = _CACHE
os.environ["PTQ4SAM_CACHE_DIR"] = _CACHE
# under pytest-xdist (make test: two workers on two cores) each worker and the CLI runs it starts use one thread
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
sys.path.insert(0, str(ROOT))
DATA = ROOT / "data" / "coco128"
CALIB_ANN = DATA / "annotations" / "instances_calib32.json"
EVAL_ANN = DATA / "annotations" / "instances_eval96.json"


def has_mmdet() -> bool:
    try:
        import mmdet  # noqa: F401
        from mmcv.ops import nms  # noqa: F401
        return True
    except Exception:
        return False


needs_mmdet = pytest.mark.skipif(not has_mmdet(), reason="mmcv-full / mmdet not installed (run environment.sh)")


@pytest.fixture(autouse=True)
def _isolated():
    """Each test starts seeded, and leaves torch's thread count as it found it: a tool's ``main()`` run in this
    process (e.g. benchmark_deploy's ``--threads 2``) would otherwise change the float sums of every later test on
    this worker (a run and its resume, one in a subprocess, then differ)."""
    torch.manual_seed(0)
    np.random.seed(0)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def _float_encoder_memo():
    """``encoder_memo.FloatEncoderMemo`` for the whole run (session-wide, so the module- and session-scoped fixtures'
    runs use it too; its files in this run's cache folder). ``PTQ4SAM_TEST_ENCODER_MEMO=off`` turns it off."""
    from encoder_memo import FloatEncoderMemo

    with pytest.MonkeyPatch.context() as mp:
        if os.environ.get("PTQ4SAM_TEST_ENCODER_MEMO", "on").lower() not in ("off", "0", "false", "no"):
            FloatEncoderMemo(Path(_CACHE) / "float_embeddings").install(mp)
        yield


def calib_samples(n: int, ann_file=CALIB_ANN, max_boxes=None):
    """The first n images (by id) of a split with their GT boxes (the first ``max_boxes`` of each image when given:
    the decoder's cost grows with the prompts), as PTQ calibration samples (no mmcv needed: the GPU machines have
    none)."""
    from ptq4sam.images import read_rgb
    from ptq4sam.samples import CalibSample

    ann = json.loads(Path(ann_file).read_text())
    out = []
    for im in sorted(ann["images"], key=lambda i: i["id"])[:n]:
        boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                          for a in ann["annotations"] if a["image_id"] == im["id"]], np.float32).reshape(-1, 4)
        out.append(CalibSample(read_rgb(DATA / "train2017" / im["file_name"]), boxes[:max_boxes]))
    return out


def capped_ann(dst: Path, max_boxes: int = 2, ann_file=CALIB_ANN) -> Path:
    """A copy of a split's annotation file with at most ``max_boxes`` annotations per image (every image kept, in
    the same order): the CLI tests' calibration set (``--cfg-options data.calib.ann_file=...``), whose decoder passes
    then cost a fraction of the full image's prompts."""
    ann = json.loads(Path(ann_file).read_text())
    seen = {}
    keep = []
    for a in ann["annotations"]:
        seen[a["image_id"]] = seen.get(a["image_id"], 0) + 1
        if seen[a["image_id"]] <= max_boxes:
            keep.append(a)
    dst.write_text(json.dumps(dict(ann, annotations=keep)))
    return dst


def run_cli(args, timeout=900, env=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    p = subprocess.run([sys.executable, str(ROOT / "ptq4sam/solver/test_quant.py"), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    return p


def run_main(args, env=None):
    """test_quant.py's ``main(args)`` in this process, as :func:`run_cli` reports it (returncode, stdout, stderr):
    the same code path without an interpreter start-up and the mmdet imports per run (~8 s each). An exception that
    would end the CLI with a traceback gives returncode 1 and the traceback on stderr. ``env``: variables set for
    this run only."""
    from ptq4sam.solver.runner import main

    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main([str(a) for a in args])
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 1
            except Exception:
                traceback.print_exc()
                rc = 1
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return subprocess.CompletedProcess(list(args), rc, out.getvalue(), err.getvalue())
