"""The Batch API through the official `openai` Python SDK, unchanged.

Run by tests/tests/e2e/batches.rs with GATEWAY_BASE_URL and GATEWAY_KEY. Uploads a file of
chats and one of embeddings, runs both batches to `completed` and checks every output line
by `custom_id`; a malformed file is refused naming its line; a cancelled batch ends
`cancelled`. Prints the ids of the batches it ran as JSON on its last line.
"""

import io
import json
import os
import sys
import time

import openai
from openai import OpenAI

CHAT = "SmolLM2-135M-Instruct"
EMBED = "all-MiniLM-L6-v2"

client = OpenAI(base_url=os.environ["GATEWAY_BASE_URL"], api_key=os.environ["GATEWAY_KEY"], max_retries=0)
checks = 0


def check(name, condition, detail=""):
    global checks
    if not condition:
        print(f"FAILED: {name} {detail}", file=sys.stderr)
        sys.exit(1)
    checks += 1
    print(f"ok: {name}", flush=True)


def jsonl(lines):
    return io.BytesIO("".join(json.dumps(l) + "\n" for l in lines).encode())


def wait(batch_id, until, limit=240):
    deadline = time.time() + limit
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in until or time.time() > deadline:
            return batch
        time.sleep(0.3)


chats = [{"custom_id": f"chat-{i}", "method": "POST", "url": "/v1/chat/completions",
          "body": {"model": CHAT, "messages": [{"role": "user", "content": f"Say the number {i}."}],
                   "max_tokens": 8, "temperature": 0}} for i in range(3)]
texts = ["a red apple", "the stock market fell", "a green pear", "interest rates rose"]
embeds = [{"custom_id": f"emb-{i}", "method": "POST", "url": "/v1/embeddings",
           "body": {"model": EMBED, "input": t}} for i, t in enumerate(texts)]

# Files: upload, retrieve, list.
chat_file = client.files.create(file=("chats.jsonl", jsonl(chats)), purpose="batch")
check("file uploaded", chat_file.id.startswith("file-") and chat_file.purpose == "batch", repr(chat_file))
check("file retrieved", client.files.retrieve(chat_file.id).bytes == chat_file.bytes)
embed_file = client.files.create(file=("embeds.jsonl", jsonl(embeds)), purpose="batch")
listed = [f.id for f in client.files.list()]
check("files listed", chat_file.id in listed and embed_file.id in listed, repr(listed))
check("file content", client.files.content(chat_file.id).text.count("\n") == 3)

# A malformed file is refused, naming its first bad line.
bad = chats[:1] + [{"custom_id": "chat-0", "method": "POST", "url": "/v1/chat/completions", "body": {"model": CHAT}}]
try:
    client.files.create(file=("bad.jsonl", jsonl(bad)), purpose="batch")
    check("malformed file refused", False, "accepted")
except openai.BadRequestError as e:
    check("malformed file refused", "line 2" in str(e) and "custom_id" in str(e), str(e))
try:
    client.batches.create(input_file_id=embed_file.id, endpoint="/v1/chat/completions", completion_window="24h")
    check("endpoint mismatch refused", False, "accepted")
except openai.BadRequestError as e:
    check("endpoint mismatch refused", "line 1" in str(e), str(e))

# Two batches run to completed.
chat_batch = client.batches.create(input_file_id=chat_file.id, endpoint="/v1/chat/completions",
                                   completion_window="24h", metadata={"job": "chats"})
check("batch created", chat_batch.status in ("validating", "in_progress") and chat_batch.request_counts.total == 3,
      repr(chat_batch))
embed_batch = client.batches.create(input_file_id=embed_file.id, endpoint="/v1/embeddings", completion_window="24h")
done = {}
for b in (chat_batch, embed_batch):
    done[b.id] = wait(b.id, ("completed", "failed", "expired", "cancelled"))
    check(f"{b.endpoint} batch completed", done[b.id].status == "completed", repr(done[b.id]))
    counts = done[b.id].request_counts
    check(f"{b.endpoint} counts", counts.completed == counts.total and counts.failed == 0, repr(counts))
check("batch listed", chat_batch.id in [b.id for b in client.batches.list()])
check("metadata kept", done[chat_batch.id].metadata == {"job": "chats"})

out = [json.loads(l) for l in client.files.content(done[chat_batch.id].output_file_id).text.splitlines()]
by_id = {o["custom_id"]: o for o in out}
check("every chat line answered once", sorted(by_id) == [f"chat-{i}" for i in range(3)] and len(out) == 3, repr(out))
for cid, o in by_id.items():
    body = o["response"]["body"]
    check(f"{cid} is a chat reply", o["response"]["status_code"] == 200 and body["object"] == "chat.completion"
          and body["choices"][0]["message"]["content"] and body["usage"]["completion_tokens"] > 0, repr(o))
out = [json.loads(l) for l in client.files.content(done[embed_batch.id].output_file_id).text.splitlines()]
vectors = {o["custom_id"]: o["response"]["body"]["data"][0]["embedding"] for o in out}
check("every embedding line answered", sorted(vectors) == [f"emb-{i}" for i in range(4)], repr(sorted(vectors)))
direct = client.embeddings.create(model=EMBED, input=texts[2]).data[0].embedding
check("batch embedding is the model's", max(abs(a - b) for a, b in zip(direct, vectors["emb-2"])) < 1e-4)
check("no error file", done[embed_batch.id].error_file_id is None)

# Cancel: a batch cancelled at once ends cancelled; lines it did not run are in its error file.
many = [{"custom_id": f"c-{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": CHAT, "messages": [{"role": "user", "content": "Count to fifty."}], "max_tokens": 64}}
        for i in range(40)]
f = client.files.create(file=("many.jsonl", jsonl(many)), purpose="batch")
b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
c = client.batches.cancel(b.id)
check("cancelling", c.status in ("cancelling", "cancelled"), repr(c))
c = wait(b.id, ("cancelled", "completed", "failed"))
check("cancelled", c.status == "cancelled" and c.cancelled_at is not None, repr(c))
errors = [json.loads(l) for l in client.files.content(c.error_file_id).text.splitlines()]
check("unrun lines in the error file", len(errors) >= 30 and all(e["error"]["code"] == "batch_cancelled" for e in errors),
      repr(errors[:2]))
check("counts add up", c.request_counts.completed + c.request_counts.failed == 40, repr(c.request_counts))

# Deleting a file.
check("file deleted", client.files.delete(f.id).deleted)
try:
    client.files.retrieve(f.id)
    check("deleted file gone", False, "found")
except openai.NotFoundError:
    check("deleted file gone", True)

print(f"{checks} checks passed")
print(json.dumps({"batches": [chat_batch.id, embed_batch.id], "files": [chat_file.id]}))
