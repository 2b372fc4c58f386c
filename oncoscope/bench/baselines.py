"""Speed/compute baselines: the networks typical Keras screening apps ship.

Many open-source leukemia-smear apps classify with a Keras ``VGG16`` at
256x256 (``include_top``-style head: Flatten of 8x8x512 -> Dense 4096 ->
Dense 4096 -> Dense classes) and segment with the "classic" Keras U-Net
(64-128-256-512 encoder, 1024 bottleneck, transposed-conv decoder, sigmoid
mask). This module rebuilds both in torch with *random* weights, purely as a
latency and FLOP yardstick for our own models, and provides the measuring
tools:

* :func:`time_torch_model` - batch-1 eval-mode latency percentiles;
* :func:`measure_matmul_gflops` - the machine's float32 GEMM rate, so that
  latencies taken on different machines can be put on a common scale;
* :func:`torch_flops` / :func:`onnx_flops` - multiply-add FLOPs (2 per MAC)
  counted from a torch module or from an exported ONNX graph;
* :func:`baseline_report` - all of the above for VGG16@256 and U-Net@256.

Pure ML, no web imports. torch (and onnx) are imported inside the functions,
so importing this module costs nothing for torch-free serving code.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import torch

# Keras VGG16 "D" configuration; "M" is a 2x2 max-pool.
VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M",
    128, 128, "M",
    256, 256, 256, "M",
    512, 512, 512, "M",
    512, 512, 512, "M",
)  # fmt: skip

# Parameters of the 13 conv layers (weights + biases), independent of input
# size and class count.
VGG16_CONV_PARAMS = 14_714_688

UNET_WIDTHS: tuple[int, ...] = (64, 128, 256, 512)
UNET_BOTTLENECK = 1024


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------


def build_vgg16(num_classes: int = 4, image_size: int = 256, in_channels: int = 3) -> "torch.nn.Module":
    """Keras-style VGG16 with a Flatten + 4096 + 4096 + ``num_classes`` head.

    Random weights. ``image_size`` must be a multiple of 32; at 256 the flatten
    is 8*8*512 = 32768 features. The output is raw logits (Keras apps put a
    softmax on the last Dense; it is negligible for timing).
    """
    import torch.nn as nn

    if image_size % 32 or image_size <= 0:
        raise ValueError(f"image_size must be a positive multiple of 32, got {image_size}")
    layers: list[nn.Module] = []
    c = in_channels
    for v in VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers.append(nn.Conv2d(c, int(v), kernel_size=3, padding=1))
            layers.append(nn.ReLU(inplace=True))
            c = int(v)
    side = image_size // 32
    features = nn.Sequential(*layers)
    classifier = nn.Sequential(
        nn.Flatten(),
        nn.Linear(512 * side * side, 4096),
        nn.ReLU(inplace=True),
        nn.Linear(4096, 4096),
        nn.ReLU(inplace=True),
        nn.Linear(4096, num_classes),
    )
    model = nn.Sequential()
    model.add_module("features", features)
    model.add_module("classifier", classifier)
    return model


def build_keras_unet(image_size: int = 256, in_channels: int = 3) -> "torch.nn.Module":
    """The classic Keras U-Net (``padding='same'``), random weights.

    Encoder levels 64-128-256-512, each two conv3x3+ReLU then a 2x2 max-pool;
    bottleneck two conv3x3+ReLU at 1024; decoder: ConvTranspose2d(2x2, stride
    2) up, concat with the skip, two conv3x3+ReLU; final 1x1 conv to one
    channel + sigmoid. The network is fully convolutional; ``image_size`` only
    has to be a multiple of 16 so that the skips line up, and it is validated
    here so that callers notice a bad size early. Output: (N, 1, H, W).
    """
    import torch
    import torch.nn as nn

    if image_size % 16 or image_size <= 0:
        raise ValueError(f"image_size must be a positive multiple of 16, got {image_size}")

    def double_conv(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
        )

    class KerasUNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.image_size = image_size
            self.down = nn.ModuleList()
            c = in_channels
            for w in UNET_WIDTHS:
                self.down.append(double_conv(c, w))
                c = w
            self.pool = nn.MaxPool2d(2)
            self.bottleneck = double_conv(c, UNET_BOTTLENECK)
            c = UNET_BOTTLENECK
            self.up = nn.ModuleList()
            self.dec = nn.ModuleList()
            for w in reversed(UNET_WIDTHS):
                self.up.append(nn.ConvTranspose2d(c, w, kernel_size=2, stride=2))
                self.dec.append(double_conv(2 * w, w))
                c = w
            self.head = nn.Conv2d(c, 1, kernel_size=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            skips = []
            for block in self.down:
                x = block(x)
                skips.append(x)
                x = self.pool(x)
            x = self.bottleneck(x)
            for up, dec, skip in zip(self.up, self.dec, reversed(skips)):
                x = dec(torch.cat([up(x), skip], dim=1))
            return torch.sigmoid(self.head(x))

    return KerasUNet()


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------


def _full_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:  # (C, H, W) -> batch 1
        shape = (1, *shape)
    return shape


def time_torch_model(
    model: "torch.nn.Module",
    input_shape: Sequence[int],
    threads: int = 2,
    warmup: int = 3,
    runs: int = 20,
) -> dict[str, Any]:
    """Latency of ``model(x)`` in eval mode under ``torch.no_grad``.

    ``input_shape`` is the full input shape, e.g. ``(1, 3, 256, 256)``; a 3-d
    ``(C, H, W)`` gets batch 1 prepended. The torch intra-op thread count is
    set to ``threads`` for the measurement and restored afterwards, as is the
    model's train/eval mode. Returns ``p50_ms``, ``p95_ms``, ``mean_ms``,
    ``min_ms`` plus the ``runs``/``threads`` used.
    """
    import numpy as np
    import torch

    if runs < 1:
        raise ValueError("runs must be >= 1")
    shape = _full_shape(input_shape)
    prev_threads = torch.get_num_threads()
    was_training = model.training
    times: list[float] = []
    try:
        torch.set_num_threads(int(threads))
        model.eval()
        x = torch.randn(*shape)
        with torch.no_grad():
            for _ in range(max(0, warmup)):
                model(x)
            for _ in range(runs):
                t0 = time.perf_counter()
                model(x)
                times.append((time.perf_counter() - t0) * 1000.0)
    finally:
        torch.set_num_threads(prev_threads)
        model.train(was_training)
    arr = np.asarray(times)
    return {
        "p50_ms": float(np.percentile(arr, 50)),
        "p95_ms": float(np.percentile(arr, 95)),
        "mean_ms": float(arr.mean()),
        "min_ms": float(arr.min()),
        "runs": int(runs),
        "threads": int(threads),
        "input_shape": list(shape),
    }


def measure_matmul_gflops(threads: int = 2, n: int = 1024, repeats: int = 10) -> float:
    """Best-of-``repeats`` float32 ``n x n`` matmul rate in GFLOP/s (2*n^3 each).

    Restores the torch thread count. On a machine that is busy with other work
    this measures what is *available*, not the peak.
    """
    import torch

    prev_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(int(threads))
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=gen)
        b = torch.randn(n, n, generator=gen)
        out = torch.empty(n, n)
        torch.mm(a, b, out=out)  # warm-up (allocations, BLAS init)
        best = math.inf
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(prev_threads)
    return 2.0 * n**3 / best / 1e9


# --------------------------------------------------------------------------
# FLOP counting
# --------------------------------------------------------------------------


def torch_flops(model: "torch.nn.Module", input_shape: Sequence[int]) -> int:
    """FLOPs (2 per MAC) of one forward pass, via ``FlopCounterMode``.

    Counts matmul/conv/conv-transpose/bmm/addmm etc.; elementwise ops
    (ReLU, pooling, sigmoid, adds) are not counted, matching :func:`onnx_flops`.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    try:
        model.eval()
        x = torch.randn(*_full_shape(input_shape))
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def _dims(type_proto: Any) -> list[int] | None:
    """Static dims of a tensor TypeProto, or None if unknown/symbolic."""
    if not type_proto.HasField("tensor_type"):
        return None
    tt = type_proto.tensor_type
    if not tt.HasField("shape"):
        return None
    out = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        else:
            return None
    return out


