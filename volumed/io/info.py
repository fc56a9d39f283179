"""A summary of a volume's geometry, intensities and provenance (``volumed info``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from volumed.io.volume import Volume


@dataclass(frozen=True)
class VolumeInfo:
    path: str
    format: str
    modality: str
    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    extent_mm: tuple[float, float, float]
    orientation: str
    origin_ras_mm: tuple[float, float, float]
    affine: list[list[float]]
    dtype: str
    min: float
    max: float
    mean: float
    std: float
    p1: float
    p50: float
    p99: float
    study_uid: str | None
    series_uid: str | None
    frame_of_reference_uid: str | None
    series_description: str | None
    n_files: int
    header: dict

    def to_dict(self) -> dict:
        return asdict(self)

    def to_text(self) -> str:
        unit = " HU" if self.modality == "CT" else ""
        lines = [
            f"path          {self.path}",
            f"format        {self.format}    modality {self.modality}    dtype {self.dtype}",
            f"shape         {' x '.join(str(s) for s in self.shape)} voxels",
            f"spacing       {', '.join(f'{s:.4g}' for s in self.spacing_mm)} mm",
            f"extent        {', '.join(f'{s:.1f}' for s in self.extent_mm)} mm",
            f"orientation   {self.orientation}    origin (RAS) {', '.join(f'{s:.2f}' for s in self.origin_ras_mm)} mm",
            "affine (RAS)  " + "\n              ".join("  ".join(f"{v:9.4f}" for v in row) for row in self.affine),
            f"intensity     min {self.min:.1f}  max {self.max:.1f}  mean {self.mean:.1f}  std {self.std:.1f}{unit}",
            f"percentiles   p1 {self.p1:.1f}  p50 {self.p50:.1f}  p99 {self.p99:.1f}{unit}",
        ]
        if self.format == "dicom":
            lines += [
                f"study UID              {self.study_uid or '(empty)'}",
                f"series UID             {self.series_uid or '(empty)'}",
                f"frame of reference UID {self.frame_of_reference_uid or '(empty)'}",
                f"series                 {self.series_description or ''} ({self.n_files} slice files)",
            ]
        for k, v in self.header.items():
            if self.format == "dicom":
                lines.append(f"{k[:22]:<23}{v}")
        return "\n".join(lines)


def describe_volume(volume: Volume) -> VolumeInfo:
    data = volume.data
    flat = data.reshape(-1)
    sample = flat[:: max(1, flat.size // 2_000_000)].astype(np.float64)  # percentiles on <= 2M voxels
    p1, p50, p99 = (float(v) for v in np.percentile(sample, [1, 50, 99]))
    return VolumeInfo(
        path=str(volume.source.path),
        format=volume.source.format,
        modality=volume.modality,
        shape=volume.shape,
        spacing_mm=volume.spacing,
        extent_mm=tuple(float(s * n) for s, n in zip(volume.spacing, volume.shape)),  # type: ignore[arg-type]
        orientation=volume.orientation,
        origin_ras_mm=volume.origin,
        affine=[[float(v) for v in row] for row in volume.affine],
        dtype=str(data.dtype),
        min=float(data.min()),
        max=float(data.max()),
        mean=float(data.mean(dtype=np.float64)),
        std=float(data.std(dtype=np.float64)),
        p1=p1,
        p50=p50,
        p99=p99,
        study_uid=volume.source.study_uid,
        series_uid=volume.source.series_uid,
        frame_of_reference_uid=volume.source.frame_of_reference_uid,
        series_description=volume.source.series_description,
        n_files=len(volume.source.files),
        header=dict(volume.source.header),
    )
