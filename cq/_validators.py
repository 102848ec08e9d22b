"""attrs validators shared by the config records; each raises ConfigError naming the field."""

from __future__ import annotations

from .errors import ConfigError

__all__ = ["one_of", "positive_int", "optional_positive_int"]


def one_of(options: tuple, *, optional: bool = False, what: str = ""):
    """Validator: the value is one of ``options`` (or ``None`` when ``optional``)."""

    def check(instance, attribute, value):
        if value is None and optional:
            return
        if value not in options:
            raise ConfigError(f"{what or attribute.name}={value!r} is not one of {list(options)}")

    return check


def positive_int(instance, attribute, value):
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{attribute.name}={value!r} must be a positive integer such as 128")


def optional_positive_int(instance, attribute, value):
    if value is not None:
        positive_int(instance, attribute, value)


def backend(value):
    """Converter: a :class:`cq.kernels.Backend` from its name, or a ConfigError listing the names."""
    from .kernels import Backend

    try:
        return Backend(value)
    except ValueError:
        raise ConfigError(f"backend={value!r} must be one of {[b.value for b in Backend]}; "
                          "use 'auto' to let cq choose") from None
