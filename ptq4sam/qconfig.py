"""q_config yaml: loading (with ``root:`` inheritance and command-line overrides) and validation.

Keys follow the paper repo's yamls (optionally nested under ``quant:``)::

    seed: 1005
    a_qconfig: {quantizer: LSQFakeQuantize, observer: AvgMSEObserver, bit: 6, symmetric: false, ch_axis: -1}
    w_qconfig: {quantizer: AdaRoundFakeQuantize, observer: MSEObserver, bit: 6, symmetric: false, ch_axis: 0}
    calibrate: 32
    recon: {batch_size: 1, scale_lr: 4.0e-5, warm_up: 0.2, weight: 0.01, iters: 20000, b_range: [20, 2],
            keep_gpu: true, round_mode: learned_hard_sigmoid, drop_prob: 0.5}
    ptq4sam: {BIG: true, AGQ: true, global_num: 128, peak_distance: 32, peak_height: 0.01}
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import yaml

from .errors import InputNotFound, UserError, is_int, is_number, short_repr
from .methods import SECTIONS as METHOD_SECTIONS
from .quantization import OBSERVERS, QUANTIZERS, QuantizerConfig

# the quantizers a_qconfig / w_qconfig may name; the others (AGQ, LNQ, HLUQ, CAG) are placed at their sites by their
# method's switch (ptq4sam.methods), never on every activation or weight
BASE_QUANTIZERS = ("FixedFakeQuantize", "LSQFakeQuantize", "LSQPlusFakeQuantize", "AdaRoundFakeQuantize")


class QConfigError(UserError, ValueError):
    """A q_config yaml or --q-options value that is not valid (names the file, key and value)."""


@dataclass
class QuantizerSection:
    quantizer: str = "LSQFakeQuantize"
    observer: str = "AvgMSEObserver"
    bit: Optional[int] = 8
    symmetric: bool = False
    ch_axis: int = -1
    p: float = 2.4  # Lp norm of the MSE observers' search
    mse_search: str = "paper"  # MSE(Avg)Observer: 'paper' (1-D one-sided / 2-D ranges x zero points) or 'shrink' (an option)
    grad_scale: str = "paper"  # LSQ gradient scale 1/sqrt(N/C * qmax) per channel ('paper') or 1/sqrt(N * qmax) ('numel')

    def to_quantizer_config(self, **quantizer_kwargs) -> QuantizerConfig:
        okw = {"p": self.p} if "MSE" in self.observer else {}
        if self.observer in ("MSEObserver", "AvgMSEObserver"):
            okw["search"] = self.mse_search
        qkw = dict(quantizer_kwargs)
        if self.quantizer in ("LSQFakeQuantize", "LSQPlusFakeQuantize"):
            qkw["grad_scale_mode"] = self.grad_scale
        return QuantizerConfig(self.quantizer, self.observer, self.bit, self.symmetric, self.ch_axis,
                               observer_kwargs=okw, quantizer_kwargs=qkw)


@dataclass
class ReconSection:
    batch_size: int = 1
    scale_lr: float = 4.0e-5
    round_lr: float = 1.0e-3
    warm_up: float = 0.2
    weight: float = 0.01
    iters: int = 20000
    b_range: List[float] = field(default_factory=lambda: [20.0, 2.0])
    keep_gpu: bool = True
    round_mode: str = "learned_hard_sigmoid"
    drop_prob: float = 0.5
    max_boxes: int = 0  # >0: each step uses a random subset of at most this many prompts of an image (decoder units)
    units: str = "module"  # 'module': each attention / MLP / lone layer (the paper); 'block': whole blocks;
    # 'stage': SAQ-SAM's encoder stages (blocks up to each global attention / TinyViT layers) and decoder blocks
    loss: str = "paper"  # 'paper': |q - f|^p summed over dim 1, mean over the rest; 'mean': mean over all
    b_decay: str = "linear"  # AdaRound temperature: 'linear' (the paper's LinearTempDecay) or 'cosine'
    scale_space: str = "linear"  # learned activation scales: Adam on s ('linear', the paper) or on log(s) ('log')


RECON_GRANULARITIES = ("module", "block", "stage")  # recon.units (ptq4sam.quant_sam.recon_stages)

_CORE_FIELDS = [
    ("a_qconfig", QuantizerSection, field(default_factory=QuantizerSection)),
    ("w_qconfig", QuantizerSection, field(default_factory=lambda: QuantizerSection(
        "AdaRoundFakeQuantize", "MSEObserver", 8, False, 0))),
    ("calibrate", int, 32),
    ("calibrate_mode", str, "first"),  # 'first' N images by id (the paper) or 'random' (seeded)
    ("recon", ReconSection, field(default_factory=ReconSection)),
    ("float_modules", List[str], field(default_factory=lambda: [
        "patch_embed", "output_upscaling", "iou_prediction_head", "output_hypernetworks_mlps"])),
    ("depthwise_act_per_channel", bool, True),  # inputs of depthwise convs (TinyViT) per channel; see quant_sam
]
_TAIL_FIELDS = [
    ("overrides", List[Dict[str, Any]], field(default_factory=list)),  # [{pattern: glob on module names, w_bit, a_bit}]
    ("seed", int, 1005),
    ("source", str, ""),
]


def _to_dict(self) -> Dict[str, Any]:
    return dataclasses.asdict(self)


# The q_config: the core sections above, then one section per registered method (ptq4sam.methods.SECTIONS: the
# paper's `ptq4sam:`, `ahcptq:`, `smooth:`, `gptq:`, ...), so a new method's section needs no edit here.
QConfig = dataclasses.make_dataclass(
    "QConfig", _CORE_FIELDS + [(name, cls, field(default_factory=cls)) for name, cls in METHOD_SECTIONS.items()]
    + _TAIL_FIELDS, namespace={"to_dict": _to_dict, "__module__": __name__})

SECTIONS = {"a_qconfig": QuantizerSection, "w_qconfig": QuantizerSection, "recon": ReconSection, **METHOD_SECTIONS}


def _type_name(typ) -> str:
    """'int', 'List[float]', 'Optional[int]', ... for a field's annotation (a string under postponed annotations)."""
    s = typ if isinstance(typ, str) else getattr(typ, "__name__", None) if isinstance(typ, type) else str(typ)
    return s.replace("typing.", "")


