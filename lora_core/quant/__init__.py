"""Quantized weight formats: NF4 (``nf4``: the container, quantize / dequantize and their references;
``nf4_codes``: the 16 codes and their packing, two per byte; ``nf4_lookup``: the CPU dequantize),
bitsandbytes' conventions (``bnb``: state-dict layout, the 8-bit nested map) and quantized checkpoints
(``checkpoint``). Plain tensors in, plain tensors out: nothing here knows about LoRA."""
