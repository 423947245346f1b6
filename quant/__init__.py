"""INT4 quantization of expert weights (see issue: quantizer)."""
