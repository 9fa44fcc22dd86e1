"""The model code both workers share: config, Llama-family model, weights, paged KV cache, sampler,
tokenizer (torch-free) and the engine loop, plus what both worker processes run around it: the
engine thread (``engine_thread``) and the HTTP serving scaffold (``serving``)."""
