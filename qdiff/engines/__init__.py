"""Engines: turn a quantized qdiff export (the single source of truth) into something another runtime executes."""
