"""The tools built on the library: the demo, the benchmark and the database checks.

The library never imports this package; only ``writeturn.cli`` does (and the
``writeturn.bench`` re-export), so the library's modules stay free of the tools' code.
"""
