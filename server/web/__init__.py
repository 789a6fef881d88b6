"""The chat page (page.py serves it; its sources are in the repository's web/)."""
