"""Training recipes per analyzer (dataset, split manifest, image size, epochs, the analyzer's static
config) and where the trained model folder goes. Read by training, calibration, evaluation and the
model benchmark; no torch here."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import datasets_dir
from .data import MANIFEST_DIR, SourceSpec, make_multi_split, make_split

# The input normalisation of every classifier (EfficientNet-Lite's own), written into config.json.
MEAN = (127.0 / 255.0,) * 3
STD = (128.0 / 255.0,) * 3

PACKAGE_DIR = Path(__file__).resolve().parents[1]
DEFAULT_DATASETS = datasets_dir()

RECIPES = {
    "smear-all": {
        "dataset": "all-taleqani",
        "subdir": "Original",
        "segmented_subdir": "Segmented",
        "val_noun": "smears",
        "manifest": MANIFEST_DIR / "all-taleqani.json",
        "image_size": 192,
        "epochs": 14,
        "config": {
            "id": "smear-all",
            "name": "Peripheral blood smear: B-lineage acute lymphoblastic leukemia",
            "version": "1.0.0",
            "modality": "microscopy/peripheral-blood-smear",
            "input_description": "peripheral blood smear field",
            "image_noun": "Field",
            "labels": ["Benign", "Early", "Pre", "Pro"],
            "display_names": {"Benign": "Benign (hematogone)", "Early": "Early Pre-B ALL", "Pre": "Pre-B ALL",
                              "Pro": "Pro-B ALL"},
            "malignant_labels": ["Early", "Pre", "Pro"],
            "report_wording": {
                "finding": "Peripheral blood smear field, automated B-ALL pre-classification",
                "malignant": "Morphology suggestive of B-lineage acute lymphoblastic leukemia; the subtype "
                             "({label}) is a morphological suggestion only: flow cytometry decides the "
                             "immunophenotype.",
                "benign": "No morphological evidence of B-ALL blasts; appearance of benign hematogones.",
                "disclaimer": "AI output is decision support only and must be confirmed by a qualified person "
                              "(flow cytometry is the reference standard).",
            },
            "segmenter": {"threshold": 0.5, "min_area_px": 60, "min_distance_px": 9},
            "blank_image_std": 2.0,
        },
    },
    "bone-xray": {
        "dataset": "bone-xray",
        "subdir": None,
        "manifest": MANIFEST_DIR / "bone-xray.json",
        # Copies of one radiograph share the stem before `.rf.`; the correlation check adds copies filed
        # under another stem (bone films of one anatomy look alike: below 0.95 they chain into one group).
        "split": {"group_regex": r"^(.*?)\.rf\.", "run_length": 0, "min_correlation": 0.95},
        "image_size": 224,  # chosen on validation: AUC 0.964 vs 0.960 and accuracy 90.6% vs 90.3% at 176 px
        "epochs": 9,
        "train": {"augment": "radiology", "max_angle": 30.0, "gray": True, "pad": True, "freeze_blocks": 5,
                  "edges_p": 0.5},
        "operating_point": {"rule": "sensitivity", "min": 0.97},
        "calibrate_bias": True,
        "tta": "hflip",
        "ood_gate_negatives": ["brain-mri", "smear-all"],
        "citation": "Public Roboflow aggregate of bone radiographs (osteosarcoma, Ewing sarcoma, chondrosarcoma, "
                    "metastasis; normal radiographs partly from stock-photo sites); no licence stated, research use "
                    "only. Exact duplicates removed; the release's leaky train/valid/test split discarded.",
        "held_out": "all copies of a source radiograph (file-name stem before `.rf.`, and copies under flips, "
                    "rotations, crops and contrast changes filed under another stem) kept on one side",
        "targets": [
            ("Cancer-vs-normal ROC AUC", "test.metrics.malignant_vs_benign.roc_auc", ">=", 0.97),
            ("Accuracy", "test.metrics.accuracy", ">=", 0.91),
            ("Cancer sensitivity (operating point)", "test.metrics.malignant_vs_benign.sensitivity", ">=", 0.95),
            ("Smear photos flagged out-of-domain", "out_of_domain.sources.smear photos (all-taleqani).flagged", ">=", 0.95),
            ("MR slices flagged out-of-domain", "out_of_domain.sources.brain MR slices (brain-mri).flagged", ">=", 0.95),
        ],
        "limitations": [
            "Public, mixed-provenance images (scanners, phone photos of films, stock images) without patient "
            "identifiers: the split groups copies of one radiograph, but two radiographs of one patient may still "
            "land on both sides.",
            "Cancer covers several primary bone tumours and metastases without subtype labels; benign tumours, "
            "infection and fractures are not represented as classes and may be called either way.",
            "Grouped test split of 688 images; figures on another hospital's radiographs will be lower.",
        ],
        "config": {
            "id": "bone-xray",
            "name": "Bone radiograph: bone tumour screening (cancer / normal)",
            "version": "1.1.0",
            "modality": "radiology/x-ray",
            "input_description": "bone radiograph",
            "image_noun": "Radiograph",
            "dicom_modalities": ["CR", "DX", "DR", "RG"],
            "labels": ["cancer", "normal"],
            "display_names": {"cancer": "Suspected bone malignancy", "normal": "Normal bone radiograph"},
            "malignant_labels": ["cancer"],
            "positive_term": "bone malignancy",
            "report_wording": {
                "finding": "Bone radiograph, automated screening for bone malignancy",
                "malignant": "Radiographic appearance suggestive of a bone malignancy; correlate with clinical "
                             "findings and cross-sectional imaging.",
                "benign": "No radiographic features of a bone malignancy detected by the model.",
                "disclaimer": "AI output is decision support only and must be confirmed by a radiologist; "
                              "histopathology is the reference standard.",
            },
            "blank_image_std": 2.0,
        },
    },
    "brain-mri": {
        "dataset": "brain-mri",
        "subdir": None,
        "manifest": MANIFEST_DIR / "brain-mri.json",
        # Two collections: the Kaggle mix (types and no tumour) and TCGA-LGG FLAIR (gliomas and tumour-free
        # slices of the same patients, split by patient, one source per institution). 0.90 also joins
        # neighbouring slices of one scan, the closest the Kaggle files come to a patient.
        "split": {"sources": [
            SourceSpec("brain-mri"),
            SourceSpec("tcga-lgg-flair", labels={"tumour": "glioma", "no_tumour": "notumor"},
                       group_regex=r"^(TCGA_[A-Z0-9]+_[A-Z0-9]+_\d+)_", source_regex=r"^TCGA_([A-Z0-9]+)_"),
        ], "min_correlation": 0.90},
        "masks": {"dataset": "tcga-lgg-flair", "csv": "metadata.csv", "column": "mask"},
        # Each left out in turn (`--stage loso`); their answers fit the referral band (`--stage referral`).
        # The two largest institutions; CS (48 slices) and FG (35) would add a few patients each.
        "loso_sources": ["tcga-lgg-flair", "tcga-lgg-flair/DU", "tcga-lgg-flair/HT"],
        # the tumour type is suggested only on slices like this collection's tumours (`--stage types`):
        # TCGA adds gliomas alone, so its look says nothing about meningioma or pituitary tumours
        "typed_sources": ["brain-mri"],
        "image_size": 176,
        "epochs": 12,
        "train": {"augment": "radiology", "max_angle": 15.0, "gray": True, "pad": True, "freeze_blocks": 5,
                  "tone_p": 0.5, "lowres_p": 0.3},
        "operating_point": {"rule": "sensitivity", "min": 0.995},
        "calibrate_bias": True,
        "tta": "hflip",
        "ood_gate_negatives": ["bone-xray", "smear-all"],
        "citation": "Nickparvar M., Brain Tumor MRI Dataset, Kaggle 2021 (from the Figshare set of Cheng et al. 2015, "
                    "the SARTAJ set and Br35H); a random 700 per class, exact duplicates removed; no licence stated, "
                    "research use only. Buda M. et al., Comput Biol Med 109 (2019) 218-225 and Pedano N. et al., "
                    "TCGA-LGG (TCIA, doi:10.7937/K9/TCIA.2016.L4LTD3TK): 297 FLAIR slices of 83 lower-grade glioma "
                    "patients, tumour slices labelled glioma and tumour-free slices of the same patients no tumour; "
                    "CC BY-NC-SA 4.0 and TCIA's data usage policy (research use, cite).",
        "held_out": "copies of one scan and neighbouring slices (flip-, rotation-, crop- and contrast-invariant "
                    "comparison) kept on one side; TCGA patients whole, with their tumour-free slices",
        "targets": [
            ("Accuracy (4 classes), collection with types", "sources.brain-mri.accuracy.rate", ">=", 0.97),
            ("Tumour sensitivity, TCGA left out of training (its test patients)",
             "leave_one_source_out.tcga-lgg-flair.test_images.sensitivity.rate", ">=", 0.95),
            ("Confident misses, TCGA left out (of its test patients' tumour slices)",
             "leave_one_source_out.tcga-lgg-flair.test_images.confident_misses.rate", "<=", 0.02),
            ("Grad-CAM pointing game, held-out TCGA patients", "localisation.inside_mask.rate", ">=", 0.80),
            ("Tumour-vs-no-tumour sensitivity", "test.metrics.malignant_vs_benign.sensitivity", ">=", 0.99),
            ("Smear photos flagged out-of-domain", "out_of_domain.sources.smear photos (all-taleqani).flagged", ">=", 0.95),
        ],
        "limitations": [
            "Single 2-D slices. The Kaggle collection has no patient identifiers: copies and neighbouring slices are "
            "grouped by image similarity, but two distant slices of one patient may still land on both sides.",
            "The Kaggle classes come from different collections (types mostly contrast-enhanced T1, 'no tumour' "
            "mostly one collection of T2-weighted axial web JPEGs): the model can learn the collection. TCGA-LGG "
            "adds tumour and tumour-free FLAIR slices of the same patients, but only gliomas; its 'no tumour' "
            "slices come from glioma patients, not healthy brains.",
            "The tumour type is learnt from one collection only (the Kaggle mix): on slices unlike its tumours the "
            "type is withheld ('type not suggested'), and where it is shown on another collection, read the tumour "
            "call, not the type.",
            "Four classes only; other lesions (metastases, abscess, stroke) are not represented and may be called "
            "a tumour type or 'no tumour'. A slice without a tumour does not exclude one elsewhere in the brain.",
        ],
        "config": {
            "id": "brain-mri",
            "name": "Brain MR slice: brain tumour or not, type suggested (glioma, meningioma, pituitary)",
            "version": "1.1.0",
            "modality": "radiology/mr",
            "input_description": "brain MR slice",
            "image_noun": "Slice",
            "dicom_modalities": ["MR"],
            # trained on T1 (contrast), T2 and FLAIR slices of the head in the three body planes
            "dicom_checks": {
                "body_parts": ["HEAD", "BRAIN", "SKULL", "HEADNECK"],
                "planes": ["axial", "coronal", "sagittal"],
                "refused_words": ["DWI", "DIFF", "DIFFUSION", "ADC", "TRACE", "TRACEW", "DTI", "TENSOR", "FA",
                                  "SWI", "SWAN", "PERFUSION", "PERF", "DSC", "DCE", "ASL", "BOLD", "MRA", "TOF",
                                  "ANGIO", "LOCALIZER", "LOCALISER", "SCOUT", "SURVEY", "MRS", "SPECTROSCOPY", "CSI"],
                "refuse_diffusion": True,
            },
            # chosen on validation TCGA tumour slices (pointing game 11/24 against 10/24 for the top class)
            "heatmap": "positive_call",
            "labels": ["glioma", "meningioma", "notumor", "pituitary"],
            "display_names": {"glioma": "Glioma", "meningioma": "Meningioma", "notumor": "No tumour",
                              "pituitary": "Pituitary tumour", "tumour": "Brain tumour, type not suggested"},
            "malignant_labels": ["glioma", "meningioma", "pituitary"],
            "untyped_label": "tumour",
            "positive_term": "brain tumour",
            "report_wording": {
                "finding": "Brain MR slice, automated tumour detection (a type suggested where the slice resembles "
                           "the images the types were learned from)",
                "malignant": "Appearance suggestive of an intracranial tumour (most likely: {label}).",
                "untyped": "Appearance suggestive of an intracranial tumour; no type is suggested (unlike the "
                           "images the types were learned from).",
                "benign": "No intracranial tumour detected by the model on this slice.",
                "disclaimer": "AI output is decision support only and must be confirmed by a neuroradiologist; "
                              "a single slice cannot exclude a lesion elsewhere.",
            },
            "blank_image_std": 2.0,
        },
    },
}


def joins_datasets(recipe: dict) -> bool:
    """Whether the recipe's split joins several dataset folders (its paths start with the dataset)."""
    return "sources" in recipe.get("split", {})


