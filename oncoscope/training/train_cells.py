"""Training of the per-cell classifier of ``smear-differential`` (CPU friendly, seeded).

End-to-end fine-tuning of ImageNet EfficientNet-Lite0 on canonical-scale crops
(:mod:`.cells`), with augmentation aimed at what differs between laboratories: stain colour
(strong hue, saturation and tint jitter, sometimes grayscale), sharpness and resolution (blur,
down- and up-sampling to the coarsest source's detail), scale error (±20% zoom) and framing.
Sources can be left out entirely (``without``) for leave-one-source-out estimates.

Writes ``best.pt``, ``history.json`` and ``train.log`` into ``out_dir``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import classifier as C
from .cells import CROP_PX, TRAIN_CLASSES, CellCrops, build


@dataclass
class CellTrainConfig:
    datasets: str
    cache: str
    out_dir: str
    without: list[str] = field(default_factory=list)  # sources left out of training and validation
    epochs: int = 6
    batch_size: int = 48
    lr: float = 2e-3
    weight_decay: float = 1e-4
    freeze_blocks: int = 2
    per_source_cap: int = 3000  # crops per source and epoch (all-taleqani has many cells per field)
    seed: int = 0
    threads: int = 2
    max_minutes: float = 45.0
    degrade_p: float = 0.5  # crops brought down to the coarsest source's detail
    gray_p: float = 0.15  # crops shown in grayscale (colour is the most lab-specific cue)


def _log(out: Path, msg: str) -> None:
    line = time.strftime("%H:%M:%S ") + msg
    print(line, flush=True)
    with open(out / "train.log", "a") as fh:
        fh.write(line + "\n")


def trainable(crops: CellCrops, split: str) -> np.ndarray:
    """Indices of a source's cells usable for training: labels in the trained vocabulary."""
    return np.nonzero((crops.splits == split) & np.isin(crops.labels, TRAIN_CLASSES))[0]


def augment_cells(batch_u8: torch.Tensor, g: torch.Generator, degrade_p: float = 0.5,
                  gray_p: float = 0.15) -> torch.Tensor:
    x = C.to_tensor(batch_u8)
    n = x.shape[0]
    x = frame(x, g)
    x = C.geometric(x, g, CROP_PX, zoom_span=0.4)  # any angle, flips, 0.85-1.25x (scale-estimate error)
    # Resolution: crops lose detail down to 1.0-2.2x coarser, as the blurriest source.
    for i in torch.nonzero(torch.rand(n, generator=g) < degrade_p).flatten().tolist():
        f = float(torch.rand(1, generator=g)) * 1.2 + 1.0
        small = max(8, int(CROP_PX / f))
        x[i:i + 1] = F.interpolate(F.interpolate(x[i:i + 1], size=(small, small), mode="bilinear",
                                                 antialias=True, align_corners=False),
                                   size=(CROP_PX, CROP_PX), mode="bilinear", align_corners=False)
    x = C.colour_jitter(x, g, strength=1.6)
    gray = torch.rand(n, generator=g) < gray_p
    if gray.any():
        lum = 0.299 * x[gray, 0:1] + 0.587 * x[gray, 1:2] + 0.114 * x[gray, 2:3]
        x[gray] = lum.repeat(1, 3, 1, 1)
    noise = torch.rand(n, 1, 1, 1, generator=g) * 0.03
    x = (x + torch.randn(x.shape, generator=g) * noise).clamp(0, 1)
    return C.normalise(x)


