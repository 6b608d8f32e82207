"""xl-style domain configuration: `key = value` lines, validated key by key.

    # a.cfg
    name = "a"
    kernel = "pv-kernel.elf"        # relative paths are relative to this file
    memory = 32                     # MiB
    cmdline = "interactive"
    on_crash = "restart"            # destroy | restart | preserve

Strings are quoted ("..." or '...'), numbers are decimal and unquoted, `#` starts a
comment; as in xl, a value of the wrong type (memory = "32", name = 7) is a mistake.
`create` also takes `key=value` words after the file; there quotes are optional.
Every mistake is a ConfigError of one line that names the file, line and key.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from . import engines, files
from .builder import cmdline_problem
from .domain import MAX_MEMORY_MIB, MIN_MEMORY_MIB
from .errors import ConfigError

ACTIONS = ("destroy", "restart", "preserve")
MIN_MIB, MAX_MIB = MIN_MEMORY_MIB, MAX_MEMORY_MIB
NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
ELF_MAGIC = b"\x7fELF"
# xl configs are a few hundred bytes; anything near this is not one, and is not read.
MAX_CONFIG_BYTES = 64 << 10


@dataclass
class DomainConfig:
    """What `create` needs to build and run one domain, and what to do when it stops."""
    kernel: Path | None = None
    name: str | None = None              # None: the toolstack names it after the kernel
    memory: int = 64                     # MiB
    maxmem: int | None = None            # MiB; None: the same as memory
    cmdline: str = ""
    extra: str = ""                      # appended to cmdline, as xl does
    engine: str | None = None            # None: the best engine this host has
    vcpus: int = 1
    type: str | None = None              # "pv" or "pvh"; None: as the image's notes say
    ramdisk: Path | None = None          # a PVH guest's initramfs (hvm_start_info module 0)
    on_poweroff: str = "destroy"
    on_reboot: str = "restart"
    on_crash: str = "destroy"
    source: str = field(default="command line", compare=False)  # for messages

    @property
    def full_cmdline(self) -> str:
        return " ".join(part for part in (self.cmdline, self.extra) if part)


KEYS = tuple(f.name for f in fields(DomainConfig) if f.name != "source")


def _check_mib(key: str, value: int) -> int:
    if not MIN_MIB <= value <= MAX_MIB:
        raise ValueError(f"must be between {MIN_MIB} and {MAX_MIB} MiB")
    return value


def _check_choice(choices: tuple[str, ...]):
    def check(key: str, value: str) -> str:
        if value not in choices:
            raise ValueError(f"must be {', '.join(choices[:-1])} or {choices[-1]}")
        return value
    return check


def _check_name(key: str, value: str) -> str:
    if not NAME_RE.fullmatch(value):
        raise ValueError("must be 1-64 letters, digits, '_', '.' or '-', starting with a "
                         "letter or '_'")
    return value


def _check_engine(key: str, value: str) -> str:
    if value not in engines.ENGINES:
        raise ValueError(f"unknown engine (known: {', '.join(engines.ENGINES)})")
    return value


def _check_path(key: str, value: str) -> str:
    if not value:
        raise ValueError("must name a file")
    return value


def _check_vcpus(key: str, value: int) -> int:
    if value != 1:
        raise ValueError("trapless domains have exactly one vCPU")
    return value


def _check_type(key: str, value: str) -> str:
    if value not in ("pv", "pvh"):
        raise ValueError("trapless runs PV and PVH domains (type = \"pv\" or \"pvh\")")
    return value


# key -> (the type its value must have, a check that raises ValueError with the reason)
SCHEMA = {
    "name": (str, _check_name),
    "kernel": (str, _check_path),
    "memory": (int, _check_mib),
    "maxmem": (int, _check_mib),
    "cmdline": (str, lambda k, v: v),
    "extra": (str, lambda k, v: v),
    "engine": (str, _check_engine),
    "vcpus": (int, _check_vcpus),
    "type": (str, _check_type),
    "ramdisk": (str, lambda k, v: v),
    "on_poweroff": (str, _check_choice(ACTIONS)),
    "on_reboot": (str, _check_choice(ACTIONS)),
    "on_crash": (str, _check_choice(ACTIONS)),
}
assert set(SCHEMA) == set(KEYS)

_LINE = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*")
_STRING = re.compile(r"""("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')""")
_INT = re.compile(r"[+-]?\d+")


def _strip_comment(line: str) -> str:
    """The line without a `#` comment (a # inside quotes is text)."""
    quote, i = None, 0
    while i < len(line):
        ch = line[i]
        if quote:
            if ch == "\\":
                i += 1                  # the escaped character is text, whatever it is
            elif ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            return line[:i]
        i += 1
    return line


def _unquote(text: str) -> str:
    body = text[1:-1]
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)), body)


def _parse_value(where: str, key: str, text: str, bare_strings: bool):
    """A value as written: "string", 'string', 123; bare words only if bare_strings."""
    if _STRING.fullmatch(text):
        return _unquote(text)
    if _INT.fullmatch(text):
        if len(text) > 32:              # int() refuses thousands of digits anyway
            raise ConfigError(f"{where}: {key} = {text[:20]}...: number too long")
        return int(text)
    if text[:1] in "\"'":
        raise ConfigError(f"{where}: {key}: unterminated string {text}")
    if text.startswith("["):
        raise ConfigError(f"{where}: {key}: lists are not supported")
    if not text:
        raise ConfigError(f"{where}: {key}: no value after '='")
    if bare_strings:
        return text
    raise ConfigError(f"{where}: {key} = {text}: strings must be quoted (\"{text}\")")


