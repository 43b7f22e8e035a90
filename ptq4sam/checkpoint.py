"""Saving and loading quantized models (compact checkpoints) and the crash-safe reconstruction state (``--resume``)."""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .errors import atomic_write
from .methods import STRUCTURAL as METHOD_STRUCTURAL
from .models.sam_builder import CheckpointError, load_state_dict_strict, load_weights_file
from .qconfig import QConfig
from .quant_sam import build_context, quantize_sam
from .quantization import FakeQuantizeBase, freeze
from .quantization.state import quant_meta, restore_quantizers

# ---- save / load ----------------------------------------------------------------------------------------------
# q_config keys that decide which quantizers exist and what they compute: a checkpoint made with other values cannot be
# loaded into this model (recon / calibration keys only decide how the saved values were found)
STRUCTURAL_KEYS = ("a_qconfig", "w_qconfig", "float_modules", "depthwise_act_per_channel", "recon.round_mode",
                   "overrides") + tuple(dict.fromkeys(METHOD_STRUCTURAL))  # each method's own (ptq4sam.methods)


def quant_state(sam) -> Dict:
    """Everything that defines the quantized model: its state dict and each quantizer's switches."""
    return {"state_dict": sam.state_dict(), "quant_meta": quant_meta(sam)}


def save_quantized(sam, path, q_config: Dict, quant_encoder: bool, info: Optional[Dict] = None):
    """The compact integer checkpoint (:mod:`ptq4sam.deploy.compact`), written atomically; returns its sizes."""
    from .deploy import save_compact  # noqa: PLC0415

    return save_compact(sam, path, q_config, quant_encoder, info)


def _get(d: Dict, dotted: str):
    for k in dotted.split("."):
        d = d.get(k) if isinstance(d, dict) else None
    return d


def qconfig_differences(saved: Dict, current: Dict, keys=STRUCTURAL_KEYS) -> List[str]:
    """``key: saved -> current`` for each of ``keys`` (q_config dicts) whose value differs. A section the saved
    q_config lacks (a file written before that method existed) counts as the section's defaults."""
    defaults = QConfig().to_dict()
    out = []
    for k in keys:
        a, b = _get(saved, k), _get(current, k)
        if a is None and _get(saved, k.split(".")[0]) is None:
            a = _get(defaults, k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{k}.{kk}: {a.get(kk)!r} -> {b.get(kk)!r}" for kk in sorted(set(a) | set(b)) if a.get(kk) != b.get(kk)]
        elif a != b:
            out.append(f"{k}: {a!r} -> {b!r}")
    return out


def restore_quant_state(sam, ckpt: Dict, path) -> None:
    """Put a :func:`quant_state` into ``sam`` (converted with the same q_config); quantizers stay unfrozen."""
    state, meta = ckpt["state_dict"], ckpt["quant_meta"]
    mods = dict(sam.named_modules())
    have = {n for n, m in mods.items() if isinstance(m, FakeQuantizeBase)}
    missing, extra = sorted(set(meta) - have), sorted(have - set(meta))
    if missing or extra:
        raise CheckpointError(f"{path}: its quantizers do not match this model's (in the file only: {missing[:3]}, "
                              f"in the model only: {extra[:3]}); was it saved with another q_config or "
                              "--quant-encoder setting?")
    for name in meta:
        if f"{name}.alpha" in state:  # AdaRound's learned rounding (mid-reconstruction states keep it)
            mods[name].alpha = nn.Parameter(state[f"{name}.alpha"].clone(), requires_grad=False)
    restore_quantizers(sam, state, meta)
    load_state_dict_strict(sam, state, str(path))


def load_quantized(sam, path, device, qcfg: Optional[QConfig] = None, quant_encoder: Optional[bool] = None) -> Dict:
    """Restore a model saved by :func:`save_quantized` into ``sam`` already converted with the same q_config.

    Read with ``weights_only=True`` (a file needing pickled objects is refused, never executed); another format is
    refused. With ``qcfg`` / ``quant_encoder``, a checkpoint saved with other structural q_config values is refused
    naming them. Returns the saved run's info."""
    from .deploy.compact import read_compact  # noqa: PLC0415

    obj = read_compact(path)
    diffs = []
    if qcfg is not None:
        diffs = qconfig_differences(json.loads(obj["q_config"]), qcfg.to_dict())
    if quant_encoder is not None and obj["quant_encoder"] != quant_encoder:
        diffs.append(f"--quant-encoder: {obj['quant_encoder']} -> {quant_encoder}")
    if diffs:
        raise CheckpointError(f"{path} was saved with another quantization setting ({'; '.join(diffs)}; saved -> "
                              "given): load it with the q_config and flags it was made with")
    return _load_compact_into(sam, obj, path, device)


def _load_compact_into(sam, obj: Dict, path, device) -> Dict:
    """Load a read compact checkpoint into ``sam`` (converted with its q_config), move it, freeze it for evaluation."""
    from .deploy.compact import load_compact  # noqa: PLC0415

    info = load_compact(sam, obj, path)
    sam.to(device)
    freeze(sam)
    return info


def load_quantized_file(sam, path, device) -> Tuple[QConfig, bool, Dict]:
    """Convert the float ``sam`` with the q_config and flags a compact checkpoint was saved with, and load it.
    Returns (q_config, quant_encoder, the saved run's info)."""
    from .deploy.compact import read_compact  # noqa: PLC0415
    from .qconfig import qconfig_from_dict  # noqa: PLC0415

    obj = read_compact(path)
    qcfg = qconfig_from_dict(json.loads(obj["q_config"]), f"{path} (its q_config)")
    for p in sam.parameters():
        p.requires_grad_(False)
    quantize_sam(sam, build_context(qcfg), obj["quant_encoder"], float_modules=tuple(qcfg.float_modules))
    return qcfg, bool(obj["quant_encoder"]), _load_compact_into(sam, obj, path, device)


# ---- crash-safe reconstruction ---------------------------------------------------------------------------------
RUN_BOOKKEEPING = ("timings", "ptq_phases_s", "pre_recon_phases_s", "resumed_after_unit", "saved_to")


def without_wall_times(metrics: Dict) -> Dict:
    """A run's metrics / info without wall times and resume bookkeeping: what must be identical between an
    uninterrupted run and a resumed one (or two runs with the same seed). A wall time is a key ending in ``_s`` at any
    depth (a method's report, a reconstruction unit's record), except COCO's small-object mAP (``segm_mAP_s``)."""
    def wall(k: str) -> bool:
        return k.endswith("_s") and not k.endswith("mAP_s")

    def strip(v):
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if not wall(k)}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v

    out = {k: strip(v) for k, v in metrics.items()
           if not (wall(k) or k.startswith("images_per_s") or k in RUN_BOOKKEEPING)}
    out["recon"] = strip(metrics.get("recon", []))
    return out


