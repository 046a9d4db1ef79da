"""Makes the embedding fixtures the worker's tests compare against: sentence-transformers'
vectors for all-MiniLM-L6-v2 on a varied set of sentences, from the same model folder.

    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install sentence-transformers
    /tmp/ref/bin/python scripts/reference/minilm_fixtures.py models/all-MiniLM-L6-v2 \
        > inference-worker/tests/fixtures/minilm_reference.json
"""

import json
import sys

from sentence_transformers import SentenceTransformer

SENTENCES = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the street corner.",
    "The stock market fell sharply after the announcement.",
    "Photosynthesis converts light energy into chemical energy.",
    "She scored the winning goal in the final minute.",
    "Please reset my password; I cannot log in.",
    "The recipe needs two cups of flour and one egg.",
    "It will rain tomorrow afternoon in the north.",
    "Quantum computers use qubits instead of bits.",
    "The year 2024 had 366 days; 1234567890 and 3.14159.",
    "Café, naïve, résumé, Ångström, straße, Zürich.",
    "Emoji: 😀🚀🎉 and flags 🇫🇷🇯🇵.",
    "def add(a, b):\n    return a + b  # sum",
    "中文测试：你好，世界。",
    "日本語のテキストです。",
    "한국어 문장입니다.",
    "Ελληνικά και русский текст.",
    "Runs   of    spaces\n\n\nand\t\ttabs",
    "URLs like https://example.com/a?b=1&c=2 and e-mail a.b@c.org",
    "JSON: {\"key\": [1, 2, 3], \"nested\": {\"a\": null}}",
    "$$\\int_0^1 x^2 \\, dx = \\frac{1}{3}$$",
    "a",
    "?",
    "UPPER CASE SENTENCE WITH SHOUTING.",
    "lower case sentence without punctuation",
    "The cat sat on the mat.",
    "The feline rested on the rug.",
    "Dogs are loyal companions.",
    "Interest rates rose by a quarter of a point.",
    "The central bank raised borrowing costs.",
    "My laptop will not turn on after the update.",
    "The printer keeps jamming on page two.",
    "Heavy snow closed the mountain pass overnight.",
    "A heatwave is expected across the south this weekend.",
    "The marathon runner crossed the line in record time.",
    "The chess champion resigned after forty moves.",
    "Glaciers are retreating faster than predicted.",
    "The novel was translated into thirty languages.",
    "Don't forget to water the plants while I'm away!",
    "Is this the right way to the train station?",
    "Wow... that's, like, totally unexpected!!!",
    "Numbers: 1st, 2nd, 3rd, 4th; 10%, $5.99, €3,50.",
    "C'est la vie, mon ami.",
    "Das Wetter ist heute schön.",
    "¿Dónde está la biblioteca?",
    "The mitochondria is the powerhouse of the cell.",
    "SELECT name FROM users WHERE id = 42;",
    "<html><body><p>Hello</p></body></html>",
    "Tokens like unbelievable, antidisestablishmentarianism and pneumonoultramicroscopic.",
    "I love this product. I love this product. I love this product.",
    " ".join(["This long paragraph repeats a sentence about the sea and the sky."] * 12),
    " ".join(f"word{i}" for i in range(400)),
    "The committee postponed the vote until the next session because several members "
    "were absent and the budget figures had not yet been checked by the auditors.",
    "After the storm the village gathered in the square to count the damage, share food "
    "and plan how to rebuild the bridge that connected them to the market town.",
]


def main():
    model = SentenceTransformer(sys.argv[1], device="cpu")
    vectors = model.encode(SENTENCES, batch_size=16, normalize_embeddings=False)
    cases = [
        {"text": text, "embedding": [round(float(x), 8) for x in vector]}
        for text, vector in zip(SENTENCES, vectors)
    ]
    json.dump({"model": "all-MiniLM-L6-v2", "cases": cases}, sys.stdout, ensure_ascii=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
