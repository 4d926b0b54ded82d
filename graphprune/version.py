"""The package version (read by the ONNX manifest and the CLI)."""
__version__ = "0.1.0"
