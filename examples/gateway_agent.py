"""Example agent "writer": talks to a model through the sidecar's gateway, as any SDK would,
and keeps the answers in the vault.

It reads OPENAI_BASE_URL and OPENAI_API_KEY like the official clients do (`openai.OpenAI()`
would work unchanged). The key it holds is a placeholder: the sidecar swaps in the real one.
"""

from __future__ import annotations

import base64
import os

import httpx2

import sdk
from examples._loop import every


def main() -> None:
    base_url, api_key = os.environ["OPENAI_BASE_URL"], os.environ["OPENAI_API_KEY"]
    runtime = os.environ["SOMA_RUNTIME"]
    with sdk.Client.from_env() as soma, httpx2.Client(timeout=60, trust_env=False) as http:

        def ask(n: int) -> None:
            question = f"Summarise claim number {n} in one line"
            reply = http.post(
                f"{base_url}/chat/completions",
                headers={"Authorization": f"Bearer {api_key}"},
                json={"model": "example", "messages": [{"role": "user", "content": question}]},
            )
            reply.raise_for_status()
            answer = reply.json()["choices"][0]["message"]["content"]
            soma.call(
                "vault.store",
                {
                    "key": f"answer-{n:04d}",
                    "data": base64.b64encode(answer.encode()).decode(),
                    "metadata": {"question": question},
                    "embedding": [float(n % 3), float(n % 5), 1.0],
                },
            )
            similar = soma.call("similarity.search", {"vector": [1.0, 1.0, 1.0], "k": 2})
            print(
                f"{runtime}: model said {answer!r}; stored answer-{n:04d}; "
                f"closest so far {[m['key'] for m in similar['matches']]}",
                flush=True,
            )

        every(float(os.environ.get("WRITER_INTERVAL", "4")), ask)


if __name__ == "__main__":
    main()
