"""Every option of a stage's config is reachable from its Python function and its command."""

from __future__ import annotations

import inspect
from dataclasses import fields

import pytest

import embedkit
from embedkit.cli import main
from embedkit.config import EncodeConfig, GenerateConfig, IndexConfig, RunOptions

# config fields that the API and the CLI spell differently, on purpose
API_NAMES = {"workers": "gpus"}  # --gpus all|N becomes a number of worker processes


def cli_params(command: str) -> set[str]:
    return {p.name for p in main.commands[command].params}


@pytest.mark.parametrize(("config", "api", "command"), [
    (EncodeConfig, embedkit.encode, "encode"),
    (IndexConfig, embedkit.build_index, "build-index"),
    (GenerateConfig, embedkit.generate, "generate"),
])  # fmt: skip
def test_every_config_option_is_an_argument_of_the_api_and_an_option_of_the_cli(config, api, command):
    stage = {f.name for f in fields(config) if f.name != "run"}
    run = {API_NAMES.get(f.name, f.name) for f in fields(RunOptions)}
    if config is not EncodeConfig:
        run -= {"gpus"}  # one device per task: build-index and generate scale out with --ray only
    names = {API_NAMES.get(n, n) for n in stage} | run
    api_args = set(inspect.signature(api).parameters)
    cli = cli_params(command) | {"progress"}  # --quiet is the CLI's progress switch
    assert names - api_args == set(), f"{api.__name__} lacks {sorted(names - api_args)}"
    assert names - cli == set(), f"embedkit {command} lacks {sorted(names - cli)}"
