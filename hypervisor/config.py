"""xl-style domain configuration: `key = value` lines, validated key by key.

    # a.cfg
    name = "a"
    kernel = "pv-kernel.elf"        # relative paths are relative to this file
    memory = 32                     # MiB
    cmdline = "interactive"
    on_crash = "restart"            # destroy | restart | preserve
    disk = [ 'format=raw, vdev=xvda, access=rw, target=disk.img' ]
    vif = [ 'mac=00:16:3e:00:00:01, bridge=xenbr0' ]

Strings are quoted ("..." or '...'), numbers are decimal and unquoted, `#` starts a
comment; a list is [ 'string', ... ] and may span lines (`disk` and `vif` take one); as in
xl, a value of the wrong type (memory = "32", name = 7) is a mistake.
`create` also takes `key=value` words after the file; there quotes are optional, and
`disk=SPEC` adds one disk, `vif=SPEC` one network card.
Every mistake is a ConfigError of one line that names the file, line and key.

A disk spec is xl's (docs/misc/xl-disk-configuration.txt): comma-separated `key=value`
items (format, vdev, access, devtype) and positional ones in the order target, format,
vdev, access ('disk.img,raw,xvda,rw'); `target=` takes the rest of the spec, commas and
all. trapless's backend serves raw images of regular files as whole disks (xvdX).

A vif spec is xl's (docs/misc/xl-network-configuration.5): comma-separated `key=value`
items; trapless takes mac (six hex bytes; default: Xen's OUI 00:16:3e and three random
bytes, as libxl makes one), bridge (the software bridge inside trapless it plugs into;
default xenbr0) and type=vif. Card N of the list is device N (vif/N in xenstore).
"""
from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from . import engines, files
from .builder import cmdline_problem
from .domain import MAX_MEMORY_MIB, MAX_VCPUS, MIN_MEMORY_MIB
from .errors import ConfigError

ACTIONS = ("destroy", "restart", "preserve")
MIN_MIB, MAX_MIB = MIN_MEMORY_MIB, MAX_MEMORY_MIB
NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
ELF_MAGIC = b"\x7fELF"
# xl configs are a few hundred bytes; anything near this is not one, and is not read.
MAX_CONFIG_BYTES = 64 << 10


@dataclass(frozen=True)
class Disk:
    """One disk the domain sees as a Xen virtual block device."""
    target: Path                         # the raw image
    vdev: str                            # the name the guest is told: xvda, xvdb, ...
    devid: int                           # xenstore's number for vdev (xvda: 51712)
    readonly: bool
    spec: str = field(default="", compare=False)    # as written, for messages


# xl's names for the things a spec may say (the values trapless serves first)
DISK_FORMATS = ("raw",)
DISK_ACCESS = {"rw": False, "w": False, "ro": True, "r": True}
DISK_POSITIONAL = ("target", "format", "vdev", "access")
DISK_KEYS = DISK_POSITIONAL + ("devtype",)
XVD_RE = re.compile(r"xvd([a-z]{1,3})")
XVD_MAJOR = 202                          # Xen's block major: devid = 202 << 8 | disk << 4
XVD_EXT = 1 << 28                        # disks 16 and up: the extended numbering
XVD_MAX_DISKS = 1 << 20


def vdev_devid(vdev: str) -> int:
    """The device number Xen's tools give vdev (xenstore's vbd/<devid>), or ValueError.
    xvd letters count as a=0 .. z=25, aa=26, ... (libxl_device.c's "xvd" rule); only
    whole disks: trapless's backend does not serve partitions."""
    m = XVD_RE.fullmatch(vdev)
    if not m:
        raise ValueError(f"vdev={vdev}: expected a whole Xen virtual disk (xvda, xvdb, ...)")
    index = 0
    for ch in m.group(1):
        index = index * 26 + (ord(ch) - ord("a") + 1)
    index -= 1
    if index >= XVD_MAX_DISKS:
        raise ValueError(f"vdev={vdev}: beyond Xen's {XVD_MAX_DISKS} disks")
    return (XVD_MAJOR << 8 | index << 4) if index < 16 else XVD_EXT | index << 8


