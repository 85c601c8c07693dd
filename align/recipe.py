"""Recipes: YAML files plus command-line overrides, parsed into dataclasses with TRL's parser."""

from __future__ import annotations

import dataclasses
import difflib
import enum
import re
import sys
import types
import typing
from pathlib import Path

import yaml
from trl import TrlParser

RECIPE_FILE = "recipe.yaml"
# Other toolkits' names for options that are named otherwise here: (the option here, what to say)
OTHER_NAMES = {
    "gradient_accumulation_steps": ("micro_batch_size", "accumulation here follows from --micro_batch_size: "
                                    "steps = batch_size / (micro_batch_size x processes)"),
    "per_device_train_batch_size": ("micro_batch_size", "here it is --micro_batch_size"),
    "lr": ("learning_rate", "here it is --learning_rate"),
    "num_steps": ("max_steps", "here it is --max_steps"),
    "out": ("output_dir", "here it is --output_dir"),
}


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
    # No abbreviated flags: --max_step would be taken for --max_steps, while the same key in a recipe is refused.
    parser = RecipeParser(dataclass_types, prog=prog, allow_abbrev=False)
    try:
        return _parse(parser, argv)
    except ValueError as e:  # RecipeError, or a ValueError from a config's __post_init__ (TRL, transformers)
        sys.stderr.write(f"{prog}: error: {e}\n")  # one write: under a launch the ranks share stderr
        raise SystemExit(2) from None


def _parse(parser: RecipeParser, argv: list[str]):
    argv = [part for arg in argv for part in (arg.split("=", 1) if arg.startswith("--config=") else [arg])]
    flags, config_path, data = argv, None, {}
    if argv.count("--config") > 1:
        raise RecipeError("--config is given more than once: a run has one recipe (override its values with "
                          "--key value)")
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
            raise RecipeError("--config needs a path to a recipe YAML file")
        config_path = Path(argv[i + 1])
        flags = argv[:i] + argv[i + 2:]
        data = read_recipe(config_path)
        known = {action.dest for action in parser._actions} | {"env"}  # env: environment variables (TRL)
        unknown = [key for key in data if key not in known]
        if unknown:
            raise RecipeError(f"recipe {config_path}: unknown key(s) {', '.join(map(str, unknown))}"
                              f"{suggestions(parser, map(str, unknown), dashes='')}; check the spelling against "
                              f"`{parser.prog} --help`")
        check_types(parser.dataclass_types, data, config_path)
    # The flags alone first, so a typo is reported as such even when it also makes a config check fail.
    _, unknown = parser.parse_known_args(flags)
    if unknown:
        options = [a for a in unknown if a.startswith("-")]
        what = f"unknown option(s) {' '.join(options)}" if options else f"unexpected argument(s) {' '.join(unknown)}"
        names = (a.removeprefix("--").split("=", 1)[0] for a in options)
        raise RecipeError(f"{what}{suggestions(parser, names)}; see `{parser.prog} --help` for the options")
    try:
        return parser.parse_args_and_config(args=argv)
    except RecipeError as e:
        # The flags parsed cleanly above, so an argparse error now comes from a value in the recipe file.
        match = re.match(r"argument --([\w-]+)[^:]*: (.*)", str(e), re.DOTALL)
        field = f"field {match.group(1)}: {match.group(2)}" if match else str(e)
        raise RecipeError(f"recipe {config_path}: {field}") from None


def suggestions(parser: RecipeParser, names, dashes: str = "--") -> str:
    """' (did you mean --max_steps?)' for unknown option names close to, or other toolkits' names for, known ones;
    `dashes` is "" for recipe keys."""
    known = sorted(action.dest for action in parser._actions if action.dest != "help")
    hints = []
    for name in names:
        if name in OTHER_NAMES and OTHER_NAMES[name][0] in known:
            hints.append(f"for {dashes}{name}, {OTHER_NAMES[name][1].replace('--', dashes)}")
        elif close := difflib.get_close_matches(name, known, n=1, cutoff=0.8):
            hints.append(f"did you mean {dashes}{close[0]} for {dashes}{name}?")
    return f" ({'; '.join(hints)})" if hints else ""


def check_types(dataclass_types, data: dict, config_path: Path) -> None:
    """Refuse recipe values of the wrong type. argparse converts the strings it reads (from the command line, or
    a quoted YAML value), but YAML's own numbers, booleans, lists and nulls would reach the config unchecked:
    `max_steps: 2.5` would train 3 steps and `learning_rate: [1, 2]` fail deep inside the loop."""
    for cls in dataclass_types:
        try:
            hints = typing.get_type_hints(cls)
        except Exception:  # a third-party config whose annotations do not resolve: argparse's checks only
            continue
        for field in dataclasses.fields(cls):
            if field.name in data:
                problem = _type_problem(hints.get(field.name), data[field.name])
                if problem:
                    raise RecipeError(f"recipe {config_path}: field {field.name}: {problem}")


def _type_problem(annotation, value) -> str | None:
    """What is wrong with `value` for a field annotated `annotation` (int, float, bool, str, a list, or Optional of
    one); None when it fits, or when the annotation is anything else (left to the config's own checks)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(annotation)):
            return None
        if len(args) != 1:
            return None
        annotation = args[0]
    if typing.get_origin(annotation) is list:
        if isinstance(value, str):  # one item, which the config makes a list of
            return None
        if not isinstance(value, list):
            return f"expected a list, got {value!r}"
        item_type = (typing.get_args(annotation) or (None,))[0]
        for i, item in enumerate(value, start=1):
            if problem := _type_problem(item_type, item):
                return f"list item {i}: {problem}"
        return None
    expected = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(annotation)
    if expected is None or isinstance(value, str):  # a string is for argparse to convert (or refuse)
        return None
    fits = {
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        bool: isinstance(value, bool),
        str: False,
    }[annotation]
    return None if fits else f"expected {expected}, got {value!r}"


def read_recipe(path: Path) -> dict:
    """A recipe file's mapping of field: value, or a RecipeError naming the file."""
    if not path.is_file():
        raise RecipeError(f"recipe {path} not found (recipes live in recipes/<preset>/<stage>.yaml)")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise RecipeError(f"recipe {path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x}); save it as UTF-8") \
            from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a YAML mapping of field: value")
    return data


def save_recipe(out_dir: str | Path, *configs, notes: dict | None = None, skip: tuple[str, ...] = ()) -> Path:
    """Write the resolved recipe (every field of every config, after overrides, but those in `skip`) to
    out_dir/recipe.yaml, which is itself a recipe: `--config out_dir/recipe.yaml` repeats the run. `notes` (facts
    about the run, not settings) go in as comments."""
    resolved = {}
    for config in configs:
        for field in dataclasses.fields(config):
            if field.name in skip:
                continue
            value = getattr(config, field.name)
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                value = dataclasses.asdict(value)  # e.g. TRL's accelerator_config: a mapping in a recipe
            if isinstance(value, enum.Enum):
                value = value.value
            if isinstance(value, Path):
                value = str(value)
            try:
                yaml.safe_dump(value)
            except yaml.YAMLError:
                value = str(value)
            resolved[field.name] = value
    comments = "".join(f"# {key}: {value}\n" for key, value in (notes or {}).items())
    path = Path(out_dir) / RECIPE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(comments + yaml.safe_dump(resolved, sort_keys=True))
    return path
