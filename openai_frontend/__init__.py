"""An OpenAI-compatible HTTP API (/v1/models, /v1/completions, /v1/chat/completions) in front of
a running tritonserver: a light client of Triton (FastAPI, tokenizers, tritonclient), no engine."""
