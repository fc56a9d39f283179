"""The input images of a bundle workflow's ``dataset`` (``--input_image`` on MONAI's command line)."""

from __future__ import annotations

from collections.abc import Mapping

from volumed.errors import ConfigError

__all__ = ["dataset_images"]


def dataset_images(dataset) -> list[str]:
    """The ``"image"`` of every item of ``dataset.data``, as strings.

    Raises:
        ConfigError: the dataset holds no item, or an item has no image (``--input_image`` not given).
    """
    data = getattr(dataset, "data", None) or []
    images = [item.get("image") if isinstance(item, Mapping) else None for item in data]
    if not images or any(i in (None, "") for i in images):
        raise ConfigError("no input image: pass --input_image PATH (a NIfTI/NRRD file or a DICOM series folder)", "input_image")
    return [str(i) for i in images]
