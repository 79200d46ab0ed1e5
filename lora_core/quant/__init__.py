"""Quantized weight formats: NF4 (``nf4``: the container, quantize / dequantize and their references),
bitsandbytes' conventions (``bnb``: state-dict layout, the 8-bit nested map) and quantized checkpoints
(``checkpoint``). Plain tensors in, plain tensors out: nothing here knows about LoRA."""
