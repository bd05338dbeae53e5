"""Specs for the seq2seq encoder families (filled in per architecture)."""

from bt_plugin.spec import EncoderSpec

SPECS: list[EncoderSpec] = []
