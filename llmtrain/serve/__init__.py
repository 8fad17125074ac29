"""An HTTP server for Megatron-Core checkpoints: OpenAI's completions and chat APIs and
Megatron-LM's `PUT /api`, requests from every client batched together (docs/generate_serve.md).
`python -m llmtrain.serve load=...`; the client: `python -m llmtrain.serve.client host:port`."""
