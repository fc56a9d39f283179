"""The in-memory volume: voxels plus the geometry that places them in the patient.

Axis convention (used everywhere in volumed, the same as nibabel and MONAI's MetaTensor):
``data[i, j, k]`` with ``affine @ [i, j, k, 1]`` giving the voxel centre in **RAS+ world
millimetres**. For a DICOM series, ``i`` runs along a row (columns), ``j`` down the columns
(rows) and ``k`` along the sorted slices; for NIfTI, the file's own index order is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

MODALITIES = ("CT", "MR", "unknown")


@dataclass(frozen=True)
class SourceInfo:
    """Where a volume came from.

    Attributes:
        path: the file or folder that was read.
        format: ``"nifti"``, ``"nrrd"``, ``"mha"``, ``"dicom"`` or ``"array"`` (built in memory).
        study_uid, series_uid, frame_of_reference_uid: DICOM identifiers (``None`` when absent).
        sop_instance_uids: SOP Instance UID of each slice, in ``k`` order (DICOM only).
        files: the slice files in ``k`` order (DICOM only); the writers of DICOM SEG use them.
        series_description: DICOM SeriesDescription, when present.
        header: a few format-specific header values (e.g. NIfTI qform code, DICOM manufacturer).
    """

    path: Path | None = None
    format: str = "array"
    study_uid: str | None = None
    series_uid: str | None = None
    frame_of_reference_uid: str | None = None
    sop_instance_uids: tuple[str, ...] = ()
    files: tuple[Path, ...] = ()
    series_description: str | None = None
    header: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Volume:
    """A 3D image with its geometry.

    Attributes:
        data: voxel array of shape ``(X, Y, Z)``; CT intensities are Hounsfield units (float32
            after rescale slope/intercept), label maps keep an integer dtype.
        affine: ``(4, 4)`` float64 matrix from voxel indices to RAS+ world coordinates in mm.
        modality: ``"CT"``, ``"MR"`` or ``"unknown"``.
        source: provenance, including DICOM UIDs.
    """

    data: np.ndarray
    affine: np.ndarray
    modality: str = "unknown"
    source: SourceInfo = field(default_factory=SourceInfo)

    def __post_init__(self) -> None:
        if self.data.ndim != 3:
            raise ValueError(f"Volume data must be 3D (X, Y, Z), got shape {self.data.shape}")
        aff = np.asarray(self.affine, dtype=np.float64)
        if aff.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {aff.shape}")
        object.__setattr__(self, "affine", aff)
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {self.modality!r}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size along ``i, j, k`` in mm."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def orientation(self) -> str:
        """Three-letter RAS orientation code of the axes, e.g. ``"RAS"`` or ``"LPS"``."""
        return "".join(nib.aff2axcodes(self.affine))

    @property
    def origin(self) -> tuple[float, float, float]:
        """World RAS position (mm) of the centre of voxel ``(0, 0, 0)``."""
        return tuple(float(v) for v in self.affine[:3, 3])  # type: ignore[return-value]

    def with_data(self, data: np.ndarray, modality: str | None = None) -> "Volume":
        """A volume on the same grid with other voxels (e.g. a label map for this image)."""
        if tuple(data.shape) != self.shape:
            raise ValueError(f"data shape {tuple(data.shape)} does not match the grid {self.shape}")
        return replace(self, data=data, modality=modality or self.modality)

    def crop(self, box: tuple[slice, slice, slice]) -> "Volume":
        """The sub-volume ``data[box]`` (slices with unit step) whose voxels keep their world
        positions: the affine's origin moves to the box's first voxel."""
        starts = [b.indices(n) for b, n in zip(box, self.shape)]
        if len(starts) != 3 or any(step != 1 for _, _, step in starts):
            raise ValueError(f"crop takes three slices with unit step, got {box!r}")
        affine = self.affine.copy()
        affine[:3, 3] = self.affine[:3, :3] @ np.array([lo for lo, _, _ in starts], dtype=np.float64) + self.affine[:3, 3]
        return replace(self, data=np.ascontiguousarray(self.data[tuple(box)]), affine=affine)

    def world_to_voxel(self, points_ras: np.ndarray) -> np.ndarray:
        """Map ``(N, 3)`` RAS mm points to continuous voxel indices ``(N, 3)``."""
        pts = np.asarray(points_ras, dtype=np.float64).reshape(-1, 3)
        inv = np.linalg.inv(self.affine)
        return pts @ inv[:3, :3].T + inv[:3, 3]

    def voxel_to_world(self, ijk: np.ndarray) -> np.ndarray:
        """Map ``(N, 3)`` voxel indices to RAS mm points ``(N, 3)``."""
        idx = np.asarray(ijk, dtype=np.float64).reshape(-1, 3)
        return idx @ self.affine[:3, :3].T + self.affine[:3, 3]

    def to_metatensor(self):
        """A MONAI ``MetaTensor`` of shape ``(1, X, Y, Z)`` carrying the affine (RAS) and source."""
        import torch
        from monai.data import MetaTensor

        meta = {
            "filename_or_obj": str(self.source.path) if self.source.path else "",
            "modality": self.modality,
            "original_affine": self.affine.copy(),
            "spatial_shape": np.asarray(self.shape),
            "space": "RAS",
        }
        return MetaTensor(torch.as_tensor(np.ascontiguousarray(self.data))[None], affine=torch.as_tensor(self.affine), meta=meta)

    def same_grid(self, other: "Volume", atol: float = 1e-3) -> bool:
        """True when ``other`` has the same shape and affine (within ``atol`` mm)."""
        return self.shape == other.shape and np.allclose(self.affine, other.affine, atol=atol)
