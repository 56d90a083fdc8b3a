"""jaxlm: JAX/Flax reimplementations of five small PyTorch language models, with one toolchain."""
__version__ = "0.1.0"
