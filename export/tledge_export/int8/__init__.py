"""int8: the QDQ quantizer (``quantize``), the int8 step of an export (``step``), sensitivity ranking,
accuracy-aware search and quantization-aware training (``qat``, ``qat_fold``)."""
