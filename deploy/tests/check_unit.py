#!/usr/bin/env python3
"""Checks that deploy/systemd/cardvault.service carries every setting the
deployment docs promise (systemd-analyze verify only proves it loads).
Usage: check_unit.py UNIT"""
import sys

unit = {}
section = None
for raw in open(sys.argv[1], encoding="utf-8"):
    line = raw.strip()
    if not line or line.startswith(("#", ";")):
        continue
    if line.startswith("["):
        section = line.strip("[]")
        continue
    k, _, v = line.partition("=")
    unit.setdefault((section, k.strip()), []).append(v.strip())

want = {
    ("Service", "Type"): "simple",
    ("Service", "User"): "cardvault",
    ("Service", "ExecStart"): "/usr/local/bin/cardvault serve --config /etc/cardvault/cardvault.toml",
    ("Service", "ExecReload"): "/bin/kill -HUP $MAINPID",
    ("Service", "NoNewPrivileges"): "yes",
    ("Service", "ProtectSystem"): "strict",
    ("Service", "ReadWritePaths"): "/var/lib/cardvault",
    ("Service", "PrivateTmp"): "yes",
    ("Service", "PrivateDevices"): "yes",
    ("Service", "ProtectHome"): "yes",
    ("Service", "ProtectKernelTunables"): "yes",
    ("Service", "ProtectKernelModules"): "yes",
    ("Service", "ProtectKernelLogs"): "yes",
    ("Service", "ProtectControlGroups"): "yes",
    ("Service", "RestrictAddressFamilies"): "AF_INET AF_INET6 AF_UNIX",
    ("Service", "RestrictNamespaces"): "yes",
    ("Service", "LockPersonality"): "yes",
    ("Service", "MemoryDenyWriteExecute"): "yes",
    ("Service", "LimitCORE"): "0",
    ("Service", "CapabilityBoundingSet"): "CAP_IPC_LOCK",
    ("Service", "AmbientCapabilities"): "CAP_IPC_LOCK",
    ("Service", "LimitMEMLOCK"): "infinity",
    ("Service", "MemorySwapMax"): "0",
    ("Service", "SystemCallFilter"): "@system-service",
    ("Service", "UMask"): "0077",
    ("Service", "KillSignal"): "SIGTERM",
    ("Service", "TimeoutStopSec"): "30",
    ("Install", "WantedBy"): "multi-user.target",
}
errors = []
for key, val in want.items():
    got = unit.get(key)
    if got is None:
        errors.append(f"missing {key[0]}.{key[1]}={val}")
    elif got[-1] != val:
        errors.append(f"{key[0]}.{key[1]} is {got[-1]!r}, want {val!r}")
if unit.get(("Service", "Type"), [""])[-1] == "notify":
    errors.append("Type=notify: the binary does not call sd_notify")
for e in errors:
    print("unit:", e)
if errors:
    sys.exit(1)
print(f"unit: {len(want)} required settings present")
