"""test_openai.py - the official openai Python client (PyPI, pinned in
scripts/setup.sh, venv ~/.cache/livekvq/venv-openai) against a real
livekvq-server (default model SmolLM2-135M-Instruct Q4_1, INT4 KV cache) on a
free loopback port, started with --api-key and --served-model-name.

Checks: models.list; completions (non-stream: text, usage, finish_reason;
stream: chunks concatenate to the same greedy text, usage chunk with
stream_options.include_usage, the raw SSE ends in "data: [DONE]"); stop
sequences, n, echo, seeded sampling; chat completions (non-stream and
stream, same greedy content); logprobs shape (completions and chat);
logit_bias through the client (a +100 token is all greedy decoding picks, a
-100 one never comes; ids from POST /tokenize); a wrong API key gives
openai.AuthenticationError; invalid requests give BadRequestError /
NotFoundError with the field named (an over-long stop string, a logit_bias
out of range, more sequences than the queue holds); "cache_prompt": false
gives the same text, a non-boolean one is a 400 naming it, /metrics has the
prefix cache's series; SIGTERM gives exit 0
with no sanitizer report.

Run: tests/server/run_py.sh --openai tests/server/test_openai.py with
LKQ_BUILDDIR and LKQ_MODELS set (meson test does that).
"""
import json
import math
import os
import sys
import unittest
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lkq_testsrv  # noqa: E402

try:
    import openai
except ImportError:
    lkq_testsrv.skip("the openai package is not installed in this interpreter")

API_KEY = "lkq-test-key-3f9a"
MODEL_ID = "lkq-smollm2"
PROMPT = "The capital of France is"
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
QUESTION = "What is the capital of France? Answer in one sentence."


