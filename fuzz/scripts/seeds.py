#!/usr/bin/env python3
"""Writes the seed corpora under fuzz/corpus/<target>/ from the tests'
inputs. Run from the repository root: python3 fuzz/scripts/seeds.py
(rtnetlink seeds are a dump of this machine's links, addresses and routes
when run as root in a namespace; the committed ones came from a test
namespace with a veth, addresses and a default route)."""
import json, os, shutil, socket, struct, sys

ROOT = os.path.join(os.path.dirname(__file__), "..", "corpus")
KEY_A = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="
KEY_B = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="


def put(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def copy(target, name, path):
    with open(path, "rb") as f:
        put(target, name, f.read())


# wg-quick
copy("wg_quick_config", "wg0", "tunnel/tests/data/wg0.conf")
put("wg_quick_config", "full", f"""[Interface]
PrivateKey = {KEY_A}
ListenPort = 51820
Address = 10.10.0.1/24, fd10::1/64
DNS = 10.10.0.53, corp.example
MTU = 1420
FwMark = 0x51820
Table = off
PostUp = true

[Peer]
PublicKey = {KEY_B}
PresharedKey = {KEY_A}
Endpoint = [fd00:77::2]:51821
AllowedIPs = 10.10.0.2/32, fd10::2/128
PersistentKeepalive = 25
""")
put("wg_quick_config", "bad", f"[Interface]\nPrivateKey = {KEY_A}\nListenPort = 99999\n")

# rules
copy("rules", "example", "docs/examples/rules.toml")
copy("rules", "packaging", "packaging/vane.toml")

# control protocol
for i, line in enumerate([
    '{"hello":{"protocol":1,"software":"vanectl 0.1.0"}}',
    '{"id":7,"command":{"kind":"status"}}',
    '{"id":8,"command":{"kind":"on-demand","enabled":true}}',
    '{"id":9,"command":{"kind":"watch"}}',
    '{"id":1,"command":{"kind":"status","extra":1}}',
    '{"id":7,"error":{"code":"bad-request","message":"x"}}',
    '{"hello":{"protocol":1,"software":"vaned 0.1.0"}}',
]):
    put("ctl_proto", f"line{i}", line)
# The status example of docs/control.md.
with open("docs/control.md") as f:
    doc = f.read()
example = doc[doc.index("### Example"):]
example = example[example.index("```json\n") + 8:]
status = json.loads(example[:example.index("```")])
put("ctl_proto", "reply-status", json.dumps({"id": 7, "ok": {"kind": "status", "status": status}}))
put("ctl_proto", "event-status", json.dumps({"id": 9, "event": {"kind": "status", "status": status}}))

# userspace API (first byte: the piece size the bytes arrive in)
hexkey = "e84b5a6ce13d9a8d8c2c4f1c1d2b5e7a8f0e6d4c3b2a19080706050403020100"
put("uapi", "get", b"\x05get=1\n\n")
put("uapi", "set", ("\x07set=1\nprivate_key=" + hexkey + "\nlisten_port=51820\nfwmark=0\n"
                    "replace_peers=true\npublic_key=" + hexkey[::-1] + "\npreshared_key=" + hexkey +
                    "\nendpoint=[fd00::2]:51821\npersistent_keepalive_interval=25\n"
                    "replace_allowed_ips=true\nallowed_ip=10.0.0.0/24\nallowed_ip=fd00::/64\n"
                    "protocol_version=1\n\n").encode())
put("uapi", "remove", ("\x40set=1\npublic_key=" + hexkey + "\nremove=true\n"
                       "public_key=" + hexkey[::-1] + "\nupdate_only=true\nallowed_ip=-10.0.0.0/24\n\n").encode())
put("uapi", "bad", b"\x01set=1\nlisten_port=51999\nno_such_key=1\n\n")


# nl80211
def nla(kind, value):
    b = struct.pack("=HH", 4 + len(value), kind) + value
    return b + b"\0" * ((4 - len(b) % 4) % 4)


def genl(family, cmd, attrs, flags=0):
    payload = struct.pack("=BBH", cmd, 1, 0) + b"".join(attrs)
    return struct.pack("=IHHII", 16 + len(payload), family, flags, 7, 0) + payload


u32 = lambda v: struct.pack("=I", v)
put("nl80211", "interface", genl(0x1c, 7, [nla(3, u32(4)), nla(4, b"wlan0\0"), nla(1, u32(0)),
                                            nla(5, u32(2)), nla(52, b"caf\xe9 \xff\x00net")]))
ies = bytes([0, 8]) + b"HomeWifi" + bytes([1, 2, 0x82, 0x84])
bss = nla(0x8000 | 47, nla(6, ies) + nla(9, u32(1)))
put("nl80211", "scan", genl(0x1c, 34, [nla(3, u32(4)), bss]))
put("nl80211", "family", genl(0x10, 1, [nla(2, b"nl80211\0"), nla(1, struct.pack("=H", 0x1c)),
                                        nla(0x8000 | 7, nla(0x8000 | 1, nla(2, b"mlme\0") + nla(1, u32(5))))]))
put("nl80211", "error", struct.pack("=IHHII", 36, 2, 0, 7, 0) + struct.pack("=i", -19) + b"\0" * 16)
put("nl80211", "events", genl(0x1c, 46, [nla(3, u32(4))]) + genl(0x1c, 48, [nla(3, u32(4))]))

# datagram records: op, len (u16 le), bytes
def rec(op, data):
    return bytes([op]) + struct.pack("<H", len(data)) + data


def ipv4(src, dst, payload=b"hello"):
    total = 20 + len(payload)
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0, 64, 17, 0,
                    socket.inet_aton(src), socket.inet_aton(dst))
    return h + payload


def ipv6(src, dst, payload=b"hello"):
    h = struct.pack("!IHBB16s16s", 6 << 28, len(payload), 17, 64,
                    socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst))
    return h + payload


put("datagram", "allowed", rec(1, ipv4("10.0.0.2", "10.0.0.1")) + rec(1, ipv6("fd00::2", "fd00::1")))
put("datagram", "spoofed", rec(1, ipv4("10.0.0.3", "10.0.0.1")) + rec(1, b""))
put("datagram", "tamper", rec(1, ipv4("10.0.0.2", "10.0.0.1")) + rec(2, b"\0" * 20 + b"\x01"))
put("datagram", "reorder", rec(3, ipv4("10.0.0.2", "10.0.0.1")) + rec(3, ipv6("fd00::2", "fd00::1")))
put("datagram", "garbage", rec(0, b"\x01" + b"\0" * 147) + rec(0, b"\x04" + b"\0" * 31)
    + rec(0, b"\x02" + b"\0" * 91) + rec(0, b"\x03" + b"\0" * 63) + rec(0, b"\x09"))

# rtnetlink: a dump of links, addresses and routes (as root, in a netns)
if os.geteuid() == 0 and "--rtnetlink" in sys.argv:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
    s.bind((0, 0))
    for name, kind, fam in [("links", 18, 0), ("addrs", 22, 0), ("routes", 26, 0)]:
        hdr = struct.pack("=IHHII", 16 + 4 if kind != 26 else 16 + 12, kind, 0x301, 1, 0)
        body = struct.pack("=Bxxx", fam) if kind != 26 else struct.pack("=BBBBBBBBI", fam, 0, 0, 0, 0, 0, 0, 0, 0)
        s.send(hdr + body)
        i = 0
        while True:
            data = s.recv(65536)
            put("rtnetlink", f"{name}{i}", data)
            i += 1
            if struct.unpack_from("=H", data, 4)[0] in (2, 3):
                break
