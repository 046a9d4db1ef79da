"""Drives a running gateway with the official `openai` Python SDK, unchanged.

Run by tests/tests/openai_sdk.rs with GATEWAY_BASE_URL, GATEWAY_KEY (may use every model)
and GATEWAY_NARROW_KEY (may use the embedding model only). Exits non-zero on any failure.
"""

import json
import os
import sys
from typing import Literal

import openai
from openai import OpenAI
from pydantic import BaseModel, Field

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

# Structured output: any JSON object, and a Pydantic model parsed by the SDK.
reply = client.chat.completions.create(
    model=CHAT,
    messages=[{"role": "user", "content": "Describe a cat."}],
    response_format={"type": "json_object"},
    max_tokens=200,
)
try:
    obj = json.loads(reply.choices[0].message.content)
    check("json_object parses", isinstance(obj, dict), repr(obj))
except ValueError as e:
    check("json_object parses", False, f"{e}: {reply.choices[0].message.content!r}")


class Pet(BaseModel):
    name: str = Field(max_length=20)
    species: Literal["cat", "dog", "bird"]
    age: int = Field(ge=0, le=30)


parsed = client.chat.completions.parse(
    model=CHAT,
    messages=[{"role": "user", "content": "Describe a pet."}],
    response_format=Pet,
    temperature=0.7,
    seed=1,
)
pet = parsed.choices[0].message.parsed
check("parse returns the Pydantic model", isinstance(pet, Pet), repr(parsed.choices[0].message.content))

