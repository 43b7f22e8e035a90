"""Torch-only quantization core: observers, fake quantizers, quantized modules, state switches.

Nothing here imports mmcv or mmdet, so it runs wherever torch runs.
"""
from .cag import CAGFakeQuantize, group_channels  # noqa: F401
from .fake_quant import (  # noqa: F401
                         QUANTIZERS,
                         AdaRoundFakeQuantize,
                         AGQFakeQuantize,
                         FakeQuantizeBase,
                         FixedFakeQuantize,
                         LSQFakeQuantize,
                         LSQPlusFakeQuantize,
                         agq_quantize,
                         use_compiled_agq,
)
from .hluq import HLUQFakeQuantize, HybridRangeObserver, hluq_level_set, hluq_levels, hluq_quantize  # noqa: F401
from .lnq import LNQFakeQuantize, lnq_reference  # noqa: F401
from .observer import (  # noqa: F401
                         OBSERVERS,
                         AvgMinMaxObserver,
                         AvgMSEFastObserver,
                         AvgMSEObserver,
                         MinMaxObserver,
                         MSEFastObserver,
                         MSEObserver,
                         PercentileObserver,
                         qparams_from_range,
                         qrange,
)
from .qconfig import QuantizerConfig, build_quantizer  # noqa: F401
from .qmodules import QuantConv2d, QuantConvTranspose2d, QuantLinear, QuantPoint, quantizers  # noqa: F401
from .state import (  # noqa: F401
                         disable_all,
                         enable_calibration,
                         enable_quantization,
                         freeze,
                         harden_all,
                         min_drop_prob,
                         perturbed_outputs,
                         set_drop_prob,
                         unfreeze,
)
