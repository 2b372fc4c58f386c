"""Tests for the Keras-style speed baselines and FLOP counters (fast: small sizes)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper  # noqa: E402

from oncoscope.bench import baselines as bb


@pytest.fixture(autouse=True)
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _nparams(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _single_node_model(
    op: str,
    x_shape: list,
    w_shape: list,
    y_shape: list | None = None,
    **attrs,
) -> onnx.ModelProto:
    """One-node graph ``Y = op(X, W)`` with W an initializer; Y shape left to inference."""
    import numpy as np

    w = helper.make_tensor("W", TensorProto.FLOAT, w_shape, np.zeros(w_shape, np.float32).ravel().tolist())
    node = helper.make_node(op, ["X", "W"], ["Y"], **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, y_shape)],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(onnx.shape_inference.infer_shapes(model, strict_mode=True))
    return model


# ---------------------------------------------------------------- models


def test_vgg16_shape_and_params():
    model = bb.build_vgg16(num_classes=4, image_size=64).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 4)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 13
    assert all(c.kernel_size == (3, 3) for c in convs)
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 256] + [512] * 6
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in model.modules()) == 5
    # The conv trunk is size- and class-independent.
    assert _nparams(model.features) == bb.VGG16_CONV_PARAMS == 14_714_688
    # Head at 64x64: flatten 2*2*512 = 2048.
    head = (2048 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * 4 + 4)
    assert _nparams(model.classifier) == head


def test_vgg16_head_at_256_without_building_it():
    # Building the 256 model allocates ~660 MB of FC weights; check the head
    # arithmetic through the flatten width on a meta-device build instead.
    with torch.device("meta"):
        model = bb.build_vgg16(num_classes=4, image_size=256)
    fc1 = model.classifier[1]
    assert fc1.in_features == 8 * 8 * 512 == 32768
    expected = 14_714_688 + (32768 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * 4 + 4)
    assert _nparams(model) == expected == 165_734_212


def test_vgg16_rejects_bad_size():
    with pytest.raises(ValueError):
        bb.build_vgg16(image_size=100)


def test_unet_output_matches_input_spatial_shape():
    model = bb.build_keras_unet(image_size=64).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 1, 64, 64)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0  # sigmoid
    ups = [m for m in model.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [u.out_channels for u in ups] == [512, 256, 128, 64]
    assert max(m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)) == 1024


def test_unet_rejects_bad_size():
    with pytest.raises(ValueError):
        bb.build_keras_unet(image_size=72)


# ---------------------------------------------------------------- FLOPs


def test_onnx_flops_single_conv_exact():
    # 3->8 conv 3x3 pad 1 on 16x16: out 1*8*16*16 = 2048 elems, 3*3*3 = 27 MACs each.
    m = _single_node_model("Conv", [1, 3, 16, 16], [8, 3, 3, 3], pads=[1, 1, 1, 1])
    assert bb.onnx_flops(m) == 2 * 2048 * 27 == 110_592


def test_onnx_flops_depthwise_and_strided_conv_exact():
    # depthwise 8ch 3x3 stride 2 pad 1 on 16x16 -> 8x8x8 = 512 elems, 9 MACs each
    m = _single_node_model("Conv", [1, 8, 16, 16], [8, 1, 3, 3], pads=[1, 1, 1, 1], strides=[2, 2], group=8)
    assert bb.onnx_flops(m) == 2 * 512 * 9
    # grouped: 8->16 with group 2, 1x1 -> each output sees 4 inputs
    m = _single_node_model("Conv", [1, 8, 5, 5], [16, 4, 1, 1], group=2)
    assert bb.onnx_flops(m) == 2 * (16 * 25) * 4


def test_onnx_flops_conv_transpose_gemm_matmul_exact():
    # ConvTranspose 4->2, 2x2 stride 2 on 3x3: each input elem does 2*2*2 MACs
    m = _single_node_model("ConvTranspose", [1, 4, 3, 3], [4, 2, 2, 2], strides=[2, 2])
    assert bb.onnx_flops(m) == 2 * (4 * 9) * 8
    # Gemm (3x5) @ (5x7)^T-free
    m = _single_node_model("Gemm", [3, 5], [5, 7])
    assert bb.onnx_flops(m) == 2 * 3 * 5 * 7
    m = _single_node_model("Gemm", [5, 3], [7, 5], transA=1, transB=1)
    assert bb.onnx_flops(m) == 2 * 3 * 5 * 7
    # batched MatMul (2,3,5) @ (5,7)
    m = _single_node_model("MatMul", [2, 3, 5], [5, 7])
    assert bb.onnx_flops(m) == 2 * 2 * 3 * 5 * 7


def test_onnx_flops_symbolic_batch_and_override(tmp_path):
    m = _single_node_model("Conv", ["N", 3, 16, 16], [8, 3, 3, 3], pads=[1, 1, 1, 1])
    assert bb.onnx_flops(m) == 110_592  # batch taken as 1
    assert bb.onnx_flops(m, input_shapes={"X": [2, 3, 16, 16]}) == 2 * 110_592
    assert bb.onnx_flops(m, input_shapes={"X": [1, 3, 32, 32]}) == 4 * 110_592
    path = tmp_path / "conv.onnx"
    onnx.save(m, str(path))
    assert bb.onnx_flops(path) == 110_592
    assert bb.onnx_flops(str(path)) == 110_592
    # the caller's model is not modified
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"


def test_onnx_flops_rejects_unresolvable_symbolic_dim():
    m = _single_node_model("Conv", [1, 3, "H", 16], [8, 3, 3, 3], pads=[1, 1, 1, 1])
    with pytest.raises(ValueError):
        bb.onnx_flops(m)
    assert bb.onnx_flops(m, input_shapes={"X": [1, 3, 16, 16]}) == 110_592


class _Small(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.dw = torch.nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16)
        self.pw = torch.nn.Conv2d(16, 24, 1)
        self.up = torch.nn.ConvTranspose2d(24, 8, 2, stride=2)
        self.fc = torch.nn.Linear(8 * 32 * 32, 10)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = torch.relu(self.dw(x))
        x = torch.relu(self.pw(x))
        x = self.up(x)
        return self.fc(torch.flatten(x, 1))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_onnx_flops_matches_torch_flops(tmp_path):
    model = _Small().eval()
    shape = (1, 3, 32, 32)
    path = tmp_path / "small.onnx"
    torch.onnx.export(
        model,
        (torch.randn(*shape),),
        str(path),
        dynamo=False,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        opset_version=17,
    )
    tf = bb.torch_flops(model, shape)
    of = bb.onnx_flops(path)
    assert tf > 0
    assert abs(of - tf) <= 0.01 * tf, (of, tf)
    # hand count: conv 2*16*32*32*27, dw 2*16*16*16*9, pw 2*24*16*16*16,
    # convT 2*24*16*16*8*4, fc 2*8192*10
    hand = 2 * (16 * 1024 * 27 + 16 * 256 * 9 + 24 * 256 * 16 + 24 * 256 * 32 + 8192 * 10)
    assert tf == hand
    assert of == hand
    assert bb.onnx_flops(path, input_shapes={"x": [3, 3, 32, 32]}) == 3 * hand
    assert model.training is False


def test_torch_flops_restores_training_mode():
    model = _Small().train()
    bb.torch_flops(model, (3, 32, 32))  # 3-d shape gets batch 1
    assert model.training is True


# ---------------------------------------------------------------- timing


def test_measure_matmul_gflops_positive_and_restores_threads():
    torch.set_num_threads(1)
    g = bb.measure_matmul_gflops(threads=2, n=128, repeats=3)
    assert isinstance(g, float) and g > 0
    assert torch.get_num_threads() == 1


def test_time_torch_model_keys_and_thread_restore():
    torch.set_num_threads(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).train()
    res = bb.time_torch_model(model, (1, 3, 16, 16), threads=2, warmup=1, runs=5)
    assert torch.get_num_threads() == 1
    assert model.training is True
    for key in ("p50_ms", "p95_ms", "mean_ms"):
        assert isinstance(res[key], float) and res[key] > 0
    assert res["min_ms"] <= res["p50_ms"] <= res["p95_ms"]
    assert res["runs"] == 5 and res["threads"] == 2
    assert res["input_shape"] == [1, 3, 16, 16]


def test_time_torch_model_restores_threads_on_error():
    torch.set_num_threads(1)

    class Boom(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        bb.time_torch_model(Boom(), (1, 3, 8, 8), threads=2, warmup=0, runs=1)
    assert torch.get_num_threads() == 1


def test_module_import_does_not_need_torch_at_import_time():
    import importlib.util
    import subprocess
    import sys

    spec = importlib.util.find_spec("oncoscope.bench.baselines")
    assert spec is not None
    code = "import sys, oncoscope.bench.baselines; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
