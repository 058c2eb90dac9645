"""The worker: DeepSeek engine, KV cache, scheduler, runner, KV transfer and gRPC server."""
