"""The New-run form, built from the recipe schema (src/tunelab/recipe.py: every field's default and help), and its
checking by tunelab's own validation, so the form and `tunelab validate` can never disagree.

The page sends every field as text; text is read the way a `dotted.key=value` override is (YAML: `3`, `1e-4`,
`[q, v]`, `null`), except plain-string fields, which are taken as typed (a run named `2024` stays a string).
"""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel

from tunelab.errors import TunelabError
from tunelab.recipe import METHOD_CLASSES, RECIPE_CLASSES, Recipe, load_recipe, model_class_of, validate_recipe

SECTION_TITLES = {"": "Run", "model": "Model", "data": "Data", "method": "Method", "train": "Training",
                  "eval": "Evaluation", "fewshot": "Few-shot", "preference": "Preference",
                  "reward": "Reward", "grpo": "GRPO", "output": "Output"}


def field_kind(annotation: Any) -> tuple[str, list[str] | None]:
    """How a field is edited: choice (with its choices), bool, text (a string) or yaml (numbers, lists, unions)."""
    options = [a for a in typing.get_args(annotation) if a is not type(None)] \
        if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union else [annotation]
    if len(options) == 1 and typing.get_origin(options[0]) is Literal:
        return "choice", [str(choice) for choice in typing.get_args(options[0])]
    if options == [bool]:
        return "bool", None
    if options == [str]:
        return "text", None
    return "yaml", None


def section_class(annotation: Any) -> type[BaseModel] | None:
    """The section class of a field that holds a section (directly or as `Section | None`)."""
    try:
        return model_class_of(annotation)
    except TypeError:
        return None


def section_fields(model: type[BaseModel], prefix: str, skip: tuple[str, ...] = ()) -> list[dict]:
    """The editable fields of a section, sub-sections flattened into dotted paths."""
    fields = []
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        path = f"{prefix}{name}"
        nested = section_class(info.annotation)
        if nested is not None:
            optional = not info.is_required() and info.default is None
            for sub in section_fields(nested, f"{path}."):
                fields.append({**sub, "optional_section": path if optional else sub.get("optional_section")})
            continue
        kind, choices = field_kind(info.annotation)
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        fields.append({"path": path, "kind": kind, "choices": choices, "required": info.is_required(),
                       "default": to_text(default, kind), "description": info.description or ""})
    return fields


def form_schema() -> dict:
    """The sections every task shares (top-level run fields first), each task's own sections and each method's
    fields, for the page to render: it shows the chosen task's sections and the chosen method's fields only."""
    shared = Recipe.model_fields
    sections = [{"name": "", "title": SECTION_TITLES[""], "fields": section_fields(Recipe, "", skip=tuple(
        name for name, info in shared.items() if section_class(info.annotation) or name == "method"))}]
    for name, info in shared.items():
        if name == "method":
            sections.append({"name": "method", "title": SECTION_TITLES["method"], "fields": [
                {"path": "method.name", "kind": "choice", "choices": list(METHOD_CLASSES), "required": False,
                 "default": "full", "description": "How weights are trained"}]})
        elif section_class(info.annotation):
            sections.append(section_of(name, info))
    tasks = {task: [section_of(name, info) for name, info in cls.model_fields.items() if name not in shared]
             for task, cls in RECIPE_CLASSES.items()}
    methods = {name: section_fields(cls, "method.", skip=("name",)) for name, cls in METHOD_CLASSES.items()}
    return {"sections": sections, "tasks": tasks, "methods": methods}


def section_of(name: str, info) -> dict:
    """One section of the form: its title, help and fields."""
    return {"name": name, "title": SECTION_TITLES.get(name, name), "description": info.description,
            "fields": section_fields(section_class(info.annotation), f"{name}.")}


def fields_for(task: str | None, method: str | None) -> dict[str, dict]:
    """The fields a recipe of `task` trained with `method` takes, by path (every task's and method's when unknown)."""
    schema = form_schema()
    fields = {field["path"]: field for section in schema["sections"] for field in section["fields"]}
    for name, sections in schema["tasks"].items():
        if task not in schema["tasks"] or name == task:
            fields.update({field["path"]: field for section in sections for field in section["fields"]})
    for name, method_fields in schema["methods"].items():
        if method not in schema["methods"] or name == method:
            fields.update({field["path"]: field for field in method_fields})
    return fields


def all_fields() -> dict[str, dict]:
    """Every field of the schema by path (each task's and each method's fields included)."""
    return fields_for(None, None)


def to_text(value: Any, kind: str) -> str:
    """A value as the form shows it."""
    if value is None:
        return ""
    if kind in ("text", "choice"):
        return str(value)
    if kind == "bool":
        return "true" if value else "false"
    return json.dumps(value, ensure_ascii=False)  # JSON is YAML: 3, 0.001, ["q", "v"]


