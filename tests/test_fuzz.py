"""Fuzz tests of every input surface read before work starts: generated documents either load or raise one of our
UserErrors (printed as one line ``error: ...``, exit 2), never another exception; whatever loads round-trips.

Derandomized (the same cases on every run) and bounded: the number of generated cases per surface is ``CASES``.
"""
import dataclasses
import json
import warnings

import pytest
import yaml
from conftest import CALIB_ANN, ROOT, needs_mmdet
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from ptq4sam.errors import UserError
from ptq4sam.qconfig import SECTIONS, QConfig, load_qconfig, qconfig_from_dict

CASES = {"qconfig_doc": 300, "qconfig_bytes": 150, "q_options": 250, "coco": 250, "prompts": 200, "cfg_options": 60}


def fuzz(name):
    return settings(max_examples=CASES[name], deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.filter_too_much])


# anything JSON / YAML can hold, small
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.integers(-3, 40),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                    st.sampled_from(["off", "paper", "log", "nearest", "first", "random", "AvgMSEObserver",
                                     "LSQFakeQuantize", "", "None"]))
ANY = st.recursive(SCALARS, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                   max_leaves=6)


def _plausible(default):
    """Values near a field's default (so that many documents load and the checks past the types are reached)."""
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        return st.integers(-3, 40) | st.sampled_from([0, 1, 2 ** 32, 10 ** 9])
    if isinstance(default, float):
        return st.floats(-1.0, 30.0) | st.sampled_from([0.0, float("nan"), float("inf")])
    if isinstance(default, str):
        return st.sampled_from([default, "", "paper", "x"])
    if isinstance(default, list):
        return st.lists(st.integers(0, 20) | st.floats(0.0, 1.5) | st.text(max_size=4), max_size=4) | st.just(default)
    return ANY


def _section(cls):
    inst = cls()
    return st.fixed_dictionaries({}, optional={f.name: _plausible(getattr(inst, f.name)) | ANY
                                               for f in dataclasses.fields(cls)})


DEFAULTS = QConfig()
QDOC = st.fixed_dictionaries({}, optional={
    **{f.name: _plausible(getattr(DEFAULTS, f.name)) | ANY for f in dataclasses.fields(QConfig)
       if f.name not in SECTIONS},
    **{name: _section(cls) | ANY for name, cls in SECTIONS.items()},
    "unknown_key": ANY})
KEYS = [f.name for f in dataclasses.fields(QConfig) if f.name not in SECTIONS] + [
    f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _default(key):
    obj = DEFAULTS
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _value_for(key):
    """A value for the dotted q_config key: mostly near its default, sometimes anything."""
    return st.one_of(_plausible(_default(key)), _plausible(_default(key)), ANY)


def _mutated(edits):
    doc = DEFAULTS.to_dict()
    for key, value in edits:
        *path, last = key.split(".")
        node = doc
        for p in path:
            node = node[p]
        node[last] = value
    return doc


# the defaults with one to three keys changed (most documents load, so the checks past the types are reached), or
# documents built from scratch, or anything at all
MUTATED = st.lists(st.sampled_from(KEYS).flatmap(lambda k: _value_for(k).map(lambda v: (k, v))), min_size=1,
                   max_size=3).map(_mutated)


def _event(name: str) -> None:
    if currently_in_test_context():  # the grid test below runs outside hypothesis
        event(name)


def _load_or_user_error(load):
    """``load()``'s value, or None if it raised a UserError; any other exception fails the test."""
    try:
        out = load()
    except UserError as e:
        assert str(e).strip(), "an input error must say what is wrong"
        _event("error: " + type(e).__name__)
        return None
    _event("loaded")
    return out


_PY_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _assert_well_typed(obj):
    """Every field of a loaded q_config has its declared type, lists element by element, and no number is NaN / Inf
    (those pass every range check and poison a run silently)."""
    json.dumps(obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj), allow_nan=False)
    for f in dataclasses.fields(obj):
        v, t = getattr(obj, f.name), str(f.type).replace("typing.", "")
        if dataclasses.is_dataclass(v):
            _assert_well_typed(v)
        elif t.startswith("List[") and t[5:-1] in _PY_TYPES:
            assert all(type(e) is _PY_TYPES[t[5:-1]] for e in v), (f.name, v)
        elif t in _PY_TYPES:
            assert type(v) is _PY_TYPES[t], (f.name, v)


def _roundtrip_qconfig(q, tmp_path):
    _assert_well_typed(q)
    d = q.to_dict()
    assert qconfig_from_dict(d, "round trip") == q
    f = tmp_path / "roundtrip.yaml"
    f.write_text(yaml.safe_dump(d))
    assert load_qconfig(f) == q


