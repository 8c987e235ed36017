"""Export and inference: Hugging Face (Bamba), ONNX and weight-quantized formats, plus the shared
pieces of the generation CLI.

    hf              our checkpoint <-> transformers BambaForCausalLM folder (logits parity)
    onnx_export     prefill and decode-step graphs of the reference path (torch.onnx, dynamo)
    onnx_runtime    onnxruntime sessions over those graphs and a greedy loop purely in onnxruntime
    quantize        int8 / NF4 / int4 weight-only quantization, save and load
    measure         validation tokens, perplexity, decode tokens/s, file sizes
    card            README card and resolved config written beside every export
    loading         run config, device and checkpoint resolution shared by the entrypoints
    runner          one function per format: write, measure, write the card (launch/export.py)
    textgen         streaming detokenization, stop strings and the interactive command set

Imports point down: export -> config -> model.
"""


class ExportError(RuntimeError):
    """An export or inference request that cannot be carried out; the message is one line saying why."""
