"""The per-device choices, in one table: which kernel `auto` picks on a device type, and which
library the packed kernel's float32 CPU linears call on a CPU vendor. Read by
bt_plugin/kernels/__init__.py (`resolve_kernel_name`) and bt_plugin/kernels/linear.py."""

from __future__ import annotations

# What "auto" picks per device type. CPU: packed (measured by `python -m bt_plugin bench`; the
# fused C++ kernel loses much of its gain to nested-tensor conversions there). CUDA: fastpath,
# the published BetterTransformer path, until a GPU measurement says otherwise.
AUTO_KERNEL = {"cpu": "packed", "cuda": "fastpath"}
# ... and under torch.autocast (a user's, or precision="bf16"): the fused C++ kernel computes in
# its weights' dtype, so packed, whose ops autocast casts as it casts stock's.
AUTO_KERNEL_UNDER_AUTOCAST = {"cpu": "packed", "cuda": "packed"}
# The library of the packed kernel's float32 CPU linears, per CPU vendor (/proc/cpuinfo's
# vendor_id); any other: "torch" (F.linear, MKL). oneDNN on AMD EPYC: measured 10.4 -> 7.5 ms for a
# 14-token all-MiniLM-L6-v2 query on a 2-core AVX512 EPYC (bt_plugin/kernels/linear.py).
LINEAR_BY_CPU_VENDOR = {"AuthenticAMD": "onednn"}