def _runtime_shapes(model: Any, path: Any) -> dict[str, list[int]]:
    """Shapes of every intermediate tensor from one ONNX Runtime pass on zero inputs
    (at the static input shapes already written into ``model``)."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    full = onnx.load(str(path))
    names = {o for n in full.graph.node for o in n.output if o}
    existing = {o.name for o in full.graph.output}
    for name in sorted(names - existing):
        full.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    sess = ort.InferenceSession(full.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {}
    init = {t.name for t in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in init:
            continue
        dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        feeds[inp.name] = np.zeros(dims, dtype=np.float32)
    outs = sess.run(None, feeds)
    return {o.name: list(v.shape) for o, v in zip(sess.get_outputs(), outs) if hasattr(v, "shape")}


def onnx_flops(path_or_model: Any, input_shapes: dict[str, list[int]] | None = None) -> int:
    """Multiply-add FLOPs (2 per MAC) of an ONNX model's main graph.

    ``path_or_model`` is a file path or an ``onnx.ModelProto``. Shapes come
    from ``onnx.shape_inference.infer_shapes`` at the declared static input
    shapes; a symbolic leading (batch) dim is taken as 1, and ``input_shapes``
    (input name -> full shape) overrides any input. Any other symbolic dim
    without an override raises ``ValueError``.

    Counted ops (biases ignored):

    * Conv: ``2 * prod(out) * (C_in/group) * kH * kW`` (grouped/depthwise too);
    * ConvTranspose: ``2 * prod(in) * (C_out/group) * kH * kW``;
    * Gemm: ``2 * M * K * N``; MatMul: ``2 * prod(out) * K`` (broadcast-aware).

    Everything else (activations, pooling, adds, ...) counts zero. Ops inside
    control-flow subgraphs (If/Loop/Scan) are not visited.
    """
    import onnx
    from onnx import shape_inference

    if isinstance(path_or_model, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(path_or_model)
    else:
        # Weights are not needed: initializer dims live in the TensorProto.
        model = onnx.load(str(path_or_model), load_external_data=False)

    graph = model.graph
    init_names = {t.name for t in graph.initializer}
    overrides = dict(input_shapes or {})
    unknown = set(overrides) - {i.name for i in graph.input}
    if unknown:
        raise ValueError(f"input_shapes names not among graph inputs: {sorted(unknown)}")

    for inp in graph.input:
        if inp.name in init_names:
            continue
        tt = inp.type.tensor_type
        if inp.name in overrides:
            shape = [int(s) for s in overrides[inp.name]]
            del tt.shape.dim[:]
            for s in shape:
                tt.shape.dim.add().dim_value = s
            continue
        for k, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value"):
                continue
            if k == 0:
                d.Clear()
                d.dim_value = 1
            else:
                raise ValueError(
                    f"input {inp.name!r} has symbolic dim {k} ({d.dim_param!r}); pass input_shapes"
                )

    # Drop stale intermediate shapes (they may carry the old symbolic batch).
    del graph.value_info[:]
    for out in graph.output:
        if out.type.HasField("tensor_type"):
            out.type.tensor_type.ClearField("shape")

    inferred = shape_inference.infer_shapes(model, data_prop=True)
    g = inferred.graph

    shapes: dict[str, list[int] | None] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        shapes[vi.name] = _dims(vi.type)
    for t in g.initializer:
        shapes[t.name] = [int(d) for d in t.dims]
    for node in g.node:  # Constant outputs, in case inference left them out
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    shapes[node.output[0]] = [int(d) for d in a.t.dims]

    if any(shapes.get(o) is None for n in g.node if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")
           for o in list(n.input[:2]) + list(n.output[:1])) and not isinstance(path_or_model, onnx.ModelProto):
        # Static inference cannot follow data-dependent shapes (e.g. "same" padding computed
        # at run time): fill the gaps with the real shapes from one ONNX Runtime pass.
        shapes.update({k: v for k, v in _runtime_shapes(model, path_or_model).items() if shapes.get(k) is None})

    def need(name: str, node: Any) -> list[int]:
        s = shapes.get(name)
        if s is None:
            raise ValueError(
                f"cannot count {node.op_type} node {node.name!r}: shape of {name!r} unknown after inference"
            )
        return s

    def attr(node: Any, name: str, default: int) -> int:
        for a in node.attribute:
            if a.name == name:
                return int(a.i)
        return default

    total = 0
    for node in g.node:
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            continue
        if op == "Conv":
            w = need(node.input[1], node)
            out = need(node.output[0], node)
            total += 2 * math.prod(out) * math.prod(w[1:])
        elif op == "ConvTranspose":
            x = need(node.input[0], node)
            w = need(node.input[1], node)  # (C_in, C_out/group, kH, kW)
            total += 2 * math.prod(x) * math.prod(w[1:])
        elif op == "Gemm":
            a = need(node.input[0], node)
            out = need(node.output[0], node)
            k = a[0] if attr(node, "transA", 0) else a[1]
            total += 2 * math.prod(out) * k
        elif op == "MatMul":
            a = need(node.input[0], node)
            out = need(node.output[0], node)
            k = a[-1]
            total += 2 * max(1, math.prod(out)) * k
    return int(total)


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def baseline_report(
    threads: int = 2,
    runs: int = 20,
    image_size: int = 256,
    num_classes: int = 4,
    warmup: int = 2,
) -> dict[str, Any]:
    """Batch-1 latency and FLOPs of Keras-style VGG16 and U-Net at ``image_size``.

    Returns ``{"vgg16": {p50_ms, p95_ms, mean_ms, ..., gflops, params},
    "keras_unet": {...}, "combined_p50_ms", "matmul_gflops_per_s", "threads",
    "image_size"}`` where ``gflops`` is GFLOPs per image (2 per MAC).

    Cost (torch_flops, 2 per MAC): VGG16@256 = 40.39 GFLOPs with 165.7M
    params (134M of them in the first Dense), Keras U-Net@256 = 96.33 GFLOPs
    with 31.0M params; onnx_flops of their TorchScript ONNX exports agrees
    exactly. Measured on the 2-core dev VM with threads=2 *while a training
    job was using the same cores* (load average ~4, so pessimistic):
    matmul ~87 GFLOP/s, VGG16 p50 ~1.04 s, U-Net p50 ~2.05 s, combined p50
    ~3.08 s; ``baseline_report(runs=3, warmup=1)`` took ~21 s wall in total.
    Keep ``runs`` small (3-5) on such machines.
    """
    shape = (1, 3, image_size, image_size)
    matmul = measure_matmul_gflops(threads=threads)

    report: dict[str, Any] = {}
    for name, build in (
        ("vgg16", lambda: build_vgg16(num_classes=num_classes, image_size=image_size)),
        ("keras_unet", lambda: build_keras_unet(image_size=image_size)),
    ):
        model = build()
        entry = time_torch_model(model, shape, threads=threads, warmup=warmup, runs=runs)
        entry["gflops"] = torch_flops(model, shape) / 1e9
        entry["params"] = int(sum(p.numel() for p in model.parameters()))
        report[name] = entry
        del model

    report["combined_p50_ms"] = report["vgg16"]["p50_ms"] + report["keras_unet"]["p50_ms"]
    report["matmul_gflops_per_s"] = matmul
    report["threads"] = int(threads)
    report["image_size"] = int(image_size)
    return report