def _known(where: str, key: str) -> None:
    if key not in SCHEMA:
        raise ConfigError(f"{where}: unknown key '{key}' (known: {', '.join(sorted(SCHEMA))})")


def _apply(cfg: DomainConfig, where: str, key: str, value, typed: bool = False) -> None:
    """Check value and set it. typed: it comes from a file, where quotes say what is a
    string; words typed after `create` have no types, so "32" may be a number there."""
    want, check = SCHEMA[key]
    if typed and not isinstance(value, want):
        if want is int:
            raise ConfigError(f"{where}: {key} = {value!r}: expected a whole number, "
                              f"not a string")
        raise ConfigError(f"{where}: {key} = {value}: strings must be quoted (\"{value}\")")
    if want is int and isinstance(value, str):
        if not _INT.fullmatch(value.strip()):
            raise ConfigError(f"{where}: {key} = {value!r}: expected a whole number")
        value = int(value)
    elif want is str and isinstance(value, int):
        value = str(value)             # name = 7 or cmdline = 3: text that happens to be digits
    try:
        value = check(key, value)
    except ValueError as e:
        raise ConfigError(f"{where}: {key} = {value!r}: {e}") from None
    if key in ("kernel", "ramdisk"):
        value = Path(value)
    setattr(cfg, key, value)


def parse_text(text: str, source: str = "config", base: Path | None = None,
               cfg: DomainConfig | None = None) -> DomainConfig:
    """Apply the `key = value` lines of text to cfg (a fresh DomainConfig if None)."""
    cfg = cfg or DomainConfig(source=source)
    for number, raw in enumerate(text.splitlines(), 1):
        line = _strip_comment(raw).strip().rstrip(";").strip()
        if not line:
            continue
        where = f"{source}:{number}"
        m = _LINE.fullmatch(line)
        if not m:
            raise ConfigError(f"{where}: expected `key = value`, got {line!r}")
        key, value = m.groups()
        _known(where, key)
        _apply(cfg, where, key, _parse_value(where, key, value, bare_strings=False), typed=True)
        if key == "kernel" and base is not None and not cfg.kernel.is_absolute():
            cfg.kernel = base / cfg.kernel
        if key == "ramdisk" and base is not None and not cfg.ramdisk.is_absolute():
            cfg.ramdisk = base / cfg.ramdisk
    return cfg


def apply_overrides(cfg: DomainConfig, words: list[str]) -> DomainConfig:
    """Apply `key=value` words typed after `create FILE`."""
    for word in words:
        key, eq, value = word.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"{word!r}: expected key=value")
        value = value.strip()
        _known("command line", key)
        parsed = _parse_value("command line", key, value, bare_strings=True) if value else ""
        _apply(cfg, "command line", key, parsed)
    return cfg


def finish(cfg: DomainConfig) -> DomainConfig:
    """Checks that need every key: a kernel that exists, maxmem against memory."""
    where = cfg.source
    if cfg.kernel is None:
        raise ConfigError(f"{where}: kernel: missing (kernel = \"path/to/image.elf\")")
    why = files.problem(cfg.kernel)
    if why:
        raise ConfigError(f"{where}: kernel = '{cfg.kernel}': {why}")
    why = cmdline_problem(cfg.full_cmdline)
    if why:
        raise ConfigError(f"{where}: {'cmdline + extra' if cfg.extra else 'cmdline'}: {why}")
    if cfg.ramdisk is not None:
        why = files.problem(cfg.ramdisk)
        if why:
            raise ConfigError(f"{where}: ramdisk = '{cfg.ramdisk}': {why}")
    if cfg.maxmem is not None and cfg.maxmem < cfg.memory:
        raise ConfigError(f"{where}: maxmem = {cfg.maxmem}: below memory ({cfg.memory} MiB)")
    return cfg


def load(path: str | Path, overrides: list[str] = ()) -> DomainConfig:
    """A DomainConfig from `create PATH [key=value ...]`: PATH is a config file or, if it
    is an ELF image, the kernel itself."""
    path = Path(path)
    with files.RegularFile(path, str(path), ConfigError) as f:
        head = f.read(len(ELF_MAGIC))
        is_elf = head == ELF_MAGIC
        if not is_elf and f.size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {f.size:,} bytes: not an ELF image, and config files "
                              f"above {MAX_CONFIG_BYTES >> 10} KiB are refused")
        raw = b"" if is_elf else head + f.read(MAX_CONFIG_BYTES)
    if is_elf:
        cfg = DomainConfig(kernel=path, source=str(path))
    else:
        try:
            text = raw.decode()
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: neither an ELF image nor a text config file (byte "
                              f"{raw[e.start]:#04x} at offset {e.start} is not UTF-8)") from None
        cfg = parse_text(text, str(path), base=path.parent)
    return finish(apply_overrides(cfg, list(overrides)))


def from_words(overrides: list[str]) -> DomainConfig:
    """A DomainConfig from `create key=value ...` alone (no file)."""
    return finish(apply_overrides(DomainConfig(), overrides))
