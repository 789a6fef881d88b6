"""Load generation and comparisons against peer servers."""
