"""Per-architecture specs, installed as `bt_plugin.patches`.

One module per architecture family, each a short declarative `EncoderSpec` (`SPEC`) or a list of
them (`SPECS`). The built-in families are listed here and loaded from this package directly, so
they are found however bt_plugin was installed; third-party families arrive through the
entry-point group `bt_plugin.patches` (see `bt_plugin.loading.registry`).
"""

BUILTIN_FAMILIES = ("bert", "text", "vision", "audio", "seq2seq", "rotary", "relative", "decoder")
