"""Recipes: YAML files plus command-line overrides, parsed into dataclasses with TRL's parser."""

from __future__ import annotations

import dataclasses
import enum
import re
import sys
from pathlib import Path

import yaml
from trl import TrlParser

RECIPE_FILE = "recipe.yaml"


class RecipeError(ValueError):
    """A recipe file or command-line flag that cannot be used; the message names it and says what to do."""


class RecipeParser(TrlParser):
    """TrlParser whose argparse errors (a bad value, a missing one) are raised for parse_recipe to word, instead of
    printing the usage of every field (hundreds of lines for a TRL config) and exiting."""

    def error(self, message):
        raise RecipeError(message)


def parse_recipe(dataclass_types, argv: list[str] | None = None, prog: str = "align"):
    """Parse `--config recipe.yaml [--key value ...]` into instances of `dataclass_types` (a tuple).

    `prog` (e.g. "align sft") heads `--help` and error messages. A problem with the recipe or the flags (an unknown
    key or flag, a value of the wrong type, a config's own check failing) is printed as one line, `PROG: error:
    ...`, and ends the program with exit status 2, as argparse does."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = RecipeParser(dataclass_types, prog=prog)
    try:
        return _parse(parser, argv)
    except ValueError as e:  # RecipeError, or a ValueError from a config's __post_init__ (TRL, transformers)
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _parse(parser: RecipeParser, argv: list[str]):
    flags, config_path, data = argv, None, {}
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise RecipeError("--config needs a path to a recipe YAML file")
        config_path = Path(argv[i + 1])
        flags = argv[:i] + argv[i + 2:]
        data = read_recipe(config_path)
        known = {action.dest for action in parser._actions} | {"env"}  # env: environment variables (TRL)
        unknown = [key for key in data if key not in known]
        if unknown:
            raise RecipeError(f"recipe {config_path}: unknown key(s) {', '.join(map(str, unknown))}; check the "
                              f"spelling against `{parser.prog} --help`")
    # The flags alone first, so a typo is reported as such even when it also makes a config check fail.
    _, unknown = parser.parse_known_args(flags)
    if unknown:
        options = [a for a in unknown if a.startswith("-")]
        what = f"unknown option(s) {' '.join(options)}" if options else f"unexpected argument(s) {' '.join(unknown)}"
        raise RecipeError(f"{what}; see `{parser.prog} --help` for the options")
    try:
        return parser.parse_args_and_config(args=argv)
    except RecipeError as e:
        # The flags parsed cleanly above, so an argparse error now comes from a value in the recipe file.
        match = re.match(r"argument --([\w-]+)[^:]*: (.*)", str(e), re.DOTALL)
        field = f"field {match.group(1)}: {match.group(2)}" if match else str(e)
        raise RecipeError(f"recipe {config_path}: {field}") from None


def read_recipe(path: Path) -> dict:
    """A recipe file's mapping of field: value, or a RecipeError naming the file."""
    if not path.is_file():
        raise RecipeError(f"recipe {path} not found (recipes live in recipes/<preset>/<stage>.yaml)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a YAML mapping of field: value")
    return data


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
