"""Per-architecture specs, installed as `bt_plugin.patches` and registered as entry points.

One module per architecture family, each a short declarative `EncoderSpec`.
"""
