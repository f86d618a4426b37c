"""Integrations with other libraries (imported on demand; each needs its library installed).

* :mod:`dilated_sparse.integrations.transformers`: Hugging Face transformers, through its
  ``AttentionInterface`` (``attn_implementation="dilated_sparse"``).
"""

__all__: list[str] = []
