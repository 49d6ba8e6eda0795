"""deploy/bin/lorax-router-wait and deploy/bin/phishard-prestop against a real `phishard serve` of
the embedded tiny model, with a fake router that records its arguments and signals. Part of
check_deploy.py (configure() is called with the binary before the tests run)."""

import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
import unittest

_BIN = None
_REPO = None

FAKE_ROUTER = """#!/usr/bin/env bash
trap 'echo TERM >> "$FAKE_DIR/router-events"; exit 7' TERM
printf '%s\\n' "$@" > "$FAKE_DIR/router-args.tmp"
mv "$FAKE_DIR/router-args.tmp" "$FAKE_DIR/router-args"
while :; do sleep 0.1; done
"""


def configure(binary, repo):
    global _BIN, _REPO
    _BIN, _REPO = binary, repo


def wait_for(pred, timeout_s, what):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


class ScriptsTest(unittest.TestCase):
    def setUp(self):
        if not _BIN or not os.access(_BIN, os.X_OK):
            self.fail(f"phishard binary '{_BIN}' not found: build the `phishard` target first")
        # Short path: a unix socket path has at most 107 bytes.
        self.dir = tempfile.mkdtemp(prefix="phd-")
        self.prefix = os.path.join(self.dir, "sock", "lorax-server")
        os.mkdir(os.path.dirname(self.prefix))
        self.marker = self.prefix + ".router-active"
        # A Hugging Face cache whose acme/tiny resolves to the embedded model.
        repo = os.path.join(self.dir, "hub", "models--acme--tiny")
        os.makedirs(os.path.join(repo, "refs"))
        os.makedirs(os.path.join(repo, "snapshots"))
        self.snapshot = os.path.join(repo, "snapshots", "0123abcd")
        os.symlink(os.path.join(_REPO, "models", "tiny-phi-code"), self.snapshot)
        with open(os.path.join(repo, "refs", "main"), "w") as f:
            f.write("0123abcd\n")
        self.router = os.path.join(self.dir, "fake-router")
        with open(self.router, "w") as f:
            f.write(FAKE_ROUTER)
        os.chmod(self.router, 0o755)
        self.env = dict(os.environ, PHISHARD_UDS_PATH=self.prefix, POLL_INTERVAL_S="0.1",
                        LORAX_ROUTER=self.router, PHISHARD=_BIN, FAKE_DIR=self.dir,
                        HUGGINGFACE_HUB_CACHE=os.path.join(self.dir, "hub"),
                        SHARD_WAIT_TIMEOUT_S="60")
        self.procs = []

    def tearDown(self):
        # Each process leads its own group: the wrapper's router child goes with it, and no
        # orphan keeps a stderr pipe open.
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.communicate(timeout=10)
        subprocess.run(["rm", "-rf", self.dir], check=False)

    def start(self, argv, **kw):
        p = subprocess.Popen(argv, env=self.env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def start_shard(self):
        shard = self.start([_BIN, "serve", "acme/tiny", "--uds-path", self.prefix])
        wait_for(lambda: os.path.exists(self.prefix + "-0") and shard.poll() is None, 30,
                 "the shard's socket")
        return shard

    def wrapper(self):
        return self.start([os.path.join(_REPO, "deploy", "bin", "lorax-router-wait"),
                           "--port", "3000", "--tokenizer-name", "acme/tiny"])

    def wait_router(self, w, shard):
        try:
            wait_for(lambda: self.router_args() is not None, 20, "the router to start")
        except AssertionError:
            for p in (w, shard):
                os.killpg(p.pid, signal.SIGKILL)
            raise AssertionError(f"router not started; wrapper: {w.communicate(timeout=10)[1]}\n"
                                 f"shard: {shard.communicate(timeout=10)[1]}")

    def router_args(self):
        path = os.path.join(self.dir, "router-args")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return f.read().split("\n")[:-1]

    def test_router_waits_for_a_serving_shard_and_follows_its_restarts(self):
        w = self.wrapper()
        # A leftover socket file nobody listens on (a shard killed with SIGKILL) is not enough.
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(self.prefix + "-0")
        stale.close()
        time.sleep(0.8)
        self.assertIsNone(w.poll())
        self.assertIsNone(self.router_args(), "router started before any shard served")

        shard = self.start_shard()
        self.wait_router(w, shard)
        self.assertEqual(self.router_args(),
                         ["--port", "3000", "--tokenizer-name", self.snapshot,
                          "--master-shard-uds-path", self.prefix + "-0"])
        self.assertTrue(os.path.exists(self.marker))

        # The shard dies and comes back: the router must go (it would skip Warmup).
        shard.kill()
        shard.wait()
        self.start_shard()
        self.assertEqual(w.wait(timeout=20), 1)
        with open(os.path.join(self.dir, "router-events")) as f:
            self.assertIn("TERM", f.read())
        self.assertFalse(os.path.exists(self.marker))

        # A new wrapper starts a router again; SIGTERM reaches the router, whose status is kept.
        os.remove(os.path.join(self.dir, "router-args"))
        w2 = self.wrapper()
        wait_for(lambda: self.router_args() is not None, 20, "the second router to start")
        w2.send_signal(signal.SIGTERM)
        self.assertEqual(w2.wait(timeout=20), 7)
        self.assertFalse(os.path.exists(self.marker))

    def test_router_waits_for_every_rank(self):
        self.env["NUM_SHARD"] = "2"
        self.start_shard()  # rank 0 only
        w = self.wrapper()
        time.sleep(1.0)
        self.assertIsNone(w.poll())
        self.assertIsNone(self.router_args(), "router started with rank 1 missing")
        w.send_signal(signal.SIGTERM)
        self.assertEqual(w.wait(timeout=10), 0)

    def test_wrapper_rejects_bad_settings(self):
        for key, value in (("NUM_SHARD", "0"), ("PHISHARD_UDS_PATH", "/nonexistent/x/s"),
                           ("LORAX_ROUTER", "/nonexistent/router")):
            with self.subTest(**{key: value}):
                env = dict(self.env, **{key: value})
                r = subprocess.run([os.path.join(_REPO, "deploy", "bin", "lorax-router-wait")],
                                   env=env, capture_output=True, text=True, timeout=10)
                self.assertEqual(r.returncode, 1)
                self.assertIn(key, r.stderr)

    def test_prestop_waits_for_the_router_marker(self):
        prestop = os.path.join(_REPO, "deploy", "bin", "phishard-prestop")
        t0 = time.monotonic()
        subprocess.run([prestop], env=self.env, check=True, timeout=10)
        self.assertLess(time.monotonic() - t0, 1.0, "no router marker: return at once")

        open(self.marker, "w").close()
        threading.Timer(1.5, os.remove, [self.marker]).start()
        t0 = time.monotonic()
        subprocess.run([prestop], env=self.env, check=True, timeout=10)
        self.assertGreaterEqual(time.monotonic() - t0, 1.4, "returned while the router ran")

        open(self.marker, "w").close()  # a router killed with SIGKILL leaves it behind
        t0 = time.monotonic()
        r = subprocess.run([prestop], env=dict(self.env, PRESTOP_TIMEOUT_S="1"),
                           capture_output=True, text=True, timeout=10)
        self.assertEqual(r.returncode, 0)
        self.assertLess(time.monotonic() - t0, 3.0)
        self.assertIn("still marked active", r.stderr)
