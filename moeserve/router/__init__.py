"""Router: OpenAI HTTP and gRPC front end, tokenizer, prefix index, routing, P/D orchestration."""
