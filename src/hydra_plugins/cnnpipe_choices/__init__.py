"""An unknown choice of a config group, kept for cnnpipe's schema to name (unknown_choice.py)."""
