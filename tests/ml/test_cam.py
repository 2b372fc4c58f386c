"""The served heatmap (computed from ONNX outputs) equals MONAI's torch Grad-CAM on the same weights."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")
ort = pytest.importorskip("onnxruntime")

from monai.visualize import GradCAM  # noqa: E402

from oncoscope.ml import cam  # noqa: E402
from oncoscope.training.classifier import SmearClassifier
from oncoscope.training.export import export_classifier

SIZE = 128


@pytest.fixture(scope="module")
def model_and_session(tmp_path_factory):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = SmearClassifier(4, pretrained=False).eval()
    with torch.no_grad():  # give the head non-trivial weights
        model.head.weight.normal_(0, 0.2)
    path = tmp_path_factory.mktemp("cam") / "clf.onnx"
    export_classifier(model, path, SIZE)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return model, sess


@pytest.mark.parametrize("class_idx", [0, 1, 2, 3])
def test_onnx_cam_equals_torch_gradcam(model_and_session, class_idx):
    model, sess = model_and_session
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(class_idx))
    logits, feats = sess.run(["logits", "features"], {"image": x.numpy()})
    np.testing.assert_allclose(logits, model(x).detach().numpy(), atol=1e-4)
    w = model.head.weight.detach().numpy()

    gc = GradCAM(nn_module=model, target_layers="cam_layer", postprocessing=lambda m: m)
    raw_torch = gc.compute_map(x, class_idx=class_idx)[0, 0].detach().numpy()
    raw_onnx = cam.cam(feats[0], w, class_idx)
    assert raw_torch.max() > 0, "degenerate test: empty Grad-CAM"
    np.testing.assert_allclose(raw_onnx, raw_torch, rtol=1e-3, atol=1e-6 * raw_torch.max())

    up_torch = gc(x, class_idx=class_idx)[0, 0].detach().numpy()  # MONAI bilinear upsampling
    ours = cam.heatmap(feats[0], w, class_idx, SIZE, SIZE)
    np.testing.assert_allclose(ours, cam.normalise01(up_torch), atol=2e-3)


def test_upsample_matches_torch_interpolate():
    m = np.random.default_rng(0).random((5, 7))
    ref = torch.nn.functional.interpolate(torch.from_numpy(m)[None, None], size=(33, 50), mode="bilinear",
                                          align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(cam.upsample_bilinear(m, 33, 50), ref, atol=1e-10)


def test_normalise_constant_map():
    assert cam.normalise01(np.ones((3, 3))).max() == 0.0


class _Contrast(torch.nn.Module):
    """One output: mean logit of the positive classes minus mean logit of the negative ones."""

    def __init__(self, model, positive, negative):
        super().__init__()
        self.model, self.positive, self.negative = model, positive, negative

    def forward(self, x):
        logits = self.model(x)
        return (logits[:, self.positive].mean(1) - logits[:, self.negative].mean(1))[:, None]


def test_the_positive_call_map_is_torch_gradcam_of_the_logit_contrast(model_and_session):
    """brain-mri's heatmap explains 'tumour against no tumour': MONAI's Grad-CAM of that logit difference."""
    model, sess = model_and_session
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(9))
    (feats,) = sess.run(["features"], {"image": x.numpy()})
    w = model.head.weight.detach().numpy()
    pos, neg = [0, 1, 3], [2]
    gc = GradCAM(nn_module=_Contrast(model, pos, neg), target_layers="model.cam_layer", postprocessing=lambda m: m)
    raw_torch = gc.compute_map(x, class_idx=0)[0, 0].detach().numpy()
    raw_onnx = cam.cam(feats[0], w, weights=cam.contrast_weights(w, pos, neg))
    assert raw_torch.max() > 0, "degenerate test: empty Grad-CAM"
    np.testing.assert_allclose(raw_onnx, raw_torch, rtol=1e-3, atol=1e-6 * raw_torch.max())
