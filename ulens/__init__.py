"""The `ulens` command: a thin dispatcher over the parts' commands, plus local services."""
