"""3D encoders: STU-Net, CT-ViT, SwinUNETR; one registry (:func:`create_encoder`)."""

from volumed.encoders.registry import (  # noqa: F401
    EncoderSpec,
    FeatureInfo,
    create_encoder,
    get_encoder_spec,
    list_encoders,
    register_encoder,
)
