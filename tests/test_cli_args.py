"""funczero.cli_args.add_config_arguments: the flags launchers and DeepSpeed command lines pass."""

from __future__ import annotations

import argparse

import pytest

from funczero.cli_args import add_config_arguments


def test_launcher_and_deepspeed_spellings_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    parser = add_config_arguments(argparse.ArgumentParser(), default_config="default.json")
    args = parser.parse_args([])
    assert (args.local_rank, args.config, args.deepspeed) == (None, "default.json", False)
    for argv in (
        ["--local_rank=3", "--deepspeed", "--deepspeed_config", "ds.json"],
        ["--local-rank", "3", "--config", "ds.json"],
        ["--deepspeed-config=ds.json", "--local_rank", "3"],
    ):
        args = parser.parse_args(argv)
        assert (args.local_rank, args.config) == (3, "ds.json"), argv


def test_local_rank_defaults_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert add_config_arguments(argparse.ArgumentParser()).parse_args([]).local_rank == 2
    monkeypatch.setenv("LOCAL_RANK", "two")
    with pytest.raises(ValueError, match="LOCAL_RANK='two' in the environment is not an integer"):
        add_config_arguments(argparse.ArgumentParser())


def test_options_the_script_already_defines_are_kept() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=-1)  # the usual DeepSpeed script
    add_config_arguments(parser)
    assert parser.parse_args([]).local_rank == -1
    assert parser.parse_args(["--local-rank", "1"]).local_rank == 1  # the other spelling added


def test_an_option_defined_for_something_else_is_an_error() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", dest="model_config")
    with pytest.raises(ValueError, match="already defines --config with dest='model_config'"):
        add_config_arguments(parser)


def test_unknown_flags_are_still_rejected() -> None:
    parser = add_config_arguments(argparse.ArgumentParser(prog="train.py"))
    with pytest.raises(SystemExit):
        parser.parse_args(["--local_rnak", "1"])
