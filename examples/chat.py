"""Talk to a running `slm serve` (e.g. `make run`) with the official OpenAI client."""

from openai import OpenAI

if __name__ == "__main__":
    client = OpenAI(base_url="http://localhost:8000/v1", api_key="unused")
    print([m.id for m in client.models.list()])
    stream = client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": "Name three French cities."}],
        max_tokens=64,
        stream=True,
    )
    for chunk in stream:
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
    print()
    vector = client.embeddings.create(model="all-minilm-l6-v2", input="hello").data[0].embedding
    print(f"embedding: {len(vector)} dims")
