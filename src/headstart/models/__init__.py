"""Models layer: backbones and where their weights come from, heads, freezing, the transfer model,
the inference fast path and the stored model format (model.json + model.safetensors)."""
