"""``tledge-runtime serve``: configuration and exposure rules (``config``), the server (``server``), the
Starlette app, HTTP plumbing, micro-batching, metrics, the Open Inference Protocol and Triton's Python backend."""
