"""Reading and writing volumes: NIfTI, NRRD, MHA, DICOM series; NIfTI, DICOM SEG and DICOM SR outputs."""

from volumed.io.reader import describe_series, read_dicom_series, read_label, read_volume, resample_label_to  # noqa: F401
from volumed.io.volume import SourceInfo, Volume  # noqa: F401
