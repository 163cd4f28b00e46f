"""Ask the demo fleet (`make run`) one question, with the base model and with its LoRA adapter.

The demo fleet serves SmolLM2-135M-Instruct as `smollm2-135m-instruct` and the pirate LoRA
adapter on it as `smollm2-pirate` (orchestrator/demo_fleet.yaml): an adapter is asked for by
its name in `model`, like any model.

    python examples/adapter.py ["your question"]
"""

import sys

from openai import OpenAI

if __name__ == "__main__":
    client = OpenAI(base_url="http://localhost:8000/v1", api_key="unused")
    question = sys.argv[1] if len(sys.argv) > 1 else "Name three French cities."
    print(f"models: {[m.id for m in client.models.list()]}")
    print(f"question: {question}")
    for model in ("smollm2-135m-instruct", "smollm2-pirate"):
        reply = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": question}],
            max_tokens=96,
            temperature=0,
        )
        print(f"{model:>22}: {reply.choices[0].message.content!r}")
