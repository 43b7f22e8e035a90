"""ACNR, activation-aware condition-number reduction (AHCQ-SAM, Zhang et al.; code Wenlun-Zhang/AHCQ-SAM): before a
Linear weight is quantized, its small singular values are raised so that the weight is better conditioned, by as much
as the activation-quantization error along each singular direction allows.

For a weight W (out x in) with condition number kappa = s_max / s_min >= ``kappa_min`` (100), take the SVD
W^T = U diag(s) V^T (U: directions of the layer's input space) and, on calibration data,

    C_i = mean over tokens of ((X_fp - Q_a(X_q)) . u_i)^2

(X_fp: the layer's input in the float model; X_q: its input in the model whose activation quantizers are on and
weights float; Q_a: the layer's own input quantizer). Then ``iters`` proximal steps, each on the current values:

    t     = mean(s)
    tail  = the values after the first one at which the cumulative s^2 energy (largest first) exceeds ``energy``
    s_hat = (s + 2 lam t) / (1 + 2 lam + 2 beta C)       (the minimiser of (x-s)^2/2 + lam (x-t)^2 + beta C x^2)
    s     = max(s, s_hat) on the tail                    (values are only raised)

and the weight W' = (U diag(s) V^T)^T is what the weight quantizer rounds (the float weight stays: float forwards and
reconstruction's reference are the original model's, as the authors' reconstruction reference is). Their lam = 0.003,
beta = 0.001, energy 0.8, K = 200 steps at W4 / W5 and 20 at W6.

Where this differs from the authors' code: their C_i is summed twice per batch (twice the formula above; we follow the
formula); they capture each layer's inputs again after the layers before it changed (with their changed weights
upstream), where we capture every layer's inputs in one pass of the original weights (2 forwards per image instead of
2 per image per layer); they redo the SVD every step (the same U; the tail is chosen on the sorted current values, as
here); they calibrate the activations again after ACNR (their AGQ / LNQ parameters stay from before it), we keep the
ranges of the original model; they use the first 32 calibration images, we all (``acnr_images``). As theirs, C is
measured before the softmax searches (AGQ / LNQ) and PCC have set their quantizers (their calibrated ranges then).

Memory: one image's float inputs of every treated layer are held until its quantized forward (for SAM-H with the
encoder quantized, several GB per image)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

LAMBDA, BETA, ENERGY, KAPPA_MIN = 0.003, 0.001, 0.8, 100.0  # the authors' values


def default_iters(weight_bits: int) -> int:
    """The authors' number of proximal steps: 200 for W4 / W5, 20 for W6 (and wider weights)."""
    return 200 if weight_bits < 6 else 20


def condition_number(s: torch.Tensor) -> float:
    """s_max / s_min of singular values ``s`` (inf when the smallest is 0)."""
    lo = float(s.min())
    return float("inf") if lo == 0 else float(s.max()) / lo


def tail_index(s: torch.Tensor, energy: float) -> torch.Tensor:
    """Indices (into ``s``, any order) of the values after the first one, largest first, at which the cumulative
    s^2 energy exceeds ``energy`` of the total: the tail ACNR may raise."""
    order = torch.argsort(s, descending=True, stable=True)
    e = torch.cumsum(s[order].double() ** 2, 0)
    cut = int(torch.searchsorted(e, energy * e[-1], right=True))  # the first index with e > energy * total
    return order[cut + 1:]


def acnr_values(s: torch.Tensor, c: torch.Tensor, iters: int, lam: float = LAMBDA, beta: float = BETA,
                energy: float = ENERGY) -> torch.Tensor:
    """``iters`` proximal steps (module docstring) on singular values ``s`` with activation-error energies ``c``
    (aligned with ``s``); returns the new values (float64)."""
    s, c = s.double().clone(), c.double()
    for _ in range(iters):
        tail = tail_index(s, energy)
        if tail.numel() == 0:
            break
        t = s.mean()
        s_hat = (s[tail] + 2 * lam * t) / (1 + 2 * lam + 2 * beta * c[tail])
        s[tail] = torch.maximum(s[tail], s_hat)
    return s


