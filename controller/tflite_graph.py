"""TFLite flatbuffer rewrites for ``edgefleet model quantize`` (see docs/quantize.md).

ai-edge-quantizer wants a float32 model with a SignatureDef; XNNPACK wants int8 graphs
without stand-alone activation ops; the agent wants a uint8 input it can feed raw camera
pixels to. The rewrites here do that on the flatbuffer object API of ``ai_edge_litert``
(generalized from packaging/assets/make_assets.py, which made the shipped INT8 model):

- :func:`to_float32` — fp16 constants behind DEQUANTIZE ops become fp32 constants, the
  DEQUANTIZE ops go, RELUs are fused (:func:`fuse_activations`), unused tensors and
  operator codes are dropped and a ``serving_default`` signature is added when missing.
- :func:`add_uint8_input` — a uint8 graph input plus one QUANTIZE op in front of the int8
  input the quantizer leaves (same scale, zero point + 128).
- :func:`graph_facts` — cheap facts that predict XNNPACK speed: op counts, stand-alone
  activations left, XNNPACK partitions.

Everything raises :class:`TFLiteGraphError` (a ControllerError) with what to do.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from controller.errors import ControllerError

__all__ = [
    "SIGNATURE_KEY",
    "Float32Model",
    "GraphFacts",
    "ModelIO",
    "TFLiteGraphError",
    "add_uint8_input",
    "fuse_activations",
    "graph_facts",
    "model_io",
    "tensor_suggestions",
    "to_float32",
]

SIGNATURE_KEY = "serving_default"


class TFLiteGraphError(ControllerError):
    """A TFLite model cannot be read, is not the kind of model asked for, or a rewrite failed."""


def _schema() -> Any:
    try:
        from ai_edge_litert import schema_py_generated as sch
    except ImportError as err:  # pragma: no cover - ai-edge-litert is a dependency of the extra
        raise TFLiteGraphError(
            f"reading TFLite models needs ai-edge-litert ({err}): pip install 'edgefleet[quantize]'"
        ) from err
    return sch


def _fbu() -> Any:
    from ai_edge_litert.tools import flatbuffer_utils

    return flatbuffer_utils


def _read(data: bytes, what: str) -> Any:
    _schema()
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise TFLiteGraphError(f"{what} is not a TFLite model (no TFL3 identifier)")
    try:
        return _fbu().read_model_from_bytearray(bytearray(data))
    except Exception as err:  # the flatbuffer reader raises anything on bad input
        raise TFLiteGraphError(f"{what} is not a readable TFLite model: {err}") from err


def _write(model: Any) -> bytes:
    return bytes(_fbu().convert_object_to_bytearray(model))


def _code(model: Any, op: Any) -> int:
    oc = model.operatorCodes[op.opcodeIndex]
    return int(max(oc.builtinCode, oc.deprecatedBuiltinCode))


def _name(tensor: Any) -> str:
    raw = tensor.name
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)


def _type_name(type_code: int) -> str:
    sch = _schema()
    names = {v: k for k, v in vars(sch.TensorType).items() if not k.startswith("_")}
    return str(names.get(type_code, type_code)).lower()


def _op_name(code: int) -> str:
    sch = _schema()
    names = {v: k for k, v in vars(sch.BuiltinOperator).items() if not k.startswith("_")}
    return str(names.get(code, code))


def _quantized(tensor: Any) -> bool:
    q = tensor.quantization
    return q is not None and q.scale is not None and len(q.scale) > 0


def _has_data(model: Any, tensor: Any) -> bool:
    if tensor.buffer <= 0 or tensor.buffer >= len(model.buffers):
        return False
    data = model.buffers[tensor.buffer].data
    return data is not None and len(data) > 0


# --- float model in, fp32 + signature out ------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelIO:
    """The one input of a float model, as its signature names it."""

    signature_key: str
    input_key: str
    """Signature input name (the calibration data is keyed by it)."""
    input_tensor: str
    """Tensor name (the calibration result is keyed by it)."""
    input_shape: tuple[int, ...]
    activations: tuple[str, ...]
    """Names of the non-constant tensors, in graph order (what --fix-range can name)."""


def _check_float(model: Any, what: str) -> None:
    sch = _schema()
    if len(model.subgraphs) != 1:
        raise TFLiteGraphError(
            f"{what} has {len(model.subgraphs)} subgraphs; quantize supports single-subgraph "
            "vision models only"
        )
    sg = model.subgraphs[0]
    if len(sg.inputs) != 1:
        raise TFLiteGraphError(
            f"{what} has {len(sg.inputs)} inputs; quantize supports one image input only"
        )
    for i in [*sg.inputs, *sg.outputs]:
        t = sg.tensors[int(i)]
        if t.type != sch.TensorType.FLOAT32 or _quantized(t):
            kind = "input" if i in sg.inputs else "output"
            raise TFLiteGraphError(
                f"{what} is not a float model ({kind} {_name(t)!r} is {_type_name(t.type)}"
                f"{' quantized' if _quantized(t) else ''}): give the float (fp32 or fp16) model "
                "it was made from"
            )
    for t in sg.tensors:
        if _quantized(t):
            raise TFLiteGraphError(
                f"{what} is already (partly) quantized (tensor {_name(t)!r} is "
                f"{_type_name(t.type)} with a scale): give the float (fp32 or fp16) model"
            )


def _rewrite_fp16_constants(model: Any, what: str) -> int:
    """DEQUANTIZE(fp16 const) -> fp32 const under the DEQUANTIZE's output name."""
    sch = _schema()
    sg = model.subgraphs[0]
    remap: dict[int, int] = {}
    keep: list[Any] = []
    converted: set[int] = set()
    for op in sg.operators:
        if _code(model, op) != sch.BuiltinOperator.DEQUANTIZE:
            keep.append(op)
            continue
        src, dst = sg.tensors[int(op.inputs[0])], sg.tensors[int(op.outputs[0])]
        if src.type != sch.TensorType.FLOAT16 or not _has_data(model, src):
            raise TFLiteGraphError(
                f"{what} is not a float model (DEQUANTIZE of {_type_name(src.type)} tensor "
                f"{_name(src)!r}): give the float (fp32 or fp16) model"
            )
        if src.buffer not in converted:
            buf = model.buffers[src.buffer]
            f32 = np.frombuffer(bytes(bytearray(buf.data)), np.float16).astype(np.float32)
            buf.data = np.frombuffer(f32.tobytes(), np.uint8)
            converted.add(src.buffer)
        src.type = sch.TensorType.FLOAT32
        src.name, dst.name = dst.name, src.name + b"_fp16_unused"
        remap[int(op.outputs[0])] = int(op.inputs[0])
    for op in keep:
        op.inputs = [remap.get(int(i), int(i)) for i in op.inputs]
    sg.outputs = [remap.get(int(i), int(i)) for i in sg.outputs]
    sg.operators = keep
    used = {int(i) for op in keep for i in [*op.inputs, *op.outputs] if int(i) >= 0}
    for i in used:
        if sg.tensors[i].type == sch.TensorType.FLOAT16:
            raise TFLiteGraphError(
                f"{what} computes in float16 (tensor {_name(sg.tensors[i])!r}), which quantize "
                "cannot rewrite: export a float32 model (or fp16 weights only)"
            )
    return len(remap)


