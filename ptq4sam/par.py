"""SAQ-SAM's Prompt-Aware Reconstruction (PAR; Zhu et al., "SAQ-SAM"; code jingjing0419/SAQ-SAM): reconstruction
units judged by what the mask decoder makes of them, not only by their own outputs.

* Encoder stages end at each global-attention block (SAM ViT: blocks 0-2, 3-5, ... for ViT-B; TinyViT, whose
  attention is all windowed: each of its layers, i.e. its convolution stage and the end of each attention stage),
  then the neck. A stage's quantized output goes through the rest of the image encoder and the two-way transformer
  of the mask decoder, all in float, with up to ``prompts`` of the image's box prompts; the loss is on the
  transformer's image tokens (after the prompt interaction) against the float model's, ``|.|^2`` summed over
  channels, averaged over prompts and tokens. The stage's own output loss has weight 0 (as the authors' code).
* Decoder two-way blocks (one unit each): ``beta * (query_weight * L(queries) + L(keys))`` on the block's outputs
  plus ``alpha * L(prompt tokens)``: the quantized decoder's output prompt tokens (the whole quantized decoder fed
  the quantized image embedding, the block inside it with QDrop) against the float decoder's on the same embedding.
  The final token-to-image attention keeps the paper's loss.

Where this differs from the authors' code: a ViT stage's output goes through the remaining encoder blocks (theirs
feeds it to the neck directly); AdaRound keeps its rounding regulariser (theirs sets it to 0); every unit takes
``recon.iters`` steps (theirs 2000 for PAR units, 10000 for the final attention)."""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch

from .quantization import disable_all, enable_quantization
from .reconstruction import UnitObjective, lp_loss, stage_entry
from .samples import CalibSample, forward_sample


class _StopAtTransformer(Exception):
    pass


def prompt_subsets(samples: List[CalibSample], prompts: int, seed: int) -> Dict[int, np.ndarray]:
    """Per sample with boxes: a seeded random subset of at most ``prompts`` of its boxes (sorted indices), fixed for
    the whole reconstruction (the authors sample theirs once per image)."""
    out = {}
    for i, s in enumerate(samples):
        n = np.asarray(s.boxes).reshape(-1, 4).shape[0]
        if n:
            g = torch.Generator().manual_seed(seed * 7919 + i)
            out[i] = np.sort(torch.randperm(n, generator=g)[:prompts].numpy())
    return out


def two_way_outputs(seg, sample: CalibSample, feats: Optional[torch.Tensor] = None):
    """(prompt tokens, image tokens) out of the mask decoder's two-way transformer for ``sample`` (its encoder is
    run unless ``feats`` is given); the rest of the decoder is skipped."""
    got = []

    def stop(m, args, out):
        got.append(out)
        raise _StopAtTransformer

    hook = seg.sam.mask_decoder.transformer.register_forward_hook(stop)
    try:
        forward_sample(seg, sample, feats)
    except _StopAtTransformer:
        pass
    finally:
        hook.remove()
    if not got:
        raise RuntimeError("PAR: the mask decoder's transformer was not reached")
    return got[0]


def token_loss(pred: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """The PAR distance of token tensors (prompts, tokens, channels): ``|pred - tgt|^2`` summed over channels, averaged
    over the rest."""
    return lp_loss(pred, tgt, p=2.0, dim=-1)


class PARObjective(UnitObjective):
    """The loss of SAQ-SAM's PAR (module docstring) as a :class:`~ptq4sam.reconstruction.UnitObjective`."""

    def __init__(self, seg, samples: List[CalibSample], alpha: float, beta: float, query_weight: float,
                 prompts: int, seed: int):
        from .quant_sam import decoder_stages  # noqa: PLC0415

        self.seg, self.sam, self.samples = seg, seg.sam, samples
        self.alpha, self.beta, self.query_weight = alpha, beta, query_weight
        self.subsets = prompt_subsets(samples, prompts, seed)
        self.enc_ids = {id(m) for m in self.sam.image_encoder.modules()}
        self.blocks = {id(b) for b in decoder_stages(self.sam.mask_decoder.transformer)[:-1]}
        self.fp_image_tokens: Optional[Dict[int, torch.Tensor]] = None
        self.fp_prompt_tokens: Optional[Dict[int, torch.Tensor]] = None
        self.q_feats: Dict[int, torch.Tensor] = {}
        self.kind = None  # 'encoder' / 'decoder' / None for the unit being optimised
        self.cache = self.stage_i = None

    def _sub(self, i: int) -> CalibSample:
        s = self.samples[i]
        return CalibSample(s.image, np.asarray(s.boxes).reshape(-1, 4)[self.subsets[i]])

    def local_weights(self, unit, n):
        if self.kind == "encoder":
            return [0.0] * n
        if self.kind == "decoder":  # (queries, keys) of a two-way block
            return [self.beta * self.query_weight, self.beta] if n == 2 else [self.beta] * n
        return None

    @torch.no_grad()
    def prepare(self, cache, i, stage, unit, quant_state):
        self.cache, self.stage_i = cache, i
        if id(stage_entry(stage)) in self.enc_ids:
            self.kind = "encoder"
            if self.fp_image_tokens is None:  # the float model's: the same for every encoder stage
                disable_all(self.sam)
                self.fp_image_tokens = {i: cache.store(two_way_outputs(self.seg, self._sub(i))[1])
                                        for i in self.subsets}
            disable_all(self.sam)  # the rest of the model float while this stage learns
            enable_quantization(unit)
        elif id(stage) in self.blocks:
            self.kind = "decoder"
            self.fp_image_tokens = None  # the encoder stages are done
            if self.fp_prompt_tokens is None:  # the quantized encoder is final by now
                quant_state()
                for i in self.subsets:
                    cache._cur = i  # a float encoder replays its cached embedding by sample
                    self.q_feats[i] = cache.store(self.seg.encode(self.samples[i].image)[0])
                disable_all(self.sam)
                self.fp_prompt_tokens = {i: cache.store(two_way_outputs(self.seg, self._sub(i),
                                                                        cache.load(self.q_feats[i]))[0])
                                         for i in self.subsets}
                quant_state()
        else:
            self.kind = None

    def extra(self, unit, out, sample, gen):
        if self.kind is None or sample not in self.subsets:
            return None
        cache = self.cache
        if self.kind == "encoder":
            with cache.replaced(self.stage_i, out, sample):
                tokens = two_way_outputs(self.seg, self._sub(sample))[1]
            return self.alpha * token_loss(tokens, cache.load(self.fp_image_tokens[sample]))
        tokens = two_way_outputs(self.seg, self._sub(sample), cache.load(self.q_feats[sample]))[0]
        return self.alpha * token_loss(tokens, cache.load(self.fp_prompt_tokens[sample]))
