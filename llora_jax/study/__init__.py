"""Studies: a typed study spec (``spec``), its fine-tuning part (``finetune``), its analysis part
(``analysis``) and the runner that puts them together (``runner``)."""
