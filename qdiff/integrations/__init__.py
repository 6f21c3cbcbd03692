"""Integrations with other libraries; each is imported explicitly (``import qdiff.integrations.diffusers``) and
registers itself there. ``import qdiff`` imports none of them."""
