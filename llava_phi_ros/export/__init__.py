"""ONNX export of LLaVA-Phi: the graphs (graphs.py) and `llava-phi export` (onnx_export.py)."""