# Tools: a named choice and `required`, whole and streamed; then the tool's result answered.
weather = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
question = [{"role": "user", "content": "What is the weather in Paris?"}]
named = client.chat.completions.create(
    model=CHAT,
    messages=question,
    tools=[weather],
    tool_choice={"type": "function", "function": {"name": "get_weather"}},
)
calls = named.choices[0].message.tool_calls or []
check("named tool call", len(calls) == 1 and calls[0].function.name == "get_weather", repr(named.choices[0].message))
check("tool call id", calls[0].id.startswith("call_") and calls[0].type == "function")
check("tool finish_reason", named.choices[0].finish_reason == "tool_calls")
args = json.loads(calls[0].function.arguments)
check("tool arguments valid", set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit"), repr(args))
# Bounded: sampled at temperature 1, a call may otherwise run to the context's end; the
# grammar closes the call before the budget runs out.
required = client.chat.completions.create(model=CHAT, messages=question, tools=[weather], tool_choice="required",
                                          max_tokens=256)
check("required tool call", bool(required.choices[0].message.tool_calls))

streamed = {}
finish = None
for chunk in client.chat.completions.create(
    model=CHAT, messages=question, tools=[weather], tool_choice="required", stream=True, parallel_tool_calls=False
):
    if not chunk.choices:
        continue
    choice = chunk.choices[0]
    finish = choice.finish_reason or finish
    for d in choice.delta.tool_calls or []:
        entry = streamed.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
        if d.id:
            entry["id"] = d.id
        if d.function and d.function.name:
            entry["name"] += d.function.name
        if d.function and d.function.arguments:
            entry["arguments"] += d.function.arguments
check("streamed tool call assembled", len(streamed) == 1 and streamed[0]["name"] == "get_weather", repr(streamed))
check("streamed tool call id", (streamed[0]["id"] or "").startswith("call_"))
check("streamed arguments parse", set(json.loads(streamed[0]["arguments"])) == {"city", "unit"})
check("streamed finish_reason", finish == "tool_calls", repr(finish))

answered = client.chat.completions.create(
    model=CHAT,
    messages=question
    + [
        named.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": calls[0].id, "content": '{"temperature": 21, "sky": "clear"}'},
    ],
    tools=[weather],
    tool_choice="none",
    max_tokens=40,
)
check("tool result answered", bool(answered.choices[0].message.content), repr(answered.choices[0].message))

labelled = client.chat.completions.create(
    model=CHAT, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, metadata={"purpose": "sdk-check"}, user="u-1"
)
check("labels accepted (metadata, user)", labelled.usage.completion_tokens > 0)

# Log probabilities, and n choices with their usage summed.
lp = client.chat.completions.create(
    model=CHAT, messages=[{"role": "user", "content": "Name a colour."}], logprobs=True, top_logprobs=3, max_tokens=6
)
entries = lp.choices[0].logprobs.content
check("logprobs per token", len(entries) == lp.usage.completion_tokens, f"{len(entries)} {lp.usage}")
check("top_logprobs 3", all(len(e.top_logprobs) == 3 and e.logprob <= 0 for e in entries))
three = client.chat.completions.create(
    model=CHAT, messages=[{"role": "user", "content": "Name a colour."}], n=3, max_tokens=8, logprobs=True, seed=5
)
check("n=3 choices", [c.index for c in three.choices] == [0, 1, 2])
check(
    "n=3 usage summed",
    three.usage.completion_tokens == sum(len(c.logprobs.content) for c in three.choices),
    repr(three.usage),
)

# Legacy completions, Responses and model retrieval. Each call's request id and the usage
# the SDK reported are written to GATEWAY_USAGE_OUT for the test to compare with the ledger.
reported = []


def note(raw, usage_in, usage_out):
    reported.append({"request_id": raw.headers.get("x-request-id"), "prompt": usage_in, "completion": usage_out})


raw = client.completions.with_raw_response.create(model=CHAT, prompt="Once upon a time", max_tokens=8, temperature=0)
comp = raw.parse()
note(raw, comp.usage.prompt_tokens, comp.usage.completion_tokens)
check("completion text", len(comp.choices[0].text) > 0 and comp.object == "text_completion", repr(comp))
check("completion usage", comp.usage.completion_tokens == 8 and comp.choices[0].finish_reason == "length", repr(comp.usage))

raw = client.completions.with_raw_response.create(
    model=CHAT, prompt=["The sea is", "The sky is"], n=2, max_tokens=4, logprobs=2, seed=3
)
many = raw.parse()
note(raw, many.usage.prompt_tokens, many.usage.completion_tokens)
check("completions: 2 prompts x n=2", sorted(c.index for c in many.choices) == [0, 1, 2, 3], repr(many.choices))
check(
    "completion logprobs",
    all(len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) and len(c.logprobs.top_logprobs[0]) <= 2 for c in many.choices),
)
check(
    "completions usage summed",
    many.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in many.choices),
    repr(many.usage),
)
echo = client.completions.create(model=CHAT, prompt="Hello there", max_tokens=3, echo=True, temperature=0)
check("completion echo", echo.choices[0].text.startswith("Hello there"), repr(echo.choices[0].text))

raw = client.completions.with_raw_response.create(
    model=CHAT, prompt="Count: one, two,", max_tokens=6, stream=True, stream_options={"include_usage": True}
)
text, usage = "", None
for chunk in raw.parse():
    if chunk.choices:
        text += chunk.choices[0].text
    if chunk.usage:
        usage = chunk.usage
note(raw, usage.prompt_tokens, usage.completion_tokens)
# Sampled: the model may end before max_tokens; the usage chunk counts what it sent.
check("completion stream", len(text) > 0 and 1 <= usage.completion_tokens <= 6, repr((text, usage)))

raw = client.responses.with_raw_response.create(
    model=CHAT, instructions="Answer briefly.", input="What is the capital of France?", max_output_tokens=24, temperature=0
)
resp = raw.parse()
note(raw, resp.usage.input_tokens, resp.usage.output_tokens)
check("responses output_text", len(resp.output_text) > 0 and resp.id.startswith("resp_"), repr(resp.output))
check("responses usage", resp.usage.output_tokens > 0 and resp.usage.input_tokens > 0, repr(resp.usage))


class Capital(BaseModel):
    city: str = Field(max_length=30)
    country: str = Field(max_length=30)


parsed = client.responses.parse(
    model=CHAT, input=[{"role": "user", "content": "Name a capital city."}], text_format=Capital, temperature=0.5
)
check("responses.parse", isinstance(parsed.output_parsed, Capital), repr(parsed.output_text))

