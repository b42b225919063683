"""`lfm2vl serve`: an OpenAI-compatible HTTP server on the continuous-batching engine (needs the `serve`
extra: FastAPI, uvicorn). See docs/serve.md."""
