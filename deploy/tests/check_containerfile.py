#!/usr/bin/env python3
"""Structural checks of deploy/Containerfile that hadolint does not make:
the stages, the build command, the runtime user, entrypoint, command,
volume and port the deployment docs rely on. Usage: check_containerfile.py FILE"""
import json
import re
import sys

path = sys.argv[1]
lines = []
buf = ""
for raw in open(path, encoding="utf-8"):
    line = raw.rstrip("\n")
    if not buf and (not line.strip() or line.lstrip().startswith("#")):
        continue
    if line.endswith("\\"):
        buf += line[:-1] + " "
        continue
    lines.append((buf + line).strip())
    buf = ""

args = {}
stages = []  # [(base, name, [instructions])]
for line in lines:
    instr, _, rest = line.partition(" ")
    instr = instr.upper()
    if instr == "ARG" and not stages:
        k, _, v = rest.partition("=")
        args[k.strip()] = v.strip()
        continue
    if instr == "FROM":
        m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?$", rest.strip(), re.I)
        base = re.sub(r"\$\{(\w+)\}", lambda mm: args.get(mm.group(1), ""), m.group(1))
        stages.append((base, m.group(2), []))
        continue
    stages[-1][2].append((instr, rest.strip()))

errors = []


def need(cond, msg):
    if not cond:
        errors.append(msg)


need(len(stages) >= 2, "expected a multi-stage build")
builder, final = stages[0], stages[-1]
need(re.search(r"(^|/)rust:1-bookworm$", builder[0]) is not None,
     f"builder must be rust:1-bookworm, got {builder[0]}")
need(any(i == "RUN" and "cargo build --release --locked" in r for i, r in builder[2]),
     "builder must run `cargo build --release --locked`")
need(re.search(r"(^|/)(debian:bookworm-slim|distroless/cc[\w.-]*(:\S+)?)$", final[0]) is not None,
     f"runtime must be debian:bookworm-slim or distroless/cc, got {final[0]}")
fin = final[2]


def last(kind):
    vals = [r for i, r in fin if i == kind]
    return vals[-1] if vals else None


copies = [r for i, r in fin if i == "COPY"]
need(len(copies) == 1 and "--from=" + (builder[1] or "0") in copies[0]
     and copies[0].endswith("/usr/local/bin/cardvault"),
     f"runtime stage must copy only the cardvault binary from the builder: {copies}")
need(not any(i == "ADD" for i, _ in fin), "no ADD in the runtime stage")
user = last("USER") or ""
need(user.split(":")[0] in ("10001",), f"runtime USER must be uid 10001, got {user!r}")
need(last("EXPOSE") == "7443", f"EXPOSE must be 7443, got {last('EXPOSE')!r}")
vol = last("VOLUME") or ""
vols = json.loads(vol) if vol.startswith("[") else vol.split()
need(vols == ["/var/lib/cardvault"], f"VOLUME must be /var/lib/cardvault, got {vol!r}")
need(json.loads(last("ENTRYPOINT") or "null") == ["/usr/local/bin/cardvault"],
     "ENTRYPOINT must be [\"/usr/local/bin/cardvault\"] (exec form)")
need(json.loads(last("CMD") or "null") == ["serve", "--config", "/etc/cardvault/cardvault.toml"],
     "CMD must be [\"serve\",\"--config\",\"/etc/cardvault/cardvault.toml\"] (exec form)")
ignore = open(path + ".dockerignore", encoding="utf-8").read().split()
need("target" in ignore and ".git" in ignore, "Containerfile.dockerignore must exclude target and .git")

for e in errors:
    print("containerfile:", e)
if errors:
    sys.exit(1)
print(f"containerfile: {len(stages)} stages, builder {builder[0]}, runtime {final[0]}, user {user}: ok")