def parse_disk(spec: str, base: Path | None = None) -> Disk:
    """A Disk from one xl disk spec (ValueError saying what is wrong); a relative target
    is relative to base (the config file's directory), as kernel is."""
    values: dict[str, str] = {}
    rest, positional = spec, 0
    while rest.strip():
        item, comma, after = rest.partition(",")
        item = item.strip()
        key, eq, value = item.partition("=")
        key = key.strip()
        if eq and key == "target":       # the rest of the spec, commas and all
            value, after = (value + comma + after).strip(), ""
        elif eq:
            if key not in DISK_KEYS:
                raise ValueError(f"unknown parameter '{key}' (known: {', '.join(DISK_KEYS)})")
            value = value.strip()
        else:
            if positional >= len(DISK_POSITIONAL):
                raise ValueError(f"'{item}': more than {len(DISK_POSITIONAL)} positional "
                                 f"parameters ({', '.join(DISK_POSITIONAL)})")
            key, value = DISK_POSITIONAL[positional], item
            positional += 1
        if key in values:
            raise ValueError(f"{key} given twice")
        values[key] = value
        rest = after
    fmt = values.get("format", "raw") or "raw"
    if fmt not in DISK_FORMATS:
        raise ValueError(f"format={fmt}: trapless serves raw images only")
    if values.get("devtype", "disk") != "disk":
        raise ValueError(f"devtype={values['devtype']}: trapless serves disks only")
    access = values.get("access", "rw") or "rw"
    if access not in DISK_ACCESS:
        raise ValueError(f"access={access}: must be rw or ro")
    if "vdev" not in values:
        raise ValueError("no vdev (vdev=xvda)")
    target = values.get("target", "")
    if not target:
        raise ValueError("no target (target=path/to/disk.img)")
    path = Path(target)
    if base is not None and not path.is_absolute():
        path = base / path
    return Disk(target=path, vdev=values["vdev"], devid=vdev_devid(values["vdev"]),
                readonly=DISK_ACCESS[access], spec=spec)


@dataclass(frozen=True)
class Vif:
    """One network card the domain sees as a Xen virtual network device."""
    mac: str                             # aa:bb:cc:dd:ee:ff, lower case
    bridge: str                          # the software bridge it is plugged into
    devid: int = 0                       # its number: its place in the vif list
    spec: str = field(default="", compare=False)

    @property
    def mac_bytes(self) -> bytes:
        return bytes(int(x, 16) for x in self.mac.split(":"))


VIF_KEYS = ("mac", "bridge", "type")
VIF_DEFAULT_BRIDGE = "xenbr0"           # libxl's default
XEN_OUI = (0x00, 0x16, 0x3E)            # the MAC prefix of Xen's cards
MAC_RE = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}")
BRIDGE_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")    # a Linux interface name (IFNAMSIZ - 1)


def random_mac() -> str:
    """A MAC as libxl makes one: Xen's OUI, then three random bytes, the first below 0x80."""
    r = random.SystemRandom()
    tail = (r.randrange(0x80), r.randrange(0x100), r.randrange(0x100))
    return ":".join(f"{b:02x}" for b in XEN_OUI + tail)


def parse_vif(spec: str, devid: int) -> Vif:
    """A Vif from one xl vif spec (ValueError saying what is wrong)."""
    values: dict[str, str] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq:
            raise ValueError(f"'{item}': expected key=value")
        if key not in VIF_KEYS:
            if key in ("script", "ip", "vifname", "model", "rate", "backend", "gatewaydev"):
                raise ValueError(f"{key}=: trapless does not take it (its network is a "
                                 f"bridge inside trapless; it takes {', '.join(VIF_KEYS)})")
            raise ValueError(f"unknown parameter '{key}' (known: {', '.join(VIF_KEYS)})")
        if key in values:
            raise ValueError(f"{key} given twice")
        values[key] = value
    if values.get("type", "vif") != "vif":
        raise ValueError(f"type={values['type']}: trapless's cards are PV (type=vif)")
    mac = values.get("mac") or random_mac()
    if not MAC_RE.fullmatch(mac):
        raise ValueError(f"mac={mac}: expected six hex bytes (00:16:3e:01:02:03)")
    if int(mac[:2], 16) & 1:
        raise ValueError(f"mac={mac}: a multicast address (its first byte is odd)")
    bridge = values.get("bridge") or VIF_DEFAULT_BRIDGE
    if not BRIDGE_RE.fullmatch(bridge):
        raise ValueError(f"bridge={bridge}: expected 1-15 letters, digits, '_', '.' or '-'")
    return Vif(mac=mac.lower(), bridge=bridge, devid=devid, spec=spec)


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
    maxvcpus: int | None = None          # None: the same as vcpus
    type: str | None = None              # "pv" or "pvh"; None: as the image's notes say
    ramdisk: Path | None = None          # an initramfs (PVH module 0, PV mod_start)
    on_poweroff: str = "destroy"
    on_reboot: str = "restart"
    on_crash: str = "destroy"
    disk: list[Disk] = field(default_factory=list)
    vif: list[Vif] = field(default_factory=list)
    source: str = field(default="command line", compare=False)  # for messages

    @property
    def vcpu_count(self) -> int:
        """The vCPUs the domain has: maxvcpus, else vcpus (as xl: the rest of maxvcpus
        beyond vcpus start offline, and here every vCPU but 0 starts down)."""
        return self.maxvcpus if self.maxvcpus is not None else self.vcpus

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
    if not 1 <= value <= MAX_VCPUS:
        raise ValueError(f"must be between 1 and {MAX_VCPUS}")
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
    "maxvcpus": (int, _check_vcpus),
    "type": (str, _check_type),
    "ramdisk": (str, lambda k, v: v),
    "on_poweroff": (str, _check_choice(ACTIONS)),
    "on_reboot": (str, _check_choice(ACTIONS)),
    "on_crash": (str, _check_choice(ACTIONS)),
    "disk": (list, None),                # parse_disk, with the file's directory
    "vif": (list, None),                 # parse_vif
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
        if SCHEMA.get(key, (None,))[0] is list:
            return _parse_list(where, key, text)
        raise ConfigError(f"{where}: {key}: lists are not supported")
    if not text:
        raise ConfigError(f"{where}: {key}: no value after '='")
    if bare_strings:
        return text
    raise ConfigError(f"{where}: {key} = {text}: strings must be quoted (\"{text}\")")