_ACTIVATIONS = {"RELU": "RELU", "RELU6": "RELU6", "RELU_N1_TO_1": "RELU_N1_TO_1"}
"""Stand-alone activation op -> the ActivationFunctionType it fuses into."""
_FUSE_INTO = ("CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "SUB", "MUL", "FULLY_CONNECTED")


def fuse_activations(model: Any) -> int:
    """Fuse RELU / RELU6 / RELU_N1_TO_1 into the CONV_2D, DEPTHWISE_CONV_2D, ADD, SUB, MUL or
    FULLY_CONNECTED that produces its input (when that output has no other consumer, is no
    graph output and has no fused activation yet). Same math; the int8 graph then stays in
    one XNNPACK partition. Returns how many were fused."""
    sch = _schema()
    ops = sch.BuiltinOperator
    sg = model.subgraphs[0]
    act_codes = {
        getattr(ops, k): getattr(sch.ActivationFunctionType, v) for k, v in _ACTIVATIONS.items()
    }
    fuse_codes = {getattr(ops, k) for k in _FUSE_INTO}
    consumers: dict[int, int] = collections.Counter(
        int(i) for op in sg.operators for i in op.inputs if int(i) >= 0
    )
    producer = {int(o): op for op in sg.operators for o in op.outputs}
    graph_out = {int(o) for o in sg.outputs}
    signature_tensors = {
        int(tm.tensorIndex)
        for sd in model.signatureDefs or []
        for tm in [*(sd.inputs or []), *(sd.outputs or [])]
    }
    drop: set[int] = set()
    for op in sg.operators:
        act = act_codes.get(_code(model, op))
        if act is None:
            continue
        t = int(op.inputs[0])
        p = producer.get(t)
        options: Any = getattr(p, "builtinOptions", None)
        if (
            p is None
            or _code(model, p) not in fuse_codes
            or consumers.get(t, 0) != 1
            or t in graph_out
            or t in signature_tensors
            or getattr(options, "fusedActivationFunction", None) != sch.ActivationFunctionType.NONE
        ):
            continue
        options.fusedActivationFunction = act
        p.outputs = [int(op.outputs[0])]  # the producer now writes the activation's output
        drop.add(id(op))
    sg.operators = [op for op in sg.operators if id(op) not in drop]
    return len(drop)


def _compact(model: Any) -> None:
    """Drop tensors and operator codes no operator, graph input/output or signature uses."""
    sg = model.subgraphs[0]
    sigs = [
        tm for sd in model.signatureDefs or [] for tm in [*(sd.inputs or []), *(sd.outputs or [])]
    ]
    used = sorted(
        {int(i) for op in sg.operators for i in [*op.inputs, *op.outputs] if int(i) >= 0}
        | {int(i) for i in sg.inputs}
        | {int(i) for i in sg.outputs}
        | {int(tm.tensorIndex) for tm in sigs}
    )
    new_idx = {old: new for new, old in enumerate(used)}
    sg.tensors = [sg.tensors[i] for i in used]
    for op in sg.operators:
        op.inputs = [new_idx[int(i)] if int(i) >= 0 else -1 for i in op.inputs]
        op.outputs = [new_idx[int(i)] for i in op.outputs]
        if op.intermediates is not None and len(op.intermediates):
            op.intermediates = [new_idx[int(i)] for i in op.intermediates if int(i) in new_idx]
    sg.inputs = [new_idx[int(i)] for i in sg.inputs]
    sg.outputs = [new_idx[int(i)] for i in sg.outputs]
    for tm in sigs:
        tm.tensorIndex = new_idx[int(tm.tensorIndex)]
    used_oc = sorted({op.opcodeIndex for op in sg.operators})
    oc_idx = {o: n for n, o in enumerate(used_oc)}
    model.operatorCodes = [model.operatorCodes[o] for o in used_oc]
    for op in sg.operators:
        op.opcodeIndex = oc_idx[op.opcodeIndex]


def _ensure_signature(model: Any) -> None:
    sch = _schema()
    sg = model.subgraphs[0]
    for sd in model.signatureDefs or []:
        if sd.subgraphIndex == 0 and len(sd.inputs or []) == 1:
            return

    def tensor_map(i: int) -> Any:
        tm = sch.TensorMapT()
        tm.name = sg.tensors[i].name
        tm.tensorIndex = int(i)
        return tm

    sd = sch.SignatureDefT()
    sd.signatureKey = SIGNATURE_KEY
    sd.subgraphIndex = 0
    sd.inputs = [tensor_map(int(i)) for i in sg.inputs]
    sd.outputs = [tensor_map(int(i)) for i in sg.outputs]
    model.signatureDefs = [sd]


@dataclass(frozen=True, slots=True)
class Float32Model:
    data: bytes
    io: ModelIO
    fp16_constants: int
    """fp16 constants rewritten to fp32 (0 for an fp32 model)."""
    fused_activations: int


def to_float32(data: bytes, *, what: str = "the model", fuse: bool = True) -> Float32Model:
    """A float (fp32 or fp16-weights) TFLite model as fp32 with a signature, RELUs fused."""
    model = _read(data, what)
    for oc in model.operatorCodes:  # deprecated int8 code -> int32 builtin_code
        oc.builtinCode = max(oc.builtinCode, oc.deprecatedBuiltinCode)
    _check_float(model, what)
    fp16 = _rewrite_fp16_constants(model, what)
    fused = fuse_activations(model) if fuse else 0
    _compact(model)
    _ensure_signature(model)
    out = _write(model)
    return Float32Model(
        data=out, io=model_io(out, what=what), fp16_constants=fp16, fused_activations=fused
    )


def model_io(data: bytes, *, what: str = "the model") -> ModelIO:
    """Signature and input of a single-input model with a signature."""
    model = _read(data, what)
    sg = model.subgraphs[0]
    gin = int(sg.inputs[0])
    for sd in model.signatureDefs or []:
        for tm in sd.inputs or []:
            if int(tm.tensorIndex) == gin:
                key = tm.name.decode() if isinstance(tm.name, bytes) else str(tm.name)
                sig = sd.signatureKey
                return ModelIO(
                    signature_key=sig.decode() if isinstance(sig, bytes) else str(sig),
                    input_key=key,
                    input_tensor=_name(sg.tensors[gin]),
                    input_shape=tuple(int(d) for d in sg.tensors[gin].shape),
                    activations=tuple(_name(t) for t in sg.tensors if not _has_data(model, t)),
                )
    raise TFLiteGraphError(f"{what} has no signature for its input; rewrite it with to_float32")


# --- uint8 input ---------------------------------------------------------------------------


def add_uint8_input(data: bytes, *, what: str = "the quantized model") -> bytes:
    """Put a uint8 graph input (same scale, zero point + 128) and a QUANTIZE uint8 -> int8 in
    front of the int8 input, so raw camera pixels can be fed; outputs stay int8."""
    sch = _schema()
    model = _read(data, what)
    sg = model.subgraphs[0]
    gin = int(sg.inputs[0])
    t8 = sg.tensors[gin]
    if t8.type != sch.TensorType.INT8 or not _quantized(t8):
        raise TFLiteGraphError(
            f"{what} has a {_type_name(t8.type)} input, expected a quantized int8 one"
        )
    tu = sch.TensorT()
    tu.name, tu.shape, tu.type = t8.name, list(t8.shape), sch.TensorType.UINT8
    if t8.shapeSignature is not None and len(t8.shapeSignature):
        tu.shapeSignature = list(t8.shapeSignature)
    tu.buffer = t8.buffer  # the empty buffer of a non-constant tensor
    qp = sch.QuantizationParametersT()
    qp.scale = [float(t8.quantization.scale[0])]
    qp.zeroPoint = [int(t8.quantization.zeroPoint[0]) + 128]
    tu.quantization = qp
    t8.name = t8.name + b"_int8"
    sg.tensors.append(tu)
    uidx = len(sg.tensors) - 1
    quantize = sch.BuiltinOperator.QUANTIZE
    codes = [
        i
        for i, oc in enumerate(model.operatorCodes)
        if max(oc.builtinCode, oc.deprecatedBuiltinCode) == quantize
    ]
    if codes:
        qcode = codes[0]
    else:
        oc = sch.OperatorCodeT()
        oc.builtinCode = oc.deprecatedBuiltinCode = quantize
        oc.version = 1
        model.operatorCodes.append(oc)
        qcode = len(model.operatorCodes) - 1
    op = sch.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = qcode, [uidx], [gin]
    op.builtinOptionsType = sch.BuiltinOptions.QuantizeOptions
    op.builtinOptions = sch.QuantizeOptionsT()
    sg.operators.insert(0, op)
    sg.inputs = [uidx]
    for sd in model.signatureDefs or []:
        for tm in sd.inputs or []:
            if int(tm.tensorIndex) == gin:
                tm.tensorIndex = uidx
    return _write(model)


# --- facts ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GraphFacts:
    """What a TFLite graph looks like to XNNPACK, from the flatbuffer and one interpreter load."""

    size: int
    ops: int
    op_types: dict[str, int] = field(default_factory=dict)
    standalone_activations: int = 0
    """RELU / RELU6 / RELU_N1_TO_1 ops left (each can split an int8 graph for XNNPACK)."""
    input_dtype: str = ""
    input_scale: float | None = None
    input_zero_point: int | None = None
    output_dtypes: list[str] = field(default_factory=list)
    xnnpack_partitions: int | None = None
    """Subgraphs XNNPACK took (1 is best); None when the model would not load."""
    invoke_ms: float | None = None
    """Median of a few ``invoke()`` on one thread (zeros input): a rough, local figure."""


def _interpreter_facts(data: bytes, runs: int) -> tuple[int | None, float | None]:
    import time

    try:
        from ai_edge_litert.interpreter import Interpreter

        from inference.backends.native_log import quiet_native_stderr

        with quiet_native_stderr():
            interp = Interpreter(model_content=data, num_threads=1)
            interp.allocate_tensors()
        partitions = sum(1 for d in interp._get_ops_details() if d.get("op_name") == "DELEGATE")
        detail = interp.get_input_details()[0]
        interp.set_tensor(detail["index"], np.zeros(detail["shape"], detail["dtype"]))
        for _ in range(5):  # warm-up
            interp.invoke()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            interp.invoke()
            times.append((time.perf_counter() - start) * 1000.0)
    except (ImportError, ValueError, RuntimeError):
        return None, None
    return partitions, float(np.median(times)) if times else None


def graph_facts(data: bytes, *, what: str = "the model", runs: int = 50) -> GraphFacts:
    """Op counts from the flatbuffer; XNNPACK partitions and invoke time from LiteRT."""
    model = _read(data, what)
    sg = model.subgraphs[0]
    types = collections.Counter(_op_name(_code(model, op)) for op in sg.operators)
    tin = sg.tensors[int(sg.inputs[0])]
    partitions, invoke_ms = _interpreter_facts(data, runs)
    return GraphFacts(
        size=len(data),
        ops=len(sg.operators),
        op_types=dict(types.most_common()),
        standalone_activations=sum(types.get(k, 0) for k in _ACTIVATIONS),
        input_dtype=_type_name(tin.type),
        input_scale=float(tin.quantization.scale[0]) if _quantized(tin) else None,
        input_zero_point=int(tin.quantization.zeroPoint[0]) if _quantized(tin) else None,
        output_dtypes=[_type_name(sg.tensors[int(o)].type) for o in sg.outputs],
        xnnpack_partitions=partitions,
        invoke_ms=invoke_ms,
    )


def tensor_suggestions(names: Sequence[str], wanted: str, limit: int = 6) -> list[str]:
    """Names close to ``wanted`` (else the first few) for an error message."""
    import difflib

    close = difflib.get_close_matches(wanted, names, n=limit, cutoff=0.5)
    return close or list(names[:limit])
