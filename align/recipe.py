"""Recipes: YAML files plus command-line overrides, parsed into dataclasses with TRL's parser."""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path

import yaml
from trl import TrlParser

RECIPE_FILE = "recipe.yaml"


def parse_recipe(dataclass_types, argv: list[str] | None = None):
    """Parse `--config recipe.yaml [--key value ...]` into instances of `dataclass_types` (a tuple).

    Unknown keys in the YAML or on the command line are errors that name the key and the file."""
    argv = list(argv) if argv is not None else None
    config_path = None
    if argv is not None and "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise SystemExit("--config needs a path to a recipe YAML file")
        config_path = Path(argv[i + 1])
        if not config_path.is_file():
            raise SystemExit(f"recipe {config_path} not found (recipes live in recipes/<preset>/<stage>.yaml)")
        try:
            data = yaml.safe_load(config_path.read_text())
        except yaml.YAMLError as e:
            raise SystemExit(f"recipe {config_path} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise SystemExit(f"recipe {config_path} must be a YAML mapping of field: value")
    parser = TrlParser(dataclass_types)
    try:
        return parser.parse_args_and_config(args=argv)
    except ValueError as e:
        if "Unknown arguments from config file" in str(e):
            raise SystemExit(f"recipe {config_path}: {e}") from e
        raise


def save_recipe(out_dir: str | Path, *configs, extra: dict | None = None) -> Path:
    """Write the resolved recipe (every field of every config, after overrides) to out_dir/recipe.yaml."""
    resolved = {}
    for config in configs:
        for field in dataclasses.fields(config):
            value = getattr(config, field.name)
            if isinstance(value, enum.Enum):
                value = value.value
            if isinstance(value, Path):
                value = str(value)
            try:
                yaml.safe_dump(value)
            except yaml.YAMLError:
                value = str(value)
            resolved[field.name] = value
    resolved.update(extra or {})
    path = Path(out_dir) / RECIPE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(resolved, sort_keys=True))
    return path

