"""Inference layer: a stored model (PyTorch or ONNX Runtime) run on images: predictions and logits."""