class OpenAIClient(unittest.TestCase):
    srv = None

    @classmethod
    def setUpClass(cls):
        cls.srv = lkq_testsrv.Server(["--api-key", API_KEY, "--served-model-name", MODEL_ID])
        cls.client = openai.OpenAI(base_url=cls.srv.url + "/v1", api_key=API_KEY,
                                   max_retries=0, timeout=120.0)
        # the reference greedy completion that the other cases compare with
        cls.greedy = cls.client.completions.create(model=MODEL_ID, prompt=PROMPT,
                                                   max_tokens=8, temperature=0)

    @classmethod
    def tearDownClass(cls):
        if cls.srv and cls.srv.proc.poll() is None:
            cls.srv.stop()

    # ---- models ---------------------------------------------------------------

    def test_models_list(self):
        models = list(self.client.models.list())
        self.assertEqual([m.id for m in models], [MODEL_ID])
        self.assertEqual(models[0].object, "model")
        self.assertEqual(models[0].owned_by, "livekvquant")

    # ---- completions ----------------------------------------------------------

    def test_completion_nonstream(self):
        r = self.greedy
        self.assertEqual(r.object, "text_completion")
        self.assertEqual(r.model, MODEL_ID)
        self.assertTrue(r.id)
        self.assertEqual(len(r.choices), 1)
        c = r.choices[0]
        self.assertEqual(c.index, 0)
        self.assertIsInstance(c.text, str)
        self.assertGreater(len(c.text.strip()), 0)
        self.assertIn(c.finish_reason, ("length", "stop"))
        u = r.usage
        self.assertEqual(u.prompt_tokens, 5)  # SmolLM2's BPE: The| capital| of| France| is
        if c.finish_reason == "length":
            self.assertEqual(u.completion_tokens, 8)
        else:
            self.assertLess(u.completion_tokens, 8)
        self.assertEqual(u.total_tokens, u.prompt_tokens + u.completion_tokens)
        # a 135M instruct model knows this one; also proves the prompt got through
        self.assertIn("Paris", c.text)

    def test_completion_stream_equals_nonstream(self):
        stream = self.client.completions.create(
            model=MODEL_ID, prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True})
        text, finishes, usage, n_chunks, after_usage = "", [], None, 0, 0
        for ch in stream:
            n_chunks += 1
            if usage is not None:
                after_usage += 1
            self.assertEqual(ch.object, "text_completion")
            self.assertEqual(ch.model, MODEL_ID)
            for c in ch.choices:
                self.assertEqual(c.index, 0)
                text += c.text
                if c.finish_reason is not None:
                    finishes.append(c.finish_reason)
            if ch.usage is not None:
                usage = ch.usage
                self.assertEqual(ch.choices, [])
        self.assertGreater(n_chunks, 2, "expected token-by-token chunks")
        self.assertEqual(text, self.greedy.choices[0].text)
        self.assertEqual(finishes, [self.greedy.choices[0].finish_reason])
        self.assertIsNotNone(usage, "no usage chunk with stream_options.include_usage")
        self.assertEqual(after_usage, 0, "chunks after the usage chunk")
        self.assertEqual(usage.prompt_tokens, self.greedy.usage.prompt_tokens)
        self.assertEqual(usage.completion_tokens, self.greedy.usage.completion_tokens)
        self.assertEqual(usage.total_tokens, self.greedy.usage.total_tokens)

    def test_completion_stream_without_usage(self):
        chunks = list(self.client.completions.create(
            model=MODEL_ID, prompt=PROMPT, max_tokens=3, temperature=0, stream=True))
        self.assertTrue(chunks)
        self.assertTrue(all(ch.usage is None for ch in chunks))
        text = "".join(c.text for ch in chunks for c in ch.choices)
        # greedy: the first 3 tokens' text starts the 8-token reference
        self.assertGreater(len(text), 0)
        self.assertTrue(self.greedy.choices[0].text.startswith(text), text)

    def test_raw_sse_ends_with_done(self):
        with self.client.completions.with_streaming_response.create(
                model=MODEL_ID, prompt=PROMPT, max_tokens=3, temperature=0,
                stream=True) as resp:
            self.assertEqual(resp.status_code, 200)
            self.assertTrue(resp.headers.get("content-type", "").startswith("text/event-stream"))
            lines = [ln for ln in resp.iter_lines() if ln.strip()]
        self.assertTrue(lines)
        self.assertTrue(all(ln.startswith("data: ") for ln in lines), lines)
        self.assertEqual(lines[-1], "data: [DONE]")
        self.assertEqual(sum(ln == "data: [DONE]" for ln in lines), 1)

    def test_stop_sequence(self):
        full = self.greedy.choices[0].text
        self.assertIn(".", full, "the greedy reference text has no '.' to stop at")
        r = self.client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=8,
                                           temperature=0, stop=["."])
        self.assertEqual(r.choices[0].finish_reason, "stop")
        self.assertEqual(r.choices[0].text, full.split(".")[0])

    def test_n_and_echo(self):
        r = self.client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=3,
                                           temperature=0, n=2, echo=True)
        self.assertEqual(sorted(c.index for c in r.choices), [0, 1])
        self.assertEqual(r.choices[0].text, r.choices[1].text)
        text = r.choices[0].text
        self.assertTrue(text.startswith(PROMPT), text)
        self.assertGreater(len(text), len(PROMPT))
        self.assertTrue(self.greedy.choices[0].text.startswith(text[len(PROMPT):]), text)
        self.assertEqual(r.usage.completion_tokens, 6)

    def test_seeded_sampling_reproducible(self):
        args = dict(model=MODEL_ID, prompt="Once upon a time", max_tokens=4,
                    temperature=1.0, top_p=0.95, n=3, seed=1234)
        a = [c.text for c in sorted(self.client.completions.create(**args).choices,
                                    key=lambda c: c.index)]
        b = [c.text for c in sorted(self.client.completions.create(**args).choices,
                                    key=lambda c: c.index)]
        self.assertEqual(a, b, "the same seed gave other samples")
        self.assertGreater(len(set(a)), 1, "3 samples at temperature 1 were all equal")

    def test_completion_logprobs(self):
        r = self.client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=4,
                                           temperature=0, logprobs=3)
        c = r.choices[0]
        lp = c.logprobs
        n = r.usage.completion_tokens
        self.assertEqual(n, 4)
        self.assertEqual(len(lp.tokens), n)
        self.assertEqual(len(lp.token_logprobs), n)
        self.assertEqual(len(lp.top_logprobs), n)
        self.assertEqual(len(lp.text_offset), n)
        self.assertEqual("".join(lp.tokens), c.text)
        for i in range(n):
            x = lp.token_logprobs[i]
            self.assertTrue(math.isfinite(x) and x <= 0.0, x)
            top = lp.top_logprobs[i]
            self.assertTrue(1 <= len(top) <= 3, top)
            self.assertTrue(all(v <= 0.0 for v in top.values()))
            # greedy: the chosen token is the most likely one
            self.assertIn(lp.tokens[i], top)
            self.assertAlmostEqual(max(top.values()), x, places=4)
            self.assertAlmostEqual(top[lp.tokens[i]], x, places=4)
            if i > 0:
                self.assertEqual(lp.text_offset[i] - lp.text_offset[i - 1],
                                 len(lp.tokens[i - 1]))
        # the same numbers when streamed
        toks, lps = [], []
        for ch in self.client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=4,
                                                 temperature=0, logprobs=3, stream=True):
            for cc in ch.choices:
                if cc.logprobs is not None:
                    toks += cc.logprobs.tokens
                    lps += cc.logprobs.token_logprobs
        self.assertEqual(toks, lp.tokens)
        for a, b in zip(lps, lp.token_logprobs):
            self.assertAlmostEqual(a, b, places=4)

    # ---- chat -----------------------------------------------------------------

    def chat_messages(self):
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]

    def test_chat_nonstream_and_stream(self):
        r = self.client.chat.completions.create(model=MODEL_ID, messages=self.chat_messages(),
                                                max_tokens=10, temperature=0)
        self.assertEqual(r.object, "chat.completion")
        self.assertEqual(r.model, MODEL_ID)
        c = r.choices[0]
        self.assertEqual(c.message.role, "assistant")
        self.assertIsInstance(c.message.content, str)
        self.assertGreater(len(c.message.content.strip()), 0)
        self.assertIn(c.finish_reason, ("length", "stop"))
        self.assertIn("Paris", c.message.content)
        # the chat template wrapped the messages: more tokens than the bare text
        bare = self.client.completions.create(model=MODEL_ID, prompt=SYSTEM + QUESTION,
                                              max_tokens=1, temperature=0)
        self.assertGreater(r.usage.prompt_tokens, bare.usage.prompt_tokens + 4)
        self.assertEqual(r.usage.total_tokens,
                         r.usage.prompt_tokens + r.usage.completion_tokens)

        stream = self.client.chat.completions.create(
            model=MODEL_ID, messages=self.chat_messages(), max_tokens=10, temperature=0,
            stream=True, stream_options={"include_usage": True})
        content, roles, finishes, usage, n = "", [], [], None, 0
        for ch in stream:
            n += 1
            self.assertEqual(ch.object, "chat.completion.chunk")
            for cc in ch.choices:
                if cc.delta.role:
                    roles.append(cc.delta.role)
                content += cc.delta.content or ""
                if cc.finish_reason is not None:
                    finishes.append(cc.finish_reason)
            if ch.usage is not None:
                usage = ch.usage
        self.assertGreater(n, 2)
        self.assertEqual(roles, ["assistant"])
        self.assertEqual(content, c.message.content)
        self.assertEqual(finishes, [c.finish_reason])
        self.assertIsNotNone(usage)
        self.assertEqual(usage.prompt_tokens, r.usage.prompt_tokens)
        self.assertEqual(usage.completion_tokens, r.usage.completion_tokens)

    def test_chat_logprobs(self):
        r = self.client.chat.completions.create(model=MODEL_ID, messages=self.chat_messages(),
                                                max_tokens=4, temperature=0, logprobs=True,
                                                top_logprobs=2)
        c = r.choices[0]
        items = c.logprobs.content
        self.assertEqual(len(items), r.usage.completion_tokens)
        self.assertEqual("".join(it.token for it in items), c.message.content)
        for it in items:
            self.assertTrue(math.isfinite(it.logprob) and it.logprob <= 0.0)
            self.assertEqual(bytes(it.bytes), it.token.encode("utf-8"))
            self.assertEqual(len(it.top_logprobs), 2)
            self.assertGreaterEqual(it.top_logprobs[0].logprob, it.top_logprobs[1].logprob)
            self.assertEqual(it.top_logprobs[0].token, it.token)
            self.assertAlmostEqual(it.top_logprobs[0].logprob, it.logprob, places=4)

    # ---- logit_bias (ids from /tokenize, llama.cpp's shape) --------------------

    def tokenize(self, text):
        req = urllib.request.Request(self.srv.url + "/tokenize",
                                     data=json.dumps({"content": text}).encode(),
                                     headers={"Content-Type": "application/json",
                                              "Authorization": "Bearer " + API_KEY})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read().decode())["tokens"]

    def test_logit_bias(self):
        paris = self.tokenize(" Paris")
        self.assertEqual(len(paris), 1, paris)
        r = self.client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=3,
                                           temperature=0, logit_bias={str(paris[0]): 100})
        self.assertEqual(r.choices[0].text, " Paris" * 3)
        self.assertIn(" Paris", self.greedy.choices[0].text)
        r = self.client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=8,
                                           temperature=0, logit_bias={str(paris[0]): -100})
        self.assertNotIn(" Paris", r.choices[0].text)
        c = self.client.chat.completions.create(model=MODEL_ID, messages=self.chat_messages(),
                                                max_tokens=2, temperature=0,
                                                logit_bias={str(paris[0]): 100})
        self.assertEqual(c.choices[0].message.content, " Paris" * 2)

    # ---- errors ---------------------------------------------------------------

    def test_wrong_api_key(self):
        bad = openai.OpenAI(base_url=self.srv.url + "/v1", api_key="not-the-key",
                            max_retries=0, timeout=60.0)
        with self.assertRaises(openai.AuthenticationError) as cm:
            bad.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=2)
        self.assertEqual(cm.exception.status_code, 401)
        with self.assertRaises(openai.AuthenticationError):
            bad.chat.completions.create(model=MODEL_ID, messages=self.chat_messages(),
                                        max_tokens=2)
        with self.assertRaises(openai.AuthenticationError):
            list(bad.models.list())
        with self.assertRaises(openai.AuthenticationError):
            list(bad.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=2,
                                        stream=True))

    def test_bad_requests(self):
        with self.assertRaises(openai.BadRequestError) as cm:
            self.client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=2,
                                           temperature=5)
        self.assertEqual(cm.exception.status_code, 400)
        self.assertEqual(cm.exception.param, "temperature")
        with self.assertRaises(openai.BadRequestError) as cm:
            self.client.chat.completions.create(model=MODEL_ID, messages=self.chat_messages(),
                                                max_tokens=2, top_p=1.5, stream=True)
        self.assertEqual(cm.exception.param, "top_p")
        with self.assertRaises(openai.BadRequestError) as cm:
            self.client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=100000)
        self.assertEqual(cm.exception.code, "context_length_exceeded")
        with self.assertRaises(openai.BadRequestError) as cm:
            self.client.chat.completions.create(
                model=MODEL_ID, messages=[{"role": "robot", "content": "hi"}], max_tokens=2)
        self.assertEqual(cm.exception.param, "messages")
        with self.assertRaises(openai.NotFoundError) as cm:
            self.client.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=2)
        self.assertEqual(cm.exception.code, "model_not_found")
        with self.assertRaises(openai.BadRequestError) as cm:
            self.client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=2,
                                           stop="x" * 1000)
        self.assertEqual(cm.exception.param, "stop")
        with self.assertRaises(openai.BadRequestError) as cm:
            self.client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=2,
                                           logit_bias={"5": 101})
        self.assertEqual(cm.exception.param, "logit_bias")
        with self.assertRaises(openai.BadRequestError) as cm:  # 5 x 16 > --max-queue 64
            self.client.completions.create(model=MODEL_ID, prompt=["a", "b", "c", "d", "e"],
                                           max_tokens=2, n=16)
        self.assertEqual(cm.exception.param, "n")
        self.assertIn("--max-queue", cm.exception.message)
        # the server is still fine afterwards
        r = self.client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=2,
                                           temperature=0)
        self.assertTrue(self.greedy.choices[0].text.startswith(r.choices[0].text))

    def test_cache_prompt(self):
        # opting out of prefix reuse changes nothing in the answer
        r = self.client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=8,
                                           temperature=0, extra_body={"cache_prompt": False})
        self.assertEqual(r.choices[0].text, self.greedy.choices[0].text)
        with self.assertRaises(openai.BadRequestError) as cm:
            self.client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=2,
                                           extra_body={"cache_prompt": "no"})
        self.assertEqual(cm.exception.param, "cache_prompt")
        with urllib.request.urlopen(self.srv.url + "/metrics", timeout=30) as m:
            text = m.read().decode()
        for name in ("vllm:prefix_cache_queries_total{", "vllm:prefix_cache_hits_total{",
                     "livekvq_prefix_cache_enabled 1", "livekvq_prefix_cache_blocks ",
                     "livekvq_prefix_cache_bytes ", "livekvq_prefix_cache_evictions_total "):
            self.assertIn(name, text)

    # ---- shutdown (runs last: unittest sorts by name) -------------------------

    def test_zz_sigterm_clean_exit(self):
        self.srv.assert_clean_exit(self)


if __name__ == "__main__":
    lkq_testsrv.run_tests(__name__)
