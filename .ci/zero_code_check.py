"""Checks an installed bt_plugin: the .pth hook converts from_pretrained with BT_PLUGIN=1 and only then."""

import atexit
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

site = Path(sysconfig.get_paths()["purelib"])
assert (site / "bt_plugin.pth").is_file(), f"bt_plugin.pth missing from {site}"
assert not (site / "patches").exists(), "a top-level 'patches' package was installed"

from transformers import BertConfig, BertModel  # noqa: E402

directory = tempfile.mkdtemp(prefix="zero-code-")
atexit.register(shutil.rmtree, directory, ignore_errors=True)
BertModel(BertConfig(hidden_size=256, num_attention_heads=4, intermediate_size=512, num_hidden_layers=2)).save_pretrained(directory)

SCRIPT = f"""
import sys
from transformers import AutoModel
model = AutoModel.from_pretrained({directory!r})
print(type(model.encoder.layer[0]).__name__, "bt_plugin" in sys.modules, "wrapt" in sys.modules)
"""


def run(flag):
    env = {k: v for k, v in os.environ.items() if k != "BT_PLUGIN"}
    if flag is not None:
        env["BT_PLUGIN"] = flag
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()


assert run("1") == ["FusedBertLayer", "True", "True"], run("1")
assert run(None) == ["BertLayer", "False", "False"], run(None)
print(f"zero-code check passed ({sys.prefix})")
