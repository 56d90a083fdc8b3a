"""Model architectures. Importing this package registers each one with config_base."""
from jaxlm.models import decoder
from jaxlm.models.config_base import build_model, register_module

register_module("decoder", decoder.Decoder)

__all__ = ["build_model", "decoder"]
