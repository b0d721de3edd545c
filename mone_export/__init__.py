"""mone-export: prune Mixture-of-Experts LLMs with MoNE and export them to ONNX Runtime."""
