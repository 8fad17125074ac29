"""Runs a reply's code against a record's tests in a subprocess of its own, never in the training
process: CPU time and memory limits (resource), a wall-clock timeout after which its whole
process group is killed, no network (a network namespace of its own where the kernel allows
one, and sockets refused inside Python in any case), an empty temporary working folder and an
isolated interpreter (-I: no user site, no PYTHON* variables).

This keeps a wrong or hostile reply from hanging, flooding or reaching out of a training step;
it is not a security boundary against a determined attacker (no seccomp, same user): run code
rewards from untrusted policies on a reward server of their own (stage.alignment.reward=remote).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile

# Run first in the child, before the reply's code: its limits, then refused sockets. (Set here
# rather than in a preexec_fn, which is unsafe in a multi-threaded training process.)
PRELUDE = """\
import os as _os, resource as _resource, socket as _socket
_resource.setrlimit(_resource.RLIMIT_CPU, ({cpu}, {cpu} + 1))
_resource.setrlimit(_resource.RLIMIT_AS, ({memory}, {memory}))
_resource.setrlimit(_resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
_resource.setrlimit(_resource.RLIMIT_CORE, (0, 0))
try:  # a network namespace of its own: no interface but a down loopback
    _os.unshare(_os.CLONE_NEWUSER | _os.CLONE_NEWNET)
except (AttributeError, OSError):
    pass  # not allowed here: the refused sockets below remain
def _refused(*args, **kwargs):
    raise OSError("network access is disabled in the code sandbox")
_socket.socket = _socket.create_connection = _socket.getaddrinfo = _refused
del _os, _resource, _socket, _refused
"""
FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)


def code_of(reply: str) -> str:
    """The last fenced code block of a reply, else the whole reply."""
    blocks = FENCE.findall(reply)
    return blocks[-1] if blocks else reply


def run(code: str, tests: str, seconds: float, memory_mb: int) -> subprocess.CompletedProcess:
    """The reply's code then the tests, as one script in a sandboxed child; a child killed on
    timeout comes back with returncode -9."""
    with tempfile.TemporaryDirectory(prefix="llmtrain-sandbox-") as folder:
        script = os.path.join(folder, "main.py")
        with open(script, "w") as out:
            prelude = PRELUDE.format(cpu=max(1, int(seconds + 0.999)),
                                     memory=memory_mb * 1024 * 1024)
            out.write(prelude + "\n" + code + "\n\n" + tests + "\n")
        child = subprocess.Popen([sys.executable, "-I", "-S", script], cwd=folder,
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, env={"PATH": "/usr/bin:/bin"},
                                 start_new_session=True)
        try:
            out, err = child.communicate(timeout=seconds)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            out, err = child.communicate()
            return subprocess.CompletedProcess(child.args, -signal.SIGKILL, out, err)
        return subprocess.CompletedProcess(child.args, child.returncode, out, err)


def passes(code: str, tests: str, seconds: float, memory_mb: int) -> bool:
    return run(code, tests, seconds, memory_mb).returncode == 0
