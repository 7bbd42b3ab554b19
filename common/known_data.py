"""What fedward knows about a data source without opening a file: the class names, channels and
modalities of the MedMNIST sets it knows, and the classes of its own synthetic images.

Plain constants, importable without torch or MONAI, so that reading a study config (common.config,
common.model_spec) costs a command that refuses it nothing: the readers (common.medmnist,
common.synthetic) use the same names.
"""

from __future__ import annotations

# The class names of the MedMNIST sets fedward knows, for labels 0..K-1 (medmnist's INFO "label"), and
# their channels (colour sets: 3).
KNOWN_CLASSES = {"pneumoniamnist": ["normal", "pneumonia"], "breastmnist": ["malignant", "normal-or-benign"]}
KNOWN_CLASS_COUNTS = {name: len(classes) for name, classes in KNOWN_CLASSES.items()}
KNOWN_CHANNELS = {"pneumoniamnist": 1, "breastmnist": 1, "dermamnist": 3, "retinamnist": 3, "bloodmnist": 3,
                  "pathmnist": 3}  # fmt: skip
# Their imaging modality, as DICOM Modality codes (MedMNIST's paper: chest X-ray; breast ultrasound).
KNOWN_MODALITIES = {"pneumoniamnist": ["CR", "DX"], "breastmnist": ["US"]}

SYNTHETIC_CLASSES = ["normal", "finding"]  # fedward's synthetic images (common.synthetic)
SYNTHETIC_SEGMENTATION_CLASSES = ["background", "lesion"]  # the segmentation variant's label map values
