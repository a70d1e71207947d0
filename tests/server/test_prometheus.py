"""test_prometheus.py - a real Prometheus server (Debian package
`prometheus`) scrapes a real livekvq-server every second; the test queries
Prometheus' HTTP API (/api/v1/query) the way a dashboard or an alert would.

Both run on free loopback ports; Prometheus gets a generated config and a
temporary TSDB directory. The KV gauges (bytes held, saved, bits per
element) and the EMA series (livekvq_kv_ema_{lo,hi,width}{layer,tensor})
describe the sequences running at scrape time (metrics.c: the EMA is the
mean over running sequences; the series are absent when none runs), so the
test keeps one long streaming completion running until Prometheus has
scraped it (it polls Prometheus, no fixed sleeps), checks every value of
that one scrape, then drops the stream (client disconnect) and checks that
Prometheus sees the request cancelled and the KV memory given back.

The server protects /metrics with --metrics-key; Prometheus scrapes with
that key as a Bearer credential (`authorization` in its config), and a
scrape without it gets 401 while /health stays open.

Small cache knobs (--chunk-size 32 --block-tokens 16) so that a ~120-token
prompt is prefilled in several chunks (2 warm-up chunks, then clipped EMA
updates) and lands in INT4 blocks quickly, also under ASan.

Standard library only (system python3). Skips (77) without prometheus, the
server binary or the model.
"""
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.error
import urllib.parse
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lkq_testsrv  # noqa: E402

N_LAYERS = 30  # SmolLM2-135M
SCRAPE_S = 1
DEADLINE_S = 90  # the whole wait for a scrape of the running stream (ASan, loaded machine)
METRICS_KEY = "scrape-secret-42"


def http_json(url, body=None, timeout=30):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data,
                                 headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read().decode())