RECON_STATE_FORMAT = "ptq4sam-recon-state-1"
CRASH_ENV = "PTQ4SAM_CRASH_AFTER_UNIT"  # testing hook: raise right after unit k's state is saved


class ReconCheckpoint:
    """The quantization state after calibration (unit 0) and after each finished reconstruction unit, written
    atomically to ``path``; :meth:`load` gives it back to ``--resume`` if ``fingerprint`` (q_config, calibration
    data, seed, flags) is the same. Resuming replays the finished stages' forwards (no optimisation) to rebuild the
    cached stage inputs, restores the reconstruction's random generators, and continues with the next unit: the result
    is bit-identical to an uninterrupted run (tested)."""

    def __init__(self, path, fingerprint: Dict, resume: bool = False, write: bool = True, log=print):
        self.path, self.fingerprint, self.resume, self.write, self.log = Path(path), fingerprint, resume, write, log
        crash = os.environ.get(CRASH_ENV)
        self.crash_after = int(crash) if crash else None
        self.save_s = 0.0  # time spent writing the state (reported in ptq_phases_s.recon_state_saves)

    def save(self, sam, units_done: int, n_units: int, info: Dict, recon_infos: List[Dict], rng: Dict) -> None:
        obj = {"format": RECON_STATE_FORMAT, "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
               "units_done": units_done, "n_units": n_units, "info": json.dumps(info),
               "recon": json.dumps(recon_infos), "rng": rng, **quant_state(sam)}
        if self.write:
            t = time.time()
            atomic_write(self.path, lambda tmp: torch.save(obj, tmp))
            self.save_s += time.time() - t
        if self.crash_after is not None and units_done >= self.crash_after:
            raise RuntimeError(f"simulated crash after reconstruction unit {units_done} ({CRASH_ENV})")

    def load(self) -> Optional[Dict]:
        if not self.resume:
            return None
        if not self.path.is_file():
            self.log(f"--resume: no saved state at {self.path}; starting from the beginning")
            return None
        ckpt = load_weights_file(self.path, "reconstruction state (--resume)")
        if not isinstance(ckpt, dict) or ckpt.get("format") != RECON_STATE_FORMAT:
            raise CheckpointError(f"{self.path}: not a reconstruction state of format {RECON_STATE_FORMAT!r} (found "
                                  f"{ckpt.get('format') if isinstance(ckpt, dict) else type(ckpt).__name__!r})")
        saved = json.loads(ckpt["fingerprint"])
        diffs = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in self.fingerprint.items() if saved.get(k) != v]
        if diffs:
            raise CheckpointError(f"{self.path}: the interrupted run used other settings ({'; '.join(d[:200] for d in diffs)}; "
                                  "saved -> now): resume with the same config, q_config, options and seed, or delete "
                                  "the file to start over")
        ckpt["info"], ckpt["recon"] = json.loads(ckpt["info"]), json.loads(ckpt["recon"])
        return ckpt

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

