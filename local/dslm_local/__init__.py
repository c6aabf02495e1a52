"""Local inference for dslm models without torch: decoding settings and stop rules shared with
dslm-generate (decoding), an ONNX export with its KV cache (onnx_model), and dslm-complete."""
