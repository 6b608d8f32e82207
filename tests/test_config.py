"""xl-style config files: what parses, and the one-line error for each kind of mistake."""
from pathlib import Path

import pytest

from hypervisor import config
from hypervisor.errors import ConfigError


@pytest.fixture
def kernel(tmp_path) -> Path:
    path = tmp_path / "k.elf"
    path.write_bytes(b"\x7fELF" + bytes(60))     # only its existence and magic matter here
    return path


def write(tmp_path, text: str, name: str = "d.cfg") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_full_config_parses_with_comments_quotes_and_relative_kernel(tmp_path, kernel):
    cfg = config.load(write(tmp_path, """
# a domain for the demo
name = "web-1"            # quoted strings
kernel = 'k.elf'          # relative to the config file
memory = 32
maxmem = 32
cmdline = "interactive # not a comment"
extra = "quiet"
engine = "kvm"
vcpus = 1
type = "pv"
on_poweroff = "preserve"
on_reboot = "destroy"
on_crash = "restart";
"""))
    assert cfg.name == "web-1"
    assert cfg.kernel == kernel
    assert (cfg.memory, cfg.maxmem, cfg.engine) == (32, 32, "kvm")
    assert cfg.full_cmdline == "interactive # not a comment quiet"
    assert (cfg.on_poweroff, cfg.on_reboot, cfg.on_crash) == ("preserve", "destroy", "restart")


def test_defaults_follow_xl(tmp_path, kernel):
    cfg = config.load(write(tmp_path, 'kernel = "k.elf"\n'))
    assert (cfg.name, cfg.memory, cfg.cmdline, cfg.engine) == (None, 64, "", None)
    assert (cfg.on_poweroff, cfg.on_reboot, cfg.on_crash) == ("destroy", "restart", "destroy")


def test_an_elf_image_is_its_own_config_and_words_override(kernel):
    cfg = config.load(kernel, ["name=a", "memory=16", 'cmdline="interactive ticks=5"',
                               "on_crash=preserve"])
    assert (cfg.kernel, cfg.name, cfg.memory) == (kernel, "a", 16)
    assert cfg.cmdline == "interactive ticks=5"
    assert cfg.on_crash == "preserve"


def test_words_alone_make_a_config(kernel):
    cfg = config.from_words([f"kernel={kernel}", "name=solo"])
    assert (cfg.kernel, cfg.name) == (kernel, "solo")


