"""LoRA itself, from the math up::

    functional   the reference formulas (the CPU path; what every fast path is tested against), merged_weight
    bases        the frozen W₀ behind one protocol (base_protocol: FrozenBase, HoldsFrozenBase): DenseBase,
                 NF4Base and NF4Linear (nf4_base; + nf4_linear, its autograd)
    fused        one autograd Function per layer (the CUDA path)
    layer        LoRALinear: holds a base and its adapter (merging: its merge / unmerge / unload); qlora:
                 QLoRALinear (an NF4 base); embedding: LoRAEmbedding, conv: LoRAConv (the same layer for
                 nn.Embedding, nn.Conv1d / nn.Conv2d)
    config       LoraConfig;  surgery: apply / merge / unmerge / unload;  adapters: PEFT-layout files
    slots        several named adapters per layer ("default" keeps the single-adapter keys); registry: which
                 adapters a model holds; multi: set / list / delete / disable / mixed batches; combine:
                 add_weighted_adapter (PEFT's combination types)

Which path a call takes is decided in ``lora_core.dispatch``.
"""
