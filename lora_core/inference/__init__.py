"""Using a fine-tune: ``sampling`` (``lc.generate``: the library's own sampler and decode loop with the
model's key/value cache) and ``gguf`` (the merged model as a GGUF file llama.cpp and transformers read)."""
