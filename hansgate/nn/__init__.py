"""L1: torch building blocks shared by refinement, audit and the exported graph.

Scoped hooks (``hooks``), baked-in input normalisation (``normalisation``), layer tracing
and model surgery (``surgery``), forward-mode derivatives (``jvp``), model
loading and source identity (``models``), training helpers (``training``), and ONNX export
checked against torch (``export``).
"""

from __future__ import annotations

from hansgate.nn.export import (
    LOGIT_TOLERANCE,
    allowed_difference,
    OPSET,
    export_checked,
    export_checked_to,
    export_onnx,
    run_onnx,
)
from hansgate.nn.hooks import capture, eval_mode, leaf_outputs, module_named
from hansgate.nn.jvp import Linearized, UnsupportedOp, linearizable
from hansgate.nn.models import (
    BUILTIN_MODELS,
    MnistCNN,
    SmallResNet,
    SmallVGG,
    build_builtin,
    load_model,
    load_state_dict_file,
    source_sha256,
    state_dict_sha256,
)
from hansgate.nn.normalisation import Normalised
from hansgate.nn.surgery import (
    LayerCall,
    Refined,
    auto_layers,
    capture_outputs,
    get_module,
    insert_after,
    resolve_layers,
    run_hooked,
    trace_calls,
)
from hansgate.nn.training import (
    TrainConfig,
    accuracy,
    batches,
    frozen_batchnorm,
    predict_logits,
    train_classifier,
)

__all__ = [
    "module_named",
    "capture",
    "leaf_outputs",
    "eval_mode",
    "Normalised",
    "LayerCall",
    "run_hooked",
    "trace_calls",
    "auto_layers",
    "resolve_layers",
    "capture_outputs",
    "get_module",
    "insert_after",
    "Refined",
    "Linearized",
    "UnsupportedOp",
    "linearizable",
    "BUILTIN_MODELS",
    "MnistCNN",
    "SmallVGG",
    "SmallResNet",
    "build_builtin",
    "load_model",
    "load_state_dict_file",
    "state_dict_sha256",
    "source_sha256",
    "TrainConfig",
    "train_classifier",
    "predict_logits",
    "accuracy",
    "batches",
    "frozen_batchnorm",
    "OPSET",
    "LOGIT_TOLERANCE",
    "allowed_difference",
    "export_onnx",
    "run_onnx",
    "export_checked",
    "export_checked_to",
]
