"""Drives a running gateway with the official `openai` Python SDK, unchanged.

Run by tests/tests/openai_sdk.rs with GATEWAY_BASE_URL, GATEWAY_KEY (may use every model)
and GATEWAY_NARROW_KEY (may use the embedding model only). Exits non-zero on any failure.
"""

import os
import sys

import openai
from openai import OpenAI

CHAT = "SmolLM2-135M-Instruct"
EMBED = "all-MiniLM-L6-v2"

base_url = os.environ["GATEWAY_BASE_URL"]
client = OpenAI(base_url=base_url, api_key=os.environ["GATEWAY_KEY"], max_retries=0)
narrow = OpenAI(base_url=base_url, api_key=os.environ["GATEWAY_NARROW_KEY"], max_retries=0)
stranger = OpenAI(base_url=base_url, api_key="sk-gw-0000000000000000-" + "0" * 38, max_retries=0)

checks = 0


def check(name, condition, detail=""):
    global checks
    if not condition:
        print(f"FAILED: {name} {detail}", file=sys.stderr)
        sys.exit(1)
    checks += 1
    print(f"ok: {name}")


def expect_error(name, error_type, status, call):
    try:
        call()
    except error_type as e:
        check(name, e.status_code == status, f"status {e.status_code}")
        body = e.body if isinstance(e.body, dict) else {}
        check(f"{name} has an OpenAI error body", "message" in body and "type" in body, repr(e.body))
        check(f"{name} has x-request-id", bool(e.response.headers.get("x-request-id")))
        return
    except Exception as e:  # noqa: BLE001 - any other type is a failure
        check(name, False, f"raised {type(e).__name__}: {e}")
    check(name, False, "no exception")


# Models: this key sees both; the narrow key only its one.
models = sorted(m.id for m in client.models.list())
check("models list", models == [CHAT, EMBED], repr(models))
check("narrow key's models", [m.id for m in narrow.models.list()] == [EMBED])

# Chat, not streamed.
reply = client.chat.completions.create(
    model=CHAT,
    messages=[{"role": "user", "content": "What is 2+2?"}],
    max_tokens=12,
    temperature=0,
)
check("chat content", "4" in reply.choices[0].message.content, repr(reply.choices[0].message.content))
check("chat usage", reply.usage.prompt_tokens > 0 and 0 < reply.usage.completion_tokens <= 12)
check("chat finish_reason", reply.choices[0].finish_reason in ("stop", "length"))

# Chat, streamed with usage.
raw = client.chat.completions.with_raw_response.create(
    model=CHAT,
    messages=[{"role": "user", "content": "Count to three."}],
    max_tokens=10,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
check("stream x-request-id", bool(raw.headers.get("x-request-id")))
text, usage, finishes, ids = "", None, 0, set()
for chunk in raw.parse():
    ids.add(chunk.id)
    if chunk.choices:
        text += chunk.choices[0].delta.content or ""
        finishes += chunk.choices[0].finish_reason is not None
    if chunk.usage is not None:
        usage = chunk.usage
check("stream text", len(text) > 0)
check("stream one finish_reason", finishes == 1)
check("stream one id", len(ids) == 1)
check("stream usage chunk", usage is not None and usage.completion_tokens > 0 and usage.prompt_tokens > 0)

# Embeddings with the SDK's default encoding (base64), and floats.
emb = client.embeddings.create(model=EMBED, input=["hello world", "bonjour le monde"])
vec = emb.data[0].embedding
check("embeddings base64 default", len(emb.data) == 2 and len(vec) == 384, str(len(vec)))
check("embeddings unit length", abs(sum(x * x for x in vec) - 1.0) < 1e-3)
floats = client.embeddings.create(model=EMBED, input="hello world", encoding_format="float")
check("embeddings float", max(abs(a - b) for a, b in zip(floats.data[0].embedding, vec)) < 1e-6)
short = client.embeddings.create(model=EMBED, input="hello world", dimensions=64)
check("embeddings dimensions", len(short.data[0].embedding) == 64)
check("embeddings usage", emb.usage.prompt_tokens > 0)

# Errors, as the SDK's exception types.
expect_error(
    "400 bad request",
    openai.BadRequestError,
    400,
    lambda: client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "x"}], n=2),
)
expect_error("401 bad key", openai.AuthenticationError, 401, lambda: stranger.models.list())
expect_error(
    "403 model not allowed",
    openai.PermissionDeniedError,
    403,
    lambda: narrow.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "x"}]),
)
expect_error(
    "404 unknown model",
    openai.NotFoundError,
    404,
    lambda: client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}]),
)
expect_error(
    "413 body too large",
    openai.APIStatusError,
    413,
    lambda: client.embeddings.create(model=EMBED, input="x" * (2 * 1024 * 1024)),
)

# 429s: a key allowed one request a minute (no retries, to see the first refusal), and a
# key with no quota left (the SDK's own retries are told not to retry: x-should-retry).
limited = OpenAI(base_url=base_url, api_key=os.environ["GATEWAY_LIMITED_KEY"], max_retries=0)
limited.embeddings.create(model=EMBED, input="one")
try:
    limited.embeddings.create(model=EMBED, input="two")
    check("429 rate limit", False, "no exception")
except openai.RateLimitError as e:
    check("429 rate limit", e.status_code == 429 and e.code == "rate_limit_exceeded", repr(e))
    retry_after = int(e.response.headers.get("retry-after", "0"))
    check("429 retry-after", 1 <= retry_after <= 120, str(retry_after))
    check("429 ratelimit headers", e.response.headers.get("x-ratelimit-limit-requests") == "1")
no_quota = OpenAI(base_url=base_url, api_key=os.environ["GATEWAY_NO_QUOTA_KEY"])
try:
    no_quota.embeddings.create(model=EMBED, input="x")
    check("429 insufficient quota", False, "no exception")
except openai.RateLimitError as e:
    check("429 insufficient quota", e.code == "insufficient_quota", repr(e))

print(f"{checks} checks passed")
