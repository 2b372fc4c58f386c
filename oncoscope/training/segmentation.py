"""White-cell segmenter: reference masks derived from the dataset's ``Segmented/``
images, a MONAI U-Net, and its training loop.

Reference masks (``derive_reference_mask``), documented in the model card:
1. ``Segmented/`` is the RGB image with non-cell pixels set to black by the
   dataset authors' HSV threshold. Foreground = max(R, G, B) > 30.
2. A 3x3 binary opening removes one-pixel red-cell rims and speckle.
3. Holes are filled (textured benign nuclei come out hollow), then an opening
   with a radius-2 disk smooths edges, and components under 80 px (at 224 px)
   are dropped.
4. A reference is *usable* when the cleaned foreground covers 0.5%-60% of the
   image. Pro-B references are near-empty in most images (the authors'
   threshold misses the pinker Pro-B cells), so Pro-B is excluded from training
   and from the Dice figures; the model card says so.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from ..imaging.imageio import load_image, resize_rgb
from ..ml.cells import clean_binary, dice, iou
from . import classifier as C
from .data import load_manifest, manifest_samples
from .train_classifier import _log, seed_everything

SEG_CLASSES = ("Benign", "Early", "Pre")  # classes whose references are usable
MIN_FG, MAX_FG = 0.005, 0.60


def derive_reference_mask(segmented_rgb: np.ndarray) -> np.ndarray:
    """Binary reference mask (H, W) bool from a ``Segmented/`` image (see module docstring)."""
    fg = segmented_rgb.max(axis=2) > 30
    fg = ndi.binary_opening(fg, structure=np.ones((3, 3), bool))
    fg = ndi.binary_fill_holes(fg)
    yy, xx = np.mgrid[-2:3, -2:3]
    disk = (xx * xx + yy * yy) <= 4
    fg = ndi.binary_opening(fg, structure=disk)
    scale = (fg.shape[0] * fg.shape[1]) / (224 * 224)
    return clean_binary(fg, max(10, int(80 * scale)))


def usable(mask: np.ndarray) -> bool:
    f = float(mask.mean())
    return MIN_FG <= f <= MAX_FG


def build_unet():
    from monai.networks.nets import UNet

    return UNet(spatial_dims=2, in_channels=3, out_channels=1, channels=(16, 32, 64, 128), strides=(2, 2, 2),
                num_res_units=1, norm="batch")


def load_seg_arrays(root: Path, recipe: dict, samples, size: int):
    xs, ms, keep = [], [], []
    for s in samples:
        if s.label not in SEG_CLASSES:
            continue
        o = load_image(root / recipe["subdir"] / s.path).rgb
        sg = load_image(root / recipe["segmented_subdir"] / s.path).rgb
        if sg.shape != o.shape:
            continue
        m = derive_reference_mask(sg)
        if not usable(m):
            continue
        xs.append(resize_rgb(o, size))
        ms.append(np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)) > 127)
        keep.append(s)
    return np.stack(xs), np.stack(ms), keep


def _augment_pair(x_u8, m, g, size):
    """Same geometric transform for image and mask; colour jitter on the image only."""
    import torch
    import torch.nn.functional as F


    x = C.to_tensor(x_u8)
    mt = m.float().unsqueeze(1)
    n = x.shape[0]
    k = int(torch.randint(0, 4, (1,), generator=g))
    x, mt = torch.rot90(x, k, (2, 3)), torch.rot90(mt, k, (2, 3))
    if float(torch.rand(1, generator=g)) < 0.5:
        x, mt = x.flip(3), mt.flip(3)
    # mild scale jitter
    s = float(torch.rand(1, generator=g)) * 0.3 + 0.85
    theta = torch.tensor([[1 / s, 0, 0], [0, 1 / s, 0]], dtype=torch.float32).expand(n, 2, 3)
    grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    mt = F.grid_sample(mt, grid, mode="nearest", padding_mode="reflection", align_corners=False)
    x = C.colour_jitter(x, g)
    return C.normalise(x), mt


def train_segmenter(root: Path, recipe: dict, out_dir: Path, seed: int = 0, epochs: int = 12, size: int | None = None,
                    batch_size: int = 16, threads: int = 2) -> dict:
    import torch
    from monai.losses import DiceCELoss

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = size or recipe["image_size"]
    torch.set_num_threads(threads)
    seed_everything(seed)
    manifest = load_manifest(recipe["manifest"])
    t0 = time.time()
    xtr, mtr, _ = load_seg_arrays(root, recipe, manifest_samples(manifest, "train"), size)
    xva, mva, _ = load_seg_arrays(root, recipe, manifest_samples(manifest, "val"), size)
    _log(out_dir, f"segmenter: train {len(xtr)} val {len(xva)} usable references ({time.time() - t0:.0f}s)")
    net = build_unet()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = int(np.ceil(len(xtr) / batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps * epochs, pct_start=0.15)
    loss_fn = DiceCELoss(sigmoid=True)
    g = torch.Generator().manual_seed(seed)
    xt, mt = torch.from_numpy(xtr), torch.from_numpy(mtr)
    best, history = -1.0, []
    for ep in range(epochs):
        net.train()
        perm = torch.randperm(len(xt), generator=g)
        tl = 0.0
        te = time.time()
        for st in range(steps):
            idx = perm[st * batch_size:(st + 1) * batch_size]
            xb, mb = _augment_pair(xt[idx], mt[idx], g, size)
            loss = loss_fn(net(xb), mb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tl += loss.item() * len(idx)
        net.eval()
        with torch.no_grad():
            probs = []
            for i in range(0, len(xva), 32):
                xb = C.normalise(C.to_tensor(torch.from_numpy(xva[i:i + 32])))
                probs.append(torch.sigmoid(net(xb))[:, 0].numpy())
            pv = np.concatenate(probs)
        vd = float(np.mean([dice(p >= 0.5, m) for p, m in zip(pv, mva)]))
        rec = {"epoch": ep + 1, "train_loss": tl / len(xt), "val_dice": vd, "seconds": time.time() - te}
        history.append(rec)
        _log(out_dir, "segmenter " + json.dumps(rec))
        if vd > best:
            best = vd
            torch.save({"model": net.state_dict(), "size": size, "epoch": ep + 1}, out_dir / "best.pt")
    (out_dir / "history.json").write_text(json.dumps(history, indent=1))
    _log(out_dir, f"segmenter done in {(time.time() - t0) / 60:.1f} min, best val Dice {best:.4f}")
    return {"best_val_dice": best, "history": history}


def load_segmenter(out_dir: Path):
    import torch

    ck = torch.load(Path(out_dir) / "best.pt", map_location="cpu", weights_only=False)
    net = build_unet()
    net.load_state_dict(ck["model"])
    net.eval()
    return net, ck


__all__ = ["derive_reference_mask", "usable", "build_unet", "train_segmenter", "load_segmenter", "SEG_CLASSES", "dice", "iou"]