def data_root(analyzer_id: str, given: str | Path | None = None, datasets: str | Path | None = None) -> Path:
    """The folder the recipe's manifest paths are relative to: the dataset's own folder, or the
    datasets folder (``datasets``, default ../shared/datasets) when the split joins several."""
    if given:
        return Path(given)
    r = RECIPES[analyzer_id]
    folder = Path(datasets) if datasets else DEFAULT_DATASETS
    return folder if joins_datasets(r) else folder / r["dataset"]


def recipe_split(analyzer_id: str, datasets: str | Path | None = None) -> dict:
    """The analyzer's split manifest, made by the rules its recipe names."""
    r = RECIPES[analyzer_id]
    rule = dict(r.get("split", {}))
    if joins_datasets(r):
        return make_multi_split(datasets or DEFAULT_DATASETS, rule.pop("sources"), analyzer_id, **rule)
    return make_split(Path(datasets or DEFAULT_DATASETS) / r["dataset"], r.get("subdir"), dataset_name=r["dataset"],
                      **rule)


def model_dir(analyzer_id: str) -> Path:
    return PACKAGE_DIR / "models" / analyzer_id


def write_config(recipe: dict, out_dir: Path) -> None:
    """Static analyzer config (labels, wording, preprocessing); calibration is added later."""
    cfg = dict(recipe["config"])
    cfg["preprocess"] = {"size": recipe["image_size"], "mean": list(MEAN), "std": list(STD), "resize": "bilinear",
                         "pad_to_square": "median border colour"}
    if recipe.get("train", {}).get("gray"):
        cfg["preprocess"]["grayscale"] = True
    if recipe.get("tta"):
        cfg["preprocess"]["tta"] = recipe["tta"]
    if "segmenter" in cfg:
        cfg["segmenter"] = dict(cfg["segmenter"], size=recipe["image_size"])
        cfg["files"] = ["classifier.onnx", "segmenter.onnx", "head.npz"]
    else:
        cfg["files"] = ["classifier.onnx", "head.npz"]
    path = out_dir / "config.json"
    if path.exists():  # keep an existing calibration block until calibrate rewrites it
        old = json.loads(path.read_text())
        if "calibration" in old:
            cfg["calibration"] = old["calibration"]
            cfg["files"].append("ood.npz")
    path.write_text(json.dumps(cfg, indent=1))