_SCALARS = {"bool": "true or false", "int": "an integer", "float": "a finite number", "str": "a string",
            "Dict[str, Any]": "a mapping"}
_LISTS = {"bool": "a list of true / false", "int": "a list of integers", "float": "a list of finite numbers",
          "str": "a list of strings", "Dict[str, Any]": "a list of mappings"}


def _scalar_ok(value, name: str) -> bool:
    if name == "bool":
        return isinstance(value, bool)
    if name == "int":
        return is_int(value)
    if name == "float":  # finite: NaN / Inf would pass every range check below
        return is_number(value)
    if name == "str":
        return isinstance(value, str)
    if name == "Dict[str, Any]":
        return isinstance(value, dict)
    return True  # a type this checker does not know: the section's own check() decides


def _check_type(key: str, value, typ, src: str):
    """``value`` if it has the field's type (ints are taken for floats, lists are checked element by element),
    else a :class:`QConfigError` naming the key, what it expects and what it got."""
    name = _type_name(typ)
    if name == "Optional[int]":
        if value is None or value is False or value in ("off", "none", "None"):  # YAML reads `off` as False
            return None
        name = "int"
    if name.startswith("List[") and name.endswith("]"):
        elem = name[5:-1]
        ok = isinstance(value, list) and all(_scalar_ok(v, elem) for v in value)
        want = _LISTS.get(elem, f"a list of {elem}")
        if ok and elem == "float":
            value = [float(v) for v in value]
    else:
        ok = _scalar_ok(value, name)
        want = _SCALARS.get(name, name)
        if ok and name == "float":
            value = float(value)
    if not ok:
        raise QConfigError(f"{src}: '{key}' expects {want}, got {value!r}")
    return value


def _build(cls, data: Dict, prefix: str, src: str):
    if not isinstance(data, dict):
        raise QConfigError(f"{src}: '{prefix.rstrip('.')}' must be a mapping, got {data!r}")
    known = {f.name: f for f in fields(cls)}
    kw = {}
    for k, v in data.items():
        if k not in known:
            raise QConfigError(f"{src}: unknown key '{prefix}{k}' (known: {sorted(known)})")
        if k in SECTIONS and cls is QConfig:
            kw[k] = _build(SECTIONS[k], v, f"{k}.", src)
        else:
            kw[k] = _check_type(prefix + k, v, known[k].type, src)
    return cls(**kw)


