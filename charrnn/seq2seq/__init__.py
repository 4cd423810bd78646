"""Conditional generation: an encoder–decoder over pairs of lines, source -> target, with attention."""
