"""Native Qwen-VL: config, vision tower, decoder and checkpoint loading."""