@dataclass
class LayerSVD:
    """One weight's SVD (float64): W^T = u diag(s) vh; ``c`` and ``n`` accumulate the activation-error energies."""

    u: torch.Tensor  # (in, k)
    s: torch.Tensor  # (k,)
    vh: torch.Tensor  # (k, out)
    c: torch.Tensor  # (k,) sum over tokens of (delta_x . u_i)^2
    n: int = 0  # tokens seen

    @classmethod
    def of(cls, weight: torch.Tensor) -> "LayerSVD":
        u, s, vh = torch.linalg.svd(weight.detach().double().T, full_matrices=False)
        return cls(u, s, vh, torch.zeros_like(s))

    @torch.no_grad()
    def add(self, delta_x: torch.Tensor) -> None:
        """Accumulate C from input errors ``delta_x`` (..., in)."""
        d = delta_x.reshape(-1, self.u.shape[0]).double()
        self.c += ((d @ self.u) ** 2).sum(0)
        self.n += d.shape[0]

    def reduced(self, iters: int, lam: float = LAMBDA, beta: float = BETA, energy: float = ENERGY
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(the new weight (out x in, float64), its singular values) after :func:`acnr_values`."""
        s = acnr_values(self.s, self.c / max(self.n, 1), iters, lam, beta, energy)
        return ((self.u * s) @ self.vh).T, s


def treat(svds: Dict[str, LayerSVD], weights: Dict[str, torch.Tensor], iters: int, lam: float, beta: float,
          energy: float) -> Tuple[Dict[str, torch.Tensor], List[Dict]]:
    """ACNR's new weight for every layer in ``svds`` (by name; ``weights``: the float weights, for dtype) and a
    report line each (kappa before / after, the tail's size, the relative weight change)."""
    out, report = {}, []
    for name, svd in svds.items():
        w_new, s = svd.reduced(iters, lam, beta, energy)
        w = weights[name]
        out[name] = w_new.to(w.dtype)
        report.append({"layer": name, "kappa_before": round(condition_number(svd.s), 2),
                       "kappa_after": round(condition_number(s), 2), "raised": int((s > svd.s).sum()),
                       "rel_change": float((w_new - w.double()).norm() / w.double().norm()), "tokens": svd.n})
    return out, report


@torch.no_grad()
def collect_errors(seg, samples: Sequence, feats: Sequence, layers: Dict[str, torch.nn.Module],
                   svds: Dict[str, LayerSVD], progress=lambda it, **kw: it) -> None:
    """C of every layer in ``svds``: per sample two forwards, the float model's (every quantizer off; each layer's
    input recorded) and the activation-quantized one's (weights float); each layer's X_fp - Q_a(X_q) is added to its
    SVD. ``feats``: the float image embeddings per sample (None: encode), ``layers``: the modules by name."""
    from .quantization import disable_all, enable_quantization, set_drop_prob  # noqa: PLC0415
    from .samples import forward_sample  # noqa: PLC0415

    sam = seg.sam
    recorded: Dict[str, List[torch.Tensor]] = {}
    quantized = [False]

    def hook_for(name):
        def hook(mod, inp, out):  # on the layer's input quantization point: out = Q_a(its input), or the input
            if not quantized[0]:
                recorded.setdefault(name, []).append(out.detach())
            elif not recorded.get(name):
                raise RuntimeError(f"ACNR: {name} ran more often with quantized activations than in float")
            else:
                svds[name].add(recorded[name].pop(0) - out)
        return hook

    handles = [layers[n].input_quant.register_forward_hook(hook_for(n)) for n in svds]
    try:
        for s, f in zip(progress(samples, desc="ACNR: activation errors"), feats):
            recorded.clear()
            quantized[0] = False
            disable_all(sam)
            forward_sample(seg, s, f)
            quantized[0] = True
            enable_quantization(sam, weights=False)
            set_drop_prob(sam, 1.0)  # every activation quantized (no QDrop mixing)
            forward_sample(seg, s, f)
            left = [n for n, v in recorded.items() if v]
            if left:
                raise RuntimeError(f"ACNR: {left[:3]} ran more often in float than with quantized activations")
    finally:
        for h in handles:
            h.remove()
        disable_all(sam)
