"""Export trained torch models to ONNX for serving with ONNX Runtime."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np

from .classifier import ExportWrapper
from .segmentation import load_segmenter
from .train_classifier import load_best


def export_classifier(model, path: Path, image_size: int) -> None:
    import torch


    wrapper = ExportWrapper(model).eval()
    dummy = torch.zeros(1, 3, image_size, image_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (dummy,), str(path), input_names=["image"],
                          output_names=["logits", "features", "embedding", "ood_features"], opset_version=17,
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}, "features": {0: "batch"},
                                        "embedding": {0: "batch"}, "ood_features": {0: "batch"}}, dynamo=False)


def export_segmenter(net, path: Path, image_size: int) -> None:
    import torch

    class Wrapper(torch.nn.Module):
        def __init__(self, n):
            super().__init__()
            self.n = n

        def forward(self, x):
            return torch.sigmoid(self.n(x))[:, 0]

    w = Wrapper(net).eval()
    dummy = torch.zeros(1, 3, image_size, image_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(w, (dummy,), str(path), input_names=["image"], output_names=["cell_probability"],
                          opset_version=17, dynamic_axes={"image": {0: "batch"}, "cell_probability": {0: "batch"}},
                          dynamo=False)


def check_onnx_matches_torch(torch_fn, onnx_path: Path, x: np.ndarray, atol: float = 1e-3) -> float:
    import onnxruntime as ort
    import torch

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ref = torch_fn(torch.from_numpy(x))
    ref = ref[0] if isinstance(ref, tuple) else ref
    out = sess.run(None, {"image": x})[0]
    err = float(np.abs(out - ref.detach().numpy()).max())
    if err > atol:
        raise RuntimeError(f"ONNX output differs from torch by {err:.2e} (> {atol})")
    return err


def export_models(work_dir: Path, out_dir: Path, recipe: dict) -> None:
    """Write classifier.onnx, head weights and (for analyzers that segment) segmenter.onnx into the model folder."""
    import torch


    size = recipe["image_size"]
    out_dir.mkdir(parents=True, exist_ok=True)
    model, ck = load_best(work_dir / "classifier")
    export_classifier(model, out_dir / "classifier.onnx", size)
    x = np.random.default_rng(0).normal(size=(2, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        err_c = check_onnx_matches_torch(lambda t: model(t), out_dir / "classifier.onnx", x)
    np.savez(out_dir / "head.npz", weight=model.head.weight.detach().numpy().astype(np.float32),
             bias=model.head.bias.detach().numpy().astype(np.float32))
    info = {"classes": ck["classes"], "classifier_epoch": ck["epoch"], "onnx_max_abs_error": {"classifier": err_c}}
    parts = ["classifier"]
    if "segmented_subdir" in recipe:

        net, sck = load_segmenter(work_dir / "segmenter")
        export_segmenter(net, out_dir / "segmenter.onnx", size)
        with torch.no_grad():
            err_s = check_onnx_matches_torch(lambda t: torch.sigmoid(net(t))[:, 0], out_dir / "segmenter.onnx", x)
        info["segmenter_epoch"] = sck["epoch"]
        info["onnx_max_abs_error"]["segmenter"] = err_s
        parts.append("segmenter")
    (work_dir / "export.json").write_text(json.dumps(info, indent=1))
    for part in parts:
        for name in ("history.json", "train.log"):
            src = work_dir / part / name
            if src.exists():
                shutil.copy(src, out_dir / f"{part}_{name}")
