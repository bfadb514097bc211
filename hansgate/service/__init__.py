"""The hansgate gateway: a BentoML service that serves a bundle with onnxruntime and monitors it.

Run it with ``hansgate serve BUNDLE`` or ``HANSGATE_BUNDLE=... bentoml serve hansgate.service.service:Gateway``.
This package imports neither torch nor BentoML eagerly; ``hansgate.service.service`` holds the BentoML class.
"""

from hansgate.service.config import GatewayConfig, ServiceOptions
from hansgate.service.errors import Rejection, rejection
from hansgate.service.fairness import FairnessThresholds
from hansgate.service.gateway import Gateway
from hansgate.service.limits import ServingOptions
from hansgate.service.metrics import GatewayMetrics, batch_stats
from hansgate.service.receipts import PredictionStore, Receipt, ReceiptSigner
from hansgate.service.runtime import OnnxRuntime, select_providers

__all__ = [
    "GatewayConfig",
    "ServiceOptions",
    "ServingOptions",
    "Gateway",
    "GatewayMetrics",
    "batch_stats",
    "OnnxRuntime",
    "select_providers",
    "ReceiptSigner",
    "Receipt",
    "PredictionStore",
    "Rejection",
    "rejection",
    "FairnessThresholds",
]
