"""Small utilities shared by every OmniRay package (no heavy imports here)."""
