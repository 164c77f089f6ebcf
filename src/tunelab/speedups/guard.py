"""Whether a speed-up may run here: the library versions it was checked against, and the internals it relies on.

Each speed-up reaches into something its library does not promise to keep: TRL's private tile functions and module
constants (fused_head.py, whose wrappers copy the signatures of TRL's `_forward_tile` and `_backward_tile`), peft's
`lora.Linear` attributes (fused_lora.py), transformers' attention-function calling convention and the Trainer's
`_get_train_sampler` hook (fast_dropout.py, packed_attention.py, batch_order.py). pyproject.toml allows any
trl < 2, peft < 0.30 and transformers < 6, so instead of pinning them each speed-up module declares
`CHECKED_WITH` (library → [lowest, first unchecked) version, the range its equivalence tests passed on) and
`missing_internals()` (the names it needs that the installed library lacks). Outside that range, or with a name
missing, or when the module cannot even import, the speed-up is not applied: the run takes the library's own path
and says so once per process (a console line, and a warning that a run records in log.jsonl).

To extend a range: run the speed-up's equivalence tests (tests/test_<module>.py) on the new version and raise its
`CHECKED_WITH` bound.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from importlib import metadata
from types import ModuleType

from packaging.version import Version

from tunelab.console import say

_warned: set[str] = set()  # speed-ups whose fallback was reported in this process


class SpeedupFallbackWarning(UserWarning):
    """A speed-up was left out because the installed library is not one it was checked against."""


def installed_version(library: str) -> str:
    """The version of a library as it reports itself once imported (`trl.__version__`), else as installed."""
    module = sys.modules.get(library)
    return str(module.__version__) if module is not None else metadata.version(library)


def unchecked_versions(checked_with: dict[str, tuple[str, str]]) -> list[str]:
    """'trl 1.17.0 (checked: >=1.16,<1.17)' for each library whose installed version is outside its range."""
    found = []
    for library, (lowest, first_unchecked) in checked_with.items():
        version = installed_version(library)
        if not Version(lowest) <= Version(version) < Version(first_unchecked):
            found.append(f"{library} {version} (checked: >={lowest},<{first_unchecked})")
    return found


def usable(name: str) -> ModuleType | None:
    """The speed-up module `tunelab.speedups.<name>` when it may be applied here, else None (reported once)."""
    try:
        module = importlib.import_module(f"{__package__}.{name}")
    except (ImportError, AttributeError) as exc:  # a library internal it imports is gone
        return fall_back(name, f"it could not import what it uses ({exc})")
    unchecked = unchecked_versions(module.CHECKED_WITH)
    if unchecked:
        return fall_back(name, f"it was not checked with {', '.join(unchecked)}")
    missing = module.missing_internals()
    if missing:
        return fall_back(name, f"the installed libraries lack {', '.join(missing)}")
    return module


def fall_back(name: str, reason: str) -> None:
    """Report, once per process, that speed-up `name` is left out and why; return None (no module to apply)."""
    if name not in _warned:
        _warned.add(name)
        message = f"tunelab: speed-up {name} is off: {reason}; tunelab takes the library's own path"
        say(message)
        warnings.warn(message, SpeedupFallbackWarning, stacklevel=3)
    return None