def _merge(base: Dict, over: Dict) -> Dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path, seen=()) -> Dict:
    if not path.is_file():
        raise InputNotFound(f"q_config not found: {path}")
    if path.resolve() in seen:
        raise QConfigError(f"{path}: 'root' inheritance loops back to itself")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise QConfigError(f"{path}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r}); a q_config is a "
                           "YAML text file") from None
    data = _safe_yaml(text, str(path))
    if data is None:
        raise QConfigError(f"{path}: the file is empty; expected a mapping of q_config sections (e.g. a_qconfig:, "
                           "w_qconfig:, recon:) or 'root: <yaml>' to inherit one")
    if not isinstance(data, dict):
        raise QConfigError(f"{path}: top level must be a mapping of q_config sections, got {type(data).__name__} "
                           f"{short_repr(data)}")
    if "quant" in data and isinstance(data["quant"], dict):  # the paper repo nests everything under quant:
        extra = {k: v for k, v in data.items() if k not in ("quant", "model", "root")}
        data = {**data["quant"], **extra, **({"root": data["root"]} if "root" in data else {})}
    data.pop("model", None)
    root = data.pop("root", None)
    if root is not None and not (isinstance(root, str) and root.strip()):
        raise QConfigError(f"{path}: 'root' must be the path of a q_config yaml to inherit, got {root!r}")
    if root:
        rp = Path(root)
        if not rp.is_absolute():
            cand = [path.parent / rp, Path.cwd() / rp, Path(__file__).resolve().parents[1] / rp]
            rp = next((c for c in cand if c.is_file()), cand[0])
        data = _merge(_read_yaml(rp, seen + (path.resolve(),)), data)
    return data


