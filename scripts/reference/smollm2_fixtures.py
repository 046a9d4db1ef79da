"""Makes the reference fixtures the worker's tests compare against, from llama.cpp (as
packaged by llama-cpp-python) and Python Jinja2, on the same GGUF file.

    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install llama-cpp-python==0.3.36 jinja2
    /tmp/ref/bin/python scripts/reference/smollm2_fixtures.py models/SmolLM2-135M-Instruct.Q4_1.gguf \
        > inference-worker/tests/fixtures/smollm2_reference.json

For another quantisation of the same weights, only the greedy completions and the file's
SHA-256 (the file from scripts/requantize.sh; llama-cpp-python may run on the libllama that
scripts/llama-cpp.sh built, installed with CMAKE_ARGS=-DLLAMA_BUILD=OFF and run with
LLAMA_CPP_LIB_PATH=target/llama.cpp/build/bin):

    /tmp/ref/bin/python scripts/reference/smollm2_fixtures.py --greedy-only \
        models/derived/SmolLM2-135M-Instruct.Q4_K_M.gguf \
        > inference-worker/tests/fixtures/smollm2_q4_k_m_reference.json
"""

import hashlib
import os

import json
import sys

import jinja2
import numpy as np
from llama_cpp import Llama

GREEDY_TOKENS = 24

TEXTS = [
    "Hello, world!",
    "The year 2024 had 366 days; 1234567890 and 3.14159.",
    "Café, naïve, résumé, Ångström, straße, Zürich.",
    "Emoji: 😀🚀🎉 and flags 🇫🇷🇯🇵 and a family 👨‍👩‍👧.",
    "def add(a, b):\n    return a + b  # sum\n\tprint(add(1, 2))",
    "中文测试：你好，世界。日本語のテキスト。한국어 문장.",
    "Runs   of    spaces\n\n\nand\t\ttabs  \n  end   ",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "Mixed <|endoftext|> special tokens and <|im_end|> inside text.",
    "URLs like https://example.com/a?b=1&c=2 and e-mail a.b@c.org",
    "Ünïcödé ñ ç ø å ß œ æ and Ελληνικά and русский текст.",
    "   leading spaces and trailing newline\n",
    "JSON: {\"key\": [1, 2, 3], \"nested\": {\"a\": null, \"b\": true}}",
    "$$\\int_0^1 x^2 \\, dx = \\frac{1}{3}$$",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ],
]

GREEDY_PROMPTS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Write a sentence about cats."}],
    [{"role": "user", "content": "List three primary colours."}],
    [{"role": "user", "content": "Explain what a CPU does in one sentence."}],
    [{"role": "user", "content": "Translate 'good morning' into French."}],
    [{"role": "user", "content": "Give me a tip for learning to cook."}],
    [{"role": "user", "content": "What is the capital of Japan?"}],
    [{"role": "user", "content": "Describe the ocean in two sentences."}],
    [{"role": "user", "content": "Write a haiku about autumn leaves."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "How do I reverse a list in Python?"}],
    [{"role": "user", "content": "Name three planets of the solar system."}],
]


def main(path, greedy_only=False):
    # One token per decode: the batched kernels llama.cpp picks for this CPU (AMX) crash
    # under some hypervisors; per-token decoding gives the same logits.
    llm = Llama(model_path=path, n_ctx=512, n_threads=2, n_batch=1, n_ubatch=1, logits_all=True, verbose=False)
    template = llm.metadata["tokenizer.chat_template"]
    env = jinja2.Environment()
    tmpl = env.from_string(template)

    def render(messages):
        return tmpl.render(messages=messages, add_generation_prompt=True, bos_token="<|im_start|>", eos_token="<|im_end|>")

    def tokenize(text):
        return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    tokens = [{"text": t, "ids": tokenize(t)} for t in TEXTS]
    renders = [{"messages": m, "prompt": render(m)} for m in CONVERSATIONS]
    greedy = []
    eos = llm.token_eos()
    for messages in GREEDY_PROMPTS:
        prompt_ids = tokenize(render(messages))
        out, margins = [], []
        llm.reset()
        llm.eval(prompt_ids)
        while len(out) < GREEDY_TOKENS:
            scores = np.array(llm.scores[llm.n_tokens - 1])
            first, second = np.argsort(-scores)[:2]
            # How far the greedy choice led the runner-up: a small margin means a rounding
            # difference between implementations can legitimately flip the choice.
            margins.append(round(float(scores[first] - scores[second]), 4))
            tok = int(first)
            if tok == eos:
                break
            out.append(tok)
            llm.eval([tok])
        text = llm.detokenize(out).decode("utf-8", errors="replace")
        greedy.append(
            {"messages": messages, "prompt_ids": prompt_ids, "ids": out, "text": text, "margins": margins}
        )
    name = os.path.basename(path)
    if greedy_only:
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        out = {"source": f"llama-cpp-python 0.3.36 on {name}", "sha256": digest,
               "greedy": greedy}
    else:
        out = {"source": f"llama-cpp-python 0.3.36 and Jinja2 on {name}", "tokens": tokens,
               "renders": renders, "greedy": greedy}
    json.dump(
        out,
        sys.stdout,
        ensure_ascii=False,
        indent=1,
    )
    print()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--greedy-only"]
    main(args[0], greedy_only="--greedy-only" in sys.argv[1:])
