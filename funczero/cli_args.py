"""``add_config_arguments``: the command-line flags a training script needs under a launcher.

``funczero launch`` (and ``deepspeed``) pass ``--local_rank=N`` to every worker unless
``--no_local_rank``, and DeepSpeed command lines name the config with ``--deepspeed_config``
(plus ``--deepspeed`` to switch DeepSpeed on). A script that does not accept these flags dies
with "unrecognized arguments"; this adds them to its parser, as ``deepspeed.add_config_arguments``
does. Only the standard library is imported, so a script's ``--help`` stays fast.

Example:
    >>> import argparse
    >>> parser = add_config_arguments(argparse.ArgumentParser(), default_config="ds.json")
    >>> args = parser.parse_args(["--local_rank=1", "--deepspeed_config", "zero3.json"])
    >>> args.local_rank, args.config
    (1, 'zero3.json')
    >>> parser.parse_args(["--local-rank", "0", "--config", "a.json", "--deepspeed"]).config
    'a.json'
"""

from __future__ import annotations

import argparse
import os

__all__ = ["add_config_arguments"]

# The first option string of each is the one --help lists first.
_LOCAL_RANK_OPTIONS = ("--local_rank", "--local-rank")
_CONFIG_OPTIONS = ("--config", "--deepspeed_config", "--deepspeed-config")
_DEEPSPEED_OPTIONS = ("--deepspeed",)


def _environment_local_rank() -> int | None:
    value = os.environ.get("LOCAL_RANK")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"add_config_arguments: LOCAL_RANK={value!r} in the environment is not an integer; "
            "unset it or start the script through `funczero launch` or torchrun"
        ) from None


def _missing_options(
    parser: argparse.ArgumentParser, options: tuple[str, ...], dest: str
) -> list[str]:
    """The option strings not yet defined; raise if one is defined for another purpose."""
    # argparse has no public lookup of defined options; this mapping is stable since Python 2.7.
    defined = parser._option_string_actions
    for option in options:
        action = defined.get(option)
        if action is not None and action.dest != dest:
            raise ValueError(
                f"add_config_arguments: the parser already defines {option} with "
                f"dest={action.dest!r}, but funczero needs it for {dest!r}; rename your option "
                f"(e.g. --model_{action.dest}) so {option} can name the {dest.replace('_', ' ')}"
            )
    return [option for option in options if option not in defined]


def add_config_arguments(
    parser: argparse.ArgumentParser, *, default_config: str | None = None
) -> argparse.ArgumentParser:
    """Add ``--local_rank`` and the config flags to ``parser``, in a "funczero" group.

    * ``--local_rank N`` / ``--local-rank N`` (``args.local_rank``): what launchers pass;
      defaults to the ``LOCAL_RANK`` environment variable, else ``None``. funczero itself
      reads the rank from the environment (:func:`funczero.init_distributed`).
    * ``--config PATH`` / ``--deepspeed_config PATH`` / ``--deepspeed-config PATH``
      (``args.config``): the DeepSpeed-style JSON config; defaults to ``default_config``.
    * ``--deepspeed`` (``args.deepspeed``): accepted so DeepSpeed command lines run unchanged;
      it changes nothing.

    Options the parser already defines with the same meaning (same ``dest``) are left as they
    are, so a script that declares ``--local_rank`` itself can still call this.

    Args:
        parser: the script's parser.
        default_config: ``args.config`` when no config flag is given.

    Returns:
        ``parser`` (as ``deepspeed.add_config_arguments`` does).

    Raises:
        ValueError: the parser defines one of these options for something else, or
            ``LOCAL_RANK`` in the environment is not an integer.
    """
    # Every check before any change, so a refused parser is left as it was.
    local_rank = _missing_options(parser, _LOCAL_RANK_OPTIONS, "local_rank")
    config = _missing_options(parser, _CONFIG_OPTIONS, "config")
    deepspeed = _missing_options(parser, _DEEPSPEED_OPTIONS, "deepspeed")
    local_rank_default = _environment_local_rank() if local_rank else None
    group = parser.add_argument_group("funczero", "flags set by launchers and DeepSpeed scripts")
    if local_rank:
        group.add_argument(
            *local_rank,
            dest="local_rank",
            type=int,
            default=local_rank_default,
            metavar="N",
            help="this process's rank on its node, as launchers pass it "
            "(default: $LOCAL_RANK)",
        )
    if config:
        group.add_argument(
            *config,
            dest="config",
            default=default_config,
            metavar="PATH",
            help="DeepSpeed-style JSON config"
            # argparse %-formats help strings
            + (f" (default: {default_config.replace('%', '%%')})" if default_config else ""),
        )
    if deepspeed:
        group.add_argument(
            *deepspeed,
            dest="deepspeed",
            action="store_true",
            help="accepted for DeepSpeed command lines; has no effect",
        )
    return parser