def frame(x: torch.Tensor, g: torch.Generator, p: float = 0.3) -> torch.Tensor:
    """Paint a random border band with the crop's background colour, as crops cut near an image's edge
    are padded (so that padding does not tell which source a crop came from)."""
    n, _, h, w = x.shape
    for i in torch.nonzero(torch.rand(n, generator=g) < p).flatten().tolist():
        flat = x[i].flatten(1)
        bright = flat[:, flat.sum(0) >= flat.sum(0).quantile(0.9)].median(dim=1).values.view(3, 1, 1)
        t, b, left, r = (int(v) for v in torch.randint(0, h // 4, (4,), generator=g))
        keep = torch.zeros(h, w, dtype=torch.bool)
        keep[t:h - b, left:w - r] = True
        x[i] = torch.where(keep, x[i], bright)
    return x


def _epoch_indices(train: dict[str, np.ndarray], cap: int, rng: np.random.Generator) -> list[tuple[str, int]]:
    out = []
    for name, idx in train.items():
        take = idx if len(idx) <= cap else rng.choice(idx, cap, replace=False)
        out += [(name, int(i)) for i in take]
    rng.shuffle(out)
    return out


def train_cells(cfg: CellTrainConfig) -> Path:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    data = {k: v for k, v in build(Path(cfg.datasets), Path(cfg.cache)).items() if k not in cfg.without}
    cls_index = {c: i for i, c in enumerate(TRAIN_CLASSES)}
    train = {k: trainable(v, "train") for k, v in data.items()}
    val = {k: trainable(v, "val") for k, v in data.items()}
    counts = np.zeros(len(TRAIN_CLASSES))
    for k, idx in train.items():
        for lab in data[k].labels[idx]:
            counts[cls_index[lab]] += 1
    # Balanced loss over the classes present; a class absent from training gets no weight.
    weight = torch.tensor(np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / (counts > 0).sum(), 0.0),
                          dtype=torch.float32).clamp(max=10.0)
    _log(out, f"sources {sorted(data)}; train cells per class {dict(zip(TRAIN_CLASSES, counts.astype(int)))}")
    model = C.SmearClassifier(len(TRAIN_CLASSES))
    model.freeze_early(cfg.freeze_blocks)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = sum(min(len(v), cfg.per_source_cap) for v in train.values())
    steps = cfg.epochs * math.ceil(per_epoch / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.15)
    g = torch.Generator().manual_seed(cfg.seed)
    best, history, t0 = float("inf"), [], time.time()
    for epoch in range(cfg.epochs):
        model.train()
        order = _epoch_indices(train, cfg.per_source_cap, rng)
        tot, n_seen = 0.0, 0
        for b in range(0, len(order), cfg.batch_size):
            chunk = order[b:b + cfg.batch_size]
            xb = torch.from_numpy(np.stack([data[k].crops[i] for k, i in chunk]))
            yb = torch.tensor([cls_index[data[k].labels[i]] for k, i in chunk])
            x = augment_cells(xb, g, cfg.degrade_p, cfg.gray_p)
            loss = F.cross_entropy(model(x), yb, weight=weight, label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(chunk)
            n_seen += len(chunk)
        vloss, vacc = evaluate_loss(model, data, val, cls_index, weight)
        history.append({"epoch": epoch + 1, "train_loss": tot / n_seen, "val_loss": vloss, "val_acc": vacc,
                        "minutes": (time.time() - t0) / 60})
        _log(out, f"epoch {epoch + 1}: train {tot / n_seen:.4f} val {vloss:.4f} acc {vacc:.4f}")
        if vloss < best:
            best = vloss
            torch.save({"model": model.state_dict(), "classes": TRAIN_CLASSES, "epoch": epoch + 1}, out / "best.pt")
        (out / "history.json").write_text(json.dumps(history, indent=2))
        if (time.time() - t0) / 60 > cfg.max_minutes:
            _log(out, "time limit reached")
            break
    return out / "best.pt"


@torch.no_grad()
def evaluate_loss(model, data, idx: dict[str, np.ndarray], cls_index, weight) -> tuple[float, float]:
    model.eval()
    losses, correct, n = 0.0, 0, 0
    for k, ids in idx.items():
        for b in range(0, len(ids), 128):
            sel = ids[b:b + 128]
            x = C.normalise(C.to_tensor(torch.from_numpy(data[k].crops[sel])))
            y = torch.tensor([cls_index[lab] for lab in data[k].labels[sel]])
            logits = model(x)
            losses += float(F.cross_entropy(logits, y, weight=weight, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            n += len(sel)
    return losses / max(n, 1), correct / max(n, 1)


def load_cell_model(path: Path) -> C.SmearClassifier:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = C.SmearClassifier(len(ckpt["classes"]), pretrained=False)
    model.load_state_dict(ckpt["model"])
    return model.eval()
