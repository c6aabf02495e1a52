"""The contract of an ONNX export folder, shared by the writer (dslm.onnx_export, torch) and the
reader (dslm_local.onnx_model, ONNX Runtime) without importing either."""

ONNX_NAME = "model.onnx"
DATA_NAME = ONNX_NAME + ".data"
"""The graph's weights, beside it (ONNX's external data: ONNX Runtime maps the file)."""
INPUT_NAMES = ("input_ids", "past_keys", "past_values")
OUTPUT_NAMES = ("logits", "present_keys", "present_values")
"""The graph's inputs and outputs, in order (shapes in dslm/onnx_export.py). The cache is two
stacked tensors, (n_layer, B, n_head, P, head_dim) each, not Optimum's per-layer
past_key_values.N.key / present.N.key: a client holds two arrays."""
WEIGHTS_KEY = "dslm_onnx_weights"
"""config.json's record of the weights' precision: "fp32" or "int8"."""