def from_text(text: str, kind: str) -> Any:
    """A form value read back (None: left empty)."""
    text = text.strip()
    if text == "":
        return None
    if kind in ("text", "choice"):
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # the schema then names the field and what it expects


def recipe_values(recipe: dict) -> dict[str, str]:
    """A resolved recipe (as a dict) as the form's field texts."""
    values = {}
    method = recipe.get("method", {}).get("name") if isinstance(recipe.get("method"), dict) else recipe.get("method")
    for path, field in fields_for(recipe.get("task"), method).items():
        node: Any = recipe
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None or path.startswith("method."):
            values[path] = to_text(node, field["kind"])
    return values


def raw_recipe(values: dict[str, str]) -> dict:
    """The recipe dict the form's texts describe: only the chosen task's and method's fields; an optional section
    left empty or at its defaults is left out (e.g. eval.judge, data.replay); an empty required field is left out,
    so the schema names it as missing."""
    known = all_fields()
    fields = fields_for((values.get("task") or "").strip(), (values.get("method.name") or "full").strip())
    raw: dict = {}
    for path, text in values.items():
        if path not in known:
            raise TunelabError(f"the form sent an unknown field '{path}'")
        field = fields.get(path)
        if field is None:  # a field of another task or method, left over from an earlier choice
            continue
        value = from_text(text, field["kind"])
        if value is None and (field["required"] or field.get("optional_section")):
            continue
        if field.get("optional_section") and text.strip() == (field["default"] or "").strip():
            continue  # a default of an optional section (e.g. data.replay.fraction) alone does not ask for it
        node = raw
        parts = path.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return raw


def field_of(message: str, paths: list[str]) -> str | None:
    """The form field an error message names: the longest dotted path mentioned in it, or, when it names a whole
    section ('model' is required), that section's first field."""
    named = [path for path in paths if f"'{path}'" in message or f"{path} " in message or f"{path}:" in message
             or f"{path}." in message or message.rstrip().endswith(path)]
    if named:
        return max(named, key=len)
    return next((path for path in paths if "." in path and f"'{path.split('.')[0]}'" in message), None)


def check_form(values: dict[str, str]) -> tuple[Recipe | None, dict]:
    """Validate the form as `tunelab validate` would (schema, then data and model); (recipe, result for the page).

    Unlike `tunelab validate`, a reward function the recipe names is only located, never imported: importing runs
    the module's code, and the board's process must not run code a form names (the training process imports it,
    and refuses the run there if it does not fit)."""
    from tunelab import api
    from tunelab.data.sources import row_count

    try:
        recipe = validate_recipe(raw_recipe(values), source="recipe")
        data, source = api.check_recipe(recipe, import_code=False)
    except TunelabError as exc:
        message = str(exc)
        return None, {"ok": False, "error": message, "field": field_of(message, list(all_fields()))}
    except Exception as exc:  # noqa: BLE001 - the data and model loaders are libraries: whatever they raise on the
        # form's values (a NUL byte in a path, a corrupt file) is the form's error, not the board's crash
        return None, {"ok": False, "error": f"the recipe cannot be checked: {type(exc).__name__}: {exc}",
                      "field": None}
    return recipe, {"ok": True, "summary": f"{row_count(data.train) or 'streamed'} train rows, {len(data.eval)} eval "
                                           f"rows; model {source.location}"}


def example_names(examples_dir: Path) -> list[str]:
    """The recipes in examples/ (pipeline files, which hold stages rather than one recipe, are left out)."""
    names = []
    for path in sorted(examples_dir.glob("*.yaml")):
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(raw, dict) and "task" in raw:
            names.append(path.stem)
    return names


def template_values(examples_dir: Path, runs_index, kind: str, name: str) -> dict[str, str]:
    """The form's texts from an example recipe (examples/NAME.yaml) or an earlier run's recipe.yaml."""
    if kind == "example":
        try:
            path = (examples_dir / f"{name}.yaml").resolve()
            found = path.is_relative_to(examples_dir.resolve()) and path.is_file()
        except (OSError, RuntimeError, ValueError):  # a NUL byte, a symlink loop
            found = False
        if not found:
            raise TunelabError(f"no example {name!r}")
        return recipe_values(load_recipe(path).model_dump(mode="json"))
    if kind != "run":
        raise TunelabError(f"kind must be 'example' or 'run', not {kind!r}")
    run_dir = runs_index.resolve(name)
    return recipe_values(load_recipe(run_dir / "recipe.yaml").model_dump(mode="json"))
