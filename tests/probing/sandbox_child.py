"""A child for the sandbox tests, run by `sandboxed_module`: reads one JSON request on stdin, answers one
JSON line on stdout about what the sandbox let it see and do.

    {"action": "report"}             -> environment names, TMPDIR (and its mode), niceness, limits
    {"action": "write", "bytes": n}  -> writes n bytes into TMPDIR: "ok" or the OSError
    {"action": "allocate", "bytes": n} -> allocates n bytes: "ok" or "MemoryError"
"""

from __future__ import annotations

import json
import os
import resource
import signal
import stat
import sys
import tempfile


def main() -> None:
    request = json.loads(sys.stdin.read())
    action = request["action"]
    answer: dict = {}
    if action == "report":
        tmp = tempfile.gettempdir()
        answer = {
            "env": sorted(os.environ),
            "tmp": tmp,
            "tmp_mode": stat.S_IMODE(os.stat(tmp).st_mode),
            "nice": os.getpriority(os.PRIO_PROCESS, 0),
            "limits": {
                name: resource.getrlimit(getattr(resource, name))[0]
                for name in ("RLIMIT_AS", "RLIMIT_FSIZE", "RLIMIT_NPROC")
            },
        }
        with open(os.path.join(tmp, "left-behind"), "w") as handle:
            handle.write("removed with the directory")
    elif action == "write":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
        try:
            with open(os.path.join(tempfile.gettempdir(), "big"), "wb") as handle:
                handle.write(b"\0" * request["bytes"])
            answer = {"outcome": "ok"}
        except OSError as exc:
            answer = {"outcome": f"OSError errno {exc.errno}"}
    elif action == "allocate":
        try:
            block = bytearray(request["bytes"])
            answer = {"outcome": "ok", "size": len(block)}
        except MemoryError:
            answer = {"outcome": "MemoryError"}
    print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
