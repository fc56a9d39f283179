"""Dictionary transforms that a bundle's ``preprocessing`` needs and MONAI does not have."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from pathlib import Path

from monai.config import KeysCollection
from monai.transforms import MapTransform

from volumed.io import read_volume
from volumed.io.volume import Volume

__all__ = ["LoadVolumed"]


class LoadVolumed(MapTransform):
    """Read an image with :func:`volumed.io.read_volume` and put it in the dictionary as a
    ``MetaTensor (1, X, Y, Z)`` with its RAS affine, as MONAI's ``LoadImaged`` +
    ``EnsureChannelFirstd`` would; the :class:`Volume` itself goes under ``"volume_<key>"`` (not ``<key>_...``: MONAI
    treats every ``<key>_*`` entry as a meta dictionary).

    Why not ``LoadImaged``: volumed's reader sorts DICOM slices by position, rescales to HU, picks
    a series by ``series_uid``, tells CT from MR and keeps the UIDs that the DICOM SEG output
    references; ``volumed segment`` reads every image this way, and a bundle must give the same masks.

    A value that is already a :class:`Volume` is converted without reading, so a caller that has
    read the image (``volumed.inference.segment``) runs the same ``preprocessing`` on it.

    Args:
        keys: keys holding a path (file or DICOM folder) or a :class:`Volume`.
        series_uid: SeriesInstanceUID when a DICOM folder holds several series.
        modality: ``"CT"`` or ``"MR"`` to override the reader's guess.
    """

    def __init__(self, keys: KeysCollection, series_uid: str | None = None, modality: str | None = None,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.series_uid = series_uid
        self.modality = modality

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            volume = value if isinstance(value, Volume) else read_volume(Path(str(value)), series_uid=self.series_uid,
                                                                         modality=self.modality)
            d[key] = volume.to_metatensor()
            d[f"volume_{key}"] = volume
        return d
