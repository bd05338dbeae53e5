"""Other engines as peer rows: ONNX Runtime on a `torch.onnx` export of stock's weights.

A peer is timed in a process of its own (see runner.run_child): ONNX Runtime's thread pool slows
torch down when both live in one process. In that process torch only loads the checkpoint,
computes stock's reference output and exports the model, before any timed run; ONNX Runtime then
runs the same cases, built from the same seed, with every graph optimization, intra-op spinning off
and the benchmark's torch thread count.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn


PEERS: dict[str, str] = {
    "onnxruntime": "ONNX Runtime fp32 (torch.onnx.export(dynamo=True) of stock's model, ORT_ENABLE_ALL, "
                   "intra-op spinning off; a process of its own)",
}


PEER_PACKAGES = {"onnxruntime": ("onnxruntime", "onnx", "onnxscript")}


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


def peer_model(name: str, model: nn.Module, workdir: Path, threads: int | None) -> nn.Module:
    """The named peer serving `model`'s forward (exported to files under `workdir`)."""
    if name == "onnxruntime":
        return onnxruntime_model(model, workdir / "model.onnx", threads)
    raise ValueError(f"unknown peer {name!r}; valid: {', '.join(PEERS)}")


# A peer's process: torch's OpenMP threads sleep after a parallel region instead of spinning,
# so stock's untimed reference forwards leave the peer's thread pool the cores.
PEER_PROCESS_ENVIRONMENT = {"OMP_WAIT_POLICY": "PASSIVE"}
