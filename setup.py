"""Adds bt_plugin.pth to editable installs (wheels get it through package-data)."""

from pathlib import Path

from setuptools import setup
from setuptools.command.editable_wheel import editable_wheel

PTH = Path(__file__).parent / "bt_plugin.pth"


class _StrategyWithPth:
    """Wraps setuptools' editable strategy so the editable wheel also carries bt_plugin.pth."""

    def __init__(self, strategy):
        self._strategy = strategy

    def __enter__(self):
        self._strategy.__enter__()
        return self

    def __exit__(self, *exc_info):
        return self._strategy.__exit__(*exc_info)

    def __call__(self, wheel, files, mapping):
        self._strategy(wheel, files, mapping)
        wheel.writestr(PTH.name, PTH.read_bytes())


class EditableWheelWithPth(editable_wheel):
    def _select_strategy(self, *args, **kwargs):
        return _StrategyWithPth(super()._select_strategy(*args, **kwargs))


setup(cmdclass={"editable_wheel": EditableWheelWithPth})
