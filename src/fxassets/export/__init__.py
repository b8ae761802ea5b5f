"""The mobile_model stage (stage.py): fp32 ONNX export (onnx_export.py), int8 quantization (quantize.py) with the float
fallback (fallback.py), the .ort format (ort_format.py), latency, the grid and the model card. session.py holds the
ONNX Runtime session and tensor convention shared with the runtime."""
