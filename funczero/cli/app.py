"""The ``funczero`` command: one Typer app, one sub-command per module."""

from __future__ import annotations

import typer

from funczero.cli.ckpt import ckpt_app
from funczero.cli.config_check import config_app
from funczero.cli.env import env
from funczero.cli.estimate import estimate_command
from funczero.cli.plot import plot
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


def _print_version(value: bool) -> None:
    if value:
        import funczero

        typer.echo(f"funczero {funczero.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", "-V", is_eager=True, callback=_print_version,
        help="Print the funczero version and exit.",
    ),
) -> None:
    """funczero: JAX-style functional training for PyTorch with DeepSpeed's ZeRO built in."""


app.command("launch", cls=LaunchCommand, context_settings=LAUNCH_CONTEXT_SETTINGS)(launch)
app.add_typer(ckpt_app, name="ckpt")
app.add_typer(config_app, name="config")
app.command("env")(env)
app.command("estimate")(estimate_command)
app.command("plot")(plot)


def main() -> None:
    """Console entry point (``funczero = funczero.cli.app:main``)."""
    app()


if __name__ == "__main__":
    main()
