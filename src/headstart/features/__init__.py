"""Features layer: pooled features of a frozen backbone computed once per image and cached on disk,
and the cached activation maps of a frozen prefix for fine-tuning the rest."""
