"""MONAI bundles of volumed models: layout and metadata checks, weight integrity, loading.

``volumed.bundle.load(path)`` checks a bundle (metadata against the project's schema, installed
MONAI against ``monai_version``, the weights' sha256 against ``large_files.yml``) and returns it
with its network loaded from safetensors. The bundle's own ``configs/inference.json`` runs with
MONAI's runner (``python -m monai.bundle run``) or ``volumed run``; see
``bundles/volumed_promptseg_ct/docs/README.md``.
"""

from volumed.bundle.integrity import check_monai_version, record_hashes, sha256_file, verify_hashes
from volumed.bundle.loader import Bundle, load
from volumed.bundle.metadata import metadata_problems, read_metadata, validate_metadata

__all__ = [
    "Bundle",
    "load",
    "check_monai_version",
    "record_hashes",
    "sha256_file",
    "verify_hashes",
    "metadata_problems",
    "read_metadata",
    "validate_metadata",
]
