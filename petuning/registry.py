"""Registration of petuning's methods with PEFT.

PEFT resolves every method through four dictionaries keyed by a ``PeftType`` member (config class,
tuner class, prefix). ``PeftType`` is a closed ``str`` enum, and ``peft.utils.register_peft_method``
only accepts names that are already members, so an out-of-tree method first adds its own member
(``add_peft_type``) and then registers (``register_method``). Both steps are idempotent, so importing
petuning twice, or reloading a module, is harmless.

The enum extension relies on CPython's ``enum`` internals and on PEFT 0.21's tuner-level state-dict
hooks, so the supported PEFT range is checked here, once, with a clear message. The transformers/peft
pair is checked too: transformers' adapter API (``add_adapter``, ``load_adapter``) refuses a peft older
than its ``MIN_PEFT_VERSION``, which would otherwise surface deep inside ``load_adapter``.
"""

from __future__ import annotations

import warnings
from importlib.metadata import version as _installed_version

from packaging.version import Version

# Both ranges equal pyproject.toml's (a test checks it).
SUPPORTED_PEFT = (Version("0.21.0"), Version("0.22.0"))
"""Half-open range [low, high) of peft versions petuning is tested against."""
TESTED_TRANSFORMERS = (Version("5.20.0"), Version("5.24.0"))
"""Half-open range [low, high) of transformers versions petuning is tested against."""


class IncompatibleVersionsWarning(UserWarning):
    """The installed transformers and peft do not work together for part of their API."""


def check_peft_version(found: str | None = None) -> None:
    """Raise ``ImportError`` naming the installed and supported peft versions if they disagree."""
    found = found or _installed_version("peft")
    low, high = SUPPORTED_PEFT
    if not (low <= Version(found) < high):
        raise ImportError(
            f"petuning needs peft>={low},<{high} but peft {found} is installed. petuning extends peft's "
            f"PeftType enum and uses tuner-level state-dict hooks that only exist in this range. "
            f'Fix: pip install "peft>={low},<{high}".'
        )


def check_transformers_peft_pair(
    transformers_version: str | None = None, peft_version: str | None = None, min_peft: str | None = None
) -> str | None:
    """Warn (and return the message) if transformers' adapter API refuses the installed peft; else ``None``.

    ``min_peft`` is transformers' ``MIN_PEFT_VERSION`` for its adapter API, read from the installed transformers
    unless given; the three arguments exist so that a test can simulate a pair that is not installed.
    """
    transformers_version = transformers_version or _installed_version("transformers")
    peft_version = peft_version or _installed_version("peft")
    if min_peft is None:
        from transformers.integrations import peft as transformers_peft

        min_peft = getattr(transformers_peft, "MIN_PEFT_VERSION", None)
    if min_peft is None or Version(peft_version) >= Version(min_peft):
        return None
    low, high = TESTED_TRANSFORMERS
    message = (
        f"transformers {transformers_version} needs peft>={min_peft} for its adapter API (model.add_adapter, "
        f"model.load_adapter, from_pretrained of an adapter folder), but peft {peft_version} is installed, and "
        f"petuning supports peft>={SUPPORTED_PEFT[0]},<{SUPPORTED_PEFT[1]} only. get_peft_model and "
        f'PeftModel.from_pretrained still work. Fix: pip install "transformers>={low},<{high}".'
    )
    warnings.warn(message, IncompatibleVersionsWarning, stacklevel=3)
    return message


check_peft_version()
check_transformers_peft_pair()

from peft import mapping as peft_mapping  # noqa: E402
from peft.utils import PeftType, register_peft_method  # noqa: E402

_PEFT_MAPPINGS = (
    peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING,
    peft_mapping.PEFT_TYPE_TO_TUNER_MAPPING,
    peft_mapping.PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
    peft_mapping.PEFT_TYPE_TO_PREFIX_MAPPING,
)


def add_peft_type(name: str) -> PeftType:
    """Return ``PeftType[name]``, adding it to the enum first if it is not a member yet.

    ``name`` is upper case (``"SORSA"``); the member's value equals its name, as for PEFT's own members,
    so ``adapter_config.json`` stores ``"peft_type": "SORSA"`` and JSON strings compare equal to it.
    """
    if name != name.upper():
        raise ValueError(f"PeftType names are upper case, got {name!r}.")
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_names_.append(name)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    type.__setattr__(PeftType, name, member)  # EnumType.__setattr__ forbids rebinding members
    return member


def register_method(name: str, config_cls: type, model_cls: type) -> PeftType:
    """Register a method with PEFT under ``PeftType[name.upper()]`` and prefix ``name + "_"``.

    Idempotent, and a module reload replaces the stale classes. Refuses a name that another package already
    registered, and a prefix that another method already uses (PEFT's own uniqueness check compares against
    the dict keys, not the prefixes, so it never fires).
    """
    peft_type = add_peft_type(name.upper())
    prefix = f"{name}_"
    existing = peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if existing is config_cls:
        return peft_type
    if existing is not None:
        if (existing.__module__, existing.__qualname__) != (config_cls.__module__, config_cls.__qualname__):
            raise ValueError(
                f"The PEFT method name {name!r} is already registered by "
                f"{existing.__module__}.{existing.__qualname__}; choose another name."
            )
        for mapping in _PEFT_MAPPINGS:  # the same class re-created by a module reload: replace it
            mapping.pop(peft_type, None)
    clash = [str(t) for t, p in peft_mapping.PEFT_TYPE_TO_PREFIX_MAPPING.items() if p == prefix and t != peft_type]
    if clash:
        raise ValueError(f"Prefix {prefix!r} is already used by PEFT method(s) {clash}.")
    if getattr(model_cls, "prefix", prefix) != prefix:
        raise ValueError(f"{model_cls.__name__}.prefix must be {prefix!r} (PEFT rebuilds it from the peft_type).")
    register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=prefix)
    return peft_type
