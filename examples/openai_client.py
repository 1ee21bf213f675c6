"""Call a server that serves a Megatron checkpoint through the OpenAI-compatible API.

    python examples/openai_client.py --base-url http://127.0.0.1:30000/v1 --prompt "..."

The server needs a tokenizer (--tokenizer-path, or a tokenizer/ folder in the checkpoint).
"""

from __future__ import annotations

import argparse

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:30000/v1")
    parser.add_argument("--prompt", default="w17 w42 w99")
    parser.add_argument("--max-tokens", type=int, default=8)
    ns = parser.parse_args()

    client = OpenAI(base_url=ns.base_url, api_key="none")
    model = client.models.list().data[0].id
    out = client.completions.create(
        model=model,
        prompt=ns.prompt,
        max_tokens=ns.max_tokens,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    print("model:", model)
    print("completion:", out.choices[0].text)


if __name__ == "__main__":
    main()
