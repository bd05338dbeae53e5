"""How a load becomes a converted model.

- `patching.py`: wraps `PreTrainedModel.from_pretrained` / `_from_config` (wrapt) for `enable()`,
  `enabled()` and the zero-code flag, and converts what they return;
- `registry.py`: the architecture specs (`patches/`, entry points) by model type and version;
- `conversion.py`: `plan`, `convert`, `revert`: finds the encoder layer lists and swaps each layer's
  class for its fused class in place (same parameter objects);
- `report.py`: `explain`: per layer, fused or not and why, with its call counts.
"""
