"""Reward functions for online RL: built-in rule-based rewards, and loading a user's own as `module:function`.

A reward function takes the generated `completions` (and the `prompts`, and every other column of the data as a
keyword argument of the same name, e.g. `reference`) and returns one float per completion — TRL's convention, so
functions written for TRL work unchanged.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import inspect
import re
from collections.abc import Callable

from tunelab.errors import TunelabError

RewardFunction = Callable[..., list[float]]
REQUIRED = ("completions",)


def normalise_answer(text: str) -> str:
    """Lower-case, single-spaced, without surrounding whitespace or a final full stop: how answers are compared."""
    return re.sub(r"\s+", " ", text).strip().rstrip(".").strip().lower()


def exact_match(completions: list[str], reference: list[str], **_) -> list[float]:
    """1.0 where the completion equals the reference answer (normalised), else 0.0."""
    return [float(normalise_answer(c) == normalise_answer(r)) for c, r in zip(completions, reference, strict=True)]


def known_answer(completions: list[str], reference: list[str], answers: list[list[str]] | None = None,
                 **_) -> list[float]:
    """Classification as generation: 1.0 for the right answer, 0.25 for another valid answer (a known label),
    0.0 for anything else. The valid answers are the `answers` column, else this batch's references."""
    if answers:
        valid = [{normalise_answer(a) for a in row} for row in answers]
    else:
        valid = [{normalise_answer(r) for r in reference}] * len(reference)
    return [1.0 if normalise_answer(c) == normalise_answer(r) else 0.25 if normalise_answer(c) in ok else 0.0
            for c, r, ok in zip(completions, reference, valid, strict=True)]


def brevity(completions: list[str], **_) -> list[float]:
    """1.0 for an answer of at most 8 words, falling linearly to 0 at 40 words: a simple format reward."""
    return [max(0.0, min(1.0, (40 - len(c.split())) / 32)) for c in completions]


BUILT_IN = {"exact_match": exact_match, "known_answer": known_answer, "brevity": brevity}


def load_reward_function(spec: str) -> RewardFunction:
    """A built-in reward by name, or `module:function` imported and checked; a clear TunelabError otherwise."""
    if spec in BUILT_IN:
        return BUILT_IN[spec]
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise TunelabError(f"reward.function '{spec}' is neither a built-in ({', '.join(BUILT_IN)}) nor "
                           f"'module:function'; write e.g. my_rewards:score")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TunelabError(f"reward.function '{spec}': cannot import module '{module_name}' ({exc}); put it on "
                           f"PYTHONPATH or in the folder you run tunelab from") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise TunelabError(f"reward.function '{spec}': module '{module_name}' has no function '{function_name}'")
    check_signature(function, spec)
    return function


def locate_reward_function(spec: str) -> None:
    """Check a reward spec without running any of its code: a built-in, or `module:function` whose module file can
    be found. For a process that must not run a recipe's code (the web board): importing runs the module's top
    level, so the import, the function and its signature are checked by the training process instead."""
    if spec in BUILT_IN:
        return
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise TunelabError(f"reward.function '{spec}' is neither a built-in ({', '.join(BUILT_IN)}) nor "
                           f"'module:function'; write e.g. my_rewards:score")
    if not module_file_exists(module_name):
        raise TunelabError(f"reward.function '{spec}': cannot find module '{module_name}'; put it on PYTHONPATH or "
                           f"in the folder you run tunelab from")


def module_file_exists(module_name: str) -> bool:
    """Whether a module can be found, importing nothing: `importlib.util.find_spec('a.b')` would import package
    `a` (running its __init__), so each part is looked up in its parent's folders instead."""
    parts = module_name.split(".")
    if not all(part.isidentifier() for part in parts):
        return False
    try:
        spec = importlib.util.find_spec(parts[0])  # a top-level name: looked up, not executed
        for depth in range(1, len(parts)):
            if spec is None or spec.submodule_search_locations is None:
                return False
            spec = importlib.machinery.PathFinder.find_spec(".".join(parts[:depth + 1]),
                                                           list(spec.submodule_search_locations))
    except (ImportError, ValueError):
        return False
    return spec is not None


def check_signature(function: Callable, spec: str) -> None:
    """Refuse a function that cannot take TRL's call: completions=…, prompts=…, and the data columns as keywords."""
    parameters = inspect.signature(function).parameters.values()
    names = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    takes_any_keyword = any(p.kind == p.VAR_KEYWORD for p in parameters)
    missing = [name for name in REQUIRED if name not in names]
    if missing or not takes_any_keyword:
        raise TunelabError(f"reward.function '{spec}' must accept `completions` and `**kwargs` (it is called as "
                           f"f(prompts=…, completions=…, <data columns>=…) and returns one float per completion); "
                           f"its signature is {function.__name__}{inspect.signature(function)}")

