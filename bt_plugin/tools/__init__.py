"""Tools built on the runtime, through the public API and what little else each needs: the demo and
the command line (`cli.py`, `demo.py`), `check`, `doctor`, the offline text corpus (`corpus.py`)
and the benchmark (`bench/`). Nothing in `bt_plugin.loading`, `bt_plugin.dispatch` or
`bt_plugin.kernels` imports from here."""
