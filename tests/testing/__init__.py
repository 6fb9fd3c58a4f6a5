"""Tests of xattn_compiler.testing (the graph builders)."""
