"""Facts about the LongCat-Video DiT: the key map, dimensions, BSA presets."""
