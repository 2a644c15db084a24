"""Models: the LLaVA reference (prefill, pruning, decoding), the static decoder the graphs trace, small
config-built models (tiny), the default model, and the prompt format (prompting)."""
