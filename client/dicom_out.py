"""Results a PACS can store and a viewer can show, for a DICOM input (the `highdicom` library):

    <stem>-sr.dcm   a Comprehensive 3D SR (TID 1500 measurement report): the finding (the label at the
                    operating point) and the probability of each class, citing the source image
    <stem>-sc.dcm   a Secondary Capture: the source image in grey with the heat map over it in colour

A segmentation package writes `<stem>-seg.dcm` instead: a DICOM-SEG with one segment per foreground
class (`segmentation_object`).

All join the source's study (same Study Instance UID and patient) in series of their own, so a
viewer shows them beside the image they describe.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from scipy.ndimage import zoom

from common.readers.volume import folder_files

SCHEME = "99FEDWARD"  # private coding scheme of fedward's own concepts
SR_SERIES, SC_SERIES, SEG_SERIES = 9901, 9902, 9903
MANUFACTURER = "fedward"


def _concept(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=value, scheme_designator=SCHEME, meaning=meaning[:64])


def structured_report(
    source: pydicom.Dataset, classes: list[str], probabilities: list[float], label: str, warning: str = ""
) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 report; with a `warning` (the image is outside what the model was trained for) it
    carries an "Input check" evaluation saying so, and its series description starts with CAUTION."""
    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name=MANUFACTURER
        ),
    )
    measurements = [
        hd.sr.Measurement(name=_concept(f"p-{c}", f"Probability of {c}"), value=float(p), unit=hd.sr.CodedConcept("1", "UCUM", "no units"))
        for c, p in zip(classes, probabilities, strict=True)
    ]  # fmt: skip
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="fedward prediction"),
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
        measurements=measurements,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=codes.DCM.Finding, value=_concept(f"class-{label}", label)),
            *(
                [
                    hd.sr.QualitativeEvaluation(
                        name=_concept("input-check", "Input check"),
                        value=_concept("outside-training", f"Outside training: {warning}"),
                    )
                ]
                if warning
                else []
            ),
        ],  # fmt: skip
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_concept("classification", "AI image classification"),
        imaging_measurements=[group],
    )
    return hd.sr.Comprehensive3DSR(
        evidence=[source], content=report[0], series_number=SR_SERIES, series_instance_uid=hd.UID(),
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER, is_complete=True, is_final=False,
        series_description=("CAUTION outside training - " if warning else "") + "fedward: finding and probability",
    )  # fmt: skip


def heatmap_capture(source: pydicom.Dataset, pixels: np.ndarray, heat: np.ndarray) -> hd.sc.SCImage:
    """The source's pixels (H x W grey or H x W x 3 colour, in [0, 1]) with `heat` (any size, [0, 1])
    over them in colour."""
    from matplotlib import colormaps

    heat = zoom(heat, (pixels.shape[0] / heat.shape[0], pixels.shape[1] / heat.shape[1]), order=1)
    grey = pixels if pixels.ndim == 3 else np.repeat(pixels[..., None], 3, axis=2)
    colour = colormaps["jet"](np.clip(heat, 0, 1))[..., :3]
    alpha = 0.45 * np.clip(heat, 0, 1)[..., None]
    rgb = np.round(255 * ((1 - alpha) * grey + alpha * colour)).astype(np.uint8)
    return hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=rgb, photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8, coordinate_system=hd.CoordinateSystemNames.PATIENT,
        patient_orientation=tuple(source.get("PatientOrientation") or ("L", "F"))[:2],
        series_instance_uid=hd.UID(), series_number=SC_SERIES, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer=MANUFACTURER, series_description="fedward: heat map",
    )  # fmt: skip


def segmentation_object(
    source: pydicom.Dataset | list[pydicom.Dataset], label_map: np.ndarray, classes: list[str]
) -> hd.seg.Segmentation:
    """A DICOM-SEG of `label_map` (values = class indices): one segment per foreground class, in the
    source's study, referencing the source image; or, given a series' slices in slice order and a
    slices x rows x cols label map, one frame per slice, each referencing its slice."""
    sources = source if isinstance(source, list) else [source]
    frames = label_map if label_map.ndim == 3 else label_map[None]
    source = sources[0]
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=c, segment_label=name[:64],
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=_concept(f"seg-{name}", name),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=hd.AlgorithmIdentificationSequence(
                name=MANUFACTURER, version="1", family=codes.cid7162.ArtificialIntelligence
            ),
        )
        for c, name in enumerate(classes) if c > 0
    ]  # fmt: skip
    spacing = [float(v) for v in source.get("PixelSpacing") or source.get("ImagerPixelSpacing") or [1.0, 1.0]]
    measures = hd.PixelMeasuresSequence(
        pixel_spacing=spacing, slice_thickness=float(source.get("SliceThickness") or 1.0)
    )
    return hd.seg.Segmentation(
        source_images=sources, pixel_array=frames.astype(np.uint8), pixel_measures=measures,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=SEG_SERIES, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer=MANUFACTURER, manufacturer_model_name=MANUFACTURER, software_versions="1",
        device_serial_number="0", series_description="fedward: segmentation",
    )  # fmt: skip


def write_dicom_segmentation(
    source_path: Path,
    label_map: np.ndarray,
    classes: list[str],
    out_dir: Path,
    *,
    slice_uids: tuple[str, ...] = (),
) -> Path:
    """Write the DICOM-SEG of one DICOM input's predicted label map (a file, or a series folder whose
    slices `slice_uids` names in slice order); its path."""
    if slice_uids:
        by_uid = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, folder_files(source_path))}
        source: pydicom.Dataset | list[pydicom.Dataset] = [by_uid[uid] for uid in slice_uids]
        stem = "-".join(source_path.parts[-2:])
    else:
        source, stem = pydicom.dcmread(source_path), source_path.stem
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{stem}-seg.dcm"
    segmentation_object(source, label_map, classes).save_as(target)
    return target


def write_dicom_results(source_path: Path, pixels: np.ndarray, heat: np.ndarray | None, classes: list[str],
                        probabilities: list[float], label: str, out_dir: Path, *,
                        warning: str = "") -> list[Path]:  # fmt: skip
    """Write the SR (and, with a heat map, the Secondary Capture) for one DICOM input; their paths."""
    source = pydicom.dcmread(source_path, stop_before_pixels=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / f"{source_path.stem}-sr.dcm"]
    structured_report(source, classes, probabilities, label, warning).save_as(written[0])
    if heat is not None:
        written.append(out_dir / f"{source_path.stem}-sc.dcm")
        heatmap_capture(source, pixels, heat).save_as(written[1])
    return written
