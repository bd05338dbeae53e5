"""Other engines as peer rows: ONNX Runtime on a `torch.onnx` export of stock's weights, OpenVINO on
an `openvino.convert_model` conversion of them (at float32, and at its default precision).

Each peer is timed in a process of its own (see runner.run_child): ONNX Runtime's and OpenVINO's
thread pools slow torch (and each other) down when they share a process. In that process torch
only loads the checkpoint, computes stock's reference output and exports the model, before any
timed run; the engine then runs the same cases, built from the same seed, on the benchmark's torch
thread count (ONNX Runtime with every graph optimization and intra-op spinning off, OpenVINO with
its latency hint).
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import torch
from torch import nn


PEERS: dict[str, str] = {
    "onnxruntime": "ONNX Runtime fp32 (torch.onnx.export(dynamo=True) of stock's model, ORT_ENABLE_ALL, "
                   "intra-op spinning off; a process of its own)",
    "openvino-f32": "OpenVINO fp32 (openvino.convert_model of stock's model, compiled for CPU with "
                    "INFERENCE_PRECISION_HINT f32 and the latency hint; a process of its own)",
    "openvino": "OpenVINO at its default precision, otherwise as openvino-f32: bf16 on CPUs with AMX or "
                "AVX512-BF16, else f32 (the row names what the compiled model reports; below f32, quality is "
                "the cosine of pooled outputs and the limit is measured in that dtype)",
}


PEER_PACKAGES = {"onnxruntime": ("onnxruntime", "onnx", "onnxscript"), "openvino-f32": ("openvino",),
                 "openvino": ("openvino",)}


def installed_peers() -> tuple[str, ...]:
    """The peers whose packages are installed (pip install 'bt-plugin[peers]')."""
    return tuple(name for name, packages in PEER_PACKAGES.items()
                 if all(importlib.util.find_spec(package) for package in packages))


def serves(shape) -> bool:
    """Whether a peer runs the shape: BERT-architecture encoders without an adapter (the exported
    graph is stock's whole model; a reranker's CrossEncoder and peft wrappers are not exported)."""
    return shape.config_class == "BertConfig" and not shape.adapter and not shape.reranker


class _Outputs(nn.Module):
    """A model whose forward returns its output tuple (what torch.onnx exports as graph outputs)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return output.last_hidden_state, output.pooler_output


class OnnxRuntimeModel(nn.Module):
    """An ONNX Runtime session called like the model it was exported from: `model(**batch)`
    returns `last_hidden_state` as a torch tensor."""

    def __init__(self, session):
        super().__init__()
        self.session = session
        self.inputs = [i.name for i in session.get_inputs()]

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        """`last_hidden_state`; a missing input is zeros (BERT's token types default to zero)."""
        ids = batch["input_ids"]
        feeds = {name: (batch[name] if name in batch else torch.zeros_like(ids)).numpy() for name in self.inputs}
        return torch.from_numpy(self.session.run(None, feeds)[0])


def onnxruntime_model(model: nn.Module, target: Path, threads: int | None) -> OnnxRuntimeModel:
    """Export `model` (batch and sequence dynamic, traced on a 2 x 16 batch: an example size of
    1 would be specialized) to `target` and open it in ONNX Runtime with `threads` intra-op
    threads (None: torch's count)."""
    import onnxruntime

    if not target.exists():
        batch, length = torch.export.Dim("batch", min=1), torch.export.Dim("length", min=1)
        names = ("input_ids", "attention_mask", "token_type_ids")
        ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        args = (ids, torch.ones_like(ids), torch.zeros_like(ids))
        with torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(_Outputs(model).eval(), args, str(target), dynamo=True, input_names=list(names),
                              output_names=["last_hidden_state", "pooler_output"],
                              dynamic_shapes={name: {0: batch, 1: length} for name in names}, verbose=False)
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return OnnxRuntimeModel(onnxruntime.InferenceSession(str(target), options, providers=["CPUExecutionProvider"]))


class OpenVinoModel(nn.Module):
    """A compiled OpenVINO model called like the model it was converted from: `model(**batch)`
    returns `last_hidden_state` as a torch tensor. `computes_in` is the precision the compiled
    model reports (`bf16`, `f32`): a reduced one is judged by cosine, as the bf16 precisions are."""

    def __init__(self, compiled):
        super().__init__()
        self.request = compiled.create_infer_request()  # one request, reused: a service's steady state
        self.inputs = [i.get_any_name() for i in compiled.inputs]
        self.computes_in = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        """`last_hidden_state` (copied out of the request); a missing input is zeros."""
        ids = batch["input_ids"]
        feeds = {name: (batch[name] if name in batch else torch.zeros_like(ids)).numpy() for name in self.inputs}
        return torch.from_numpy(self.request.infer(feeds, share_outputs=False)[0])


def openvino_model(model: nn.Module, threads: int | None, precision: str | None = None) -> OpenVinoModel:
    """Convert `model` (traced on a 2 x 16 batch with one padded row: traced on a mask of ones, a
    masking shortcut for unpadded batches would be the only path kept) and compile it for the CPU
    with `threads` inference threads (None: torch's count) at `precision` (None: OpenVINO's default)."""
    import openvino

    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings on Python branches over shapes
        converted = openvino.convert_model(_Outputs(model).eval(), example_input=(ids, mask, torch.zeros_like(ids)))
    config = {"INFERENCE_NUM_THREADS": threads or torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY"}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    return OpenVinoModel(openvino.compile_model(converted, "CPU", config))


def peer_model(name: str, model: nn.Module, workdir: Path, threads: int | None) -> nn.Module:
    """The named peer serving `model`'s forward (exported to files under `workdir`)."""
    if name == "onnxruntime":
        return onnxruntime_model(model, workdir / "model.onnx", threads)
    if name in ("openvino-f32", "openvino"):
        return openvino_model(model, threads, "f32" if name == "openvino-f32" else None)
    raise ValueError(f"unknown peer {name!r}; valid: {', '.join(PEERS)}")


# A peer's process: torch's OpenMP threads sleep after a parallel region instead of spinning,
# so stock's untimed reference forwards leave the peer's thread pool the cores.
PEER_PROCESS_ENVIRONMENT = {"OMP_WAIT_POLICY": "PASSIVE"}
