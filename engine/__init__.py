"""The model code both workers share: config, Llama-family model, weights, paged KV cache, sampler,
tokenizer (torch-free) and the engine loop."""
