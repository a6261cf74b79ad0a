"""Deploy layer: exports (ONNX, TorchScript, safetensors) checked for parity, batch prediction into
CSV files, and Ray Data callables for many machines."""
