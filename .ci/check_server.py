"""Run the README's Infinity server command verbatim (the SERVER_COMMAND environment variable, through
bash), then check what the README claims: it serves embeddings over HTTP, and its model was converted
(the server's log says `layers fused`). Stops the server in every case; exit status 0 or 1."""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

START_S = 240


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # bash and the server it started
    except ProcessLookupError:
        pass


def main(command: str) -> int:
    port = int(re.search(r"--port[ =](\d+)", command).group(1))
    name = re.search(r"--served-model-name[ =](\S+)", command).group(1)
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    server = subprocess.Popen(["bash", "-c", command], stdout=log, stderr=subprocess.STDOUT,
                              env=dict(os.environ, HF_HUB_OFFLINE="1"), start_new_session=True)
    try:
        deadline = time.monotonic() + START_S
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                print(open(log.name).read()[-4000:])
                print("server check FAILED: the server did not start")
                return 1
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                time.sleep(1)
        body = json.dumps({"model": name, "input": ["The README's server command, run as written."]}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/embeddings", data=body,
                                         headers={"Content-Type": "application/json"})
        embedding = json.loads(urllib.request.urlopen(request, timeout=120).read())["data"][0]["embedding"]
    finally:
        _signal_group(server.pid, signal.SIGINT)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            _signal_group(server.pid, signal.SIGKILL)
    text = open(log.name).read()
    fused = re.search(r"(\d+)/(\d+)\s+layers fused \((\w+)\)", text)
    if not embedding or not fused or fused.group(1) != fused.group(2):
        print(text[-4000:])
        print("server check FAILED: no embedding, or the model was not converted")
        return 1
    print(f"server check passed: {len(embedding)}-dim embedding served, {fused.group(0)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(os.environ["SERVER_COMMAND"]))
