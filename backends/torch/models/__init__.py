"""The model families the torch engine runs: shared building blocks (``linear``, ``norms``,
``rotary``, ``attention_layer``, ``mlp``, ``moe``, ``causal_lm``), the family interface
(``family``) and one short module per family that wires its layer and names its tensors.
"""

#: Modules of the built-in families (each has ``FAMILIES``), in the order they are tried.
BUILTIN_FAMILY_MODULES = ("mixtral", "llama", "gemma2", "gemma3", "phi3", "qwen3", "qwen3_moe")
