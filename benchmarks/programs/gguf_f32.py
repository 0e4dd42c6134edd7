"""Rewrite the embedded Q4_1 GGUF with every tensor dequantized to float32.

llama.cpp then runs exactly our engine's weights (our float32 copy is the same
dequantization), which separates what quantized kernels buy llama.cpp from the rest.
``f32_gguf()`` writes the file once into the model cache folder and returns its path.
"""

from __future__ import annotations

from pathlib import Path

from backend.model_loader import cache_root, embedded_gguf_path

ALL_F32 = 0  # general.file_type of an all-float32 file


def f32_gguf() -> Path:
    """Path of the float32 GGUF, converting on first use (a few seconds)."""
    import gguf

    source = embedded_gguf_path()
    target = cache_root() / (source.stem + ".F32.gguf")
    if target.is_file():
        return target
    reader = gguf.GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    partial = target.with_suffix(".partial")
    writer = gguf.GGUFWriter(partial, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = ALL_F32 if name == "general.file_type" else field.contents()
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, field.types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype("float32")
        writer.add_tensor(tensor.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.rename(target)
    return target
