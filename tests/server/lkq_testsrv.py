"""lkq_testsrv.py - helpers shared by the Python "real consumer" tests of
livekvq-server (test_openai.py, test_prometheus.py): where the server binary,
the model and the data are (from the meson test environment), free loopback
ports, and a server process that is started on port 0, waited for through
its one "listening on" stdout line, and stopped with SIGTERM, which must give
exit status 0 and no sanitizer report (the ASan build runs these tests too).

Standard library only. Exit status 77 means "skipped" to meson.
"""
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest

SKIP = 77
MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SANITIZER_RE = re.compile(r"ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:")


def skip(why):
    """Prints why and exits with meson's skip status."""
    print("SKIP: " + why, flush=True)
    sys.exit(SKIP)


def server_binary():
    """Path of livekvq-server in $LKQ_BUILDDIR; skips when absent."""
    build = os.environ.get("LKQ_BUILDDIR")
    if not build:
        skip("LKQ_BUILDDIR is not set (run through meson test)")
    path = os.path.join(build, "livekvq-server")
    if not os.access(path, os.X_OK):
        skip("no server binary at " + path)
    return path


def default_model():
    """Path of the default model ($LKQ_MODELS, then ~/.cache/livekvq); skips
    when absent."""
    cands = []
    if os.environ.get("LKQ_MODELS"):
        cands.append(os.path.join(os.environ["LKQ_MODELS"], MODEL_NAME))
    cands.append(os.path.join(os.path.expanduser("~/.cache/livekvq"), MODEL_NAME))
    for c in cands:
        if os.access(c, os.R_OK):
            return c
    skip("no default model (" + MODEL_NAME + "); run scripts/setup.sh")


def shared_file(rel):
    """A file under $LKQ_SHARED (default ../shared next to the source tree)."""
    root = os.environ.get("LKQ_SHARED") or os.path.join(
        os.environ.get("LKQ_SRCDIR", "."), "..", "shared")
    return os.path.join(root, rel)


def free_port():
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sanitizer_report(text):
    """The first line of an ASan/LSan/UBSan report in text, or None."""
    for line in text.splitlines():
        if SANITIZER_RE.search(line):
            return line
    return None


class Server:
    """A livekvq-server child process on 127.0.0.1, port chosen by the
    server (--port 0). Its stderr goes to a temporary file (read on stop)."""

    def __init__(self, extra_args=(), start_timeout=120.0):
        self.binary = server_binary()
        self.model = default_model()
        self.err = tempfile.NamedTemporaryFile(prefix="lkq-srv-", suffix=".log", delete=False)
        env = dict(os.environ)
        env.pop("LKQ_API_KEY", None)
        args = [self.binary, "-m", self.model, "--host", "127.0.0.1", "--port", "0",
                "-t", "2", "--max-seqs", "4", "-c", "2048"] + list(extra_args)
        self.args = args
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.err,
                                     stdin=subprocess.DEVNULL, env=env)
        self.url = self._wait_listening(start_timeout)
        self.port = int(self.url.rsplit(":", 1)[1])

    def _wait_listening(self, timeout):
        deadline = time.monotonic() + timeout
        buf = b""
        fd = self.proc.stdout.fileno()
        while time.monotonic() < deadline:
            r, _, _ = select.select([fd], [], [], 0.2)
            if r:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                buf += chunk
                m = re.search(rb"livekvq-server: listening on (http://[0-9.]+:[0-9]+)\n", buf)
                if m:
                    return m.group(1).decode()
            elif self.proc.poll() is not None:
                break
        rc = self.proc.poll()
        self.proc.kill()
        self.proc.wait()
        raise RuntimeError("livekvq-server did not come up (exit %s, stdout %r): %s"
                           % (rc, buf[-300:], self.stderr_text()[-2000:]))

    def stderr_text(self):
        """The server's stderr so far."""
        with open(self.err.name, "r", errors="replace") as f:
            return f.read()

    def stop(self, timeout=60.0):
        """SIGTERM, wait; returns (exit status, stderr text). Kills the
        process (status None) when it does not exit in time."""
        rc = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                rc = None
        else:
            rc = self.proc.returncode
        self.proc.stdout.close()
        text = self.stderr_text()
        self.err.close()
        os.unlink(self.err.name)
        return rc, text

    def assert_clean_exit(self, tc):
        """Stops the server and asserts (on unittest.TestCase tc) a graceful
        exit 0 with no sanitizer report."""
        rc, text = self.stop()
        rep = sanitizer_report(text)
        tc.assertIsNone(rep, "sanitizer report in the server's stderr: %s\n%s"
                        % (rep, text[-4000:]))
        tc.assertEqual(rc, 0, "livekvq-server exit status after SIGTERM (None = hung): %s"
                       % text[-2000:])


class _TimedResult(unittest.TextTestResult):
    """Prints each case's wall time after its verdict."""

    def startTest(self, test):
        self._t0 = time.monotonic()
        super().startTest(test)

    def stopTest(self, test):
        super().stopTest(test)
        self.stream.write("    (%.2f s)\n" % (time.monotonic() - self._t0))
        self.stream.flush()


def run_tests(module_name):
    """Runs the unittest cases of a module verbosely; exit status 0 when all
    pass, 1 otherwise; prints one closing 'N passed, N failed' line."""
    suite = unittest.defaultTestLoader.loadTestsFromModule(sys.modules[module_name])
    t0 = time.monotonic()
    res = unittest.TextTestRunner(verbosity=2, stream=sys.stdout,
                                  resultclass=_TimedResult).run(suite)
    bad = len(res.failures) + len(res.errors)
    print("%s: %.1f s" % (module_name, time.monotonic() - t0))
    print("%d passed, %d failed" % (max(0, res.testsRun - bad - len(res.skipped)), bad))
    sys.exit(0 if bad == 0 else 1)
