"""Other engines as peer rows: ONNX Runtime on a `torch.onnx` export of stock's weights, OpenVINO on
an `openvino.convert_model` conversion of them (at float32, and at its default precision), and
`torch.compile` (inductor) on stock's model (float32, and cast to bf16), only when named: it compiles
each model for tens of seconds, in the untimed warm-up.

Each peer is timed in a process of its own (see runner.run_child): ONNX Runtime's and OpenVINO's
thread pools slow torch (and each other) down when they share a process. In that process torch
only loads the checkpoint, computes stock's reference output and exports the model, before any
timed run; the engine then runs the same cases, built from the same seed, on the benchmark's torch
thread count (ONNX Runtime with every graph optimization and intra-op spinning off, OpenVINO with
its latency hint).
"""

from __future__ import annotations

import copy
import importlib.util
import shutil
import time
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
    "inductor": "torch.compile of stock's model, fp32 (inductor with freezing: weights constant-folded and "
                "prepacked; cpp_wrapper; dynamic shapes); only when named; its compile is the untimed warm-up, "
                "its seconds in the row's name",
    "inductor-bf16": "as inductor, on stock's model cast to bf16, with max-autotune (inductor's C++ GEMM "
                     "templates: AMX or AVX512-BF16 micro-kernels where the CPU has them)",
}


PEER_PACKAGES = {"onnxruntime": ("onnxruntime", "onnx", "onnxscript"), "openvino-f32": ("openvino",),
                 "openvino": ("openvino",), "inductor": (), "inductor-bf16": ()}
# Peers that run on torch's own thread pool (their process keeps the candidates' OpenMP settings) and
# compile C++ (a compiler must be on PATH); timed only when `--peers` names them: tens of seconds of
# compile per model.
COMPILING_PEERS = ("inductor", "inductor-bf16")
CXX_COMPILERS = ("g++", "c++", "clang++")


def installed_peers() -> tuple[str, ...]:
    """The peers this machine can run: their packages installed (pip install 'bt-plugin[peers]'),
    and a C++ compiler on PATH for the compiling ones."""
    compiler = any(shutil.which(name) for name in CXX_COMPILERS)
    return tuple(name for name, packages in PEER_PACKAGES.items()
                 if all(importlib.util.find_spec(package) for package in packages)
                 and (compiler or name not in COMPILING_PEERS))


def default_peers() -> tuple[str, ...]:
    """The peers a benchmark runs when `--peers` is not given: the installed ones that do not compile."""
    return tuple(name for name in installed_peers() if name not in COMPILING_PEERS)


def peer_environment(name: str) -> dict[str, str]:
    """Environment variables of a peer's process (PEER_PROCESS_ENVIRONMENT for the engines with thread
    pools of their own; none for those that run on torch's)."""
    return {} if name in COMPILING_PEERS else PEER_PROCESS_ENVIRONMENT


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


class CompiledModel(nn.Module):
    """`torch.compile` (inductor) of stock's model, called like it: `model(**batch)` returns
    `last_hidden_state` as float32. Each new shape class compiles on its first call (`warm_up` makes
    those calls, untimed, and keeps their seconds); `computes_in` is `f32` or `bf16`."""

    def __init__(self, model: nn.Module, precision: str):
        super().__init__()
        self.computes_in = precision
        self.model = copy.deepcopy(model).to(torch.bfloat16) if precision == "bf16" else model
        options = {"freezing": True, "cpp_wrapper": True, "max_autotune": precision == "bf16"}
        self.compiled = torch.compile(self.model, dynamic=True, options=options)
        self.warm_up_s = 0.0

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        """`last_hidden_state` (float32)."""
        return self.compiled(**batch).last_hidden_state.float()

    def warm_up(self, batches: list[dict]) -> None:
        """Call each batch once (what compiles), adding the seconds to `warm_up_s`."""
        start = time.perf_counter()
        with torch.inference_mode():
            for batch in batches:
                self(**batch)
        self.warm_up_s += time.perf_counter() - start


def peer_model(name: str, model: nn.Module, workdir: Path, threads: int | None) -> nn.Module:
    """The named peer serving `model`'s forward (exported to files under `workdir`)."""
    if name == "onnxruntime":
        return onnxruntime_model(model, workdir / "model.onnx", threads)
    if name in ("openvino-f32", "openvino"):
        return openvino_model(model, threads, "f32" if name == "openvino-f32" else None)
    if name in COMPILING_PEERS:
        return CompiledModel(model.eval(), "bf16" if name == "inductor-bf16" else "f32")
    raise ValueError(f"unknown peer {name!r}; valid: {', '.join(PEERS)}")


# A peer's process: torch's OpenMP threads sleep after a parallel region instead of spinning,
# so stock's untimed reference forwards leave the peer's thread pool the cores.
PEER_PROCESS_ENVIRONMENT = {"OMP_WAIT_POLICY": "PASSIVE"}
