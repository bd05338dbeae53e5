"""Specs for the text encoder families (filled in per architecture)."""

from bt_plugin.spec import EncoderSpec

SPECS: list[EncoderSpec] = []
