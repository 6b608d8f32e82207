"""Errors a user can cause. Caught once at the command line and printed as one line;
anything else that escapes is a bug in trapless."""


class TraplessError(Exception):
    """Base of every user-facing error: bad image, bad option, missing /dev/kvm ..."""


class ImageError(TraplessError):
    """The guest image is malformed or does not fit the domain."""


class ConfigError(TraplessError):
    """A bad option, config key or value."""


class EngineError(TraplessError):
    """The engine cannot run here (no /dev/kvm, KVM refused a request ...)."""


class DomainError(TraplessError):
    """A Domain used the wrong way: started twice, used after destroy() ..."""
