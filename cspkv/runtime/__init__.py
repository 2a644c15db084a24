"""The fixed-budget KV buffer (C library with a C API), its Python binding and the generation loop."""
