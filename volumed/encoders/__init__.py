"""3D encoders: STU-Net, CT-ViT, SwinUNETR, a plain CNN; one registry (:func:`create_encoder`)."""

from volumed.encoders.registry import (  # noqa: F401
    EncoderSpec,
    FeatureInfo,
    create_encoder,
    get_encoder_spec,
    list_encoders,
    register_encoder,
)
from volumed.encoders import stunet  # noqa: F401
from volumed.encoders import ctvit  # noqa: F401
from volumed.encoders import swin  # noqa: F401
from volumed.encoders import plain  # noqa: F401
from volumed.encoders.weights import LoadReport, load_encoder_weights, save_weights  # noqa: F401,E402
