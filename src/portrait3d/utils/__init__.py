"""Small shared helpers (image conversion and atomic file output)."""
