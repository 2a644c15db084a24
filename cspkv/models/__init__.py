"""Model adapters: the LLaVA reference (llava), small config-built models (tiny), the default model."""
