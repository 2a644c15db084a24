"""The bottom layer of a deployment: the fixed-budget KV buffer (C library + Python binding), its slot
specification in Python, and the reader that checks an export folder before anything runs."""
