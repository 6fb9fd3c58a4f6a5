"""The attention pattern library, one module per family of exporter spellings.

The matcher and its patterns arrive with the attention matcher (issue 4); this package exists so
the installed layout (``xattn_compiler.patterns``) is fixed from the start.
"""