@pytest.mark.parametrize("text, message", [
    ('memroy = 32\n', "d.cfg:1: unknown key 'memroy' (known: cmdline, disk, engine, extra, "
                      "kernel, maxmem, maxvcpus, memory, name, on_crash, on_poweroff, on_reboot, "
                      "ramdisk, type, vcpus, vif)"),
    ('vif = "mac=00:16:3e:00:00:01"\n', "d.cfg:1: vif: expected a list (vif = [ 'spec', ... ])"),
    ("vif = [ 'mac=01:16:3e:00:00:01' ]\n", "d.cfg:1: vif = 'mac=01:16:3e:00:00:01': "
     "mac=01:16:3e:00:00:01: a multicast address (its first byte is odd)"),
    ("vif = [ 'mac=00:16:3e:00:00' ]\n", "d.cfg:1: vif = 'mac=00:16:3e:00:00': "
     "mac=00:16:3e:00:00: expected six hex bytes (00:16:3e:01:02:03)"),
    ("vif = [ 'bridge=a-very-long-bridge-name' ]\n", "d.cfg:1: vif = "
     "'bridge=a-very-long-bridge-name': bridge=a-very-long-bridge-name: expected 1-15 "
     "letters, digits, '_', '.' or '-'"),
    ("vif = [ 'script=vif-bridge' ]\n", "d.cfg:1: vif = 'script=vif-bridge': script=: trapless "
     "does not take it (its network is a bridge inside trapless; it takes mac, bridge, type)"),
    ("vif = [ 'model=e1000' ]\n", "d.cfg:1: vif = 'model=e1000': model=: trapless does not "
     "take it (its network is a bridge inside trapless; it takes mac, bridge, type)"),
    ("vif = [ 'colour=red' ]\n", "d.cfg:1: vif = 'colour=red': unknown parameter 'colour' "
     "(known: mac, bridge, type)"),
    ("vif = [ 'type=ioemu' ]\n", "d.cfg:1: vif = 'type=ioemu': type=ioemu: trapless's cards "
     "are PV (type=vif)"),
    ("vif = [ 'bridge' ]\n", "d.cfg:1: vif = 'bridge': 'bridge': expected key=value"),
    ("vif = [ 'bridge=a, bridge=b' ]\n", "d.cfg:1: vif = 'bridge=a, bridge=b': bridge given twice"),
    ('kernel = "k.elf"\nvif = [ "mac=00:16:3e:00:00:01", "mac=00:16:3E:00:00:01,bridge=b" ]\n',
     "d.cfg: vif = 'mac=00:16:3E:00:00:01,bridge=b': a second card with mac 00:16:3e:00:00:01"),
    ('name = x\n', 'd.cfg:1: name = x: strings must be quoted ("x")'),
    ('\n\non_crash = "reboot"\n', "d.cfg:3: on_crash = 'reboot': must be destroy, restart or "
                                  "preserve"),
    ('memory = 2\n', "d.cfg:1: memory = 2: must be between 4 and 3838 MiB"),
    ('memory = "lots"\n', "d.cfg:1: memory = 'lots': expected a whole number, not a string"),
    ('memory = "32"\n', "d.cfg:1: memory = '32': expected a whole number, not a string"),
    ('name = 7\n', 'd.cfg:1: name = 7: strings must be quoted ("7")'),
    ('memory = 32.5\n', 'd.cfg:1: memory = 32.5: strings must be quoted ("32.5")'),
    ('just words\n', "d.cfg:1: expected `key = value`, got 'just words'"),
    ('name = "a b"\n', "d.cfg:1: name = 'a b': must be 1-64 letters, digits, '_', '.' or '-', "
                       "starting with a letter or '_'"),
    ('cmdline = "open\n', 'd.cfg:1: cmdline: unterminated string "open'),
    ('kernel = "k.elf"\ndisk = [ "x" ]\n', "d.cfg:2: disk = 'x': no vdev (vdev=xvda)"),
    ('disk = "x,raw,xvda"\n', "d.cfg:1: disk: expected a list (disk = [ 'spec', ... ])"),
    ('disk = [ "x,raw,xvda"\n', "d.cfg:1: disk: the list has no closing ']'"),
    ('disk = [ x ]\n', "d.cfg:1: disk: expected a quoted string in the list, got 'x ]'"),
    ('disk = [ "a,raw,xvda" "b" ]\n', "d.cfg:1: disk: expected ',' or ']' after \"a,raw,xvda\""),
    ('disk = [ "x,qcow2,xvda" ]\n', "d.cfg:1: disk = 'x,qcow2,xvda': format=qcow2: trapless "
                                    "serves raw images only"),
    ('disk = [ "x,raw,xvda,rx" ]\n', "d.cfg:1: disk = 'x,raw,xvda,rx': access=rx: must be rw or ro"),
    ('disk = [ "x,raw,hda" ]\n', "d.cfg:1: disk = 'x,raw,hda': vdev=hda: expected a whole Xen "
                                 "virtual disk (xvda, xvdb, ...)"),
    ('disk = [ "x,raw,xvda2" ]\n', "d.cfg:1: disk = 'x,raw,xvda2': vdev=xvda2: expected a whole "
                                   "Xen virtual disk (xvda, xvdb, ...)"),
    ('disk = [ "vdev=xvda, size=3, target=x" ]\n', "d.cfg:1: disk = 'vdev=xvda, size=3, target=x': "
     "unknown parameter 'size' (known: target, format, vdev, access, devtype)"),
    ('disk = [ "x,raw,xvda,rw,more" ]\n', "d.cfg:1: disk = 'x,raw,xvda,rw,more': 'more': more "
     "than 4 positional parameters (target, format, vdev, access)"),
    ('disk = [ "vdev=xvda, vdev=xvdb, target=x" ]\n', "d.cfg:1: disk = 'vdev=xvda, vdev=xvdb, "
     "target=x': vdev given twice"),
    ('disk = [ "vdev=xvda, devtype=cdrom, target=x" ]\n', "d.cfg:1: disk = 'vdev=xvda, "
     "devtype=cdrom, target=x': devtype=cdrom: trapless serves disks only"),
    ('kernel = "k.elf"\ndisk = [ "none.img,raw,xvda" ]\n', "d.cfg: disk = 'none.img,raw,xvda': "
     "target '{dir}/none.img': no such file"),
    ('kernel = "k.elf"\ndisk = [ ".,raw,xvda" ]\n', "d.cfg: disk = '.,raw,xvda': target '{dir}': "
     "is a directory"),
    ('kernel = "k.elf"\ndisk = [ "k.elf,raw,xvda", "vdev=xvda,target=k.elf" ]\n',
     "d.cfg: disk = 'vdev=xvda,target=k.elf': a second disk named xvda"),
    ('memory = [ 1 ]\n', "d.cfg:1: memory: lists are not supported"),
    ('vcpus = 33\n', "d.cfg:1: vcpus = 33: must be between 1 and 32"),
    ('vcpus = 0\n', "d.cfg:1: vcpus = 0: must be between 1 and 32"),
    ('kernel = "k.elf"\nvcpus = 4\nmaxvcpus = 2\n', "d.cfg: maxvcpus = 2: below vcpus (4)"),
    ('type = "hvm"\n', 'd.cfg:1: type = \'hvm\': trapless runs PV and PVH domains (type = "pv" '
                        'or "pvh")'),
    ('engine = "qemu"\n', "d.cfg:1: engine = 'qemu': unknown engine (known: kvm"),
    ('name = "x"\n', 'd.cfg: kernel: missing (kernel = "path/to/image.elf")'),
    ('kernel = "nope.elf"\n', "d.cfg: kernel = '{dir}/nope.elf': no such file"),
    ('kernel = "k.elf"\nmemory = 64\nmaxmem = 32\n', "d.cfg: maxmem = 32: below memory (64 MiB)"),
])
def test_each_mistake_is_one_line_naming_file_line_and_key(tmp_path, kernel, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        config.load(path)
    expected = f"{tmp_path}/" + message.format(dir=tmp_path)
    assert "\n" not in str(e.value)
    if message.startswith("d.cfg:1: engine"):       # the list of engines grows with the tree
        assert str(e.value).startswith(expected)
    else:
        assert str(e.value) == expected


@pytest.mark.parametrize("words, message", [
    (["memory=x"], "command line: memory = 'x': expected a whole number"),
    (["foo"], "'foo': expected key=value"),
    (["=3"], "'=3': expected key=value"),
    (["colour=red"], "command line: unknown key 'colour'"),
    (["on_poweroff=explode"], "command line: on_poweroff = 'explode': must be destroy, restart "
                              "or preserve"),
    (["vif=mac=00:16:3e:00:00:0g"], "command line: vif = 'mac=00:16:3e:00:00:0g': "
     "mac=00:16:3e:00:00:0g: expected six hex bytes (00:16:3e:01:02:03)"),
])
def test_override_mistakes_are_one_line(kernel, words, message):
    with pytest.raises(ConfigError) as e:
        config.load(kernel, words)
    assert str(e.value).startswith(message)


def test_disk_specs_in_xls_forms(tmp_path, kernel):
    """Key form (target last, commas and all), positional form, a list over lines, ro,
    defaults (raw, rw), a relative target against the file's directory, and xl's device
    numbers (202 << 8 | disk << 4; from the 17th disk on, 1 << 28 | disk << 8)."""
    for name in ("a.img", "b,c.img", "d.img"):
        (tmp_path / name).write_bytes(bytes(4096))
    cfg = config.load(write(tmp_path, f"""kernel = "k.elf"
disk = [ 'format=raw, vdev=xvda, access=rw, target={tmp_path}/b,c.img',
         "a.img,raw,xvdb,ro",   # a comment inside the list
         'd.img,,xvdq',
       ]
"""))
    D = config.Disk
    assert cfg.disk == [D(tmp_path / "b,c.img", "xvda", 51712, False),
                        D(tmp_path / "a.img", "xvdb", 51728, True),
                        D(tmp_path / "d.img", "xvdq", (1 << 28) | (16 << 8), False)]
    cfg = config.load(kernel, [f"disk={tmp_path}/a.img,raw,xvdc,r"])
    assert cfg.disk == [D(tmp_path / "a.img", "xvdc", 51744, True)]
    assert config.vdev_devid("xvdp") == 202 << 8 | 15 << 4
    assert config.vdev_devid("xvdaa") == (1 << 28) | (26 << 8)


def test_vif_specs_as_xl_takes_them(tmp_path, kernel):
    """mac and bridge as given (the MAC in lower case); without them, libxl's defaults: a
    MAC with Xen's OUI and a random tail below 0x80, and bridge xenbr0. Card N is vif N."""
    (tmp_path / "n.cfg").write_text(f"""kernel = "{kernel}"
vif = [ 'mac=00:16:3E:AA:BB:CC, bridge=br1',
        '' ]
""")
    cfg = config.load(tmp_path / "n.cfg", ["vif=bridge=other"])
    first, second, third = cfg.vif
    assert (first.mac, first.bridge, first.devid) == ("00:16:3e:aa:bb:cc", "br1", 0)
    assert first.mac_bytes == bytes([0, 0x16, 0x3E, 0xAA, 0xBB, 0xCC])
    assert (second.bridge, second.devid, third.bridge, third.devid) == ("xenbr0", 1, "other", 2)
    for made in (second, third):
        assert config.MAC_RE.fullmatch(made.mac), made.mac
        assert made.mac.startswith("00:16:3e:") and int(made.mac[9:11], 16) < 0x80


def test_a_read_only_image_is_refused_for_rw_but_taken_ro(tmp_path, kernel):
    image = tmp_path / "ro.img"
    image.write_bytes(bytes(512))
    image.chmod(0o444)
    import os
    if os.access(image, os.W_OK):
        pytest.skip("running as root: every file is writable")
    with pytest.raises(ConfigError) as e:
        config.load(kernel, [f"disk={image},raw,xvda"])
    assert str(e.value) == (f"{kernel}: disk = '{image},raw,xvda': target '{image}': cannot "
                            f"open it for reading and writing")
    assert config.load(kernel, [f"disk={image},raw,xvda,ro"]).disk[0].readonly


def test_a_missing_or_binary_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^/nonexistent/a\.cfg: no such file$"):
        config.load("/nonexistent/a.cfg")
    blob = tmp_path / "blob.cfg"
    blob.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match=r"blob\.cfg: neither an ELF image nor a text config"):
        config.load(blob)


def test_maxmem_above_memory_is_room_to_balloon_up(tmp_path, kernel):
    cfg = config.load(write(tmp_path, 'kernel = "k.elf"\nmemory = 16\nmaxmem = 32\n'))
    assert (cfg.memory, cfg.maxmem) == (16, 32)
