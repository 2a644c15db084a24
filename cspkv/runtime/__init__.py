"""The bottom layer of a deployment: the fixed-budget KV buffer (C library + Python binding), its slot
specification in Python, the reader that checks an export folder before anything runs, and the export's
preprocessing (prompt text and images to model inputs), all without torch or transformers."""
