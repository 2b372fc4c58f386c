"""Training loop for the smear classifier (CPU friendly, seeded, resumable).

Writes into ``out_dir``: ``last.pt`` (every epoch, for resuming), ``best.pt``
(lowest validation loss), ``history.json`` and ``train.log``.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import classifier as C
from .data import load_arrays, load_manifest, manifest_samples


@dataclass
class TrainConfig:
    data_root: str
    manifest: str
    out_dir: str
    subdir: str = "Original"
    image_size: int = 192
    epochs: int = 14
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    freeze_blocks: int = 6
    patience: int = 4
    seed: int = 0
    threads: int = 2
    max_minutes: float = 40.0
    augment: str = "smear"  # "smear" (colour, any-angle rotation, scale-bar masking) or "radiology"
    max_angle: float = 20.0  # radiology only
    zoom_span: float = 0.3  # radiology only: zoom 0.85 to 0.85 + span (zooming in crops film labels and markers)
    gray: bool = False  # luminance replicated to 3 channels
    pad: bool = False  # pad to square before resizing (aspect preserved)
    tone_p: float = 0.0  # radiology only: share of images through a random tone curve (sequence-like)
    lowres_p: float = 0.0  # radiology only: share of images at a lower resolution
    edges_p: float = 0.0  # radiology only: share of images with film borders and a side marker painted in


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _log(out: Path, msg: str) -> None:
    line = time.strftime("%H:%M:%S ") + msg
    print(line, flush=True)
    with open(out / "train.log", "a") as fh:
        fh.write(line + "\n")


@torch.no_grad()
def predict_logits(model, x_u8: np.ndarray, size: int, batch: int = 64, transform=None) -> np.ndarray:
    model.eval()
    outs = []
    for i in range(0, len(x_u8), batch):
        xb = C.to_tensor(torch.from_numpy(x_u8[i:i + batch]))
        if transform is not None:
            xb = transform(xb)
        outs.append(model(C.normalise(C.resize(xb, size))))
    return torch.cat(outs).numpy()


def train(cfg: TrainConfig, progress: bool = True) -> dict:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    manifest = load_manifest(cfg.manifest)
    classes = manifest["classes"]
    _log(out, f"config {json.dumps(asdict(cfg))}")
    t0 = time.time()
    kw = dict(size=224, subdir=cfg.subdir, pad=cfg.pad, gray=cfg.gray)
    xtr, ytr = load_arrays(cfg.data_root, manifest_samples(manifest, "train"), classes, **kw)
    xva, yva = load_arrays(cfg.data_root, manifest_samples(manifest, "val"), classes, **kw)
    _log(out, f"loaded train {len(xtr)} val {len(xva)} images in {time.time() - t0:.0f}s")

    model = C.SmearClassifier(len(classes), pretrained=True)
    model.freeze_early(cfg.freeze_blocks)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(xtr) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warm = steps_per_epoch // 2
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
    # Class-balanced loss weights (inverse frequency, normalised).
    counts = np.bincount(ytr, minlength=len(classes)).astype(np.float64)
    weights = torch.tensor(counts.sum() / (len(classes) * counts), dtype=torch.float32)

    start_epoch, best, bad, history = 0, float("inf"), 0, []
    last_ckpt = out / "last.pt"
    if last_ckpt.exists():
        ck = torch.load(last_ckpt, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        start_epoch, best, bad, history = ck["epoch"] + 1, ck["best"], ck["bad"], ck["history"]
        _log(out, f"resumed from epoch {start_epoch}")

    g = torch.Generator().manual_seed(cfg.seed)
    xtr_t = torch.from_numpy(xtr)
    ytr_t = torch.from_numpy(ytr)
    for epoch in range(start_epoch, cfg.epochs):
        g.manual_seed(cfg.seed * 1000 + epoch)
        model.train()
        perm = torch.randperm(len(xtr), generator=g)
        run_loss, seen, correct = 0.0, 0, 0
        it = range(steps_per_epoch)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(it, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False)
            it = bar
        te = time.time()
        for step in it:
            idx = perm[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            if cfg.augment == "radiology":
                xb = C.augment_radiology(xtr_t[idx], g, cfg.image_size, cfg.max_angle, cfg.zoom_span,
                                           cfg.tone_p, cfg.lowres_p, cfg.edges_p)
            else:
                xb = C.augment(xtr_t[idx], g, cfg.image_size)
            yb = ytr_t[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb, weight=weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            run_loss += loss.item() * len(idx)
            seen += len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            if bar is not None:
                bar.set_postfix(loss=f"{run_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
        if bar is not None:
            bar.close()
        vl = predict_logits(model, xva, cfg.image_size)
        val_loss = float(F.cross_entropy(torch.from_numpy(vl), torch.from_numpy(yva)))
        val_acc = float((vl.argmax(1) == yva).mean())
        rec = {"epoch": epoch + 1, "train_loss": run_loss / seen, "train_acc": correct / seen, "val_loss": val_loss,
               "val_acc": val_acc, "seconds": time.time() - te}
        history.append(rec)
        _log(out, json.dumps(rec))
        if val_loss < best - 1e-4:
            best, bad = val_loss, 0
            torch.save({"model": model.state_dict(), "classes": classes, "config": asdict(cfg), "epoch": epoch + 1}, out / "best.pt")
        else:
            bad += 1
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "epoch": epoch,
                    "best": best, "bad": bad, "history": history}, last_ckpt)
        if bad >= cfg.patience:
            _log(out, f"early stopping after epoch {epoch + 1}")
            break
        if (time.time() - t0) / 60 > cfg.max_minutes:
            _log(out, f"time budget of {cfg.max_minutes} min reached after epoch {epoch + 1}")
            break
    with open(out / "history.json", "w") as fh:
        json.dump(history, fh, indent=1)
    _log(out, f"done in {(time.time() - t0) / 60:.1f} min, best val loss {best:.4f}")
    return {"history": history, "best_val_loss": best, "minutes": (time.time() - t0) / 60}


def load_best(out_dir: str | os.PathLike) -> tuple[C.SmearClassifier, dict]:
    ck = torch.load(Path(out_dir) / "best.pt", map_location="cpu", weights_only=False)
    model = C.SmearClassifier(len(ck["classes"]), pretrained=False)
    model.load_state_dict(ck["model"])
    model.eval()
    return model, ck
