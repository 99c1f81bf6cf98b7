"""The mock provider's private modules; the public API is `pipeline.testing`."""
