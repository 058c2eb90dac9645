"""DeepSeek-V2/V3 model code; parameters are named exactly as in HuggingFace checkpoints."""

from moeserve.worker.model.attention_metadata import AttentionMetadata
from moeserve.worker.model.deepseek import DeepseekForCausalLM

__all__ = ["AttentionMetadata", "DeepseekForCausalLM"]