def _list_open(text: str) -> bool:
    """Does text start a list its `]` does not close yet (a ] inside quotes is text)?"""
    return "]" not in _STRING.sub("", text)


def _parse_list(where: str, key: str, text: str) -> list[str]:
    """[ 'a', "b", ] -> ["a", "b"]: quoted strings only, as xl's lists of specs are."""
    body = text[1:].strip()
    items: list[str] = []
    while True:
        if body.startswith("]"):
            if body[1:].strip():
                raise ConfigError(f"{where}: {key}: {body[1:].strip()!r} after the list")
            return items
        m = _STRING.match(body)
        if not m:
            raise ConfigError(f"{where}: {key}: expected a quoted string in the list, got "
                              f"{body[:20]!r}")
        items.append(_unquote(m.group(1)))
        body = body[m.end():].strip()
        if body.startswith(","):
            body = body[1:].strip()
        elif not body.startswith("]"):
            raise ConfigError(f"{where}: {key}: expected ',' or ']' after {m.group(1)}")


def _apply_disks(cfg: DomainConfig, where: str, specs: list[str], base: Path | None) -> None:
    for spec in specs:
        try:
            cfg.disk.append(parse_disk(spec, base))
        except ValueError as e:
            raise ConfigError(f"{where}: disk = {spec!r}: {e}") from None


def _apply_vifs(cfg: DomainConfig, where: str, specs: list[str]) -> None:
    for spec in specs:
        try:
            cfg.vif.append(parse_vif(spec, len(cfg.vif)))
        except ValueError as e:
            raise ConfigError(f"{where}: vif = {spec!r}: {e}") from None


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
    lines = list(enumerate(text.splitlines(), 1))
    while lines:
        number, raw = lines.pop(0)
        line = _strip_comment(raw).strip().rstrip(";").strip()
        if not line:
            continue
        where = f"{source}:{number}"
        m = _LINE.fullmatch(line)
        if not m:
            raise ConfigError(f"{where}: expected `key = value`, got {line!r}")
        key, value = m.groups()
        _known(where, key)
        while value.startswith("[") and _list_open(value):      # a list goes on
            if not lines:
                raise ConfigError(f"{where}: {key}: the list has no closing ']'")
            value += " " + _strip_comment(lines.pop(0)[1]).strip()
        value = value.rstrip(";").strip()
        parsed = _parse_value(where, key, value, bare_strings=False)
        if key == "disk":
            if not isinstance(parsed, list):
                raise ConfigError(f"{where}: disk: expected a list (disk = [ 'spec', ... ])")
            cfg.disk = []
            _apply_disks(cfg, where, parsed, base)
            continue
        if key == "vif":
            if not isinstance(parsed, list):
                raise ConfigError(f"{where}: vif: expected a list (vif = [ 'spec', ... ])")
            cfg.vif = []
            _apply_vifs(cfg, where, parsed)
            continue
        _apply(cfg, where, key, parsed, typed=True)
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
        if key == "disk":               # one spec (or a list of them) more
            specs = _parse_list("command line", key, value) if value.startswith("[") \
                else [value]
            _apply_disks(cfg, "command line", specs, None)
            continue
        if key == "vif":                # one card (or a list of them) more
            specs = _parse_list("command line", key, value) if value.startswith("[") \
                else [value]
            _apply_vifs(cfg, "command line", specs)
            continue
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
    if cfg.maxvcpus is not None and cfg.maxvcpus < cfg.vcpus:
        raise ConfigError(f"{where}: maxvcpus = {cfg.maxvcpus}: below vcpus ({cfg.vcpus})")
    seen: set[int] = set()
    for disk in cfg.disk:
        why = files.problem(disk.target) or (
            None if os.access(disk.target, os.R_OK if disk.readonly else os.R_OK | os.W_OK)
            else "cannot open it for " + ("reading" if disk.readonly else "reading and writing"))
        if why:
            raise ConfigError(f"{where}: disk = {disk.spec!r}: target '{disk.target}': {why}")
        if disk.devid in seen:
            raise ConfigError(f"{where}: disk = {disk.spec!r}: a second disk named {disk.vdev}")
        seen.add(disk.devid)
    macs: set[str] = set()
    for vif in cfg.vif:
        if vif.mac in macs:
            raise ConfigError(f"{where}: vif = {vif.spec!r}: a second card with mac {vif.mac}")
        macs.add(vif.mac)
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
