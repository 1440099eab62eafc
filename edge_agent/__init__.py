"""edge-agent: an edge-device deployment agent for semantic segmentation (DeepLab on TFLite)."""

__version__ = "0.1.0"
