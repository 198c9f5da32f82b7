"""Fine-tuning: dataset files to batches (``data``), arguments, and the ``sft`` recipe."""
