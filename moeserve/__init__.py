"""moeserve: disaggregated serving for DeepSeek-class Mixture-of-Experts models."""

__version__ = "0.1.0"
__all__ = ["__version__"]
