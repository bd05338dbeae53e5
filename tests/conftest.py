import pytest

import bt_plugin
from bt_plugin import patching


@pytest.fixture(autouse=True)
def _plugin_off_after_each_test():
    """Every test starts and ends with the plugin disabled and from_pretrained unwrapped."""
    yield
    bt_plugin.disable()
    assert not patching.is_patched()