# libyaml's safe loader where PyYAML was built with it (the same documents, about 10x faster than the pure-Python one)
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _safe_yaml(text: str, where: str):
    """``yaml.safe_load(text)``, with a syntax error as a :class:`QConfigError` naming ``where`` and the line."""
    try:
        return yaml.load(text, Loader=_SAFE_LOADER)
    except yaml.YAMLError as e:  # name the file and the line, not yaml's "<unicode string>"
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise QConfigError(f"{where}:{at}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    except UnicodeError:  # e.g. a command-line byte that is not UTF-8 (a lone surrogate): libyaml cannot encode it
        raise QConfigError(f"{where}: not valid text (a character that is not UTF-8: {text!r})") from None


def parse_overrides(options: Sequence[str]) -> Dict:
    """``['recon.iters=200', 'ptq4sam.AGQ=false']`` -> nested dict (values read as YAML). A key given twice takes
    the last value; a key below one that was set to a value (``recon=1 recon.iters=2``) is an error."""
    out: Dict[str, Any] = {}
    for opt in options:
        if not isinstance(opt, str) or "=" not in opt:
            raise QConfigError(f"--q-options: expected key=value (e.g. recon.iters=200), got {opt!r}")
        key, val = opt.split("=", 1)
        parts = key.split(".")
        if not all(p.strip() == p and p for p in parts):
            raise QConfigError(f"--q-options {opt!r}: key {key!r} must be dot-separated names without spaces "
                               "(e.g. recon.iters)")
        node = out
        for depth, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise QConfigError(f"--q-options {opt!r}: '{'.'.join(parts[:depth + 1])}' was set to {node!r} by "
                                   "an earlier option; it cannot also have keys")
        node[parts[-1]] = _safe_yaml(val, f"--q-options {opt!r}")
    return out


def validate(q: QConfig, src: str) -> QConfig:
    def bad(key, msg):
        raise QConfigError(f"{src}: '{key}' {msg}")

    for sec in ("a_qconfig", "w_qconfig"):
        s = getattr(q, sec)
        if s.quantizer in QUANTIZERS and s.quantizer not in BASE_QUANTIZERS:
            bad(f"{sec}.quantizer", f"'{s.quantizer}' is placed at its sites by its method's switch, not on every "
                f"{'activation' if sec == 'a_qconfig' else 'weight'}; expected one of {list(BASE_QUANTIZERS)}")
        if s.quantizer not in QUANTIZERS:
            bad(f"{sec}.quantizer", f"unknown '{s.quantizer}', expected one of {list(BASE_QUANTIZERS)}")
        if s.observer not in OBSERVERS:
            bad(f"{sec}.observer", f"unknown '{s.observer}', expected one of {sorted(OBSERVERS)}")
        if s.bit is not None and not 2 <= s.bit <= 16:
            bad(f"{sec}.bit", f"must be in 2..16 or 'off', got {s.bit}")
        if s.ch_axis < -1:
            bad(f"{sec}.ch_axis", f"must be -1 (per-tensor) or a channel axis >= 0, got {s.ch_axis}")
        if not 0 < s.p <= 16:
            bad(f"{sec}.p", f"must be in (0, 16] (the Lp norm of the range search; the paper: 2.4), got {s.p}")
    if q.a_qconfig.ch_axis != -1:
        bad("a_qconfig.ch_axis", "activations are quantized per tensor: use -1")
    if not 0 <= q.seed < 2 ** 32:
        bad("seed", f"must be in 0..2**32-1 (numpy's seed range), got {q.seed}")
    if q.calibrate < 1:
        bad("calibrate", f"must be >= 1 image, got {q.calibrate}")
    if q.calibrate_mode not in ("first", "random"):
        bad("calibrate_mode", f"must be 'first' or 'random', got {q.calibrate_mode!r}")
    r = q.recon
    if r.iters < 0:
        bad("recon.iters", f"must be >= 0, got {r.iters}")
    if r.max_boxes < 0:
        bad("recon.max_boxes", f"must be >= 0 (0 = all prompts), got {r.max_boxes}")
    if r.batch_size < 1:
        bad("recon.batch_size", f"must be >= 1, got {r.batch_size}")
    if not 0 <= r.warm_up <= 1:
        bad("recon.warm_up", f"must be in [0, 1], got {r.warm_up}")
    if not 0 <= r.drop_prob <= 1:
        bad("recon.drop_prob", f"must be in [0, 1], got {r.drop_prob}")
    if len(r.b_range) != 2 or r.b_range[0] < r.b_range[1]:
        bad("recon.b_range", f"must be [start, end] with start >= end, got {r.b_range}")
    if r.round_mode not in ("learned_hard_sigmoid", "nearest"):
        bad("recon.round_mode", f"must be 'learned_hard_sigmoid' or 'nearest', got {r.round_mode!r}")
    if r.scale_lr < 0 or r.round_lr < 0 or r.weight < 0:
        bad("recon", "learning rates and weight must be >= 0")
    for key, val, allowed in (("recon.units", r.units, RECON_GRANULARITIES), ("recon.loss", r.loss, ("paper", "mean")),
                              ("recon.b_decay", r.b_decay, ("linear", "cosine")),
                              ("recon.scale_space", r.scale_space, ("linear", "log")),
                              ("a_qconfig.mse_search", q.a_qconfig.mse_search, ("paper", "shrink")),
                              ("w_qconfig.mse_search", q.w_qconfig.mse_search, ("paper", "shrink")),
                              ("a_qconfig.grad_scale", q.a_qconfig.grad_scale, ("paper", "numel"))):
        if val not in allowed:
            bad(key, f"must be one of {list(allowed)}, got {val!r}")
    for name in METHOD_SECTIONS:  # each method's section checks itself
        getattr(q, name).check(bad, q)
    for i, o in enumerate(q.overrides):
        key = f"overrides[{i}]"
        if not isinstance(o, dict) or not isinstance(o.get("pattern"), str):
            bad(key, f"must be a mapping with a 'pattern' (glob on module names), got {o!r}")
        extra = sorted(set(o) - {"pattern", "w_bit", "a_bit"})
        if extra:
            bad(key, f"unknown key(s) {extra}; expected pattern, w_bit, a_bit")
        for b in ("w_bit", "a_bit"):
            if b in o and not (isinstance(o[b], int) and not isinstance(o[b], bool) and 2 <= o[b] <= 16):
                bad(f"{key}.{b}", f"must be an integer in 2..16, got {o[b]!r}")
    return q


def qconfig_from_dict(data: Dict, src: str) -> QConfig:
    """A resolved q_config (``QConfig.to_dict()``, e.g. the one a compact checkpoint holds), checked again."""
    return validate(_build(QConfig, dict(data), "", src), src)


def load_qconfig(path: Union[str, Path], overrides: Sequence[str] = ()) -> QConfig:
    path = Path(path)
    data = _merge(_read_yaml(path), parse_overrides(overrides))
    src = str(path) + (f" (with --q-options {' '.join(overrides)})" if overrides else "")
    data.setdefault("source", str(path))
    q = _build(QConfig, data, "", src)
    # the AdaRound rounding mode lives under recon: in the paper's yamls
    return validate(q, src)
