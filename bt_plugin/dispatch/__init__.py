"""Where a call is dispatched: each call of a converted layer takes a kernel or the stock forward.

- `layer.py`: the fused layer (`FusedLayer`): decides per call, packs at the stack's first layer,
  runs the kernel, unpacks after the last, counts fused and fallback calls;
- `stack.py`: the encoder loop's frame (a `ContextVar`) that carries the packed tokens between layers;
- `calls.py`: a call's arguments by name, whatever the transformers version;
- `eligibility.py`, `masks.py`: the reasons a call or a layer cannot run fused;
- `heads.py`: whether a model's head reads padded positions;
- `activations.py`: the activation function a layer computes, by name.
"""
