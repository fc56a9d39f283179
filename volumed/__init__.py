"""volumed: 3D medical imaging (CT first, MR too) on MONAI.

The chain every task follows::

    volume file(s) --io--> Volume / MetaTensor --transforms--> model-space tensor
      --encoder--> multi-scale features --head(+text)--> masks / tokens / logits
      --postprocess (invert to original space)--> NIfTI, DICOM SEG/SR, JSON, PNG
"""

__version__ = "0.1.0"

from volumed.errors import VolumedError  # noqa: F401
from volumed import _startup

_startup.install()  # MONAI imported without transformers and scipy.signal: ~3 s less start-up (see volumed/_startup.py)
