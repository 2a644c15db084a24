"""Helpers shared by the console scripts."""

import click


def not_built_yet(command: str, issue: str) -> None:
    """Fail clearly for a command whose capability has not landed yet."""
    raise click.ClickException(
        f"{command} is not built yet: it arrives with the {issue} issue. "
        "Until then, the PyTorch reference is available as `cspkv.generate` (see README)."
    )
