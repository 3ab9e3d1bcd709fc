"""Reading and writing bytes: safetensors, source files, atomic writes, checksum lists."""
