import pytest

import bt_plugin
from bt_plugin.loading import patching


@pytest.fixture(autouse=True)
def _plugin_off_after_each_test():
    """Every test starts and ends with the plugin disabled and from_pretrained unwrapped."""
    yield
    bt_plugin.disable()
    assert not patching.is_patched()


@pytest.fixture
def forget_private_ops():
    """For tests that monkeypatch a private torch operator: bt_plugin.kernels.torch_ops looks each
    up again after the patch (call `torch_ops.forget()` once it is in place) and after the test."""
    from bt_plugin.kernels import torch_ops

    torch_ops.forget()
    yield torch_ops
    torch_ops.forget()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny inputs: one intra-op thread avoids OpenMP spinning on a busy 2-core machine. Modules
    opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def hf_offline(monkeypatch):
    """No hub access: every model comes from a local directory. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("hf_offline")`."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    """A test parametrized with a `model_type` (or a `spec`) whose family this transformers version does not
    have (the registry skips it, `bt_plugin.loading.registry.absent_families`) is skipped with that
    reason; `tests/test_versions_and_races.py` checks such models stay stock with it."""
    from bt_plugin.loading import registry

    from bt_plugin.spec import EncoderSpec

    absent = registry.absent_families()
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        model_type, spec = params.get("model_type"), params.get("spec")
        reason = None
        if isinstance(model_type, str) and not registry.specs_for_model_type(model_type):
            reason = registry.absent_reason_for_model_type(model_type)
        elif isinstance(spec, EncoderSpec):
            reason = absent.get(spec.name)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
