"""Generation engines behind one interface: transformers here, vLLM with the runtime."""
