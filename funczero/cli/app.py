"""The ``funczero`` command: one Typer app, one sub-command per module."""

from __future__ import annotations

import typer

from funczero.cli.ckpt import ckpt_app
from funczero.cli.launch import LAUNCH_CONTEXT_SETTINGS, LaunchCommand, launch

__all__ = ["app", "main"]

app = typer.Typer(
    name="funczero",
    help="funczero: JAX-style functional training for PyTorch with DeepSpeed's ZeRO built in.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Help texts show grammar such as HOST[:SLOT]; rich markup would eat the brackets.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root() -> None:
    """funczero: JAX-style functional training for PyTorch with DeepSpeed's ZeRO built in."""


app.command("launch", cls=LaunchCommand, context_settings=LAUNCH_CONTEXT_SETTINGS)(launch)
app.add_typer(ckpt_app, name="ckpt")


def main() -> None:
    """Console entry point (``funczero = funczero.cli.app:main``)."""
    app()


if __name__ == "__main__":
    main()