@fuzz("qconfig_doc")
@given(doc=MUTATED | QDOC | ANY)
def test_fuzz_qconfig_documents_load_or_raise_a_user_error(doc, tmp_path):
    f = tmp_path / "q.yaml"
    f.write_text(yaml.safe_dump(doc))
    q = _load_or_user_error(lambda: load_qconfig(f))
    if q is not None:
        _roundtrip_qconfig(q, tmp_path)


def _flow(value) -> str:
    """``value`` as one line of YAML (as a user would type it after ``key=``)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10 ** 6).strip().removesuffix("...").strip()


ODD_VALUES = [float("nan"), float("inf"), float("-inf"), -1, 0, 1, 2 ** 40, 1.5, -0.5, "", "x", "off", None, True,
              [], [1, "a"], [float("nan")], {}, {"a": 1}]


@pytest.mark.parametrize("key", KEYS)
def test_every_qconfig_key_with_every_odd_value_loads_well_typed_or_raises_a_user_error(key, tmp_path):
    """The grid beside the fuzzer: each key of the q_config set to each odd value (NaN, Inf, 0, -1, huge, empty,
    wrong type, a list with a wrong element), one at a time, as a --q-options override (read as YAML, as a file is)."""
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(DEFAULTS.to_dict()))
    for value in ODD_VALUES:
        q = _load_or_user_error(lambda v=value: load_qconfig(base, [f"{key}={_flow(v)}"]))
        if q is not None:
            _roundtrip_qconfig(q, tmp_path)


def test_q_option_with_a_byte_that_is_not_utf8_is_a_user_error(tmp_path):
    """A command-line byte that is not UTF-8 reaches Python as a lone surrogate (os.fsdecode); the YAML reader cannot
    encode it: one clear error naming --q-options, not a traceback."""
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(DEFAULTS.to_dict()))
    with pytest.raises(UserError, match="q-options.*not valid"):
        load_qconfig(base, ["recon.iters=\udc80"])


@fuzz("qconfig_bytes")
@given(raw=st.binary(max_size=48) | st.text(max_size=40).map(str.encode))
def test_fuzz_qconfig_bytes_load_or_raise_a_user_error(raw, tmp_path):
    f = tmp_path / "q.yaml"
    f.write_bytes(raw)
    q = _load_or_user_error(lambda: load_qconfig(f))
    if q is not None:
        _roundtrip_qconfig(q, tmp_path)


VALUES = st.sampled_from(["1", "0", "-1", "2", "4", "1e9", "1.0e-3", ".nan", "-.inf", "true", "off", "[1, 2]",
                          "[20, 2]", "{a: 1}", "[", "'x", "", "paper", "nearest", "AvgMSEObserver", ": :", "\t"]) \
    | st.text(max_size=6)
OPTION = st.one_of(st.sampled_from(KEYS).flatmap(lambda k: _value_for(k).map(lambda v: f"{k}={_flow(v)}")),
                   st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS + ["recon", "ptq4sam", "nope.x", "a..b",
                                                                                  " seed", ""]), VALUES),
                   st.text(max_size=12))


@fuzz("q_options")
@given(options=st.lists(OPTION, max_size=4))
def test_fuzz_q_options_load_or_raise_a_user_error(options, tmp_path):
    base = ROOT / "exp" / "recipes" / "w4a4-cpu.yaml"
    q = _load_or_user_error(lambda: load_qconfig(base, options))
    if q is not None:
        _roundtrip_qconfig(q, tmp_path)


_DELETE = object()


def _paths(doc, prefix=()):
    """Every path (tuple of keys / indices) into a JSON document, inner nodes included."""
    yield prefix
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        yield from _paths(v, prefix + (k,))


def _apply(doc, edits):
    doc = json.loads(json.dumps(doc))
    for path, value in edits:
        if not path:
            doc = value if value is not _DELETE else {}
            continue
        node = doc
        for k in path[:-1]:
            node = node[k]
        if value is _DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return doc


def mutated(base, near=ANY):
    """``base`` (a valid JSON document) with one to three nodes replaced (by ``near`` or anything) or deleted."""
    paths = list(_paths(base))
    edit = st.tuples(st.sampled_from(paths), st.one_of(near, ANY, st.just(_DELETE)))
    return st.lists(edit, min_size=1, max_size=3, unique_by=lambda e: e[0]).map(
        lambda edits: _apply(base, sorted(edits, key=lambda e: -len(e[0]))))  # deepest first: paths stay valid


COCO = {"images": [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48},
                   {"id": 2, "file_name": "sub/b.jpg", "width": 32, "height": 32}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 7, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 3, 20.5, 10], "area": 150.0, "iscrowd": 0,
             "segmentation": [[2, 3, 22, 3, 22, 13, 2, 13]]},
            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [0, 0, 32, 32], "area": 1024, "iscrowd": 1,
             "segmentation": {"counts": "0`0", "size": [32, 32]}},
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [60, 40, 10, 10]}]}
NEAR = st.one_of(st.integers(-2, 70), st.floats(-5, 100), st.sampled_from([1, 2, 7, 0.5, "a.jpg", [32, 32]]))


@needs_mmdet
@fuzz("coco")
@given(doc=mutated(COCO, NEAR) | ANY)
def test_fuzz_coco_annotations_load_or_raise_a_user_error(doc, tmp_path):
    import numpy as np

    from projects.instance_segment_anything.models.prompt_sources import GTBoxPrompts, load_coco_json

    f = tmp_path / "ann.json"
    f.write_text(json.dumps(doc))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ann = _load_or_user_error(lambda: load_coco_json(str(f)))
        if ann is None:
            return
        gt = GTBoxPrompts(str(f), include_crowd=True)
    for im in ann["images"]:  # every image of a file that loaded gets finite boxes of known classes
        p = gt(None, [{"ori_filename": im["file_name"]}])[0]
        assert np.isfinite(p.boxes).all() and len(p.boxes) == len(p.labels) == len(p.scores)
        assert ((0 <= p.labels) & (p.labels < len(ann["categories"]))).all()


DETECTIONS = [{"image_id": 9, "bbox": [10, 20, 100.5, 50], "score": 0.9, "category_id": 1},
              {"image_id": 25, "bbox": [0, 0, 5, 5], "score": 0.1, "category_id": 62},
              {"image_id": 999999, "bbox": [1, 1, 5, 5], "score": 0.5, "category_id": 3}]


@needs_mmdet
@fuzz("prompts")
@given(doc=mutated(DETECTIONS, NEAR | st.sampled_from([9, 25, 30, 62, 1000, -3.0])) | ANY | st.binary(max_size=16))
def test_fuzz_prompt_json_loads_or_raises_a_user_error(doc, tmp_path):
    import numpy as np

    from projects.instance_segment_anything.models.prompt_sources import JsonPrompts

    f = tmp_path / "dets.json"
    if isinstance(doc, bytes):
        f.write_bytes(doc)
    else:
        f.write_text(json.dumps(doc))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = _load_or_user_error(lambda: JsonPrompts(str(f), str(CALIB_ANN), max_boxes=None))
        if src is None:
            return
        kept = [d for dets in src.per_image.values() for d in dets]
        f2 = tmp_path / "kept.json"  # round trip: what was kept loads again unchanged
        f2.write_text(json.dumps(kept))
        assert JsonPrompts(str(f2), str(CALIB_ANN), max_boxes=None).per_image == src.per_image
    for name, image_id in src.index.ids.items():
        p = src(None, [{"ori_filename": name, "ori_shape": (480, 640, 3)}])[0]
        assert np.isfinite(p.boxes).all() and len(p.boxes) <= len(src.per_image.get(image_id, []))


CFG_KEYS = ["model.sam.model_type", "model.prompt.type", "data.test.ann_file", "data.test", "model", "model.nope",
            "data.samples_per_gpu", "model.mask_threshold", "model.box_batch", "x", "data.test.pipeline.0.type",
            "data.test.pipeline.9.type", ""]


@needs_mmdet
@fuzz("cfg_options")
@given(options=st.lists(st.builds(lambda k, v: f"{k}={v}", st.sampled_from(CFG_KEYS),
                                  st.sampled_from(["1", "None", "[1,2", "(1,2)", "a,b", "'x'", "", "[[", "True"])
                                  | st.text(max_size=5)) | st.text(max_size=8), min_size=1, max_size=3))
def test_fuzz_cfg_options_load_or_raise_a_user_error(options):
    from ptq4sam.solver.runner import load_config, parse_args

    config = str(ROOT / "projects/configs/lite_medsam/gt-box_lite-medsam.py")
    try:
        args = parse_args(["--config", config, "--fp", "--cfg-options", *options])
    except SystemExit as e:  # argparse's own one-line usage error
        assert e.code == 2
        return
    _load_or_user_error(lambda: load_config(config, args.cfg_options))