fn = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city.",
    "parameters": weather["function"]["parameters"],
    "strict": True,
}
raw = client.responses.with_raw_response.create(
    model=CHAT, input="What is the weather in Paris?", tools=[fn], tool_choice="required", parallel_tool_calls=False
)
called = raw.parse()
note(raw, called.usage.input_tokens, called.usage.output_tokens)
calls = [o for o in called.output if o.type == "function_call"]
check("responses function call", len(calls) == 1 and calls[0].name == "get_weather", repr(called.output))
check("responses call arguments", set(json.loads(calls[0].arguments)) == {"city", "unit"}, calls[0].arguments)
answer = client.responses.create(
    model=CHAT,
    input=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"type": "function_call", "call_id": calls[0].call_id, "name": calls[0].name, "arguments": calls[0].arguments},
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"temperature": 21}'},
    ],
    tools=[fn],
    tool_choice="none",
    max_output_tokens=30,
)
check("responses answers a function result", len(answer.output_text) > 0, repr(answer.output))

raw = client.responses.with_raw_response.create(model=CHAT, input="Write a haiku about rain.", max_output_tokens=20, stream=True)
kinds, deltas, final = [], "", None
for event in raw.parse():
    kinds.append(event.type)
    if event.type == "response.output_text.delta":
        deltas += event.delta
    if event.type in ("response.completed", "response.incomplete"):
        final = event.response
note(raw, final.usage.input_tokens, final.usage.output_tokens)
check("responses stream events", kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] in ("response.completed", "response.incomplete"), repr(kinds))
check("responses stream text", deltas == final.output_text and len(deltas) > 0, repr((deltas, final.output_text)))
check(
    "responses stream usage",
    (final.status, final.usage.output_tokens == 20) in (("incomplete", True), ("completed", False))
    and 0 < final.usage.output_tokens <= 20,
    repr((final.status, final.usage)),
)

raw = client.responses.with_raw_response.create(
    model=CHAT, input="What is the weather in Oslo?", tools=[fn], tool_choice="required", stream=True, parallel_tool_calls=False
)
args, done_args, final = "", None, None
for event in raw.parse():
    if event.type == "response.function_call_arguments.delta":
        args += event.delta
    if event.type == "response.function_call_arguments.done":
        done_args = event.arguments
    if event.type == "response.completed":
        final = event.response
note(raw, final.usage.input_tokens, final.usage.output_tokens)
check("responses streamed call", args == done_args and set(json.loads(args)) == {"city", "unit"}, repr(args))

expect_error(
    "responses store refused",
    openai.BadRequestError,
    400,
    lambda: client.responses.create(model=CHAT, input="x", store=True),
)
expect_error(
    "responses previous_response_id refused",
    openai.BadRequestError,
    400,
    lambda: client.responses.create(model=CHAT, input="x", previous_response_id="resp_123"),
)

model = client.models.retrieve(CHAT)
check("models.retrieve", model.id == CHAT and getattr(model, "context_length", 0) > 0 and getattr(model, "kind", "") == "chat", repr(model))
check("models.retrieve embedding", getattr(client.models.retrieve(EMBED), "kind", "") == "embedding")
expect_error("models.retrieve unknown", openai.NotFoundError, 404, lambda: client.models.retrieve("no-such-model"))
expect_error("models.retrieve not allowed", openai.NotFoundError, 404, lambda: narrow.models.retrieve(CHAT))

with open(os.environ["GATEWAY_USAGE_OUT"], "w") as out:
    json.dump(reported, out)

# Errors, as the SDK's exception types.
expect_error(
    "400 bad request",
    openai.BadRequestError,
    400,
    lambda: client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "x"}], n=9),
)
expect_error(
    "400 unknown field",
    openai.BadRequestError,
    400,
    lambda: client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "x"}], extra_body={"frobnicate": 1}
    ),
)
try:
    client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "x"}], extra_body={"frobnicate": 1})
except openai.BadRequestError as e:
    check("unknown field named", e.param == "frobnicate" and "frobnicate" in str(e), repr(e.body))
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