class Prometheus:
    """A prometheus child process scraping target (host:port) every second."""

    def __init__(self, target, key=None):
        self.binary = shutil.which("prometheus") or (
            "/usr/bin/prometheus" if os.access("/usr/bin/prometheus", os.X_OK) else None)
        if not self.binary:
            lkq_testsrv.skip("no prometheus binary (apt-get install prometheus; scripts/setup.sh)")
        self.dir = tempfile.mkdtemp(prefix="lkq-prom-")
        cfg = os.path.join(self.dir, "prometheus.yml")
        with open(cfg, "w") as f:
            f.write("global:\n"
                    "  scrape_interval: %ds\n"
                    "  scrape_timeout: %ds\n"
                    "  evaluation_interval: %ds\n"
                    "scrape_configs:\n"
                    "  - job_name: livekvq\n"
                    "    metrics_path: /metrics\n"
                    "    static_configs:\n"
                    "      - targets: ['%s']\n" % (SCRAPE_S, SCRAPE_S, SCRAPE_S, target))
            if key:
                f.write("    authorization:\n"
                        "      type: Bearer\n"
                        "      credentials: %s\n" % key)
        self.log = open(os.path.join(self.dir, "prometheus.log"), "w")
        for attempt in range(3):
            self.port = lkq_testsrv.free_port()
            self.url = "http://127.0.0.1:%d" % self.port
            self.proc = subprocess.Popen(
                [self.binary, "--config.file=" + cfg,
                 "--storage.tsdb.path=" + os.path.join(self.dir, "tsdb"),
                 "--web.listen-address=127.0.0.1:%d" % self.port, "--log.level=warn"],
                stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL)
            if self._wait_ready(60):
                return
            self.proc.kill()
            self.proc.wait()
        raise RuntimeError("prometheus did not become ready: " + self.log_text()[-2000:])

    def _wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False  # e.g. the port was taken meanwhile
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return True
            except OSError:
                pass
            time.sleep(0.2)
        return False

    def log_text(self):
        self.log.flush()
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def query(self, q, at=None):
        """Instant query; returns the result vector as [(labels, value)]."""
        params = {"query": q}
        if at is not None:
            params["time"] = "%.3f" % at
        r = http_json(self.url + "/api/v1/query?" + urllib.parse.urlencode(params))
        if r.get("status") != "success":
            raise AssertionError("query %r failed: %r" % (q, r))
        res = r["data"]["result"]
        if r["data"]["resultType"] == "scalar":
            return [({}, float(res[1]))]
        return [(s["metric"], float(s["value"][1]), float(s["value"][0])) for s in res]

    def value(self, q, at=None):
        """The single value of an instant query, or None when empty."""
        res = self.query(q, at)
        if not res:
            return None
        if len(res) != 1:
            raise AssertionError("query %r: %d series, expected one" % (q, len(res)))
        return res[0][1]

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class Streamer(threading.Thread):
    """One streaming completion read line by line until it ends or stop is
    set; then the connection is closed (the server must cancel it)."""

    def __init__(self, url, prompt, max_tokens):
        super().__init__(daemon=True)
        self.url, self.prompt, self.max_tokens = url, prompt, max_tokens
        self.stop = threading.Event()
        self.first_token = threading.Event()
        self.t_first = None  # wall-clock time of the first token
        self.chunks = 0
        self.done = False
        self.error = None

    def run(self):
        body = {"prompt": self.prompt, "max_tokens": self.max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True}
        req = urllib.request.Request(self.url + "/v1/completions",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                for line in r:
                    if line.startswith(b"data: {"):
                        self.chunks += 1
                        if self.t_first is None:
                            self.t_first = time.time()
                        self.first_token.set()
                    elif line.startswith(b"data: [DONE]"):
                        self.done = True
                    if self.stop.is_set():
                        break
        except Exception as e:  # reported by the test
            self.error = e
        self.first_token.set()


class PrometheusScrape(unittest.TestCase):
    srv = None
    prom = None

    @classmethod
    def setUpClass(cls):
        cls.srv = lkq_testsrv.Server(["--kv-cache", "int4", "--chunk-size", "32",
                                      "--block-tokens", "16", "--metrics-key", METRICS_KEY])
        try:
            cls.prom = Prometheus("127.0.0.1:%d" % cls.srv.port, METRICS_KEY)
        except BaseException:
            cls.srv.stop()
            raise
        with open(lkq_testsrv.shared_file("data/moby-dick.txt"), errors="replace") as f:
            text = f.read()
        cls.prompt = text[30000:30500]  # about 120 tokens: 4 chunks of 32

    @classmethod
    def tearDownClass(cls):
        if cls.prom:
            cls.prom.stop()
        if cls.srv and cls.srv.proc.poll() is None:
            cls.srv.stop()

    def wait_for(self, what, fn, timeout):
        """Polls fn() (truthy = done) every 0.25 s; fails after timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = fn()
            if v:
                return v
            time.sleep(0.25)
        self.fail("timed out after %.0f s waiting for %s; prometheus log: %s"
                  % (timeout, what, self.prom.log_text()[-1500:]))

    def test_scrapes(self):
        p, s = self.prom, self.srv
        job = '{job="livekvq"}'
        # 1. the target is up (Prometheus parsed our exposition format)
        self.wait_for("up == 1", lambda: p.value("up" + job) == 1.0, 30)
        targets = http_json(p.url + "/api/v1/targets")["data"]["activeTargets"]
        self.assertEqual(len(targets), 1)
        self.assertEqual(targets[0]["health"], "up", targets[0])
        self.assertEqual(targets[0]["lastError"], "")
        # without the key /metrics is refused; /health needs none
        with self.assertRaises(urllib.error.HTTPError) as cm:
            urllib.request.urlopen(s.url + "/metrics", timeout=30)
        self.assertEqual(cm.exception.code, 401)
        self.assertEqual(http_json(s.url + "/health")["status"], "ok")

        # 2. a couple of short requests, then one long stream kept running
        for _ in range(2):
            r = http_json(s.url + "/v1/completions",
                          {"prompt": "The capital of France is", "max_tokens": 4,
                           "temperature": 0})
            self.assertEqual(r["usage"]["completion_tokens"], 4)
        http_json(s.url + "/v1/chat/completions",
                  {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        st = Streamer(s.url, self.prompt, 1500)
        st.start()
        try:
            self.check_running_scrape(st)
        finally:
            st.stop.set()
            st.join(120)
        self.assertIsNone(st.error)
        self.assertFalse(st.done, "the stream ended before it was dropped")

        # 3. the dropped stream is cancelled and its KV memory given back
        self.wait_for("the cancelled request and an empty KV cache",
                      lambda: (p.value('livekvq_requests_finished_total{reason="cancelled"}')
                               or 0) >= 1 and p.value("livekvq_kv_bytes_held") == 0
                      and p.value("livekvq_requests_running") == 0, 60)
        self.assertEqual(p.value("livekvq_kv_saved_bytes"), 0)
        self.assertEqual(p.value('livekvq_kv_blocks_used{kind="int4"}'), 0)
        # EMA series are absent while no sequence runs (stale in Prometheus)...
        self.assertEqual(p.query("livekvq_kv_ema_lo"), [])
        # ...but a range query still has what they were
        self.assertEqual(len(p.query("max_over_time(livekvq_kv_ema_width[5m])")),
                         2 * N_LAYERS)
        self.assertGreater(p.value("max_over_time(livekvq_kv_saved_bytes[5m])"), 0)

        # 4. counters and histograms as PromQL uses them
        self.assertGreaterEqual(
            p.value('livekvq_requests_total{endpoint="/v1/completions",code="200"}'), 3)
        self.assertGreaterEqual(
            p.value('livekvq_requests_total{endpoint="/v1/chat/completions",code="200"}'), 1)
        self.assertGreater(p.value("increase(livekvq_generation_tokens_total[5m])"), 0)
        ttft = p.value("histogram_quantile(0.5, "
                       "sum by (le) (rate(livekvq_time_to_first_token_seconds_bucket[5m])))")
        self.assertTrue(ttft is not None and math.isfinite(ttft) and ttft > 0, ttft)
        self.assertGreaterEqual(p.value("livekvq_time_to_first_token_seconds_count"), 4)
        self.assertEqual(p.value("up" + job), 1.0)

    def check_running_scrape(self, st):
        """Waits for a scrape taken while the stream ran with INT4 blocks,
        then checks every KV and EMA series of that one scrape."""
        p = self.prom
        st.first_token.wait(DEADLINE_S)
        self.assertIsNone(st.error)
        self.assertGreater(st.chunks, 0, "no token from the stream")

        def int4_scrape():
            if st.error or st.done:
                self.fail("the stream ended early (%r, done=%s)" % (st.error, st.done))
            # the sample time of the latest scrape that saw INT4 blocks in use;
            # every series of that scrape is then read at that time
            # (one taken after the prompt was prefilled: after the first token).
            # timestamp() gives the sample time only of a plain selector.
            sel = 'livekvq_kv_blocks_used{kind="int4"}'
            ts = p.value("timestamp(%s)" % sel)
            if ts is None or ts <= st.t_first:
                return None
            return ts if (p.value(sel, ts) or 0) > 0 else None

        at = self.wait_for("a scrape of the running stream with INT4 blocks", int4_scrape,
                           DEADLINE_S)

        def v(q):
            x = p.value(q, at)
            self.assertIsNotNone(x, "no value for %s at %.3f" % (q, at))
            self.assertTrue(math.isfinite(x), "%s = %r" % (q, x))
            return x

        self.assertEqual(v('up{job="livekvq"}'), 1.0)
        self.assertGreaterEqual(v("livekvq_requests_running"), 1)
        self.assertGreaterEqual(v('vllm:num_requests_running{model_name!=""}'), 1)
        fp16_eq = v("livekvq_kv_fp16_equivalent_bytes")
        held = v("livekvq_kv_bytes_held")
        saved = v("livekvq_kv_saved_bytes")
        tokens = v("livekvq_kv_tokens")
        self.assertGreater(tokens, 100)  # the whole prompt is in
        # SmolLM2: 30 layers x 2 tensors x 3 KV heads x 64 channels x 2 bytes a token
        self.assertEqual(fp16_eq, tokens * N_LAYERS * 2 * 3 * 64 * 2)
        self.assertGreater(saved, 0, "no bytes saved while INT4 blocks are in use")
        self.assertLess(saved, fp16_eq)
        self.assertEqual(saved, fp16_eq - held)
        self.assertAlmostEqual(v("sum(livekvq_kv_bytes)"), held, delta=0.5)
        self.assertAlmostEqual(v("livekvq_kv_saved_ratio"), saved / fp16_eq, places=9)
        bits = v("livekvq_kv_bits_per_element")
        self.assertTrue(4.0 < bits < 16.0, bits)
        self.assertAlmostEqual(bits, held * 8 / (fp16_eq / 2), delta=1e-6)
        self.assertGreater(v('livekvq_kv_bytes{kind="int4"}'), 0)
        self.assertGreater(v('livekvq_kv_bytes{kind="scales"}'), 0)
        # by layer kind: SmolLM2 has global layers only, so the global
        # figures are the totals and the window ones are zero
        self.assertEqual(v('livekvq_kv_layer_bytes_held{layer_kind="global"}'), held)
        self.assertEqual(v('livekvq_kv_layer_bytes_held{layer_kind="window"}'), 0)
        self.assertAlmostEqual(v('sum(livekvq_kv_layer_bytes{layer_kind="global"})'), held,
                               delta=0.5)
        self.assertAlmostEqual(v('livekvq_kv_layer_bits_per_element{layer_kind="global"}'), bits,
                               delta=1e-9)
        self.assertEqual(v('livekvq_kv_layer_tokens{layer_kind="global"}'), tokens)
        self.assertEqual(v('livekvq_kv_layer_count{layer_kind="global"}'), N_LAYERS)
        self.assertEqual(v('livekvq_kv_layer_count{layer_kind="window"}'), 0)
        self.assertEqual(v('livekvq_kv_layer_mode_info{layer_kind="global",kv_cache="int4"}'), 1)
        self.assertEqual(v('livekvq_kv_layer_mode_info{layer_kind="window",kv_cache="fp16"}'), 1)
        self.assertEqual(v('livekvq_kv_layer_blocks_used{layer_kind="global",kind="int4"}'),
                         v('livekvq_kv_blocks_used{kind="int4"}'))
        usage = v('vllm:kv_cache_usage_perc{model_name!=""}')
        self.assertTrue(0 < usage <= 1, usage)
        self.assertAlmostEqual(usage, v("livekvq_kv_usage_ratio"), places=9)
        ratio = v("livekvq_kv_outlier_ratio")
        self.assertTrue(0 <= ratio < 0.1, ratio)
        # EMA: every (layer, tensor) has lo < hi, width = hi - lo, sane size
        series = {}
        for name in ("lo", "hi", "width"):
            for m, val, _ in p.query("livekvq_kv_ema_" + name, at):
                self.assertEqual(m.get("job"), "livekvq")
                series.setdefault((int(m["layer"]), m["tensor"]), {})[name] = val
        self.assertEqual(sorted(series), [(l, t) for l in range(N_LAYERS) for t in "kv"])
        for key, d in series.items():
            self.assertEqual(len(d), 3, key)
            self.assertTrue(all(math.isfinite(x) and abs(x) < 1e4 for x in d.values()), d)
            self.assertLess(d["lo"], d["hi"], key)
            self.assertAlmostEqual(d["width"], d["hi"] - d["lo"], delta=1e-4 * (1 + d["width"]))
        # the same identity checked inside Prometheus (label matching)
        self.assertEqual(p.query("abs(livekvq_kv_ema_width - (livekvq_kv_ema_hi - "
                                 "livekvq_kv_ema_lo)) > 0.001", at), [])
        self.assertEqual(len(p.query("livekvq_kv_ema_width > 0", at)), 2 * N_LAYERS)

    def test_zz_sigterm_clean_exit(self):
        self.srv.assert_clean_exit(self)


if __name__ == "__main__":
    lkq_testsrv.run_tests(__name__)
