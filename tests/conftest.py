import pytest

import bt_plugin
from bt_plugin import patching


@pytest.fixture(autouse=True)
def _plugin_off_after_each_test():
    """Every test starts and ends with the plugin disabled and from_pretrained unwrapped."""
    yield
    bt_plugin.disable()
    assert not patching.is_patched()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny inputs: one intra-op thread avoids OpenMP spinning on a busy 2-core machine. Modules
    opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
